"""The weight math against independent references, and ModuleWeights' reading of a file's tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit_ext.errors import LorakitError
from lorakit_ext.networks import functional
from lorakit_ext.networks.functional import ConvGeometry
from lorakit_ext.networks.weights import ModuleWeights, NetworkWeights


def rel_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def tucker_reference(core, a, b):
    """W[p, q, k, l] = sum_ij core[i, j, k, l] a[i, p] b[j, q], by explicit loops over the rank."""
    out = torch.zeros(a.shape[1], b.shape[1], *core.shape[2:], dtype=torch.float64)
    for i in range(core.shape[0]):
        for j in range(core.shape[1]):
            out += core[i, j].double() * torch.outer(a[i].double(), b[j].double())[:, :, None, None]
    return out


def test_lora_delta_linear_and_conv_match_the_plain_product():
    torch.manual_seed(0)
    down, up = torch.randn(4, 8), torch.randn(6, 4)
    assert torch.allclose(functional.lora_delta(down, up, 0.5), (up @ down) * 0.5)
    down4, up4 = torch.randn(4, 5, 3, 3), torch.randn(6, 4, 1, 1)
    expected = torch.einsum("or,rikl->oikl", up4[:, :, 0, 0], down4) * 2.0
    delta = functional.lora_delta(down4, up4, 2.0)
    assert delta.shape == (6, 5, 3, 3) and delta.dtype == torch.float32
    assert rel_max_diff(delta, expected) < 1e-6


def test_lora_tucker_delta_matches_the_mode_product():
    torch.manual_seed(1)
    down, mid, up = torch.randn(4, 5, 1, 1), torch.randn(4, 4, 3, 3), torch.randn(6, 4, 1, 1)
    expected = tucker_reference(mid, up[:, :, 0, 0].T, down[:, :, 0, 0]) * 0.25
    assert rel_max_diff(functional.lora_delta(down, up, 0.25, mid=mid).double(), expected) < 1e-6


BYPASS_CASES = {
    "linear": (None, False),
    "conv-plain": (ConvGeometry(), False),
    "conv-stride2-pad1": (ConvGeometry(stride=2, padding=1), False),
    "conv-dilated": (ConvGeometry(stride=(2, 1), padding=(2, 1), dilation=2), False),
    "tucker-stride2-pad1": (ConvGeometry(stride=2, padding=1), True),
    "tucker-dilated": (ConvGeometry(stride=(2, 1), padding=(2, 1), dilation=2), True),
}


@pytest.mark.parametrize("case", BYPASS_CASES)
def test_lora_bypass_equals_the_dense_delta_applied(case):
    geometry, tucker = BYPASS_CASES[case]
    torch.manual_seed(2)
    if geometry is None:
        x, down, up, mid = torch.randn(3, 7, 8), torch.randn(4, 8), torch.randn(6, 4), None
        dense = F.linear(x, functional.lora_delta(down, up, 0.75))
    else:
        x, up = torch.randn(2, 5, 9, 11), torch.randn(6, 4, 1, 1)
        down = torch.randn(4, 5, 1, 1) if tucker else torch.randn(4, 5, 3, 3)
        mid = torch.randn(4, 4, 3, 3) if tucker else None
        delta = functional.lora_delta(down, up, 0.75, mid=mid)
        dense = F.conv2d(x, delta, stride=geometry.stride, padding=geometry.padding, dilation=geometry.dilation)
    bypass = functional.lora_bypass(x, down, up, 0.75, mid=mid, conv=geometry)
    assert bypass.shape == dense.shape
    assert rel_max_diff(bypass, dense) <= 1e-5


def test_loha_delta_plain_and_tucker():
    torch.manual_seed(3)
    w1a, w1b, w2a, w2b = torch.randn(6, 4), torch.randn(4, 45), torch.randn(6, 4), torch.randn(4, 45)
    plain = functional.loha_delta(w1a, w1b, w2a, w2b, 0.5, (6, 5, 3, 3))
    assert rel_max_diff(plain, ((w1a @ w1b) * (w2a @ w2b) * 0.5).reshape(6, 5, 3, 3)) < 1e-6

    t1, t2 = torch.randn(4, 4, 3, 3), torch.randn(4, 4, 3, 3)
    a1, b1, a2, b2 = torch.randn(4, 6), torch.randn(4, 5), torch.randn(4, 6), torch.randn(4, 5)
    tucker = functional.loha_delta(a1, b1, a2, b2, 0.5, (6, 5, 3, 3), t1=t1, t2=t2)
    expected = tucker_reference(t1, a1, b1) * tucker_reference(t2, a2, b2) * 0.5
    assert rel_max_diff(tucker.double(), expected) < 1e-6


def test_lokr_delta_is_the_kronecker_product_entrywise():
    torch.manual_seed(4)
    w1, w2 = torch.randn(2, 3), torch.randn(3, 4)
    delta = functional.lokr_delta(w1, w2, 2.0, (6, 12))
    for i in range(2):
        for j in range(3):
            assert torch.allclose(delta[i * 3 : (i + 1) * 3, j * 4 : (j + 1) * 4], w1[i, j] * w2 * 2.0)
    # conv: w2 (out_k, in_k, kh, kw) -> block (i, j) of the (out, in) grid is w1[i, j] * w2
    w2conv = torch.randn(3, 2, 3, 3)
    conv = functional.lokr_delta(w1, w2conv, 1.0, (6, 6, 3, 3))
    assert torch.allclose(conv[3:6, 4:6], w1[1, 2] * w2conv)


def test_lokr_factor_rebuilds_full_factored_and_tucker():
    torch.manual_seed(5)
    full = torch.randn(2, 3)
    assert torch.equal(functional.lokr_factor(full=full), full)
    a, b = torch.randn(3, 2), torch.randn(2, 4)
    assert torch.allclose(functional.lokr_factor(a=a, b=b), a @ b)
    t, ta, tb = torch.randn(2, 2, 3, 3), torch.randn(2, 3), torch.randn(2, 4)
    assert rel_max_diff(functional.lokr_factor(a=ta, b=tb, t=t).double(), tucker_reference(t, ta, tb)) < 1e-6
    with pytest.raises(LorakitError):
        functional.lokr_factor(a=a)


def test_deltas_are_fp32_from_half_inputs():
    down, up = torch.randn(2, 4).half(), torch.randn(3, 2).half()
    assert functional.lora_delta(down, up, 1.0).dtype == torch.float32
    w = [torch.randn(3, 2).half(), torch.randn(2, 4).half()] * 2
    assert functional.loha_delta(*w, 1.0, (3, 4)).dtype == torch.float32


# --- ModuleWeights -----------------------------------------------------------------------------------------------


def lora_weights(alpha=2.0):
    return ModuleWeights({"lora_down.weight": torch.randn(4, 8), "lora_up.weight": torch.randn(6, 4)}, alpha)


def test_module_weights_lora_facts_and_scale():
    torch.manual_seed(6)
    weights = lora_weights(alpha=2.0)
    assert (weights.algo, weights.rank, weights.scale) == ("lora", 4, 0.5)
    assert (weights.is_conv, weights.kernel_size, weights.out_features, weights.in_features) == (False, (1, 1), 6, 8)
    up, down = weights.tensors["lora_up.weight"], weights.tensors["lora_down.weight"]
    assert torch.allclose(weights.delta(), up @ down * 0.5)
    assert ModuleWeights(weights.tensors).scale == 1.0  # no alpha in the file: the WebUI applies scale 1
    conv = ModuleWeights({"lora_down.weight": torch.randn(4, 5, 1, 1), "lora_up.weight": torch.randn(6, 4, 1, 1)}, 4)
    assert conv.delta((6, 5)).shape == (6, 5)  # a 1x1-conv LoRA fits a Linear (SD1 proj_in vs SD2's)
    tucker = ModuleWeights(
        {"lora_down.weight": torch.randn(4, 5, 1, 1), "lora_mid.weight": torch.randn(4, 4, 3, 3),
         "lora_up.weight": torch.randn(6, 4, 1, 1)}, 1.0,
    )
    assert (tucker.is_conv, tucker.kernel_size, tucker.shape) == (True, (3, 3), (6, 5, 3, 3))


def test_module_weights_loha_and_lokr_facts():
    torch.manual_seed(7)
    shapes = {"hada_w1_a": (6, 4), "hada_w1_b": (4, 45), "hada_w2_a": (6, 4), "hada_w2_b": (4, 45)}
    loha = ModuleWeights({name: torch.randn(*shape) for name, shape in shapes.items()}, 8)
    assert (loha.algo, loha.rank, loha.scale, loha.is_conv, loha.shape) == ("loha", 4, 2.0, None, None)
    with pytest.raises(LorakitError, match="needs the target weight's shape"):
        loha.delta()
    assert loha.delta((6, 5, 3, 3)).shape == (6, 5, 3, 3)

    full = ModuleWeights({"lokr_w1": torch.randn(2, 2), "lokr_w2": torch.randn(3, 4)}, 7.0)
    assert (full.algo, full.rank, full.scale, full.shape) == ("lokr", None, 1.0, (6, 8))
    factored = ModuleWeights(
        {"lokr_w1": torch.randn(2, 2), "lokr_w2_a": torch.randn(3, 5), "lokr_w2_b": torch.randn(5, 4)}, 10.0
    )
    assert (factored.rank, factored.scale, factored.out_features) == (5, 2.0, 6)
    t = {"lokr_w1": torch.randn(2, 1), "lokr_w2_a": torch.randn(4, 3), "lokr_w2_b": torch.randn(4, 5),
         "lokr_t2": torch.randn(4, 4, 3, 3)}
    tucker = ModuleWeights(t, 2.0)
    assert tucker.shape == (6, 5, 3, 3)
    w2 = functional.lokr_factor(a=t["lokr_w2_a"], b=t["lokr_w2_b"], t=t["lokr_t2"])
    assert torch.equal(tucker.delta(), functional.lokr_delta(t["lokr_w1"], w2, 0.5, (6, 5, 3, 3)))


def test_module_weights_bad_input_raises_lorakit_error():
    torch.manual_seed(8)
    with pytest.raises(LorakitError, match="not a LoRA, LoHa or LoKr"):
        ModuleWeights({"lora_down.weight": torch.randn(2, 3)}).algo
    with pytest.raises(LorakitError, match="different ranks"):
        ModuleWeights({"lora_down.weight": torch.randn(4, 8), "lora_up.weight": torch.randn(6, 3)}).delta()
    with pytest.raises(LorakitError, match="does not fit"):
        lora_weights().delta((8, 6))  # transposed: same element count, rows disagree
    with pytest.raises(LorakitError, match="does not fit"):
        ModuleWeights({"lokr_w1": torch.randn(2, 2), "lokr_w2": torch.randn(3, 4)}).delta((6, 9))


def test_to_converts_dtype_and_keeps_alpha():
    weights = NetworkWeights({"lora_unet_x": lora_weights(3.0)}, {"ss_network_dim": "4"})
    half = weights.to(dtype=torch.float16)
    assert half.modules["lora_unet_x"].tensors["lora_down.weight"].dtype == torch.float16
    assert half.modules["lora_unet_x"].alpha == 3.0 and half.metadata == {"ss_network_dim": "4"}
