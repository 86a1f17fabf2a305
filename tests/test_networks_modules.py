"""Networks attached to tiny hosts: forward deltas, MultiheadAttention rows, fuse/unfuse, detach, gradients, dropout."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit_ext.errors import LorakitError
from lorakit_ext.models.base import Target
from lorakit_ext.networks import functional
from lorakit_ext.networks.functional import ConvGeometry
from lorakit_ext.networks.network import NetworkSpec, create_network, network_from_weights
from lorakit_ext.networks.weights import ModuleWeights, NetworkWeights


def rel_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def randn(*shape):
    return torch.randn(*shape)


# name -> (host layer, tensors, alpha, the delta by the pure functions)
def forward_case(name):
    linear, conv3 = nn.Linear(8, 6), nn.Conv2d(5, 6, 3, stride=2, padding=1)
    if name == "lora-linear":
        t = {"lora_down.weight": randn(4, 8), "lora_up.weight": randn(6, 4)}
        return linear, t, 2.0, lambda: functional.lora_delta(t["lora_down.weight"], t["lora_up.weight"], 0.5)
    if name == "lora-conv1x1":
        t = {"lora_down.weight": randn(4, 8, 1, 1), "lora_up.weight": randn(6, 4, 1, 1)}
        pure = lambda: functional.lora_delta(t["lora_down.weight"], t["lora_up.weight"], 0.5)  # noqa: E731
        return nn.Conv2d(8, 6, 1), t, 2.0, pure
    if name == "lora-conv3x3-stride2-pad1":
        t = {"lora_down.weight": randn(4, 5, 3, 3), "lora_up.weight": randn(6, 4, 1, 1)}
        return conv3, t, 4.0, lambda: functional.lora_delta(t["lora_down.weight"], t["lora_up.weight"], 1.0)
    if name == "locon-tucker-3x3":
        t = {"lora_down.weight": randn(4, 5, 1, 1), "lora_mid.weight": randn(4, 4, 3, 3),
             "lora_up.weight": randn(6, 4, 1, 1)}
        return conv3, t, 1.0, lambda: functional.lora_delta(
            t["lora_down.weight"], t["lora_up.weight"], 0.25, mid=t["lora_mid.weight"])
    if name == "loha-linear":
        t = {"hada_w1_a": randn(6, 4), "hada_w1_b": randn(4, 8), "hada_w2_a": randn(6, 4), "hada_w2_b": randn(4, 8)}
        return linear, t, 2.0, lambda: functional.loha_delta(
            t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], 0.5, (6, 8))
    if name == "loha-conv3x3":
        t = {"hada_w1_a": randn(6, 4), "hada_w1_b": randn(4, 45), "hada_w2_a": randn(6, 4), "hada_w2_b": randn(4, 45)}
        return conv3, t, 2.0, lambda: functional.loha_delta(
            t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], 0.5, (6, 5, 3, 3))
    if name == "loha-conv3x3-tucker":
        t = {"hada_w1_a": randn(4, 6), "hada_w1_b": randn(4, 5), "hada_w2_a": randn(4, 6), "hada_w2_b": randn(4, 5),
             "hada_t1": randn(4, 4, 3, 3), "hada_t2": randn(4, 4, 3, 3)}
        return conv3, t, 2.0, lambda: functional.loha_delta(
            t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], 0.5, (6, 5, 3, 3),
            t1=t["hada_t1"], t2=t["hada_t2"])
    if name == "lokr-full":
        t = {"lokr_w1": randn(2, 2), "lokr_w2": randn(3, 4)}
        return linear, t, 9.0, lambda: functional.lokr_delta(t["lokr_w1"], t["lokr_w2"], 1.0, (6, 8))
    if name == "lokr-factored":
        t = {"lokr_w1_a": randn(2, 3), "lokr_w1_b": randn(3, 2), "lokr_w2_a": randn(3, 3), "lokr_w2_b": randn(3, 4)}
        w1 = lambda: functional.lokr_factor(a=t["lokr_w1_a"], b=t["lokr_w1_b"])  # noqa: E731
        w2 = lambda: functional.lokr_factor(a=t["lokr_w2_a"], b=t["lokr_w2_b"])  # noqa: E731
        return linear, t, 6.0, lambda: functional.lokr_delta(w1(), w2(), 2.0, (6, 8))
    if name == "lokr-conv-tucker":
        t = {"lokr_w1": randn(2, 1), "lokr_w2_a": randn(4, 3), "lokr_w2_b": randn(4, 5), "lokr_t2": randn(4, 4, 3, 3)}
        w2 = lambda: functional.lokr_factor(a=t["lokr_w2_a"], b=t["lokr_w2_b"], t=t["lokr_t2"])  # noqa: E731
        return conv3, t, 2.0, lambda: functional.lokr_delta(t["lokr_w1"], w2(), 0.5, (6, 5, 3, 3))
    raise AssertionError(name)


FORWARD_CASES = [
    "lora-linear", "lora-conv1x1", "lora-conv3x3-stride2-pad1", "locon-tucker-3x3", "loha-linear", "loha-conv3x3",
    "loha-conv3x3-tucker", "lokr-full", "lokr-factored", "lokr-conv-tucker",
]


def host_input(layer: nn.Module) -> torch.Tensor:
    return torch.randn(3, 7, 8) if isinstance(layer, nn.Linear) else torch.randn(2, layer.in_channels, 9, 11)


def apply_dense(layer: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, delta)
    geometry = ConvGeometry.of(layer)
    return F.conv2d(x, delta, stride=geometry.stride, padding=geometry.padding, dilation=geometry.dilation)


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_delta_equals_pure_function_and_module_weights(case):
    torch.manual_seed(10)
    layer, tensors, alpha, pure_delta = forward_case(case)
    host = nn.Sequential(layer)
    name = f"lora_unet_{case.replace('-', '_')}"
    file_weights = ModuleWeights(tensors, alpha)
    x = host_input(layer)
    with torch.no_grad():
        off = host(x)
    target = Target(name, layer, "unet", "resnet")
    network = network_from_weights(NetworkWeights({name: file_weights}), [target]).attach()
    for multiplier in (1.0, 0.5):
        network.multiplier = multiplier
        with torch.no_grad():
            forward_delta = host(x) - off
        by_function = pure_delta()
        by_weights = file_weights.delta(tuple(layer.weight.shape))
        assert rel_max_diff(by_weights, by_function) <= 1e-6
        assert rel_max_diff(forward_delta, apply_dense(layer, x, by_function * multiplier)) <= 1e-5


def mha_targets(mha: nn.MultiheadAttention, prefix: str = "lora_te_mha") -> list[Target]:
    e = mha.embed_dim
    rows = [
        Target(f"{prefix}_{part}", mha, "te", "text", "in_proj_weight", (i * e, (i + 1) * e))
        for i, part in enumerate("qkv")
    ]
    return rows + [Target(f"{prefix}_out", mha, "te", "text", "out_proj.weight")]


def randomised(network):
    """Give every zero-initialised factor random values so each module's delta is non-zero."""
    with torch.no_grad():
        for param in network.parameters():
            if not param.any():
                param.normal_()
    return network


def add_deltas_directly(mha: nn.MultiheadAttention, network) -> nn.MultiheadAttention:
    reference = nn.MultiheadAttention(mha.embed_dim, mha.num_heads, batch_first=mha.batch_first)
    reference.load_state_dict(mha.state_dict())  # not deepcopy: that would copy the attached forward too
    with torch.no_grad():
        for module in network.lora_modules.values():
            target, delta = module.target, module.delta() * module.multiplier
            if target.rows is None:
                reference.out_proj.weight += delta
            else:
                reference.in_proj_weight[target.rows[0] : target.rows[1]] += delta
    return reference


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_multihead_attention_rows_match_weights_changed_directly(batch_first, algo):
    torch.manual_seed(11)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    network = randomised(create_network(mha_targets(mha), NetworkSpec(algo=algo, dim=2, alpha=1.0))).attach()
    x = torch.randn(3, 5, 8)
    for multiplier in (1.0, 0.5):
        network.multiplier = multiplier
        reference = add_deltas_directly(mha, network)
        out, attn = mha(x, x, x)
        ref_out, ref_attn = reference(x, x, x)
        assert rel_max_diff(out, ref_out) <= 1e-5 and rel_max_diff(attn, ref_attn) <= 1e-5
        base_out, _ = network_off(network, mha, x)
        assert rel_max_diff(out, base_out) > 1e-2  # the network really changes the output
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
    assert all(p.grad is None and not p.requires_grad for p in mha.parameters())


def network_off(network, mha, x):
    network.enabled = False
    try:
        return mha(x, x, x)
    finally:
        network.enabled = True


class TinyHost(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 6)
        self.conv = nn.Conv2d(5, 6, 3, stride=2, padding=1)
        self.pointwise = nn.Conv2d(5, 6, 1)
        self.mha = nn.MultiheadAttention(8, 2)

    def forward(self, tokens, image):
        return self.linear(tokens), self.conv(image), self.pointwise(image), self.mha(tokens, tokens, tokens)[0]


def tiny_targets(host: TinyHost) -> list[Target]:
    return [
        Target("lora_unet_linear", host.linear, "unet", "transformer"),
        Target("lora_unet_conv", host.conv, "unet", "resnet"),
        Target("lora_unet_pointwise", host.pointwise, "unet", "resnet"),
        *mha_targets(host.mha),
    ]


def tiny_inputs():
    return torch.randn(4, 2, 8), torch.randn(2, 5, 9, 11)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in module.state_dict().items()}


def assert_bitwise_equal(module: nn.Module, saved: dict[str, torch.Tensor]):
    state = module.state_dict()
    assert list(state) == list(saved)
    assert all(torch.equal(state[key], saved[key]) for key in saved)


def lokr_network(host: TinyHost):
    """LoKr (read from files, never trained here) on every TinyHost target, in each stored form: full w1 with a
    factored w2 on the Linears and MultiheadAttention rows, a Tucker w2 on the 3x3 conv, a full 4-D w2 on the 1x1."""
    modules = {}
    for target in tiny_targets(host):
        out_features, in_features, *kernel = target.shape
        if kernel == [3, 3]:
            tensors = {"lokr_w1": randn(2, 1), "lokr_w2_a": randn(2, out_features // 2), "lokr_w2_b": randn(2, in_features),
                       "lokr_t2": randn(2, 2, 3, 3)}
        elif kernel:
            tensors = {"lokr_w1": randn(2, 1), "lokr_w2": randn(out_features // 2, in_features, 1, 1)}
        else:
            tensors = {"lokr_w1": randn(2, 2), "lokr_w2_a": randn(out_features // 2, 2),
                       "lokr_w2_b": randn(2, in_features // 2)}
        modules[target.name] = ModuleWeights(tensors, 1.0)
    return network_from_weights(NetworkWeights(modules), tiny_targets(host))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_fuse_matches_bypass_and_unfuse_is_bitwise(dtype, algo):
    torch.manual_seed(12)
    host = TinyHost().to(dtype)
    if algo == "lokr":
        network = lokr_network(host).attach()
    else:
        spec = NetworkSpec(algo=algo, dim=3, alpha=1.5, conv_dim=2, conv_alpha=1.0, use_tucker=True)
        network = randomised(create_network(tiny_targets(host), spec)).attach()
    assert {module.algo for module in network.lora_modules.values()} == {"lora" if algo == "locon" else algo}
    network.multiplier = 0.7
    tokens, image = (t.to(dtype) for t in tiny_inputs())
    saved = snapshot(host)
    with torch.no_grad():
        bypass = host(tokens, image)
        network.fuse()
        assert network.fused and not torch.equal(host.linear.weight, saved["linear.weight"])
        fused = host(tokens, image)
        network.unfuse()
    assert_bitwise_equal(host, saved)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(fused, bypass):
        assert rel_max_diff(a.float(), b.float()) <= tolerance


def test_fuse_accumulates_in_fp32():
    torch.manual_seed(13)
    layer = nn.Linear(8, 6).half()
    original = layer.weight.detach().clone()
    network = randomised(create_network([Target("lora_unet_l", layer, "unet", "transformer")], NetworkSpec(dim=2)))
    network.attach().fuse()
    expected = (original.float() + network.lora_modules["lora_unet_l"].delta()).half()
    assert torch.equal(layer.weight.detach(), expected)
    network.detach()
    assert torch.equal(layer.weight.detach(), original)


def test_detach_restores_forward_state_and_grad_flags():
    torch.manual_seed(14)
    host = TinyHost()
    host.linear.bias.requires_grad_(False)  # a flag detach must put back as it found it
    flags = {name: p.requires_grad for name, p in host.named_parameters()}
    saved = snapshot(host)
    tokens, image = tiny_inputs()
    with torch.no_grad():
        before = host(tokens, image)
    network = randomised(create_network(tiny_targets(host), NetworkSpec(algo="locon", dim=2, conv_dim=2))).attach()
    assert list(host.state_dict()) == list(saved)
    assert not any(p.requires_grad for p in host.parameters())
    with torch.no_grad():
        assert not torch.equal(host(tokens, image)[0], before[0])
    network.fuse()
    network.detach()
    assert all("forward" not in m.__dict__ for m in host.modules())
    assert {name: p.requires_grad for name, p in host.named_parameters()} == flags
    assert_bitwise_equal(host, saved)
    with torch.no_grad():
        after = host(tokens, image)
    assert all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("detach_first", ["lower", "upper"])
def test_stacked_networks_add_up_and_detach_in_any_order(detach_first):
    torch.manual_seed(15)
    host = TinyHost()
    reference = copy.deepcopy(host)
    tokens, image = tiny_inputs()
    with torch.no_grad():
        base = host(tokens, image)
    spec = NetworkSpec(algo="locon", dim=2, conv_dim=2)
    lower = randomised(create_network(tiny_targets(host), spec)).attach()
    with torch.no_grad():
        lower_only = host(tokens, image)
    upper = randomised(create_network(tiny_targets(host), spec)).attach()
    with torch.no_grad():
        both = host(tokens, image)
        for target in tiny_targets(reference):
            weight = target.weight
            region = weight if target.rows is None else weight[target.rows[0] : target.rows[1]]
            region += lower.lora_modules[target.name].delta() + upper.lora_modules[target.name].delta()
        expected = reference(tokens, image)
    assert all(rel_max_diff(a, b) <= 1e-5 for a, b in zip(both, expected))
    (lower if detach_first == "lower" else upper).detach()
    if detach_first == "upper":
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(host(tokens, image), lower_only))
    (upper if detach_first == "lower" else lower).detach()
    assert all("forward" not in m.__dict__ for m in host.modules())
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(host(tokens, image), base))


def test_training_gradients_reach_only_the_network():
    torch.manual_seed(16)
    host = TinyHost()
    network = create_network(tiny_targets(host), NetworkSpec(algo="locon", dim=2, conv_dim=2)).attach()
    network.train()
    tokens, image = tiny_inputs()
    sum(out.square().sum() for out in host(tokens, image)).backward()
    assert all(p.grad is None and not p.requires_grad for p in host.parameters())
    ups = [p for key, p in network.named_parameters() if "up" in key]
    assert ups and all(p.grad is not None and p.grad.abs().sum() > 0 for p in ups)
    assert all(p.grad is not None for p in network.parameters())


@pytest.mark.parametrize("option", ["dropout", "rank_dropout", "module_dropout"])
def test_dropouts_act_only_in_training(option):
    torch.manual_seed(17)
    host = TinyHost()
    network = randomised(create_network(tiny_targets(host), NetworkSpec(algo="locon", dim=4, conv_dim=2))).attach()
    tokens, image = tiny_inputs()
    with torch.no_grad():
        clean = host(tokens, image)
        network.set_dropout(**{option: 0.5})
        network.eval()
        assert all(torch.equal(a, b) for a, b in zip(host(tokens, image), clean))
        network.train()
        changed = [not torch.equal(a, b) for _ in range(8) for a, b in zip(host(tokens, image), clean)]
    assert sum(changed) >= len(changed) // 2


def test_lora_dropouts_keep_the_expected_output():
    """kohya rescales: neuron dropout by F.dropout, rank dropout by 1/(1-p), so the mean output is the clean one."""
    torch.manual_seed(18)
    layer = nn.Linear(8, 6)
    network = randomised(create_network([Target("lora_unet_l", layer, "unet", "transformer")], NetworkSpec(dim=4)))
    network.attach()
    x = torch.randn(1, 8).expand(4000, 8)
    with torch.no_grad():
        clean = layer(x[:1]) - network_delta_off(network, layer, x[:1])
        for option in ("dropout", "rank_dropout"):
            network.set_dropout(**{option: 0.5})
            network.train()
            mean = (layer(x) - network_delta_off(network, layer, x)).mean(0, keepdim=True)
            network.eval()
            assert rel_max_diff(mean, clean) < 0.1, option


def network_delta_off(network, layer, x):
    network.enabled = False
    try:
        return layer(x)
    finally:
        network.enabled = True


def test_create_network_selects_targets_like_kohya():
    host = TinyHost()
    text = nn.Linear(8, 8)
    targets = tiny_targets(host) + [Target("lora_te_text", text, "te", "text")]
    targets[1] = Target("lora_unet_conv", host.conv, "unet", "sampler")

    def names(spec):
        return sorted(create_network(targets, spec).lora_modules)

    attention = ["lora_te_mha_k", "lora_te_mha_out", "lora_te_mha_q", "lora_te_mha_v", "lora_te_text"]
    assert names(NetworkSpec(algo="lora")) == sorted(["lora_unet_linear", *attention])
    assert names(NetworkSpec(algo="lora", components=("unet",))) == ["lora_unet_linear"]
    assert names(NetworkSpec(algo="locon")) == sorted(["lora_unet_linear", "lora_unet_pointwise", *attention])
    assert names(NetworkSpec(algo="loha", conv_dim=2, components=("unet",))) == [
        "lora_unet_conv", "lora_unet_linear", "lora_unet_pointwise"]
    network = create_network(targets, NetworkSpec(algo="locon", dim=4, alpha=2.0, conv_dim=3, conv_alpha=1.5))
    conv, pointwise = network.lora_modules["lora_unet_conv"], network.lora_modules["lora_unet_pointwise"]
    assert (conv.weights().rank, conv.alpha, pointwise.weights().rank, pointwise.alpha) == (3, 1.5, 4, 2.0)


def test_new_modules_start_at_zero_delta_with_kohya_and_lycoris_init():
    torch.manual_seed(19)
    host = TinyHost()
    tokens, image = tiny_inputs()
    with torch.no_grad():
        before = host(tokens, image)
    lora = create_network(tiny_targets(host), NetworkSpec(algo="locon", dim=8, conv_dim=4, use_tucker=True)).attach()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(host(tokens, image), before))
    conv = lora.lora_modules["lora_unet_conv"].weights().tensors
    assert conv["lora_down.weight"].shape == (4, 5, 1, 1) and conv["lora_mid.weight"].shape == (4, 4, 3, 3)
    linear = lora.lora_modules["lora_unet_linear"].weights().tensors
    bound = 1 / math.sqrt(8)  # kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert linear["lora_down.weight"].abs().max() <= bound and linear["lora_down.weight"].abs().max() > 0.5 * bound
    assert not linear["lora_up.weight"].any()
    lora.detach()
    loha = create_network(tiny_targets(host), NetworkSpec(algo="loha", dim=8, conv_dim=4)).lora_modules
    tensors = loha["lora_unet_linear"].weights().tensors
    assert not tensors["hada_w2_a"].any() and 0.05 < tensors["hada_w1_a"].std() < 0.2
    assert 0.7 < tensors["hada_w1_b"].std() < 1.3
    assert loha["lora_unet_conv"].weights().tensors["hada_w1_b"].shape == (4, 45)  # LyCORIS: flattened kxk


def test_export_round_trip_in_kohya_layout():
    torch.manual_seed(20)
    host = TinyHost()
    network = randomised(create_network(tiny_targets(host), NetworkSpec(algo="locon", dim=2, alpha=1.0, conv_dim=2)))
    exported = network.to_weights(dtype=torch.float16)
    module = exported.modules["lora_unet_conv"]
    assert set(module.tensors) == {"lora_down.weight", "lora_up.weight"} and module.alpha == 1.0
    assert module.tensors["lora_down.weight"].dtype == torch.float16
    assert module.tensors["lora_down.weight"].shape == (2, 5, 3, 3)
    reloaded = network_from_weights(exported, tiny_targets(host))
    for name, original in network.lora_modules.items():
        assert rel_max_diff(reloaded.lora_modules[name].delta(), original.delta()) < 2e-3  # fp16 storage


def test_bad_shapes_name_the_module():
    layer = nn.Linear(8, 6)
    conv = nn.Conv2d(5, 6, 3)
    cases = [
        ("lora_unet_wrong_in", layer, {"lora_down.weight": randn(4, 7), "lora_up.weight": randn(6, 4)}),
        ("lora_unet_wrong_rank", layer, {"lora_down.weight": randn(4, 8), "lora_up.weight": randn(6, 3)}),
        ("lora_unet_linear_on_conv", conv, {"lora_down.weight": randn(4, 5), "lora_up.weight": randn(6, 4)}),
        ("lora_unet_loha", layer, {"hada_w1_a": randn(6, 4), "hada_w1_b": randn(4, 8), "hada_w2_a": randn(6, 4),
                                   "hada_w2_b": randn(4, 9)}),
        ("lora_unet_lokr", layer, {"lokr_w1": randn(2, 2), "lokr_w2": randn(3, 5)}),
    ]
    for name, host_layer, tensors in cases:
        weights = NetworkWeights({name: ModuleWeights(tensors, 1.0)}, source="bad.safetensors")
        with pytest.raises(LorakitError, match=rf"^bad\.safetensors: .*{name}"):
            network_from_weights(weights, [Target(name, host_layer, "unet", "transformer")])


def test_module_without_a_target_is_named():
    host = TinyHost()
    weights = create_network(tiny_targets(host), NetworkSpec(algo="locon", dim=2, conv_dim=2)).to_weights()
    weights.modules["lora_unet_missing"] = weights.modules["lora_unet_linear"]
    expected = "the network: made for an unknown architecture, the model is sd1: 1 of 8 modules match no target of the model (lora_unet_missing)"
    with pytest.raises(LorakitError) as excinfo:
        network_from_weights(weights, tiny_targets(host), "sd1")
    assert str(excinfo.value) == expected


def test_spec_rejects_bad_options():
    with pytest.raises(LorakitError, match="dim"):
        NetworkSpec(dim=0)
    with pytest.raises(LorakitError, match="rank_dropout"):
        NetworkSpec(rank_dropout=1.0)
    with pytest.raises(LorakitError, match="algo"):
        NetworkSpec(algo="dora")
    with pytest.raises(LorakitError, match="no modules"):
        create_network([Target("lora_unet_conv", nn.Conv2d(2, 2, 3), "unet", "resnet")], NetworkSpec(algo="locon"))
