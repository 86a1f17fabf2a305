"""Exact low-rank forms and the concat merge: ΔW of the merged file == sum(ratio_i * ΔW_i) for every module kind."""

import json

import pytest
import safetensors.torch
import torch

from lorakit_ext.errors import LorakitError
from lorakit_ext.formats.kohya import load_network, save_network
from lorakit_ext.merge.algebra import merge_networks
from lorakit_ext.merge.lowrank import guess_shape, khatri_rao_rows, low_rank
from lorakit_ext.merge.svd import RankRule, merge_compressed
from lorakit_ext.networks.weights import ModuleWeights, NetworkWeights

torch.set_num_threads(1)

LINEAR = "lora_te_text_model_encoder_layers_0_mlp_fc1"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
SHAPES = {LINEAR: (10, 12), CONV: (10, 6, 3, 3)}


def _randn(generator, *shape):
    return torch.randn(*shape, generator=generator)


def module_of(kind: str, shape: tuple, seed: int) -> ModuleWeights:
    """One module of ``kind`` for a Linear (10, 12) or a conv (10, 6, 3, 3) weight, random but deterministic."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: _randn(g, *s)  # noqa: E731
    out, inp = shape[0], shape[1]
    conv = len(shape) == 4
    kernel = shape[2:] if conv else ()
    if kind == "lora":
        up = r(out, 4, 1, 1) if conv else r(out, 4)
        return ModuleWeights({"lora_down.weight": r(4, inp, *kernel), "lora_up.weight": up}, 2.0)
    if kind == "tucker":
        assert conv
        down, mid, up = r(3, inp, 1, 1), r(3, 3, *kernel), r(out, 3, 1, 1)
        return ModuleWeights({"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}, 1.5)
    if kind == "loha":  # flat factors for a conv, as LyCORIS stores them without Tucker
        columns = inp * (9 if conv else 1)
        factors = {"hada_w1_a": (out, 3), "hada_w1_b": (3, columns), "hada_w2_a": (out, 2), "hada_w2_b": (2, columns)}
        return ModuleWeights({name: r(*shape) for name, shape in factors.items()}, 1.0)
    if kind == "loha_tucker":
        assert conv
        return ModuleWeights(
            {"hada_t1": r(3, 3, 3, 3), "hada_w1_a": r(3, out), "hada_w1_b": r(3, inp),
             "hada_t2": r(2, 2, 3, 3), "hada_w2_a": r(2, out), "hada_w2_b": r(2, inp)},
            3.0,
        )
    if kind == "lokr":
        if conv:
            factors = {"lokr_w1": (2, 2), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 5), "lokr_w2_b": (2, 3)}
            return ModuleWeights({name: r(*shape) for name, shape in factors.items()}, 4.0)
        return ModuleWeights({"lokr_w1": r(2, 3), "lokr_w2_a": r(5, 2), "lokr_w2_b": r(2, 4)}, 1.0)
    raise AssertionError(kind)


def lora_module(down: torch.Tensor, up: torch.Tensor, alpha: float | None = None) -> ModuleWeights:
    return ModuleWeights({"lora_down.weight": down, "lora_up.weight": up}, alpha)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(
    "kind,name",
    [(k, LINEAR) for k in ("lora", "loha", "lokr")] + [(k, CONV) for k in ("lora", "tucker", "loha", "loha_tucker", "lokr")],
)
def test_low_rank_form_is_exact(kind, name):
    module = module_of(kind, SHAPES[name], seed=1)
    term = low_rank(module, SHAPES[name])
    assert relative(term.dense(), module.delta(SHAPES[name])) < 1e-6


def test_loha_rank_is_product_of_ranks_and_khatri_rao_matches_definition():
    a, b = torch.randn(5, 3), torch.randn(5, 2)
    product = khatri_rao_rows(a, b)
    assert product.shape == (5, 6)
    assert torch.equal(product[4], torch.kron(a[4], b[4]))
    assert low_rank(module_of("loha", SHAPES[LINEAR], 0)).rank == 3 * 2


def test_guess_shape_of_flat_conv_modules():
    assert guess_shape(CONV, 10, 54) == (10, 6, 3, 3)
    assert guess_shape("lora_unet_down_blocks_0_downsamplers_0_conv", 10, 90) == (10, 10, 3, 3)
    assert guess_shape("lora_unet_down_blocks_0_attentions_0_proj_in", 10, 54) == (10, 54)
    assert guess_shape(LINEAR, 10, 54) == (10, 54)


def three_networks():
    """Three inputs mixing every kind over a Linear and a 3x3 conv; the third lacks the conv module."""
    first = NetworkWeights({LINEAR: module_of("lora", SHAPES[LINEAR], 1), CONV: module_of("tucker", SHAPES[CONV], 2)})
    second = NetworkWeights({LINEAR: module_of("loha", SHAPES[LINEAR], 3), CONV: module_of("loha", SHAPES[CONV], 4)})
    third = NetworkWeights({LINEAR: module_of("lokr", SHAPES[LINEAR], 5)})
    return [first, second, third]


def expected_sum(networks, ratios, name):
    return sum(r * n.modules[name].delta(SHAPES[name]) for n, r in zip(networks, ratios) if name in n.modules)


def test_concat_merge_is_exact_with_negative_ratios():
    networks, ratios = three_networks(), [1.0, -0.7, 2.5]
    merged = merge_networks(networks, ratios)
    for name in (LINEAR, CONV):
        assert relative(merged.modules[name].delta(SHAPES[name]), expected_sum(networks, ratios, name)) < 1e-6
    # ranks add up (LoHa 3*2 = 6); alpha = rank so every loader applies scale 1
    assert merged.modules[LINEAR].rank == 4 + 6 + 4
    assert all(m.alpha == m.rank for m in merged.modules.values())
    conv = merged.modules[CONV].tensors
    assert conv["lora_down.weight"].shape == (3 + 6, 6, 3, 3) and conv["lora_up.weight"].shape == (10, 9, 1, 1)


def test_merged_file_round_trips_in_fp32_and_fp16(tmp_path):
    networks, ratios = three_networks(), [1.0, -0.7, 2.5]
    merged = merge_networks(networks, ratios, sources=["a.safetensors", "b.safetensors", "c.safetensors"])
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.float16, 2e-3)):
        path = tmp_path / f"merged_{dtype}.safetensors".replace("torch.", "")
        metadata = save_network(path, merged, dtype=dtype)
        loaded = load_network(path)
        plain = safetensors.torch.load_file(path)
        assert plain[f"{LINEAR}.lora_down.weight"].dtype == dtype
        for name in (LINEAR, CONV):
            assert relative(loaded.modules[name].delta(SHAPES[name]), expected_sum(networks, ratios, name)) < tolerance
        assert metadata["ss_network_dim"] == "14" and metadata["ss_output_name"] == path.stem
        assert [s["ratio"] for s in json.loads(metadata["ss_merged_from"])] == ratios


def test_split_scale_keeps_fp16_in_range():
    """A big ratio times a big scale must not overflow fp16 when the scale is split over both factors."""
    big = NetworkWeights({LINEAR: lora_module(torch.full((1, 12), 100.0), torch.full((10, 1), 100.0), alpha=64.0)})
    merged = merge_networks([big], [50.0])
    factors = merged.modules[LINEAR].tensors
    assert all(torch.isfinite(t.half()).all() for t in factors.values())
    assert relative(merged.modules[LINEAR].to(torch.float16).delta(), 50.0 * big.modules[LINEAR].delta()) < 1e-3


def test_mismatched_shapes_are_listed():
    wide = NetworkWeights({LINEAR: lora_module(torch.ones(2, 20), torch.ones(10, 2))})
    with pytest.raises(LorakitError, match=rf"1 modules differ in shape.*{LINEAR} \(10x12 vs 10x20\)"):
        merge_networks([three_networks()[0], wide], [1.0, 1.0])
    poisoned = NetworkWeights({LINEAR: lora_module(torch.full((2, 12), float("nan")), torch.ones(10, 2))})
    with pytest.raises(LorakitError, match=f"input 2: module {LINEAR} has NaN/Inf values in lora_down.weight"):
        merge_networks([three_networks()[0], poisoned], [1.0, 1.0])
    with pytest.raises(LorakitError, match="--ratios: 1 ratios for 2 networks"):
        merge_networks(three_networks()[:2], [1.0])


def test_progress_reports_every_module():
    calls = []
    merge_networks(three_networks(), [1, 1, 1], progress=lambda done, total, name: calls.append((done, total, name)))
    assert calls == [(1, 2, LINEAR), (2, 2, CONV)]


def test_inputs_for_different_architectures_are_refused():
    """SD1 and SDXL names hardly overlap, so no shape clashes: the architectures themselves must be compared."""
    sd1 = NetworkWeights({"lora_unet_down_blocks_0_attentions_0_proj_in": lora_module(torch.ones(2, 4, 1, 1),
                                                                                     torch.ones(4, 2, 1, 1))})
    sdxl = NetworkWeights({"lora_te1_text_model_encoder_layers_0_mlp_fc1": lora_module(torch.ones(2, 4), torch.ones(4, 2))})
    unknown = NetworkWeights({LINEAR: module_of("lora", SHAPES[LINEAR], 1)})  # too small to tell: passes
    message = r"^--models: the inputs are for different architectures: b\.safetensors is sdxl, a\.safetensors is sd1, "
    for merge in (merge_networks, lambda *a, **k: merge_compressed(*a, RankRule(rank=1), **k)):
        with pytest.raises(LorakitError, match=message + "c is of unknown architecture$"):
            merge([sdxl, sd1, unknown], [1.0, -1.0, 1.0], sources=["b.safetensors", "a.safetensors", "c"])
    assert set(merge_networks([sd1, unknown], [1.0, 1.0]).modules) == set(sd1.modules) | set(unknown.modules)
    sd2 = NetworkWeights({"lora_unet_down_blocks_0_attentions_0_proj_in": lora_module(torch.ones(2, 4),
                                                                                     torch.ones(4, 2))})
    v2 = NetworkWeights(dict(sd2.modules), {"ss_v2": "True", "ss_v_parameterization": "True"})
    assert len(merge_networks([sd2, v2], [1.0, 1.0]).modules) == 1  # v-prediction changes no weight
