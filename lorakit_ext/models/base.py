"""The one protocol every model family is used through, so the trainer, sampler and merge code never branch on it.

A *target* is one weight a network module can change, named by its kohya module name
(``lora_unet_down_blocks_0_attentions_0_proj_in``, ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``).
Most targets are a whole ``nn.Linear`` / ``nn.Conv2d`` weight; OpenCLIP's ``nn.MultiheadAttention`` packs q, k and v
into one ``in_proj_weight``, so a target may also be a block of rows of a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

Arch = Literal["sd1", "sd2", "sd2-v", "sdxl"]
Component = Literal["unet", "te", "te1", "te2"]
# Where kohya's defaults put a target: "transformer" targets are trained by plain LoRA; "resnet" and "sampler"
# (down/upsample convs) only by LoCon-style networks (1x1 convs and linears at network_dim, kxk convs at conv_dim).
Block = Literal["transformer", "resnet", "sampler", "text"]

# ss_base_model_version values kohya writes for each architecture.
BASE_MODEL_VERSION: dict[str, str] = {
    "sd1": "sd_v1",
    "sd2": "sd_v2",
    "sd2-v": "sd_v2_v",
    "sdxl": "sdxl_base_v1-0",
}


@dataclass(frozen=True)
class Target:
    """One weight a network module may change.

    ``module`` is the host module whose forward gets wrapped. ``param`` is the weight's attribute name on it
    (``"weight"`` for Linear/Conv2d, ``"in_proj_weight"`` or ``"out_proj.weight"`` for MultiheadAttention) and
    ``rows`` the block of rows when several targets share one parameter (q/k/v in ``in_proj_weight``).
    """

    name: str
    module: nn.Module
    component: Component
    block: Block
    param: str = "weight"
    rows: tuple[int, int] | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The full parameter this target lives in (not sliced)."""
        owner = self.module
        *path, leaf = self.param.split(".")
        for part in path:
            owner = getattr(owner, part)
        return getattr(owner, leaf)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the delta this target accepts: (out, in) or (out, in, kh, kw)."""
        shape = tuple(self.weight.shape)
        if self.rows is not None:
            shape = (self.rows[1] - self.rows[0],) + shape[1:]
        return shape

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.shape[2:]) if self.is_conv else (1, 1)

    @property
    def is_wrapped_whole(self) -> bool:
        """True when the target is a plain Linear/Conv2d weight, so a bypass forward (x -> down -> up) applies."""
        return self.param == "weight" and self.rows is None and isinstance(self.module, (nn.Linear, nn.Conv2d))


class ModelAdapter(Protocol):
    """What lorakit needs from a Stable Diffusion model; one implementation per model family."""

    arch: Arch
    prediction_type: Literal["epsilon", "v_prediction"]
    # (num_train_timesteps,) float32 on CPU: the noise schedule the model was trained with.
    alphas_cumprod: torch.Tensor
    device: torch.device
    dtype: torch.dtype  # dtype of the UNet weights

    def targets(self) -> list[Target]:
        """Every weight any supported network type can train, in a stable order, with kohya names."""
        ...

    def components(self) -> dict[str, nn.Module]:
        """The trainable-module roots by component name ("unet", "te" or "te1"/"te2")."""
        ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> scaled latents (B, 4, H/8, W/8) ready for noising."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]."""
        ...

    def encode_prompts(
        self, prompts: list[str], sizes: list[tuple[int, int, int, int, int, int]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Prompts -> conditioning, a dict the same adapter's ``predict`` understands.

        ``sizes`` are SDXL's micro-conditioning per prompt: (orig_h, orig_w, crop_top, crop_left, target_h, target_w);
        other architectures ignore them.
        """
        ...

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The UNet's raw output (eps or v, per ``prediction_type``)."""
        ...
