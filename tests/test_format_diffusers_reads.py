"""What ``save_network`` writes is what diffusers' LoRA loader reads: same modules, same deltas (alpha included).

A tiny SD1-shaped diffusers UNet and CLIP text encoder get a LoRA/LoCon on every target kohya's networks train;
diffusers converts our kohya file, PEFT injects it, and each injected layer's delta must equal ours.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit_ext.formats import kohya
from lorakit_ext.models import naming
from lorakit_ext.networks.weights import ModuleWeights, NetworkWeights

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


def tiny_unet() -> nn.Module:
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_text_encoder() -> nn.Module:
    config = transformers.CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return transformers.CLIPTextModel(config)


def text_layers(encoder: nn.Module) -> nn.Module:
    """``text_model`` in transformers 4; transformers 5 dropped that level."""
    return getattr(encoder, "text_model", encoder)


def lora_for(weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator) -> ModuleWeights:
    out_features, in_features, *kernel = weight.shape
    down = torch.randn(rank, in_features, *kernel, generator=generator)
    up = torch.randn(out_features, rank, *[1] * len(kernel), generator=generator)
    return ModuleWeights({"lora_down.weight": down, "lora_up.weight": up}, alpha)


def test_diffusers_loads_our_file_with_identical_deltas(tmp_path):
    torch.manual_seed(0)
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    generator = torch.Generator().manual_seed(1)
    modules, layers = {}, {}
    for path, layer in unet.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)) and naming.unet_block(path):
            name = naming.kohya_name(naming.PREFIXES["unet"], path)
            modules[name], layers[name] = lora_for(layer.weight, 4, 2.0, generator), (unet, path)
    for path, layer in text_layers(text_encoder).named_modules():
        if isinstance(layer, nn.Linear) and naming.text_block(path):
            name = naming.kohya_name(naming.PREFIXES["te"], f"text_model.{path}")
            modules[name], layers[name] = lora_for(layer.weight, 8, 2.0, generator), (text_layers(text_encoder), path)
    kinds = {kohya.module_kind(module) for module in modules.values()}
    assert kinds == {"lora", "locon"} and len(modules) > 80

    path = tmp_path / "for_diffusers.safetensors"
    kohya.save_network(path, NetworkWeights(modules), arch="sd1")
    state_dict, network_alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(path))
    diffusers.StableDiffusionPipeline.load_lora_into_unet(state_dict, network_alphas, unet=unet)
    diffusers.StableDiffusionPipeline.load_lora_into_text_encoder(state_dict, network_alphas, text_encoder=text_encoder)

    for name, (root, module_path) in layers.items():
        injected = root.get_submodule(module_path)
        assert hasattr(injected, "get_delta_weight"), f"diffusers did not apply {name}"
        theirs = injected.get_delta_weight(injected.active_adapters[0])
        ours = modules[name].delta(tuple(injected.base_layer.weight.shape))
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_folder_reads_with_peft_scales(tmp_path, use_rslora):
    """A UNet adapter as PEFT saves it (adapter_model.safetensors + adapter_config.json): each module's delta equals
    PEFT's own, lora_alpha / r, the rank and alpha patterns and rsLoRA included."""
    import peft
    import safetensors.torch

    torch.manual_seed(0)
    unet = tiny_unet()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "to_k", "proj_in"], init_lora_weights=False, use_rslora=use_rslora,
        rank_pattern={"attn2.to_k": 2}, alpha_pattern={"proj_in": 3},
    )
    unet = peft.inject_adapter_in_model(config, unet)
    config.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    safetensors.torch.save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in peft.get_peft_model_state_dict(unet).items()}, path
    )

    loaded = kohya.load_network(path)
    injected = {p: m for p, m in unet.named_modules() if hasattr(m, "get_delta_weight")}
    assert len(loaded.modules) == len(injected) > 4
    scales = set()
    for module_path, layer in injected.items():
        ours = loaded.modules[naming.kohya_name(naming.PREFIXES["unet"], module_path)]
        scales.add(ours.scale)
        theirs = layer.get_delta_weight("default")
        torch.testing.assert_close(ours.delta(tuple(layer.base_layer.weight.shape)), theirs, rtol=1e-5, atol=1e-6)
    root = (lambda r: r**0.5) if use_rslora else (lambda r: r)
    assert scales == {8 / root(4), 8 / root(2), 3 / root(4)}  # plain, rank_pattern, alpha_pattern
