"""Listing the targets of a UNet and of text encoders; shared by the ldm and diffusers adapters so both name alike."""

from __future__ import annotations

from typing import Literal

from torch import nn

from lorakit_ext.models.base import Target
from lorakit_ext.models.naming import (
    PREFIXES,
    TEXT_TARGET_PARTS,
    UNetLayout,
    hf_clip_to_open_clip,
    kohya_name,
    unet_block,
    unet_kohya_name,
)


def unet_targets(unet: nn.Module, arch: str, layout: UNetLayout) -> list[Target]:
    """Every Linear/Conv2d of a compvis or diffusers UNet that some network trains, named the way kohya names it."""
    targets = []
    for path, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and (block := unet_block(path)):
            name = unet_kohya_name(path, arch, layout)
            targets.append(Target(name=name, module=module, component="unet", block=block))
    return targets


def hf_text_transformer(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings``/``encoder``: ``text_model`` in transformers 4 and in the projection model,
    the ``CLIPTextModel`` itself in transformers 5 (which dropped that level)."""
    return getattr(model, "text_model", model)


def hf_text_layers(model: nn.Module) -> int:
    return len(hf_text_transformer(model).encoder.layers)


def text_targets(
    encoder: nn.Module, component: str, kind: Literal["hf", "open_clip"], layers: int
) -> list[Target]:
    """q/k/v/out/fc1/fc2 of the first ``layers`` layers of an HF CLIP text model or an OpenCLIP text tower.

    OpenCLIP's q, k and v are row blocks of its ``nn.MultiheadAttention``'s ``in_proj_weight`` and its out
    projection is read by the attention module itself, so those targets wrap the attention module.
    """
    targets = []
    for layer in range(layers):
        for part in TEXT_TARGET_PARTS:
            hf_path = f"text_model.encoder.layers.{layer}.{part}"
            name = kohya_name(PREFIXES[component], hf_path)
            if kind == "hf":
                module = hf_text_transformer(encoder).get_submodule(hf_path.removeprefix("text_model."))
                targets.append(Target(name=name, module=module, component=component, block="text"))
                continue
            path, param, slot = hf_clip_to_open_clip(hf_path)
            module = encoder.get_submodule(path)
            rows = None if slot is None else (slot * module.embed_dim, (slot + 1) * module.embed_dim)
            targets.append(Target(name=name, module=module, component=component, block="text", param=param, rows=rows))
    return targets
