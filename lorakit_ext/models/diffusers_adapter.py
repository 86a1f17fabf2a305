"""``ModelAdapter`` over diffusers components (``UNet2DConditionModel``, HF CLIP text encoders, ``AutoencoderKL``).

Targets carry the same kohya names as the ldm adapter's (SD1/SD2 UNet in diffusers style, SDXL converted to compvis
style), so one network file fits both. diffusers/transformers are never imported here: the caller passes objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lorakit_ext.errors import LorakitError
from lorakit_ext.models.base import Arch, Target
from lorakit_ext.models.configs import SDXL_DEFAULT_SIZE, sd_alphas_cumprod
from lorakit_ext.models.naming import UNetLayout
from lorakit_ext.models.targets import hf_text_layers, text_targets, unet_targets


def layout_from_diffusers_config(config: Mapping[str, Any]) -> UNetLayout:
    """The layout of a ``UNet2DConditionModel`` from its config."""
    res_blocks = config["layers_per_block"]
    if not isinstance(res_blocks, int):
        if len(set(res_blocks)) != 1:
            raise LorakitError(f"UNet layers_per_block {res_blocks}: kohya names need the same count on every level")
        res_blocks = res_blocks[0]
    return UNetLayout(
        levels=len(config["block_out_channels"]),
        res_blocks=res_blocks,
        attention_levels=tuple(t.startswith("CrossAttn") for t in config["down_block_types"]),
    )


class DiffusersAdapter:
    """lorakit's view of a diffusers SD1/SD2/SDXL model.

    ``text_encoders``/``tokenizers``: one (SD1/SD2) or two (SDXL: ``CLIPTextModel`` then
    ``CLIPTextModelWithProjection``). ``alphas_cumprod`` defaults to the SD training schedule. ``tokenizers`` and
    ``vae`` may be None for naming-only uses (the encoders then raise).
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoders: Sequence[nn.Module],
        tokenizers: Sequence[Any] | None = None,
        vae: nn.Module | None = None,
        alphas_cumprod: torch.Tensor | None = None,
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        arch: Arch | None = None,
    ):
        self.unet = unet
        self.text_encoders = list(text_encoders)
        self.tokenizers = list(tokenizers) if tokenizers is not None else None
        self.vae = vae
        self.prediction_type = prediction_type
        self.alphas_cumprod = (sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod).detach().float().cpu()
        self.layout = layout_from_diffusers_config(unet.config)
        self.arch: Arch = arch or _detect_arch(unet.config, len(self.text_encoders), prediction_type)
        expected = 2 if self.arch == "sdxl" else 1
        if len(self.text_encoders) != expected:
            raise LorakitError(f"{self.arch} needs {expected} text encoder(s), got {len(self.text_encoders)}")
        self.component_names = ["te1", "te2"] if self.arch == "sdxl" else ["te"]

    @classmethod
    def from_pipeline(cls, pipe: Any, arch: Arch | None = None) -> DiffusersAdapter:
        """From a ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (schedule from its scheduler)."""
        encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
        tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
        return cls(
            pipe.unet,
            encoders,
            tokenizers,
            pipe.vae,
            alphas_cumprod=pipe.scheduler.alphas_cumprod,
            prediction_type=pipe.scheduler.config.prediction_type,
            arch=arch,
        )

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def targets(self) -> list[Target]:
        targets = []
        for component, encoder in zip(self.component_names, self.text_encoders):
            targets += text_targets(encoder, component, "hf", hf_text_layers(encoder))
        return targets + unet_targets(self.unet, self.arch, self.layout)

    def components(self) -> dict[str, nn.Module]:
        return {**dict(zip(self.component_names, self.text_encoders)), "unet": self.unet}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self._need(self.vae, "a VAE")
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample()
        return latents * vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self._need(self.vae, "a VAE")
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample

    def encode_prompts(
        self, prompts: list[str], sizes: list[tuple[int, int, int, int, int, int]] | None = None
    ) -> dict[str, torch.Tensor]:
        """SD1/SD2: the last hidden state. SDXL as sgm: penultimate hidden states of both encoders side by side, the
        second's projected pooled output as ``text_embeds`` and the size tuples as ``time_ids``."""
        tokenizers = self._need(self.tokenizers, "tokenizers")
        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, self.text_encoders):
            ids = tokenizer(
                list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(encoder.device)
            if self.arch != "sdxl":
                hidden.append(encoder(ids)[0])
                continue
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
        cond = {"crossattn": torch.cat(hidden, dim=-1)}
        if self.arch == "sdxl":
            time_ids = torch.tensor(sizes or [SDXL_DEFAULT_SIZE] * len(prompts), device=self.device)
            if time_ids.shape != (len(prompts), 6):
                raise LorakitError("sizes: need one (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per prompt")
            cond.update(text_embeds=pooled, time_ids=time_ids)
        return cond

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]} if self.arch == "sdxl" else None
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=cond["crossattn"], added_cond_kwargs=added).sample

    @staticmethod
    def _need(value, what: str):
        if value is None:
            raise LorakitError(f"this diffusers adapter was built without {what}")
        return value


def _detect_arch(config: Mapping[str, Any], text_encoders: int, prediction_type: str) -> Arch:
    """SDXL by its size conditioning or second text encoder; SD2 by its 1024-wide (or linear) cross-attention."""
    if config.get("addition_embed_type") == "text_time" or text_encoders == 2:
        return "sdxl"
    width = config.get("cross_attention_dim")
    sd2 = width == 1024 or (width != 768 and config.get("use_linear_projection", False))
    if not sd2:
        return "sd1"
    return "sd2-v" if prediction_type == "v_prediction" else "sd2"
