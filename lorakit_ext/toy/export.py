"""Put the toy model where the WebUI finds checkpoints: the weights plus a ``.yaml`` of the same name beside them.

The WebUI reads a checkpoint's architecture from that yaml; its text folder (tokenizer files and the text
model's config) is written as an absolute path into this package, so the WebUI builds the text encoder from it
without a download and then loads every weight from the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from lorakit_ext.errors import LorakitError, writable_folder
from lorakit_ext.formats.safetensors_io import write_atomic
from lorakit_ext.toy.model import CHECKPOINT_NAME, CHECKPOINT_PATH, CONFIG_PATH, read_config


def export_checkpoint(to_dir: Path, name: str = CHECKPOINT_NAME) -> Path:
    """Copy the checkpoint into ``to_dir`` with its yaml beside it; returns the checkpoint's new path."""
    from omegaconf import OmegaConf

    if not CHECKPOINT_PATH.is_file():
        raise LorakitError(f"toy model weights {CHECKPOINT_PATH} are missing (run python -m lorakit_ext.toy.pretrain)")
    writable_folder(to_dir, "--to")
    target = to_dir / name
    config = OmegaConf.to_yaml(OmegaConf.create(read_config(CONFIG_PATH)))
    with open(CHECKPOINT_PATH, "rb") as source:
        write_atomic(target, iter(lambda: source.read(1 << 20), b""))
    write_atomic(target.with_suffix(".yaml"), [config.encode()])
    return target
