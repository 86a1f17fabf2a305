"""``ModelAdapter`` over the WebUI's model objects: ldm ``LatentDiffusion`` (SD1/SD2) and sgm ``DiffusionEngine`` (SDXL).

The adapter reads the structure by duck typing, never importing ldm/sgm itself, so it works on whatever the host
loaded: ``model.model.diffusion_model`` is the compvis UNet; SD1/SD2 have ``cond_stage_model`` (ldm's
FrozenCLIPEmbedder with an HF ``CLIPTextModel`` at ``.transformer``, or FrozenOpenCLIPEmbedder with an OpenCLIP
model at ``.model``); SDXL has ``conditioner.embedders``: the text embedders (``input_key == "txt"``, CLIP then
OpenCLIP) and the size embedders that make the rest of the ``vector`` conditioning. The WebUI wraps text encoders
in its own hijack classes that keep the original at ``.wrapped``; the adapter works on the originals.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lorakit_ext.errors import LorakitError
from lorakit_ext.models.base import Arch, Target
from lorakit_ext.models.configs import SDXL_DEFAULT_SIZE
from lorakit_ext.models.naming import layout_from_keys
from lorakit_ext.models.targets import hf_text_layers, text_targets, unet_targets

# sgm's batch keys for SDXL's size conditioning, in the order of a size tuple's pairs.
SDXL_SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


class LdmAdapter:
    """lorakit's view of an ldm/sgm model (see the module docstring for the structure it expects)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.unet: nn.Module = model.model.diffusion_model
        self.layout = layout_from_keys(name for name, _ in self.unet.named_modules())
        if hasattr(model, "conditioner"):
            embedders = [_unwrap(e) for e in model.conditioner.embedders]
            text = [e for e in embedders if getattr(e, "input_key", None) == "txt"]
            if len(text) != 2:
                raise LorakitError(f"SDXL model has {len(text)} text embedders, expected 2")
            self.embedders = embedders
            self.text_encoders = {"te1": text[0], "te2": text[1]}
            arch = "sdxl"
        else:
            text_encoder = _unwrap(model.cond_stage_model)
            self.embedders = [text_encoder]
            self.text_encoders = {"te": text_encoder}
            arch = "sd2" if _is_open_clip(text_encoder) else "sd1"
        self.prediction_type: Literal["epsilon", "v_prediction"] = (
            "v_prediction" if getattr(model, "parameterization", "eps") == "v" else "epsilon"
        )
        self.arch: Arch = "sd2-v" if arch == "sd2" and self.prediction_type == "v_prediction" else arch
        self.alphas_cumprod = _alphas_cumprod(model)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def targets(self) -> list[Target]:
        targets = []
        for component, encoder in self.text_encoders.items():
            if _is_open_clip(encoder):
                targets += text_targets(encoder.model, component, "open_clip", _open_clip_layers_used(encoder))
            else:
                targets += text_targets(encoder.transformer, component, "hf", hf_text_layers(encoder.transformer))
        return targets + unet_targets(self.unet, self.arch, self.layout)

    def components(self) -> dict[str, nn.Module]:
        roots = {c: e.model if _is_open_clip(e) else e.transformer for c, e in self.text_encoders.items()}
        return {**roots, "unet": self.unet}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.model.first_stage_model
        encoded = vae.encode(pixels.to(next(vae.parameters()).dtype))
        latents = encoded.sample() if hasattr(encoded, "sample") else encoded  # ldm: a distribution; sgm: latents
        return latents * self.model.scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.model.first_stage_model
        return vae.decode(latents.to(next(vae.parameters()).dtype) / self.model.scale_factor)

    def encode_prompts(
        self, prompts: list[str], sizes: list[tuple[int, int, int, int, int, int]] | None = None
    ) -> dict[str, torch.Tensor]:
        """The embedders' own forwards, with gradients (sgm's conditioner would run frozen ones under no_grad).

        Outputs are routed as sgm's conditioner does: (B, L, D) tensors concatenate into ``crossattn``, (B, D)
        ones (SDXL's pooled text and size embeddings) into ``vector``.
        """
        batch: dict[str, object] = {"txt": list(prompts)}
        if self.arch == "sdxl":
            size = torch.tensor(sizes or [SDXL_DEFAULT_SIZE] * len(prompts), device=self.device)
            if size.shape != (len(prompts), 6):
                raise LorakitError("sizes: need one (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per prompt")
            batch.update({key: size[:, 2 * i : 2 * i + 2] for i, key in enumerate(SDXL_SIZE_KEYS)})
        outputs: list[torch.Tensor] = []
        for embedder in self.embedders:
            if embedder in self.text_encoders.values():
                embedder.device = next(embedder.parameters()).device  # the raw embedders default to "cuda"
            out = embedder(batch[getattr(embedder, "input_key", "txt")])
            outputs += list(out) if isinstance(out, (list, tuple)) else [out]
        cond = {"crossattn": torch.cat([o for o in outputs if o.dim() == 3], dim=2)}
        vectors = [o for o in outputs if o.dim() == 2]
        if vectors:
            cond["vector"] = torch.cat(vectors, dim=1)
        return cond

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.unet(noisy_latents, timesteps=timesteps, context=cond["crossattn"], y=cond.get("vector"))


def _unwrap(module: nn.Module) -> nn.Module:
    """The WebUI's text-encoder hijacks keep the original embedder at ``.wrapped``."""
    while hasattr(module, "wrapped"):
        module = module.wrapped
    return module


def _is_open_clip(embedder: nn.Module) -> bool:
    return hasattr(embedder, "model") and hasattr(embedder.model, "transformer") and not hasattr(embedder, "transformer")


def _open_clip_layers_used(embedder: nn.Module) -> int:
    """ldm's FrozenOpenCLIPEmbedder stops ``layer_idx`` resblocks early (SD2 reads the penultimate layer); sgm's
    non-legacy one (SDXL) runs them all, as its pooled output comes from the last."""
    layers = len(embedder.model.transformer.resblocks)
    return layers - embedder.layer_idx if getattr(embedder, "legacy", True) else layers


def _alphas_cumprod(model: nn.Module) -> torch.Tensor:
    """ldm keeps the schedule as a buffer (the WebUI sets it on SDXL too); sgm's denoiser keeps sigmas."""
    if getattr(model, "alphas_cumprod", None) is not None:
        return model.alphas_cumprod.detach().float().cpu()
    denoiser = getattr(model, "denoiser", None)
    if denoiser is not None and hasattr(denoiser, "sigmas"):
        return 1.0 / (1.0 + denoiser.sigmas.detach().float().cpu() ** 2)
    raise LorakitError("the model has neither alphas_cumprod nor denoiser.sigmas: cannot read its noise schedule")
