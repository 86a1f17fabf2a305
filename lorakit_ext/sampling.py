"""Our own sampler over a ``ModelAdapter``: DDIM and Euler, eps and v prediction, classifier-free guidance.

Both samplers integrate the probability-flow ODE in k-diffusion's sigma space (``x = x0 + sigma * eps``,
``sigma = sqrt((1 - a) / a)`` for the model's ``alphas_cumprod`` ``a``), where one deterministic step is
``x_next = x0 + sigma_next * eps``: that is DDIM with eta 0 and Euler alike. They differ in where they step:
``ddim`` on ldm's uniform timesteps (``1, 1 + c, ...``) ending at ``t = 0``'s noise level, ``euler`` on
k-diffusion's timesteps spaced evenly from the last to the first, ending at sigma 0.

Every image's starting noise comes from its own seed, so an image does not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

from lorakit_ext.errors import LorakitError
from lorakit_ext.models.base import ModelAdapter

SamplerName = Literal["ddim", "euler"]
SAMPLERS: tuple[str, ...] = ("ddim", "euler")
LATENT_FACTOR = 8  # pixels per latent cell in every SD VAE


def sigmas_of(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma of every training timestep, float64 so the last steps are not rounded away."""
    alphas = alphas_cumprod.double()
    return ((1 - alphas) / alphas).sqrt()


def schedule(sampler: SamplerName, steps: int, alphas_cumprod: torch.Tensor) -> tuple[list[int], list[float]]:
    """The timesteps a sampler visits (high noise first) and the sigma each step ends at."""
    total = len(alphas_cumprod)
    if not 1 <= steps <= total:
        raise LorakitError(f"steps must be between 1 and {total}, got {steps}")
    sigma = sigmas_of(alphas_cumprod)
    if sampler == "ddim":
        stride = total // steps
        timesteps = [t + 1 for t in range(0, stride * steps, stride)][::-1]
        timesteps = [min(t, total - 1) for t in timesteps]
        ends = [float(sigma[t]) for t in timesteps[1:]] + [float(sigma[0])]
    elif sampler == "euler":
        timesteps = np.round(np.linspace(total - 1, 0, steps)).astype(int).tolist()
        ends = [float(sigma[t]) for t in timesteps[1:]] + [0.0]
    else:
        raise LorakitError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    return timesteps, ends


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, h, w) standard normal noise, each image drawn from a CPU generator seeded with its own seed."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample(
    adapter: ModelAdapter,
    prompts: Sequence[str],
    seeds: int | Sequence[int],
    *,
    negative_prompt: str | Sequence[str] = "",
    steps: int = 20,
    cfg_scale: float = 7.0,
    sampler: SamplerName = "euler",
    width: int = 512,
    height: int = 512,
    batch_size: int = 16,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Images (B, 3, height, width) float32 in [0, 1] on CPU, one per prompt.

    ``seeds`` is one seed per prompt, or a first seed that counts up (as the WebUI does). ``negative_prompt``
    is what guidance pushes away from ("" is the unconditional prompt). ``on_step(done, total)`` reports progress.
    """
    prompts = list(prompts)
    seeds = [seeds + i for i in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(seeds) != len(prompts) or len(negatives) != len(prompts):
        raise LorakitError(f"got {len(prompts)} prompts, {len(seeds)} seeds and {len(negatives)} negative prompts")
    if width % LATENT_FACTOR or height % LATENT_FACTOR or width <= 0 or height <= 0:
        raise LorakitError(f"width and height must be positive multiples of {LATENT_FACTOR}, got {width}x{height}")
    if batch_size < 1:
        raise LorakitError(f"batch_size must be at least 1, got {batch_size}")
    timesteps, ends = schedule(sampler, steps, adapter.alphas_cumprod)
    sigma = sigmas_of(adapter.alphas_cumprod)
    chunks = range(0, len(prompts), batch_size)
    total = len(chunks) * len(timesteps)
    images = []
    for number, start in enumerate(chunks):
        chunk = slice(start, start + batch_size)
        guide = cfg_scale != 1.0
        texts = prompts[chunk] + (negatives[chunk] if guide else [])
        sizes = [(height, width, 0, 0, height, width)] * len(texts)
        cond = adapter.encode_prompts(texts, sizes)
        latent_shape = (_latent_channels(adapter), height // LATENT_FACTOR, width // LATENT_FACTOR)
        x = initial_noise(seeds[chunk], latent_shape).double() * float((1 + sigma[timesteps[0]] ** 2).sqrt())
        for index, (t, sigma_next) in enumerate(zip(timesteps, ends)):
            sigma_t = float(sigma[t])
            eps = _guided_eps(adapter, x, t, sigma_t, cond, cfg_scale if guide else None)
            x = (x - sigma_t * eps) + sigma_next * eps
            if on_step is not None:
                on_step(number * len(timesteps) + index + 1, total)
        latents = x / (1 + ends[-1] ** 2) ** 0.5
        decoded = adapter.decode_latents(latents.to(adapter.device, adapter.dtype))
        images.append(((decoded.float().cpu() + 1) / 2).clamp(0, 1))
    return torch.cat(images)


def _latent_channels(adapter: ModelAdapter) -> int:
    """Latent channels of the adapter's UNet (4 for every SD family so far)."""
    return int(getattr(adapter, "latent_channels", 4))


def _guided_eps(
    adapter: ModelAdapter, x: torch.Tensor, t: int, sigma: float, cond: dict, cfg_scale: float | None
) -> torch.Tensor:
    """The (guided) noise estimate for sigma-space ``x`` at timestep ``t``, from an eps or a v model."""
    scale_in = 1.0 / (1 + sigma**2) ** 0.5  # alpha_t: sigma space -> the model's variance-preserving space
    model_in = (x * scale_in).to(adapter.device, adapter.dtype)
    if cfg_scale is not None:
        model_in = torch.cat([model_in, model_in])
    timesteps = torch.full((model_in.shape[0],), t, device=adapter.device, dtype=torch.long)
    out = adapter.predict(model_in, timesteps, cond).double().cpu()
    if cfg_scale is not None:
        positive, negative = out.chunk(2)
        out = negative + cfg_scale * (positive - negative)
    if adapter.prediction_type == "epsilon":
        return out
    # v = alpha * eps - s * x0 with s = sqrt(1 - alpha^2)  =>  eps = s * x_vp + alpha * v
    return sigma * scale_in * (x * scale_in) + scale_in * out


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) floats in [0, 1] -> RGB PIL images."""
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(image) for image in array]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8, for pixel measurements."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(images: torch.Tensor, columns: int, row_labels: Sequence[str] | None = None, scale: int = 1) -> Image.Image:
    """Images laid out row by row, ``columns`` per row, optionally magnified and with a label left of each row."""
    pil = [image.resize((image.width * scale, image.height * scale), Image.NEAREST) for image in to_pil(images)]
    rows = -(-len(pil) // columns)
    cell_w, cell_h = pil[0].size
    margin = 0
    if row_labels is not None:
        if len(row_labels) != rows:
            raise LorakitError(f"grid has {rows} rows but {len(row_labels)} row labels")
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        margin = 8 + max(int(measure.textlength(label)) for label in row_labels)
    canvas = Image.new("RGB", (margin + columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for index, image in enumerate(pil):
        row, column = divmod(index, columns)
        canvas.paste(image, (margin + column * cell_w, row * cell_h))
    for row, label in enumerate(row_labels or []):
        draw.text((4, row * cell_h + cell_h // 2 - 5), label, fill="black")
    return canvas
