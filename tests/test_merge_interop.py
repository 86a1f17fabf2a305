"""Merged and re-compressed files are ordinary kohya files: diffusers loads them (``pipe.load_lora_weights``) and
changes the text encoder and UNet exactly as lorakit's own application of the same file does, and their raw
tensors give the intended ΔW under the WebUI built-in Lora's convention (scale = alpha / lora_down rows)."""

import pytest
import safetensors.torch
import torch
from test_interop_diffusers import PROMPTS, SIZES, rel_diff, tiny_pipeline
from test_models_fixtures import randomize

from lorakit_ext.formats.kohya import load_network, save_network
from lorakit_ext.merge.algebra import merge_networks
from lorakit_ext.merge.svd import RankRule, merge_compressed
from lorakit_ext.models.diffusers_adapter import DiffusersAdapter
from lorakit_ext.networks.network import NetworkSpec, create_network, network_from_weights

torch.set_num_threads(1)


def webui_delta(tensors: dict, name: str) -> torch.Tensor:
    """ΔW of one LoRA / LoCon module from raw file tensors, as the WebUI's built-in Lora computes it."""
    down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
    scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
    return (up.flatten(1) @ down.flatten(1)) * scale


def outputs(adapter, x, t, cond):
    return adapter.encode_prompts(PROMPTS, SIZES)["crossattn"], adapter.predict(x, t, cond)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SD1 pipeline, a LoRA (B) and a LoCon (A), B x 1 + A x -1 merged exactly, and that merge resized."""
    folder = tmp_path_factory.mktemp("merge_interop")
    pipe = tiny_pipeline("sd1")
    adapter = DiffusersAdapter.from_pipeline(pipe)
    paths = {}
    for name, spec, seed in (
        ("b", NetworkSpec(algo="lora", dim=4, alpha=2.0), 4),
        ("a", NetworkSpec(algo="locon", dim=3, alpha=1.0, conv_dim=2, conv_alpha=1.5), 5),
    ):
        network = randomize(create_network(adapter.targets(), spec), seed=seed, std=0.2)
        paths[name] = folder / f"{name}.safetensors"
        save_network(paths[name], network.to_weights(), arch="sd1")
    b, a = load_network(paths["b"]), load_network(paths["a"])
    paths["merged"] = folder / "merged.safetensors"
    save_network(paths["merged"], merge_networks([b, a], [1.0, -1.0]), dtype=torch.float32)
    resized, report = merge_compressed([load_network(paths["merged"])], [1.0], RankRule(rank=3, conv_rank=1))
    assert 0.05 < report.relative_error < 0.95  # really truncated (linear ranks 7 -> 3, convs 2 -> 1)
    paths["resized"] = folder / "resized.safetensors"
    save_network(paths["resized"], resized, dtype=torch.float32)
    return pipe, adapter, paths, (b, a)


def test_merged_file_holds_b_minus_a_under_the_webui_scale(files):
    _, adapter, paths, (b, a) = files
    tensors = safetensors.torch.load_file(paths["merged"])
    shapes = {target.name: target.shape for target in adapter.targets()}
    assert set(b.modules) < set(a.modules)  # the LoCon's kxk convs are only in A, kept with ratio -1
    for name in a.modules:
        expected = a.modules[name].delta(shapes[name]).double().neg()
        if name in b.modules:
            expected += b.modules[name].delta(shapes[name]).double()
        expected = expected.reshape(expected.shape[0], -1)
        assert rel_diff(webui_delta(tensors, name), expected) < 1e-5, name


@pytest.mark.parametrize("which", ["merged", "resized"])
def test_diffusers_applies_merged_and_resized_files_as_lorakit_does(files, which):
    pipe, adapter, paths, _ = files
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 990])
    with torch.no_grad():
        cond = adapter.encode_prompts(PROMPTS, SIZES)  # the UNet is compared on one conditioning
        plain = outputs(adapter, x, t, cond)
        network = network_from_weights(load_network(paths[which]), adapter.targets(), adapter.arch).attach()
        ours = outputs(adapter, x, t, cond)
        network.detach()
        pipe.load_lora_weights(str(paths[which]), adapter_name=which)
        try:
            theirs = outputs(adapter, x, t, cond)
        finally:
            pipe.unload_lora_weights()
        assert torch.equal(outputs(adapter, x, t, cond)[1], plain[1])  # unloaded: the next case starts clean
    for got, expected, base in zip(theirs, ours, plain):
        assert rel_diff(expected, base) > 1e-2  # the file took effect
        assert rel_diff(got, expected) <= 1e-4
