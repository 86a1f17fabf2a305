"""Pretrain the toy model on synthetic shapes: VAE first, then UNet and text encoder on cached latents.

    python -m lorakit_ext.toy.pretrain --out lorakit_ext/toy/weights     # ~58 min on 2 free CPU cores
    python -m lorakit_ext.toy.pretrain --out /tmp/toy --quick            # a few steps, for a smoke test

Seeded and single-threaded, so the same command gives the same file. Writes the checkpoint (fp16, ldm keys), its
ldm ``.yaml`` (with the measured latent ``scale_factor``) and the diffusers configs. Each stage is cached in
``--work``, so a rerun with a changed late stage does not redo the early ones.

Recipe: the VAE learns with MSE + L1, a weak KL and a pull of its latents toward each 8x8 cell's mean color (see
``latent_anchor``); its decoder is refined alone at the end. The UNet (eps prediction, SD1 schedule) learns from
latents sampled from the cached posteriors, with AdamW, linear warmup then cosine decay, Min-SNR-5 loss weights,
10% empty captions for classifier-free guidance and an EMA of the weights, which is what ships. The text encoder's
transformer trains jointly; its token embedding stays at its random init (only ~60 of its 49408 rows are ever
used, and Adam on the full table costs more than the rest of the encoder). A second, shorter cosine cycle then
starts from the first's EMA weights with shape twins in every batch (see ``shape_twin``): by the end of the first
cycle color, size and triangles are learned but circles and squares are still drawn alike.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from lorakit_ext.formats.safetensors_io import file_sha256, save_tensors_atomic, write_atomic
from lorakit_ext.toy import shapes
from lorakit_ext.toy.config import UNET_PARAMS, VAE_DDCONFIG, diffusers_configs, ldm_config
from lorakit_ext.toy.model import CHECKPOINT_NAME, TEXT_DIR, WEIGHTS_DIR, build_model, checkpoint_state_dict


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    vae_steps: int = 500
    vae_decoder_steps: int = 400
    vae_batch: int = 8
    vae_lr: float = 1e-3
    vae_anchor_weight: float = 0.1
    vae_kl_weight: float = 1e-6
    vae_initial_logvar: float = -8.0
    latent_count: int = 8000
    unet_steps: int = 3600
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    empty_caption_rate: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    save_every: int = 1200
    twin_steps: int = 1200
    twin_lr: float = 5e-4
    twin_warmup_steps: int = 50
    eval_count: int = 256


QUICK = Recipe(
    vae_steps=2, vae_decoder_steps=2, vae_batch=4, latent_count=16, unet_steps=3,
    unet_batch=4, warmup_steps=1, save_every=0, twin_steps=2, twin_warmup_steps=1, eval_count=8,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def warmup_cosine(warmup: int, total: int, floor: float = 0.1):
    """LR multiplier: linear warmup, then cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(other.clamp(-1, 1), reference).item()
    return 10 * math.log10(4.0 / mse)


def latent_anchor(pixels: torch.Tensor) -> torch.Tensor:
    """What the latent is pulled toward: each 8x8 cell's mean RGB and mean gray level.

    The VAE's GroupNorms remove each group's mean over the image, so absolute color is slow to discover from
    reconstruction alone: unanchored, the encoder learns shapes and brightness in minutes but hue only much later.
    Anchored, color is in the latent from the first steps, and the latents look like a small image, as SD's do.
    """
    cells = F.avg_pool2d(pixels, 8)
    return torch.cat([cells, cells.mean(dim=1, keepdim=True)], dim=1)


def train_vae(vae: nn.Module, recipe: Recipe, stage: str, rng: np.random.Generator) -> None:
    """``stage`` "vae": encoder and decoder together; "decoder": the decoder alone, on the frozen encoder's
    latents (sharper edges and colors; the latents the UNet learned on do not move)."""
    nn.Module.train(vae)  # ldm replaces .train on its first stage with a no-op
    params = list(vae.parameters() if stage == "vae" else vae.decoder.parameters())
    steps = recipe.vae_steps if stage == "vae" else recipe.vae_decoder_steps
    for param in params:
        param.requires_grad_(True)
    if stage == "vae":
        with torch.no_grad():  # start nearly deterministic: posterior std ~0.02 instead of ~1
            vae.quant_conv.bias[vae.embed_dim :].fill_(recipe.vae_initial_logvar)
    optimizer = torch.optim.AdamW(params, lr=recipe.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(recipe.warmup_steps, steps))
    started = time.time()
    for step in range(steps):
        pixels = images_to_tensor([shapes.sample(rng).image for _ in range(recipe.vae_batch)])
        with torch.set_grad_enabled(stage == "vae"):
            posterior = vae.encode(pixels)
        reconstruction = vae.decode(posterior.sample())
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        anchor = F.mse_loss(posterior.mean, latent_anchor(pixels))
        loss = (
            F.mse_loss(reconstruction, pixels)
            + 0.5 * F.l1_loss(reconstruction, pixels)
            + recipe.vae_anchor_weight * anchor
            + recipe.vae_kl_weight * kl
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"{stage} step {step}/{steps} loss {loss.item():.5f} psnr {psnr(pixels, reconstruction.detach()):.2f} "
                f"dB anchor {anchor.item():.4f} kl {kl.item():.2f} ({time.time() - started:.0f}s)")
    nn.Module.train(vae, False)
    vae.requires_grad_(False)


@torch.no_grad()
def vae_psnr(vae: nn.Module, samples: list[shapes.ShapeSample]) -> float:
    pixels = images_to_tensor([s.image for s in samples])
    return psnr(pixels, vae.decode(vae.encode(pixels).mode()))


@torch.no_grad()
def encode_posteriors(vae: nn.Module, samples: list[shapes.ShapeSample], batch: int = 64) -> torch.Tensor:
    """(N, 8, h, w): posterior mean and std stacked on channels, so each UNet step can draw a fresh latent."""
    parts = []
    for start in range(0, len(samples), batch):
        posterior = vae.encode(images_to_tensor([s.image for s in samples[start : start + batch]]))
        parts.append(torch.cat([posterior.mean, posterior.std], dim=1))
    return torch.cat(parts)


class EmaWarmup:
    """EMA of parameters whose decay ramps up as (1 + n) / (10 + n), as ldm's LitEma does, so a short run is not
    dominated by its random init."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for param, shadow in zip(self.params, self.shadow):
            param.copy_(shadow)


def shape_twin(spec: shapes.ShapeSpec, rng: np.random.Generator) -> shapes.ShapeSpec:
    """The same image with the other one of circle and square (a triangle becomes either).

    Circle and square differ only in a few corner cells of an 8x8 latent, so in a batch of unrelated images the
    gradient that tells their words apart is buried under everything else; a twin with the same noise and timestep
    isolates it."""
    other = {"circle": "square", "square": "circle"}.get(spec.shape) or ("circle", "square")[rng.integers(2)]
    return replace(spec, shape=other)


@dataclass(frozen=True)
class DenoiserCycle:
    """One warmup + cosine cycle of the denoiser stage; with ``twins`` (posteriors and specs of each latent's
    shape twin) half of every batch is the twins of the other half."""

    steps: int
    lr: float
    warmup_steps: int
    save_every: int = 0
    twins: tuple[torch.Tensor, list[shapes.ShapeSpec]] | None = None


def train_denoiser(
    model: nn.Module,
    posteriors: torch.Tensor,
    specs: list[shapes.ShapeSpec],
    recipe: Recipe,
    cycle: DenoiserCycle,
    rng: np.random.Generator,
    save,
) -> None:
    """Train ``model.model`` (UNet) and the text encoder's transformer for one cycle, starting from the weights in
    the model (fresh optimizer and EMA); leaves the EMA weights in the model."""
    unet = model.model
    text_model = model.cond_stage_model.transformer
    tokenizer = model.cond_stage_model.tokenizer
    nn.Module.train(unet)
    nn.Module.train(text_model)
    unet.requires_grad_(True)
    text_model.requires_grad_(True)
    text_model.get_input_embeddings().requires_grad_(False)
    trained = nn.ModuleList([unet, text_model])
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cycle.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cycle.warmup_steps, cycle.steps))
    ema = EmaWarmup(trained, recipe.ema_decay)
    alphas_cumprod = model.alphas_cumprod.float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = snr.clamp(max=recipe.min_snr_gamma) / snr  # Min-SNR-gamma for eps prediction
    scale = model.scale_factor
    started, running = time.time(), 0.0
    drawn = recipe.unet_batch // 2 if cycle.twins else recipe.unet_batch
    for step in range(cycle.steps):
        index = torch.from_numpy(rng.integers(0, len(specs), size=drawn))
        mean, std = posteriors[index].chunk(2, dim=1)
        sample_noise = torch.randn_like(std)
        latents = (mean + std * sample_noise) * scale
        captions = [
            "" if rng.random() < recipe.empty_caption_rate else shapes.caption(specs[i], rng) for i in index.tolist()
        ]
        timesteps = torch.randint(0, len(alphas_cumprod), (drawn,))
        noise = torch.randn_like(latents)
        if cycle.twins:
            twin_posteriors, twin_specs = cycle.twins
            twin_mean, twin_std = twin_posteriors[index].chunk(2, dim=1)
            latents = torch.cat([latents, (twin_mean + twin_std * sample_noise) * scale])
            captions += [text.replace(specs[i].shape, twin_specs[i].shape) for text, i in zip(captions, index.tolist())]
            timesteps, noise = timesteps.repeat(2), noise.repeat(2, 1, 1, 1)
        tokens = tokenizer(captions, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
        context = text_model(input_ids=tokens.input_ids).last_hidden_state
        signal_rate = alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
        noise_rate = (1 - alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
        prediction = model.apply_model(signal_rate * latents + noise_rate * noise, timesteps, context)
        per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (loss_weight[timesteps] * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.update()
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == cycle.steps - 1:
            log(f"unet{' twins' if cycle.twins else ''} step {step}/{cycle.steps} loss {running:.4f} "
                f"lr {schedule.get_last_lr()[0]:.2e} ({time.time() - started:.0f}s)")
        if cycle.save_every and (step + 1) % cycle.save_every == 0 and step + 1 < cycle.steps:
            save_with_ema(model, ema, save, f"{'twins-' if cycle.twins else ''}step{step + 1}")
    ema.copy_to_model()
    unet.eval().requires_grad_(False)
    text_model.eval().requires_grad_(False)


def save_with_ema(model: nn.Module, ema: EmaWarmup, save, tag: str) -> None:
    """An intermediate checkpoint with the EMA weights, leaving the training weights in place."""
    current = [p.detach().clone() for p in ema.params]
    ema.copy_to_model()
    save(tag)
    with torch.no_grad():
        for param, value in zip(ema.params, current):
            param.copy_(value)


def write_outputs(model: nn.Module, scale_factor: float, out_dir: Path, name: str = CHECKPOINT_NAME) -> Path:
    """The checkpoint, its ldm yaml (text folder relative to the yaml) and the diffusers configs; returns the
    checkpoint path."""
    from omegaconf import OmegaConf

    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / name
    # one metadata key: safetensors writes several in an arbitrary order, and the file must be reproducible
    save_tensors_atomic(checkpoint, checkpoint_state_dict(model), {"scale_factor": repr(scale_factor)})
    config = ldm_config(scale_factor, os.path.relpath(TEXT_DIR, out_dir.resolve()))
    write_atomic(checkpoint.with_suffix(".yaml"), [OmegaConf.to_yaml(OmegaConf.create(config)).encode()])
    diffusers_json = json.dumps(diffusers_configs(scale_factor), indent=2) + "\n"
    write_atomic(checkpoint.with_name(checkpoint.stem + ".diffusers.json"), [diffusers_json.encode()])
    return checkpoint


def stage_cache(work_dir: Path, stage: str, recipe: Recipe, fields: tuple[str, ...]) -> Path:
    """Where a stage's result is kept: named by the architecture and the recipe fields it depends on, so a changed
    recipe or width retrains."""
    fields_used = {name: getattr(recipe, name) for name in ("seed", *fields)}
    key = json.dumps({"vae": VAE_DDCONFIG, "unet": UNET_PARAMS, **fields_used}, sort_keys=True)
    return work_dir / f"{stage}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"


VAE_FIELDS = (
    "vae_steps", "vae_batch", "vae_lr", "vae_anchor_weight", "vae_kl_weight", "vae_initial_logvar", "warmup_steps",
)
DECODER_FIELDS = VAE_FIELDS + ("vae_decoder_steps",)
DENOISER_FIELDS = VAE_FIELDS + (
    "latent_count", "unet_steps", "unet_batch", "unet_lr", "empty_caption_rate", "min_snr_gamma", "ema_decay",
)
TWINS_FIELDS = DENOISER_FIELDS + ("twin_steps", "twin_lr", "twin_warmup_steps")


def refine_decoder(vae: nn.Module, recipe: Recipe, work_dir: Path) -> None:
    """The decoder stage, cached like the others (it depends on the VAE stage only, so it can run beside the UNet
    stage in another process and be picked up from ``work_dir``)."""
    from safetensors.torch import load_file

    decoder_cache = stage_cache(work_dir, "decoder", recipe, DECODER_FIELDS)
    if decoder_cache.is_file():
        vae.decoder.load_state_dict(load_file(decoder_cache))
        log(f"decoder loaded from {decoder_cache}")
        return
    torch.manual_seed(recipe.seed + 4)
    train_vae(vae, recipe, "decoder", np.random.default_rng(recipe.seed + 5))
    save_tensors_atomic(decoder_cache, vae.decoder.state_dict())


def load_denoiser(denoiser: nn.Module, path: Path) -> float:
    """Load a cached denoiser stage; returns the latent scale factor it was trained with."""
    from safetensors.torch import load_file

    denoiser.load_state_dict(load_file(path))
    with safe_open(str(path), "pt") as handle:
        return float(handle.metadata()["scale_factor"])


def train_denoiser_stages(model: nn.Module, denoiser: nn.Module, recipe: Recipe, work_dir: Path, twins_cache: Path):
    """The first cycle on the cached latents (itself cached), then the shape-twin cycle from its EMA weights."""
    torch.manual_seed(recipe.seed + 1)
    data_rng = np.random.default_rng(recipe.seed + 2)
    specs = [shapes.random_spec(data_rng) for _ in range(recipe.latent_count)]
    vae = model.first_stage_model
    posteriors = encode_posteriors(vae, [shapes.ShapeSample(*shapes.render(s), "", s) for s in specs])
    mean, std = posteriors.chunk(2, dim=1)
    model.scale_factor = float(f"{1.0 / (mean + std * torch.randn_like(std)).std().item():.5g}")
    log(f"encoded {len(specs)} latents, scale_factor {model.scale_factor}")

    def save(tag: str) -> None:
        log(f"saved {write_outputs(model, model.scale_factor, work_dir / tag)}")

    metadata = {"scale_factor": repr(model.scale_factor)}
    first_cache = stage_cache(work_dir, "denoiser", recipe, DENOISER_FIELDS)
    if first_cache.is_file():
        load_denoiser(denoiser, first_cache)
        log(f"first cycle loaded from {first_cache}")
    else:
        first = DenoiserCycle(recipe.unet_steps, recipe.unet_lr, recipe.warmup_steps, recipe.save_every)
        train_denoiser(model, posteriors, specs, recipe, first, np.random.default_rng(recipe.seed + 3), save)
        save_tensors_atomic(first_cache, denoiser.state_dict(), metadata)

    twin_rng = np.random.default_rng(recipe.seed + 6)
    twin_specs = [shape_twin(spec, twin_rng) for spec in specs]
    twin_posteriors = encode_posteriors(vae, [shapes.ShapeSample(*shapes.render(s), "", s) for s in twin_specs])
    torch.manual_seed(recipe.seed + 7)
    twins = DenoiserCycle(
        recipe.twin_steps, recipe.twin_lr, recipe.twin_warmup_steps, twins=(twin_posteriors, twin_specs)
    )
    train_denoiser(model, posteriors, specs, recipe, twins, np.random.default_rng(recipe.seed + 8), save)
    save_tensors_atomic(twins_cache, denoiser.state_dict(), metadata)


def decoder_stage_process(recipe: Recipe, work_dir: Path) -> None:
    """Entry of the second process: the decoder stage from the cached VAE stage."""
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    vae = build_model(ldm_config(1.0, str(TEXT_DIR))).first_stage_model
    vae.load_state_dict(load_file(stage_cache(work_dir, "vae", recipe, VAE_FIELDS)))
    refine_decoder(vae, recipe, work_dir)


def pretrain(recipe: Recipe, out_dir: Path, work_dir: Path) -> Path:
    """Stages, each seeded on its own and cached in ``work_dir``: VAE, then UNet + text encoder on the VAE's
    latents (two cycles) while the decoder alone trains in a second process (the latents do not depend on it; its
    seeds are its own, so the file is the same either way)."""
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    torch.manual_seed(recipe.seed)
    model = build_model(ldm_config(1.0, str(TEXT_DIR)))
    work_dir.mkdir(parents=True, exist_ok=True)
    vae = model.first_stage_model
    vae_cache = stage_cache(work_dir, "vae", recipe, VAE_FIELDS)
    if vae_cache.is_file():
        vae.load_state_dict(load_file(vae_cache))
        log(f"vae loaded from {vae_cache}")
    else:
        train_vae(vae, recipe, "vae", np.random.default_rng(recipe.seed))
        save_tensors_atomic(vae_cache, vae.state_dict())
    held_out = shapes.dataset(recipe.eval_count, seed=recipe.seed + 1)
    log(f"vae held-out psnr {vae_psnr(vae, held_out):.2f} dB")

    denoiser = nn.ModuleDict({"unet": model.model, "text": model.cond_stage_model.transformer})
    twins_cache = stage_cache(work_dir, "twins", recipe, TWINS_FIELDS)
    if twins_cache.is_file():
        model.scale_factor = load_denoiser(denoiser, twins_cache)
        log(f"unet and text encoder loaded from {twins_cache}")
    else:
        decoder_helper = None
        if not stage_cache(work_dir, "decoder", recipe, DECODER_FIELDS).is_file():
            decoder_helper = multiprocessing.get_context("spawn").Process(
                target=decoder_stage_process, args=(recipe, work_dir), name="decoder stage"
            )
            decoder_helper.start()
        train_denoiser_stages(model, denoiser, recipe, work_dir, twins_cache)
        if decoder_helper is not None:
            decoder_helper.join()
            if decoder_helper.exitcode != 0:
                raise RuntimeError(f"the decoder stage's process failed (exit code {decoder_helper.exitcode})")

    refine_decoder(vae, recipe, work_dir)
    log(f"vae held-out psnr after the decoder stage {vae_psnr(vae, held_out):.2f} dB")
    checkpoint = write_outputs(model, model.scale_factor, out_dir)
    log(f"wrote {checkpoint} ({checkpoint.stat().st_size / 1e6:.1f} MB) sha256 {file_sha256(checkpoint)}")
    return checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder for the checkpoint, yaml and configs")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lorakit-toy-work",
                        help="folder for stage caches and intermediate checkpoints")
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    recipe = QUICK if args.quick else Recipe()
    recipe = Recipe(**{**recipe.__dict__, "seed": args.seed})
    started = time.time()
    pretrain(recipe, args.out, args.work)
    log(f"done in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
