"""Full-size SD1.5 / SD2.1 / SDXL configs as plain dicts, a builder on the ``meta`` device, and ldm -> diffusers config.

The values are those of the public configs (ldm ``v1-inference.yaml``, ``v2-inference-v.yaml``, sgm
``sd_xl_base.yaml`` and the diffusers ``config.json`` files), written out so tests can count and shape full-size
models without a download. Building on ``meta`` allocates no memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lorakit_ext.errors import LorakitError

# ldm / sgm UNet constructor params (``unet_config.params`` / ``network_config.params``).
LDM_UNET: dict[str, dict[str, Any]] = {
    "sd1": {
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 320,
        "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4, 4],
        "num_heads": 8,
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": 768,
        "legacy": False,
    },
    "sd2": {
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 320,
        "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4, 4],
        "num_head_channels": 64,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": True,
        "transformer_depth": 1,
        "context_dim": 1024,
        "legacy": False,
    },
    "sdxl": {
        "adm_in_channels": 2816,
        "num_classes": "sequential",
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 320,
        "attention_resolutions": [4, 2],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4],
        "num_head_channels": 64,
        "use_linear_in_transformer": True,
        "transformer_depth": [1, 2, 10],
        "context_dim": 2048,
        "spatial_transformer_attn_type": "softmax-xformers",
        "legacy": False,
    },
}

# diffusers ``unet/config.json`` (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
# stabilityai/stable-diffusion-xl-base-1.0), the keys that differ from UNet2DConditionModel's defaults.
DIFFUSERS_UNET: dict[str, dict[str, Any]] = {
    "sd1": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    },
    "sd2": {
        "sample_size": 96,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2,
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    "sdxl": {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [320, 640, 1280],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2,
        "cross_attention_dim": 2048,
        "attention_head_dim": [5, 10, 20],
        "transformer_layers_per_block": [1, 2, 10],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
}

_CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
# HF CLIPTextConfig of each text encoder, by component. SD2's has 23 layers: the model reads the penultimate one.
HF_TEXT: dict[str, dict[str, dict[str, Any]]] = {
    "sd1": {"te": _CLIP_L},
    "sd2": {
        "te": {
            "vocab_size": 49408,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "projection_dim": 512,
        }
    },
    "sdxl": {
        "te1": _CLIP_L,
        "te2": {
            "vocab_size": 49408,
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "projection_dim": 1280,
        },
    },
}
# OpenCLIP text towers as the ldm/sgm checkpoints hold them (ViT-H-14 for SD2, ViT-bigG-14 for SDXL's te2).
OPEN_CLIP_TEXT: dict[str, dict[str, Any]] = {
    "sd2": {"embed_dim": 1024, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
    "sdxl": {"embed_dim": 1280, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20, "layers": 32}},
}

# The width of sgm's size embedders (ConcatTimestepEmbedderND outdim in sd_xl_base.yaml).
SDXL_SIZE_EMBED_DIM = 256
# SDXL size conditioning when the caller gives none: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).
SDXL_DEFAULT_SIZE = (1024, 1024, 0, 0, 1024, 1024)


def diffusers_unet_config(ldm: Mapping[str, Any], sample_size: int | None = None) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config that holds the same weights as an ldm/sgm ``UNetModel`` with ``ldm`` params.

    Heads follow ldm: ``num_heads`` per transformer, or ``channels // num_head_channels`` when that is set;
    diffusers' ``attention_head_dim`` is (despite its name) the head count. ``sample_size`` is the latent size
    pipelines default to (ldm's ``image_size`` is unused). Options diffusers can't express raise ``LorakitError``.
    """
    unsupported = [
        name
        for name, default in (
            ("resblock_updown", False),
            ("use_scale_shift_norm", False),
            ("num_attention_blocks", None),
            ("disable_self_attentions", None),
            ("dims", 2),
            ("conv_resample", True),
        )
        if ldm.get(name, default) != default
    ]
    if ldm.get("num_classes") not in (None, "sequential"):
        unsupported.append("num_classes")
    if not ldm.get("use_spatial_transformer", True) or ldm.get("context_dim") is None:
        unsupported.append("use_spatial_transformer")
    mult = list(ldm["channel_mult"])
    levels = len(mult)
    res_blocks = ldm["num_res_blocks"]
    if not isinstance(res_blocks, int):
        if len(set(res_blocks)) != 1:
            unsupported.append("num_res_blocks")
        res_blocks = res_blocks[0]
    depth = ldm.get("transformer_depth", 1)
    depths = [depth] * levels if isinstance(depth, int) else list(depth)
    if ldm.get("transformer_depth_middle", depths[-1]) != depths[-1]:
        unsupported.append("transformer_depth_middle")
    if unsupported:
        raise LorakitError(f"ldm UNet options with no diffusers equivalent: {', '.join(unsupported)}")
    channels = [ldm["model_channels"] * m for m in mult]
    head_channels = ldm.get("num_head_channels", -1)
    heads = [ldm["num_heads"] if head_channels == -1 else ch // head_channels for ch in channels]
    attention = [2**level in ldm["attention_resolutions"] for level in range(levels)]
    config: dict[str, Any] = {
        "in_channels": ldm["in_channels"],
        "out_channels": ldm["out_channels"],
        "block_out_channels": channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "layers_per_block": res_blocks,
        "cross_attention_dim": ldm["context_dim"],
        "attention_head_dim": heads,
        "transformer_layers_per_block": depths,
        "use_linear_projection": bool(ldm.get("use_linear_in_transformer", False)),
    }
    if sample_size is not None:
        config["sample_size"] = sample_size
    if ldm.get("num_classes") == "sequential":
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=SDXL_SIZE_EMBED_DIM,
            projection_class_embeddings_input_dim=ldm["adm_in_channels"],
        )
    return config


def build_on_meta(factory, *args, **kwargs) -> nn.Module:
    """``factory(*args, **kwargs)`` with every tensor on the ``meta`` device: full-size shapes, no memory."""
    with torch.device("meta"):
        return factory(*args, **kwargs)


def meta_diffusers_unet(arch: str) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return build_on_meta(UNet2DConditionModel, **DIFFUSERS_UNET[_family(arch)])


def meta_ldm_unet(arch: str) -> nn.Module:
    """The ldm ``UNetModel`` of SD1/SD2 (sgm's SDXL UNet is not on PyPI)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    family = _family(arch)
    if family == "sdxl":
        raise LorakitError("the ldm package cannot build the SDXL UNet (it is sgm's)")
    return build_on_meta(UNetModel, **LDM_UNET[family])


def meta_hf_text_encoders(arch: str) -> dict[str, nn.Module]:
    """Component -> HF text encoder (SDXL's te2 with its projection, as diffusers loads it)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    encoders = {}
    for component, config in HF_TEXT[_family(arch)].items():
        cls = CLIPTextModelWithProjection if component == "te2" else CLIPTextModel
        encoders[component] = build_on_meta(cls, CLIPTextConfig(**config))
    return encoders


def _family(arch: str) -> str:
    family = "sd2" if arch == "sd2-v" else arch
    if family not in LDM_UNET:
        raise LorakitError(f"unknown architecture {arch!r}")
    return family


def sd_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """The noise schedule every SD1/SD2/SDXL model trains with (ldm's "linear", diffusers' "scaled_linear")."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()
