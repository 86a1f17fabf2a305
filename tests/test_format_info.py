"""The ``info`` verb through the CLI router: JSON on stdout, exit 2 and one line on stderr for a broken file."""

from __future__ import annotations

import hashlib
import json

import safetensors.torch
import torch

from lorakit_ext.cli import main
from lorakit_ext.formats import kohya, safetensors_io
from lorakit_ext.networks.weights import ModuleWeights, NetworkWeights

ATTN2_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
TE_FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def write_network(path) -> dict[str, str]:
    generator = torch.Generator().manual_seed(0)
    weights = NetworkWeights(
        {
            ATTN2_K: ModuleWeights({"lora_down.weight": torch.randn(8, 768, generator=generator), "lora_up.weight": torch.randn(320, 8, generator=generator)}, 4.0),
            TE_FC1: ModuleWeights({"lora_down.weight": torch.randn(128, 768, generator=generator), "lora_up.weight": torch.randn(3072, 128, generator=generator)}, None),
        }
    )  # fmt: skip
    return kohya.save_network(path, weights, metadata={"ss_sd_model_name": "v1-5.safetensors"})


def run_info(path, capsys) -> tuple[int, str, str]:
    code = main(["info", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_info_json(tmp_path, capsys):
    path = tmp_path / "net.safetensors"
    written = write_network(path)
    code, out, err = run_info(path, capsys)
    assert code == 0 and err == ""
    info = json.loads(out)
    assert info["file"] == str(path)
    assert info["size_bytes"] == path.stat().st_size
    assert info["arch"] == "sd1"
    assert info["modules"] == {"total": 2, "te": 1, "unet": 1}
    assert info["algorithms"] == {"lora": {"linear": 2}}
    assert info["ranks"] == {"lora": [8, 128]} and info["alphas"] == {"lora": [4.0]} and info["alpha_missing"] == 1
    assert info["parameters"] == 8 * 768 + 320 * 8 + 128 * 768 + 3072 * 128
    assert info["metadata"] == written
    hashes = info["hashes"]
    assert hashes["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert hashes["model_hash"] == written["sshs_model_hash"] == hashes["stored"]["sshs_model_hash"]
    assert hashes["short_hash"] == written["sshs_model_hash"][:12]
    assert hashes["legacy_hash"] == written["sshs_legacy_hash"] and hashes["mismatch"] is False


def test_info_flags_hashes_that_no_longer_match(tmp_path, capsys):
    path = tmp_path / "edited.safetensors"
    written = write_network(path)
    tensors = safetensors.torch.load_file(path)
    tensors[f"{ATTN2_K}.lora_up.weight"] *= 2  # edited after writing, stored hashes kept
    safetensors_io.save_tensors_atomic(path, tensors, written)
    code, out, _ = run_info(path, capsys)
    hashes = json.loads(out)["hashes"]
    assert code == 0 and hashes["mismatch"] is True
    assert hashes["model_hash"] != hashes["stored"]["sshs_model_hash"]


def test_info_broken_file_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "broken.safetensors"
    write_network(path)
    path.write_bytes(path.read_bytes()[:-1000])
    code, out, err = run_info(path, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert str(path) in err and "truncated" in err
