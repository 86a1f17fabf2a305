"""``python -m lorakit_ext info FILE``: what a network file holds, and whether its stored hashes are true, as JSON."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from lorakit_ext.formats import kohya, safetensors_io


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a .safetensors network file (.pt/.ckpt are read without unpickling)")


def run(args: argparse.Namespace) -> int:
    print(json.dumps(file_info(args.file), indent=2))
    return 0


def file_info(path: Path) -> dict:
    """``describe_network`` plus the file's size and its hashes recomputed next to the stored ones.

    ``hashes.mismatch`` is true when the stored ``sshs_model_hash`` is not the hash of the tensor bytes (the file
    was edited after it was written); the legacy hash is recomputed as kohya does, on the tensors with only the
    ``ss_*`` metadata.
    """
    weights = kohya.load_network(path)
    description = kohya.describe_network(weights)
    stored = description.pop("hashes")
    hashes: dict = {"stored": stored, "sha256": safetensors_io.file_sha256(path)}
    if safetensors_io.is_safetensors(path):
        model_hash = safetensors_io.file_model_hash(path)
        hashes["model_hash"] = model_hash
        hashes["short_hash"] = safetensors_io.lora_short_hash(model_hash)
        hashes["legacy_hash"] = _kohya_legacy_hash(path, weights.metadata)
        hashes["mismatch"] = any(
            stored.get(key, value) != value
            for key, value in (("sshs_model_hash", model_hash), ("sshs_legacy_hash", hashes["legacy_hash"]))
        )
    return {"file": str(path), "size_bytes": os.path.getsize(path), **description, "hashes": hashes}


def _kohya_legacy_hash(path: Path, metadata: dict[str, str]) -> str:
    """``sshs_legacy_hash`` of the file's own tensors and ``ss_*`` metadata (the file's bytes, re-serialised)."""
    tensors = safetensors_io.load_tensors(path)
    ss_metadata = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    return safetensors_io.TensorLayout(tensors).legacy_hash(ss_metadata)
