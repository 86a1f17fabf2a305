"""merge-into changes exactly the targeted weights by ratio * ΔW; extract(base, merged) gets the LoRA's ΔW back."""

import hashlib
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lorakit_ext.errors import LorakitError
from lorakit_ext.merge.checkpoint import checkpoint_arch, extract_lora, merge_into_checkpoint, target_table
from lorakit_ext.merge.svd import RankRule
from lorakit_ext.networks.weights import ModuleWeights, NetworkWeights
from tests.test_merge_algebra import lora_module

torch.set_num_threads(1)

TOY = Path(__file__).resolve().parents[1] / "lorakit_ext" / "toy" / "weights" / "toy_sd1.safetensors"
ATTN = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"
CONV = "lora_unet_up_blocks_0_resnets_1_conv2"
TEXT = "lora_te_text_model_encoder_layers_0_mlp_fc1"


@pytest.fixture(scope="module")
def toy():
    state = safetensors.torch.load_file(TOY)
    return state, target_table(state, TOY)


def lora_for(table, names, rank, seed, loha_conv=False) -> NetworkWeights:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name in names:
        shape = table[name][2]
        out, inp, kernel = shape[0], shape[1], tuple(shape[2:])
        if loha_conv and kernel:
            columns = inp * kernel[0] * kernel[1]
            factors = {"hada_w1_a": (out, 2), "hada_w1_b": (2, columns), "hada_w2_a": (out, 2)}
            factors["hada_w2_b"] = (2, columns)
            modules[name] = ModuleWeights({k: torch.randn(*s, generator=g) * 0.1 for k, s in factors.items()}, 2.0)
            continue
        down = torch.randn(rank, inp, *kernel, generator=g) * 0.1
        up = torch.randn(out, rank, *((1, 1) if kernel else ()), generator=g) * 0.1
        modules[name] = ModuleWeights({"lora_down.weight": down, "lora_up.weight": up}, alpha=rank / 2)
    return NetworkWeights(modules)


def test_toy_checkpoint_is_sd1_with_targets(toy):
    state, table = toy
    assert checkpoint_arch(state) == "sd1"
    assert {ATTN, CONV, TEXT} <= set(table)
    with pytest.raises(LorakitError, match="not an SD1/SD2/SDXL"):
        checkpoint_arch({"model.diffusion_model.x.weight": 0})


def test_merge_into_changes_exactly_the_targets(toy, tmp_path):
    state, table = toy
    first = lora_for(table, [ATTN, CONV, TEXT], rank=4, seed=1)
    second = lora_for(table, [ATTN, CONV], rank=2, seed=2, loha_conv=True)
    ratios = [0.8, -0.5]
    out = tmp_path / "merged.safetensors"
    summary = merge_into_checkpoint(TOY, [first, second], ratios, out, save_dtype=torch.float32)
    assert summary["weights_changed"] == 3
    merged = safetensors.torch.load_file(out)
    assert merged.keys() == state.keys()
    changed = {table[name][0]: name for name in (ATTN, CONV, TEXT)}
    for key, tensor in state.items():
        if key not in changed:
            assert torch.equal(merged[key], tensor.float() if tensor.is_floating_point() else tensor), key
            continue
        name, shape = changed[key], table[changed[key]][2]
        delta = sum(r * n.modules[name].delta(shape) for n, r in zip((first, second), ratios) if name in n.modules)
        torch.testing.assert_close(merged[key], tensor.float() + delta, rtol=0, atol=1e-6)


def test_extract_recovers_the_lora(toy, tmp_path):
    state, table = toy
    lora = lora_for(table, [ATTN, CONV, TEXT], rank=3, seed=3)
    tuned = tmp_path / "tuned.safetensors"
    merge_into_checkpoint(TOY, [lora], [1.0], tuned, save_dtype=torch.float32)
    network, report = extract_lora(TOY, tuned, RankRule(rank=4, conv_rank=3))
    assert set(network.modules) == {ATTN, CONV, TEXT}
    for name in (ATTN, CONV, TEXT):
        shape = table[name][2]
        expected = lora.modules[name].delta(shape)
        got = network.modules[name].delta(shape)
        assert float((got - expected).norm() / expected.norm()) < 1e-4, name
    assert report.relative_error < 1e-4 and report.retained > 1 - 1e-6
    # a dynamic rule (full SVD) finds the true rank 3 under the fp32 round-off of tuned - base
    network, report = extract_lora(TOY, tuned, RankRule(dynamic="sv_fro", value=0.99999))
    assert {name: module.rank for name, module in network.modules.items()} == {ATTN: 3, CONV: 3, TEXT: 3}
    assert report.relative_error < 1e-4
    # without conv ranks the 3x3 convs are left out, as kohya does without --conv_dim
    network, _ = extract_lora(TOY, tuned, RankRule(rank=4), include_kxk_convs=False)
    assert set(network.modules) == {ATTN, TEXT}


def test_extract_below_true_rank_reports_the_measured_error(toy, tmp_path):
    state, table = toy
    lora = lora_for(table, [TEXT], rank=8, seed=4)
    tuned = tmp_path / "tuned.safetensors"
    merge_into_checkpoint(TOY, [lora], [1.0], tuned, save_dtype=torch.float32)
    network, report = extract_lora(TOY, tuned, RankRule(rank=2))  # fc1 is 256 x 64: randomized SVD
    shape = table[TEXT][2]
    exact = lora.modules[TEXT].delta(shape).double()
    measured = float((network.modules[TEXT].delta(shape).double() - exact).norm() / exact.norm())
    optimum = torch.linalg.svdvals(exact)
    assert measured == pytest.approx(float(optimum[2:].norm() / optimum.norm()), rel=2e-2)
    assert report.relative_error == pytest.approx(measured, rel=1e-3)


def test_failures_leave_no_file(toy, tmp_path):
    state, table = toy
    stranger = NetworkWeights({"lora_unet_not_a_layer": lora_module(torch.ones(1, 4), torch.ones(4, 1))})
    out = tmp_path / "out.safetensors"
    with pytest.raises(LorakitError, match="1 of 1 modules match no weight.*lora_unet_not_a_layer"):
        merge_into_checkpoint(TOY, [stranger], [1.0], out)
    huge = lora_for(table, [ATTN], rank=2, seed=5)
    with pytest.raises(LorakitError, match="NaN/Inf after the merge"):
        merge_into_checkpoint(TOY, [huge], [1e38], out, save_dtype=torch.float16)
    with pytest.raises(LorakitError, match="no targeted weight differs"):
        extract_lora(TOY, TOY, RankRule(rank=2))
    assert list(tmp_path.iterdir()) == []


def tiny_sd2_checkpoint(path: Path) -> dict:
    """The smallest state dict with an SD2 ldm layout: the UNet's block structure and a 3-layer OpenCLIP tower."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for index in range(1, 12):
        part = "0.op" if index in (3, 6, 9) else "0.in_layers.2"
        state[f"model.diffusion_model.input_blocks.{index}.{part}.weight"] = torch.randn(4, 4, 3, 3, generator=g)
        if index in (1, 2, 4, 5, 7, 8):
            state[f"model.diffusion_model.input_blocks.{index}.1.proj_in.weight"] = torch.randn(4, 4, generator=g)
    width = 8
    for layer in range(3):
        prefix = f"cond_stage_model.model.transformer.resblocks.{layer}."
        state[prefix + "attn.in_proj_weight"] = torch.randn(3 * width, width, generator=g)
        state[prefix + "attn.in_proj_bias"] = torch.randn(3 * width, generator=g)
        state[prefix + "attn.out_proj.weight"] = torch.randn(width, width, generator=g)
        state[prefix + "mlp.c_fc.weight"] = torch.randn(4 * width, width, generator=g)
        state[prefix + "mlp.c_proj.weight"] = torch.randn(width, 4 * width, generator=g)
    state["cond_stage_model.model.positional_embedding"] = torch.randn(77, width, generator=g)
    safetensors.torch.save_file(state, path)
    return state


def test_merge_into_sd2_changes_only_the_packed_rows_of_k(tmp_path):
    checkpoint = tmp_path / "sd2.safetensors"
    state = tiny_sd2_checkpoint(checkpoint)
    assert checkpoint_arch(state) == "sd2"
    k_proj = "lora_te_text_model_encoder_layers_1_self_attn_k_proj"
    proj_in = "lora_unet_down_blocks_0_attentions_1_proj_in"
    lora = NetworkWeights(
        {
            k_proj: lora_module(torch.randn(2, 8), torch.randn(8, 2), alpha=1.0),
            proj_in: lora_module(torch.randn(2, 4), torch.randn(4, 2), alpha=2.0),
        }
    )
    out = tmp_path / "merged.safetensors"
    merge_into_checkpoint(checkpoint, [lora], [0.5], out)
    merged = safetensors.torch.load_file(out)
    packed = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"
    expected = state[packed].clone()
    expected[8:16] += 0.5 * lora.modules[k_proj].delta()
    torch.testing.assert_close(merged[packed], expected, rtol=0, atol=1e-6)
    unet_key = "model.diffusion_model.input_blocks.2.1.proj_in.weight"
    expected_unet = state[unet_key] + 0.5 * lora.modules[proj_in].delta()
    torch.testing.assert_close(merged[unet_key], expected_unet, rtol=0, atol=1e-6)
    assert all(torch.equal(merged[k], v) for k, v in state.items() if k not in (packed, unet_key))


def tiny_sdxl_checkpoint(path: Path, metadata: dict | None = None) -> dict:
    """An SDXL single file at toy size with the real key layout: the UNet in compvis names under
    ``model.diffusion_model.``, HF CLIP under ``conditioner.embedders.0.transformer.text_model.``, OpenCLIP (packed
    q/k/v) under ``conditioner.embedders.1.model.``; saved in fp16, as SDXL checkpoints ship."""
    from test_models_fixtures import TINY_CLIP, TINY_LDM_UNET_SDXL, TINY_OPEN_CLIP, hf_clip, ldm_unet, open_clip_tower

    parts = {
        "model.diffusion_model.": ldm_unet(TINY_LDM_UNET_SDXL),
        "conditioner.embedders.0.transformer.text_model.": hf_clip(TINY_CLIP),
        "conditioner.embedders.1.model.": open_clip_tower(TINY_OPEN_CLIP),
    }
    g = torch.Generator().manual_seed(0)
    state = {}
    for prefix, module in parts.items():
        for key, tensor in module.state_dict().items():
            value = torch.randn(tensor.shape, generator=g) * 0.1 if tensor.is_floating_point() else tensor
            state[prefix + key.removeprefix("text_model.")] = value.half() if value.is_floating_point() else value
    safetensors.torch.save_file(state, path, metadata)
    return state


SDXL_NAMES = (
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
    "lora_unet_output_blocks_2_2_conv",
    "lora_te1_text_model_encoder_layers_0_mlp_fc1",
    "lora_te2_text_model_encoder_layers_1_self_attn_k_proj",
)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """The tiny SDXL file, its state and target table; its metadata carries hashes that a merge makes stale."""
    checkpoint = tmp_path_factory.mktemp("sdxl") / "sdxl.safetensors"
    stale = {"sshs_model_hash": "0" * 64, "modelspec.hash_sha256": "0x" + "1" * 64, "modelspec.title": "tiny xl"}
    state = tiny_sdxl_checkpoint(checkpoint, stale)
    return checkpoint, state, target_table(state, checkpoint)


def test_merge_into_sdxl_in_bf16_with_fresh_metadata(sdxl, tmp_path):
    checkpoint, state, table = sdxl
    assert checkpoint_arch(state) == "sdxl" and set(SDXL_NAMES) <= set(table)
    first = lora_for(table, SDXL_NAMES, rank=4, seed=11)
    first.metadata["sshs_model_hash"] = "ab" * 32
    second = lora_for(table, SDXL_NAMES[:1], rank=2, seed=12)
    ratios = [0.8, -0.5]
    out = tmp_path / "merged.safetensors"
    summary = merge_into_checkpoint(
        checkpoint, [first, second], ratios, out, save_dtype=torch.bfloat16, sources=["one.safetensors", "two"]
    )
    assert summary["weights_changed"] == 4
    merged = safetensors.torch.load_file(out)
    assert merged.keys() == state.keys()
    assert {t.dtype for t in merged.values() if t.is_floating_point()} == {torch.bfloat16}
    changed = {table[name][0] for name in SDXL_NAMES}
    for key, tensor in state.items():
        if key not in changed:
            assert torch.equal(merged[key], tensor.to(torch.bfloat16)), key
    for name in SDXL_NAMES:
        key, rows, shape = table[name]
        delta = sum(r * n.modules[name].delta(shape) for n, r in zip((first, second), ratios) if name in n.modules)
        expected = state[key].float()
        block = slice(*rows) if rows else slice(None)
        expected[block] += delta
        assert float((expected[block] - state[key][block].float()).abs().max()) > 0.01  # bf16 can show the change
        # one rounding of the fp32 sum to bf16 (8 significant bits)
        torch.testing.assert_close(merged[key].float(), expected, rtol=2**-8, atol=1e-6)
    # te2's k_proj is rows 32..64 of the packed in_proj_weight: q and v rows unchanged
    key, rows, _ = table[SDXL_NAMES[3]]
    assert rows == (32, 64) and torch.equal(merged[key][:32], state[key][:32].to(torch.bfloat16))
    metadata = safetensors.safe_open(out, "pt").metadata()
    assert "sshs_model_hash" not in metadata and "modelspec.hash_sha256" not in metadata
    assert metadata["modelspec.title"] == "tiny xl"
    base = json.loads(metadata["lorakit_merged_into"])
    assert base == {"name": "sdxl.safetensors", "sshs_model_hash": "0" * 64, "modelspec.hash_sha256": "0x" + "1" * 64}
    loras = json.loads(metadata["lorakit_merged_loras"])
    assert [(m["file"], m["ratio"], m["sshs_model_hash"]) for m in loras] == [
        ("one.safetensors", 0.8, "ab" * 32), ("two", -0.5, "")
    ]


def test_merge_into_names_architectures(sdxl, tmp_path):
    sd1_lora = NetworkWeights({
        "lora_unet_down_blocks_0_attentions_0_proj_in": lora_module(torch.ones(2, 4, 1, 1), torch.ones(4, 2, 1, 1))
    })
    out = tmp_path / "out.safetensors"
    with pytest.raises(LorakitError, match=r"^sd1\.safetensors \(sd1\): 1 of 1 modules match no weight of the sdxl "):
        merge_into_checkpoint(sdxl[0], [sd1_lora], [1.0], out, sources=["sd1.safetensors"])
    xl_lora = NetworkWeights({SDXL_NAMES[2]: lora_module(torch.ones(2, 4), torch.ones(4, 2))})
    with pytest.raises(LorakitError, match=r"^xl \(sdxl\): 1 of 1 modules match no weight of the sd1 checkpoint .*toy_sd1\.safetensors"):
        merge_into_checkpoint(TOY, [xl_lora], [1.0], out, sources=["xl"])
    # SD1 and SD2 share kohya names: the clash is one of shapes, and the message names both architectures
    sd2 = tmp_path / "sd2.safetensors"
    tiny_sd2_checkpoint(sd2)
    with pytest.raises(LorakitError, match=r"does not fit a weight.*\(sd1\.safetensors is sd1; .*sd2\.safetensors is sd2\)"):
        merge_into_checkpoint(sd2, [sd1_lora_for_sd2()], [1.0], out, sources=["sd1.safetensors"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd2.safetensors"]


def sd1_lora_for_sd2() -> NetworkWeights:
    """A LoRA that is SD1's by its conv proj_in, with a text layer wider than the tiny SD2's (names SD2 has too)."""
    return NetworkWeights({
        "lora_unet_down_blocks_0_attentions_1_proj_in": lora_module(torch.ones(2, 4, 1, 1), torch.ones(4, 2, 1, 1)),
        "lora_te_text_model_encoder_layers_1_self_attn_k_proj": lora_module(torch.ones(2, 12), torch.ones(12, 2)),
    })


def test_dynamic_extract_runs_no_full_svd_of_a_large_layer(toy, tmp_path, monkeypatch):
    """Capped dynamic rules take the leading values from a randomized SVD, uncapped ones (and sv_cumulative) an
    exact eigendecomposition: no SVD of a whole layer either way, and the same ranks and errors as a dense SVD."""
    state, table = toy
    lora = lora_for(table, [TEXT, ATTN], rank=8, seed=6)
    tuned = tmp_path / "tuned.safetensors"
    merge_into_checkpoint(TOY, [lora], [1.0], tuned, save_dtype=torch.float32)
    svd_inputs = []
    real_svd = torch.linalg.svd

    def recording_svd(matrix, *args, **kwargs):
        svd_inputs.append(tuple(matrix.shape))
        return real_svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", recording_svd)
    exact = {name: lora.modules[name].delta(table[name][2]).double().reshape(table[name][2][0], -1)
             for name in (TEXT, ATTN)}
    for rule in (
        RankRule(rank=5, dynamic="sv_fro", value=0.9),
        RankRule(dynamic="sv_fro", value=0.9),
        RankRule(rank=5, dynamic="sv_cumulative", value=0.8),
        RankRule(dynamic="sv_ratio", value=3.0),
    ):
        network, report = extract_lora(TOY, tuned, rule)
        for name, delta in exact.items():
            s = torch.linalg.svdvals(delta)
            expected_rank = min(rule.rank or 99, {
                "sv_fro": int(((s**2).cumsum(0).sqrt() / s.norm() < rule.value).sum()) + 1,
                "sv_cumulative": int((s.cumsum(0) / s.sum() < rule.value).sum()) + 1,
                "sv_ratio": int((s >= s[0] / rule.value).sum()),
            }[rule.dynamic])
            rank, _, error = report.modules[name]
            assert network.modules[name].rank == rank == expected_rank, (rule, name)
            got = network.modules[name].delta(table[name][2]).double().reshape(delta.shape)
            measured = float((got - delta).norm() / delta.norm())
            assert measured == pytest.approx(float(s[rank:].norm() / s.norm()), rel=1e-2, abs=1e-5), (rule, name)
            assert error == pytest.approx(measured, rel=1e-3, abs=1e-5)
    assert svd_inputs and max(min(shape) for shape in svd_inputs) <= 5 + 10  # only svd_lowrank's small cores


def test_extract_lists_mismatched_weights_and_records_hashed_sources(toy, tmp_path):
    state, table = toy
    base = tmp_path / "base.safetensors"
    safetensors.torch.save_file(state, base, {"sshs_model_hash": "cd" * 32})
    tuned_state = dict(state)
    keys = sorted({key for key, _, _ in table.values()})
    for key in keys[:5]:
        tuned_state[key] = tuned_state[key].flatten()[1:]
    del tuned_state[keys[5]]
    wrong = tmp_path / "wrong.safetensors"
    safetensors.torch.save_file(tuned_state, wrong)
    first_shape = "x".join(map(str, state[keys[0]].shape))
    with pytest.raises(LorakitError, match=rf"wrong\.safetensors: 6 weights missing or of another shape than in "
                                           rf".*base\.safetensors.*: {keys[0]} \({first_shape} vs \d+\); .*; \.\.\.$"):
        extract_lora(base, wrong, RankRule(rank=2))
    lora = lora_for(table, [TEXT], rank=2, seed=7)
    tuned = tmp_path / "tuned.safetensors"
    merge_into_checkpoint(base, [lora], [1.0], tuned, save_dtype=torch.float32)
    network, _ = extract_lora(base, tuned, RankRule(rank=2))
    sources = json.loads(network.metadata["ss_extracted_from"])
    assert sources == {
        "base": {"name": "base.safetensors", "sshs_model_hash": "cd" * 32},
        "tuned": {"name": "tuned.safetensors", "sha256": hashlib.sha256(tuned.read_bytes()).hexdigest()},
    }
