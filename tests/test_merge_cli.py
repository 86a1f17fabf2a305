"""The merge verbs end to end on small files: JSON summary on stdout, files that load, one-line errors, no debris."""

import json

import pytest
import safetensors.torch
import torch

from lorakit_ext.cli import main
from lorakit_ext.formats import safetensors_io
from lorakit_ext.formats.kohya import load_network, save_network
from lorakit_ext.networks.weights import NetworkWeights
from tests.test_merge_algebra import lora_module
from tests.test_merge_checkpoint import ATTN, CONV, TEXT, TOY, lora_for, target_table

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def table():
    return target_table(safetensors.torch.load_file(TOY), TOY)


@pytest.fixture()
def two_loras(tmp_path, table):
    paths = []
    for seed, name in ((1, "b"), (2, "a")):
        path = tmp_path / f"{name}.safetensors"
        save_network(path, lora_for(table, [ATTN, CONV, TEXT], rank=4, seed=seed), dtype=torch.float32)
        paths.append(path)
    return paths


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


def delta_of(path, name, table):
    return load_network(path).modules[name].delta(table[name][2])


def test_merge_exact_and_recompressed(capsys, tmp_path, two_loras, table):
    b, a = two_loras
    out = tmp_path / "slider.safetensors"
    code, summary, _ = run_cli(capsys, "merge", "--models", b, a, "--ratios", 1, -1, "--save_to", out)
    assert code == 0 and summary["exact"] and summary["modules"] == 3 and summary["network_dim"] == "8"
    for name in (ATTN, CONV, TEXT):
        expected = delta_of(b, name, table) - delta_of(a, name, table)
        torch.testing.assert_close(delta_of(out, name, table), expected, rtol=1e-5, atol=1e-6)
    small = tmp_path / "slider_r2.safetensors"
    code, summary, _ = run_cli(
        capsys, "merge", "--models", b, a, "--ratios", 1, -1, "--new_rank", 2, "--save_precision", "fp16",
        "--save_to", small,
    )
    assert code == 0 and not summary["exact"] and summary["rank_max"] == 2
    assert 0 < summary["relative_error"] < 1
    assert summary["retained_energy"] == pytest.approx(1 - summary["relative_error"] ** 2)
    assert safetensors.torch.load_file(small)[f"{ATTN}.lora_down.weight"].dtype == torch.float16
    merged_from = json.loads(load_network(small).metadata["ss_merged_from"])
    assert [m["file"] for m in merged_from] == ["b.safetensors", "a.safetensors"]
    assert merged_from[0]["sshs_model_hash"] == load_network(b).metadata["sshs_model_hash"]


def test_resize_dynamic(capsys, tmp_path, two_loras, table):
    out = tmp_path / "resized.safetensors"
    code, summary, _ = run_cli(
        capsys, "resize", "--model", two_loras[0], "--dynamic", "sv_fro:0.9", "--save_to", out, "--verbose"
    )
    assert code == 0 and summary["relative_error"] <= (1 - 0.9**2) ** 0.5 + 1e-6
    resized = load_network(out)
    assert summary["rank_max"] <= 4 and set(summary["per_module"]) == set(resized.modules)
    kohya_spelling = tmp_path / "resized_kohya.safetensors"
    code, same, _ = run_cli(
        capsys, "resize", "--model", two_loras[0], "--dynamic_method", "sv_fro", "--dynamic_param", 0.9,
        "--save_to", kohya_spelling, "--verbose",
    )
    assert code == 0 and same["per_module"] == summary["per_module"]
    # sv_fro:0.9 is kohya's: 0.9 of the Frobenius norm (0.81 of the energy) kept in every module, as reported
    for name, row in summary["per_module"].items():
        assert resized.modules[name].rank == row["rank"] and row["retained_frobenius"] >= 0.9 - 1e-6
        assert row["retained_frobenius"] == pytest.approx(row["retained_energy"] ** 0.5, abs=1e-5)
        assert row["relative_error"] == pytest.approx((1 - row["retained_energy"]) ** 0.5, abs=1e-5)
        shape = table[name][2]
        exact = delta_of(two_loras[0], name, table).double()
        kept = float(delta_of(out, name, table).double().norm() / exact.norm())
        assert row["retained_frobenius"] == pytest.approx(kept, abs=1e-3), name  # ||ΔW_k|| / ||ΔW||, fp16 file
        singular = torch.linalg.svdvals(exact.reshape(shape[0], -1))
        fro = (singular**2).cumsum(0).sqrt() / singular.norm()
        assert row["rank"] == int((fro < 0.9).sum()) + 1  # the fewest singular values reaching 0.9
    assert summary["retained_frobenius"] == pytest.approx(summary["retained_energy"] ** 0.5, abs=1e-5)
    assert resized.metadata["ss_network_dim"] in ("Dynamic", "1", "2", "3", "4")


def test_merge_into_then_extract(capsys, tmp_path, two_loras, table):
    merged = tmp_path / "toy_merged.safetensors"
    code, summary, _ = run_cli(
        capsys, "merge-into", "--checkpoint", TOY, "--models", two_loras[0], "--ratios", 0.5, "--save_to", merged,
        "--save_precision", "fp32",
    )
    assert code == 0 and summary["weights_changed"] == 3
    lora = tmp_path / "extracted.safetensors"
    code, summary, _ = run_cli(
        capsys, "extract", "--base", TOY, "--tuned", merged, "--dim", 4, "--conv_dim", 4, "--save_precision", "fp32",
        "--save_to", lora,
    )
    assert code == 0 and summary["modules"] == 3 and summary["relative_error"] < 1e-3
    for name in (ATTN, CONV, TEXT):
        expected = 0.5 * delta_of(two_loras[0], name, table)
        got = delta_of(lora, name, table)
        assert float((got - expected).norm() / expected.norm()) < 1e-3


def test_errors_are_one_line_and_leave_no_file(capsys, tmp_path, two_loras, table):
    out = tmp_path / "out.safetensors"
    poisoned = tmp_path / "nan.safetensors"
    tensors = safetensors.torch.load_file(two_loras[0])
    tensors[f"{ATTN}.lora_up.weight"][0, 0] = float("nan")
    safetensors.torch.save_file(tensors, poisoned)
    other = tmp_path / "other.safetensors"
    wrong = lora_for(table, [ATTN], rank=2, seed=9)
    wrong.modules[ATTN].tensors["lora_down.weight"] = torch.ones(2, 7)
    save_network(other, wrong)
    sdxl = tmp_path / "xl.safetensors"
    xl_modules = {"lora_te1_text_model_encoder_layers_0_mlp_fc1": lora_module(torch.ones(2, 4), torch.ones(4, 2))}
    save_network(sdxl, NetworkWeights(xl_modules))
    sd1 = tmp_path / "sd1.safetensors"
    sd1_modules = {"lora_unet_down_blocks_0_attentions_0_proj_in": lora_module(torch.ones(2, 4, 1, 1), torch.ones(4, 2, 1, 1))}
    save_network(sd1, NetworkWeights(sd1_modules))
    cases = [
        (["merge", "--models", sd1, sdxl, "--save_to", out], "different architectures: sd1.safetensors is sd1, xl.safetensors is sdxl"),
        (["merge-into", "--checkpoint", TOY, "--models", sdxl, "--save_to", out], "xl.safetensors (sdxl): 1 of 1"),
        (["merge", "--models", poisoned, two_loras[1], "--save_to", out], "NaN"),
        (["merge", "--models", two_loras[0], other, "--save_to", out], "differ in shape"),
        (["merge", "--models", *two_loras, "--ratios", 1, "--save_to", out], "--ratios"),
        (["merge", "--models", *two_loras, "--dynamic", "sv_fro:2", "--save_to", out], "--dynamic"),
        (["resize", "--model", two_loras[0], "--save_to", out], "--new_rank"),
        (["resize", "--model", two_loras[0], "--dynamic_method", "sv_fro", "--save_to", out], "go together"),
        (["merge-into", "--checkpoint", two_loras[0], "--models", two_loras[1], "--save_to", out], "not an SD1"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
    inputs = ["a.safetensors", "b.safetensors", "nan.safetensors", "other.safetensors", "sd1.safetensors", "xl.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == inputs


def test_resize_to_a_file_size(capsys, tmp_path, two_loras):
    """fp16 at full rank 4 takes ~13 KB: 10 KB must fit, be mostly spent, and 4 KB must be refused."""
    out = tmp_path / "sized.safetensors"
    code, summary, _ = run_cli(capsys, "resize", "--model", two_loras[0], "--dynamic", "size:10KB", "--save_to", out)
    assert code == 0 and 0.6 * 10240 < summary["bytes"] <= 10240
    assert summary["rank_max"] > 1 and summary["relative_error"] > 0
    code, _, err = run_cli(capsys, "resize", "--model", two_loras[0], "--dynamic", "size:4KB", "--save_to", out)
    assert code == 2 and "too small" in err


def test_merge_into_records_each_lora_with_ratio_and_hash(capsys, tmp_path, two_loras):
    """A LoRA file without hash metadata gets the hash the WebUI computes for it (sha256 of the tensor bytes)."""
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(two_loras[1]), plain)
    merged = tmp_path / "toy_merged.safetensors"
    code, _, _ = run_cli(
        capsys, "merge-into", "--checkpoint", TOY, "--models", two_loras[0], plain, "--ratios", 0.5, -0.25,
        "--save_to", merged,
    )
    assert code == 0
    metadata = safetensors.safe_open(merged, "pt").metadata()
    recorded = [(m["file"], m["ratio"], m["sshs_model_hash"]) for m in json.loads(metadata["lorakit_merged_loras"])]
    assert recorded == [
        ("b.safetensors", 0.5, load_network(two_loras[0]).metadata["sshs_model_hash"]),
        ("plain.safetensors", -0.25, safetensors_io.file_model_hash(plain)),
    ]
    assert len(recorded[1][2]) == 64 and json.loads(metadata["lorakit_merged_into"])["name"] == TOY.name
