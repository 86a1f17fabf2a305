"""The training loop: one loop over a ``ModelAdapter``, for every model family, driven by a validated ``TrainConfig``.

``train(config, adapter, report=, token=, hooks=)`` is the library entry point the Train tab's job, the CLI and the
HTTP API share; it returns a ``TrainResult``. The host model is left exactly as it was whatever happens (networks
detached, modes, flags and checkpointing restored), so the WebUI can keep generating with it.

Determinism: the data order comes from (seed, epoch), each step's random draws (noise, timesteps, dropouts) from
(seed, step, process), so a run resumed from a state folder repeats the uninterrupted run's steps exactly.

Hooks for derived trainers (``TrainHooks``): ``network`` trains a network the caller built (say, slider B while
the caller keeps network A attached or fused under it; A's factors must be frozen by the caller), ``batch_loss``
replaces the loss of a batch (the paired slider runs B at +w and -w on the same noise and timesteps, through
``TrainingRun.diffusion_loss``), ``metadata`` adds fields to every saved file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit_ext.errors import LorakitError
from lorakit_ext.formats.kohya import check_fits_model, load_network, save_network
from lorakit_ext.models.base import ModelAdapter
from lorakit_ext.networks.network import Network, NetworkSpec, create_network
from lorakit_ext.train.config import TrainConfig
from lorakit_ext.train.job import StopToken
from lorakit_ext.train.kohya_keys import check_model_flags
from lorakit_ext.train.optim import build_optimizer, build_scheduler, optimizer_class, parse_optimizer_args
from lorakit_ext.train.prompts import SamplePrompt, read_prompt_file
from lorakit_ext.train.state import Progress, load_state, save_state

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LOSS_WINDOW = 20  # steps in the smoothed loss shown in progress


@dataclass
class Batch:
    """One micro-batch as the loss sees it. ``loss_weights`` are per sample (prior loss weight, not min-SNR)."""

    examples: list
    latents: Tensor  # clean, scaled latents (B, 4, h, w)
    cond: dict[str, Tensor]
    noise: Tensor
    timesteps: Tensor  # (B,) long
    loss_weights: Tensor  # (B,)
    mask: Tensor | None  # (B, 1, h, w) in [0, 1], at latent size


@dataclass
class TrainHooks:
    """Small extension points for trainers built on this one (see the module docstring)."""

    network: Network | None = None
    batch_loss: Callable[[TrainingRun, Batch], Tensor] | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainResult:
    output: Path | None  # the final network file (None when cancelled)
    files: list[Path]  # every network file written, in order
    state: Path | None  # the last state folder written
    steps: int
    epochs: int
    stopped: bool
    losses: list[float]  # loss of every optimizer step this run made (resumed runs: from the resume point)
    samples: list[Path]  # sample images written


@dataclass(frozen=True)
class TrainPlan:
    """What a config will do on a model, for ``--dry-run`` and the UI preview (``to_dict`` is JSON-ready)."""

    dataset: Any  # the dataset's DatasetSummary
    batches_per_epoch: int
    steps_per_epoch: int
    max_train_steps: int
    epochs: int
    modules: dict[str, int]  # component -> trained modules
    parameters: int
    network_bytes: int  # file size at save_precision, roughly
    warnings: list[str]

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset.to_dict(),
            "batches_per_epoch": self.batches_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "max_train_steps": self.max_train_steps,
            "epochs": self.epochs,
            "modules": self.modules,
            "parameters": self.parameters,
            "network_bytes": self.network_bytes,
            "warnings": self.warnings,
        }


# --- pure pieces ---------------------------------------------------------------------------------------------------


def multires_noise(
    shape: tuple[int, ...], iterations: int, discount: float, generator: torch.Generator | None = None
) -> Tensor:
    """Pyramid noise: white noise plus upsampled coarser noise, level i weighted ``discount**i``, unit variance.

    Level sizes shrink by a random factor in [2, 4) per level, as in the multires-noise write-up kohya follows.
    """
    batch, channels, height, width = shape
    noise = torch.randn(shape, generator=generator)
    for level in range(1, iterations + 1):
        factor = float(torch.rand((), generator=generator)) * 2 + 2
        h, w = max(1, int(height / factor**level)), max(1, int(width / factor**level))
        coarse = torch.randn(batch, channels, h, w, generator=generator)
        upsampled = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        noise = noise + upsampled * discount**level
        if h == 1 or w == 1:
            break
    return noise / noise.std()


def min_snr_weights(alphas_cumprod: Tensor, timesteps: Tensor, gamma: float, v_prediction: bool) -> Tensor:
    """Min-SNR-gamma loss weights: min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v."""
    alphas = alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr


def training_target(latents: Tensor, noise: Tensor, alphas: Tensor, prediction_type: str) -> Tensor:
    """What the UNet should output: the noise (eps) or v = sqrt(a) * noise - sqrt(1 - a) * x0."""
    if prediction_type == "epsilon":
        return noise
    shape = (-1,) + (1,) * (latents.dim() - 1)
    return alphas.sqrt().view(shape) * noise - (1 - alphas).sqrt().view(shape) * latents


def step_seed(seed: int, step: int, process: int = 0) -> int:
    """The seed of one optimizer step's random draws (independent of everything before it, hence resumable)."""
    return int(np.random.SeedSequence([seed, step, process]).generate_state(1)[0])


def mean_gradients(params: list[Tensor], all_reduce_sum: Callable[[Tensor], Tensor], processes: int) -> None:
    """Average the gradients of ``params`` over all processes in one collective call.

    Each process may have a different set of gradients (module dropout skips different modules on each), so
    reducing parameter by parameter would pair up different tensors across processes, or hang. Instead every
    process sends one flat buffer of all gradients (zeros where a parameter has none) plus one has-gradient flag per
    parameter; a parameter no process computed a gradient for keeps ``grad = None``, as in a single-process run.
    """
    reference = params[0]
    pieces = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
    flags = torch.tensor([p.grad is not None for p in params], dtype=reference.dtype, device=reference.device)
    total = all_reduce_sum(torch.cat(pieces + [flags]).float())
    summed, counts = total[: -len(params)], total[-len(params) :]
    offset = 0
    for param, count in zip(params, counts.tolist()):
        size = param.numel()
        grad = summed[offset : offset + size].view_as(param).to(param.dtype) / processes
        param.grad = grad if count > 0 else None
        offset += size


def saved_name(output_name: str, epoch: int | None = None, step: int | None = None) -> str:
    """kohya's file names: ``name.safetensors``, ``name-000004.safetensors``, ``name-step00000500.safetensors``."""
    if epoch is not None:
        return f"{output_name}-{epoch:06d}.safetensors"
    if step is not None:
        return f"{output_name}-step{step:08d}.safetensors"
    return f"{output_name}.safetensors"


def resolved_steps(config: TrainConfig, batches_per_epoch: int, processes: int = 1) -> tuple[int, int, int]:
    """(steps per epoch, max train steps, epochs), as kohya resolves them (``max_train_epochs`` wins)."""
    steps_per_epoch = math.ceil(math.ceil(batches_per_epoch / processes) / config.gradient_accumulation_steps)
    if config.max_train_epochs:
        max_steps = config.max_train_epochs * steps_per_epoch
    else:
        max_steps = config.max_train_steps
    return steps_per_epoch, max_steps, math.ceil(max_steps / steps_per_epoch)


# Options whose change makes a resumed run train differently from the run it continues (refused on resume). Paths
# (a moved dataset), saving, sampling, caching and the step count (extending a run) may change.
RESUME_MUST_MATCH = (
    "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
    "caption_extension", "default_caption", "shuffle_caption", "keep_tokens", "caption_dropout_rate",
    "caption_prefix", "caption_suffix", "flip_aug", "masked_loss", "prior_loss_weight",
    "network_algo", "network_dim", "network_alpha", "conv_dim", "conv_alpha", "network_args", "network_dropout",
    "rank_dropout", "module_dropout", "network_train_unet_only",
    "optimizer_type", "optimizer_args", "learning_rate", "unet_lr", "text_encoder_lr", "lr_scheduler",
    "lr_warmup_steps", "lr_scheduler_num_cycles", "lr_scheduler_power", "max_grad_norm",
    "train_batch_size", "gradient_accumulation_steps", "mixed_precision", "seed", "noise_offset",
    "multires_noise_iterations", "multires_noise_discount", "min_snr_gamma", "min_timestep", "max_timestep",
)


def check_resumed_config(config: TrainConfig, saved: dict) -> None:
    """Refuse to resume a state saved under options that change the result (``RESUME_MUST_MATCH``)."""
    now = config.to_dict()
    changed = [
        f"{key} {saved[key]!r} -> {now[key]!r}" for key in RESUME_MUST_MATCH if key in saved and saved[key] != now[key]
    ]
    if changed:
        raise LorakitError(f"resume: {config.resume} was saved with other training options ({', '.join(changed)}); "
                           "set them back to continue that run, or start a new one")


def warmup_steps(config: TrainConfig, max_steps: int) -> int:
    """``lr_warmup_steps``; a value below 1 is a fraction of all steps (kohya's newer form)."""
    value = config.lr_warmup_steps
    return int(value * max_steps) if 0 < value < 1 else int(value)


# --- the network ---------------------------------------------------------------------------------------------------


def network_spec(config: TrainConfig) -> NetworkSpec:
    conv_dim, conv_alpha = config.conv_resolved()
    dropout, rank_dropout, module_dropout = config.dropouts_resolved()
    return NetworkSpec(
        algo=config.network_algo_resolved(),
        dim=config.network_dim,
        alpha=config.network_alpha,
        conv_dim=conv_dim,
        conv_alpha=conv_alpha,
        dropout=dropout,
        rank_dropout=rank_dropout,
        module_dropout=module_dropout,
        components=None if config.trains_text_encoder() else ("unet",),
    )


def build_network(config: TrainConfig, adapter: ModelAdapter) -> tuple[Network, list[str]]:
    """The network the config trains (from ``network_weights`` where given) and notes about the file's fit."""
    network = create_network(adapter.targets(), network_spec(config))
    notes = []
    if config.network_weights:
        weights = load_network(config.network_weights)
        check_fits_model(weights, {t.name: t.shape for t in adapter.targets()}, adapter.arch)
        matched = 0
        with torch.no_grad():
            for name, module in network.lora_modules.items():
                if name not in weights.modules:
                    continue
                stored = weights.modules[name]
                own = module.weights().tensors
                if set(stored.tensors) != set(own) or any(stored.tensors[k].shape != own[k].shape for k in own):
                    raise LorakitError(
                        f"network_weights {config.network_weights}: {name} does not match network_algo/network_dim"
                    )
                for key, tensor in own.items():
                    tensor.copy_(stored.tensors[key])
                module.alpha = stored.alpha
                matched += 1
        skipped = len(weights.modules) - matched
        skipped_note = f", {skipped} not trained here" if skipped else ""
        notes.append(f"network_weights: {matched} modules loaded{skipped_note}")
    return network, notes


def model_flag_notes(config: TrainConfig, adapter: ModelAdapter) -> list[str]:
    """kohya's ``v2``/``v_parameterization``/``sdxl`` checked against the model (refused when they contradict it)."""
    flags = {"v2": config.v2, "v_parameterization": config.v_parameterization, "sdxl": config.sdxl}
    return check_model_flags(flags, adapter.arch, adapter.prediction_type)


def param_groups(network: Network, config: TrainConfig) -> list[dict]:
    """UNet and text encoder factors at their own learning rates (kohya's unet_lr / text_encoder_lr)."""
    unet, text = [], []
    for module in network.lora_modules.values():
        (unet if module.target.component == "unet" else text).extend(module.parameters())
    groups = []
    if unet:
        groups.append({"params": unet, "lr": config.lr_for("unet")})
    if text:
        groups.append({"params": text, "lr": config.lr_for("te")})
    return groups


# --- the run -------------------------------------------------------------------------------------------------------


def run_notes(config: TrainConfig, adapter: ModelAdapter, summary) -> list[str]:
    """The warnings shown before a run starts (and by ``--dry-run``): the config's, the model's, the dataset's."""
    return config.warnings() + model_flag_notes(config, adapter) + summary.notes(config.default_caption)


def plan(config: TrainConfig, adapter: ModelAdapter) -> TrainPlan:
    """Validate and resolve the config on a model without training (``--dry-run``)."""
    from lorakit_ext.train.dataset import TrainDataset

    config.validate()
    optimizer_class(config.optimizer_type)
    dataset = TrainDataset(config.dataset_config(), config.seed)
    summary = dataset.summary
    batches = len(dataset.epoch_batches(0, config.train_batch_size))
    steps_per_epoch, max_steps, epochs = resolved_steps(config, batches)
    with torch.random.fork_rng(devices=[]):  # the throwaway network's initialisation draws random numbers
        network, notes = build_network(config, adapter)
    modules: dict[str, int] = {}
    for module in network.lora_modules.values():
        modules[module.target.component] = modules.get(module.target.component, 0) + 1
    parameters = sum(p.numel() for p in network.parameters())
    return TrainPlan(
        dataset=summary,
        batches_per_epoch=batches,
        steps_per_epoch=steps_per_epoch,
        max_train_steps=max_steps,
        epochs=epochs,
        modules=modules,
        parameters=parameters,
        network_bytes=parameters * SAVE_DTYPES[config.save_precision].itemsize,
        warnings=run_notes(config, adapter, summary) + notes,
    )


def train(
    config: TrainConfig,
    adapter: ModelAdapter,
    report: Callable[..., None] | None = None,
    token: StopToken | None = None,
    hooks: TrainHooks | None = None,
) -> TrainResult:
    """Train a network on ``adapter``'s model as ``config`` says; see the module docstring for the guarantees."""
    config.validate()
    device = torch.device(adapter.device)
    # the run reseeds the global RNGs (network init, every step); the caller gets its own RNG state back
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        run = TrainingRun(config, adapter, report or (lambda **_: None), token or StopToken(), hooks or TrainHooks())
        return run.run()


class TrainingRun:
    """The state of one ``train`` call. Custom ``batch_loss`` hooks use ``network``, ``adapter``, ``config``,
    ``make_batch`` and ``diffusion_loss``."""

    def __init__(self, config: TrainConfig, adapter: ModelAdapter, report, token: StopToken, hooks: TrainHooks):
        from lorakit_ext.train.dataset import TrainDataset

        self.config, self.adapter, self.report, self.token, self.hooks = config, adapter, report, token, hooks
        if adapter.dtype != torch.float32 and config.mixed_precision == "no":
            raise LorakitError(f"the model is in {adapter.dtype}: set mixed_precision to fp16 or bf16 to train on it")
        self.dataset = TrainDataset(config.dataset_config(), config.seed)
        self.notes = run_notes(config, adapter, self.dataset.summary)
        self.accelerator = _accelerator(config.mixed_precision)
        if config.mixed_precision != "no" and not self.accelerator.native_amp:
            self.notes.append(f"mixed_precision {config.mixed_precision}: accelerate does not autocast to it on "
                              f"{self.accelerator.device.type}; training runs in fp32")
        self.process, self.processes = self.accelerator.process_index, self.accelerator.num_processes
        batches = len(self.dataset.epoch_batches(0, config.train_batch_size))
        if batches < self.processes:
            raise LorakitError(f"{batches} batches per epoch cannot feed {self.processes} processes: add images")
        self.steps_per_epoch, self.max_steps, self.epochs = resolved_steps(config, batches, self.processes)
        self.sample_prompts: list[SamplePrompt] = (
            read_prompt_file(config.sample_prompts) if config.sample_prompts else []
        )
        self.output_dir = Path(config.output_dir)
        self.alphas_cumprod = adapter.alphas_cumprod.float().to(adapter.device)  # once, not per micro-batch
        self.text_cache: dict[tuple, dict[str, Tensor]] = {}
        self.latent_cache = None
        self.files: list[Path] = []
        self.samples: list[Path] = []
        self.losses: list[float] = []
        self.last_state: Path | None = None
        self.started_at = time.time()
        self.session_id = uuid.uuid4().hex
        self.network: Network | None = None

    # --- the loop -------------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        config = self.config
        for note in self.notes:
            self.report(message=f"warning: {note}")
        with _host_preserved(self.adapter), self._network_attached() as network:
            self.network = network
            optimizer = build_optimizer(
                config.optimizer_type, param_groups(network, config), config.learning_rate, config.optimizer_args
            )
            scheduler = build_scheduler(
                config.lr_scheduler,
                optimizer,
                warmup_steps(config, self.max_steps),
                self.max_steps,
                config.lr_scheduler_num_cycles,
                config.lr_scheduler_power,
            )
            progress = Progress(0, 0, 0)
            if config.resume:
                progress, _ = load_state(
                    config.resume, network, optimizer, scheduler, lambda saved: check_resumed_config(config, saved)
                )
                self.report(step=progress.global_step, total=self.max_steps, message=f"resumed from {config.resume}")
            optimizer = self.accelerator.prepare(optimizer)
            if config.cache_latents:
                self._prepare_latent_cache()
            with _gradient_checkpointing(self.adapter, config.gradient_checkpointing):
                progress, stopped = self._loop(network, optimizer, scheduler, progress)
            self.token.raise_if_cancelled()
            output, images = None, []
            if self.accelerator.is_main_process:
                output = self._save(network, progress, name=saved_name(config.output_name), final=True)
                if config.save_state or stopped:
                    state_name = config.output_name + "-state"
                    self.last_state = self._save_state(network, optimizer, scheduler, progress, state_name)
                if self.sample_prompts and not stopped:  # kohya samples the final network too
                    images = self._sample(network, progress)
            self.report(
                step=progress.global_step,
                total=self.max_steps,
                message="stopped" if stopped else "finished",
                files=[str(output)] if output else [],
                images=images,
            )
        return TrainResult(
            output,
            self.files,
            self.last_state,
            progress.global_step,
            progress.epoch,
            stopped,
            self.losses,
            self.samples,
        )

    def _loop(self, network: Network, optimizer, scheduler, progress: Progress) -> tuple[Progress, bool]:
        """Optimizer steps from ``progress`` to ``max_steps``; returns where it ended and whether it was stopped."""
        step, epoch = progress.global_step, progress.epoch
        while step < self.max_steps:
            groups = self._step_groups(epoch)
            first = progress.batch_group if epoch == progress.epoch else 0
            for group_index in range(first, len(groups)):
                if self.token.stop_requested:
                    return Progress(step, epoch, group_index), True
                loss = self._optimizer_step(groups[group_index], epoch, step, optimizer, scheduler)
                step += 1
                self.losses.append(loss)
                here = Progress(step, epoch, group_index + 1)
                last = step >= self.max_steps
                files, images = ([], []) if last else self._after_step(network, optimizer, scheduler, here)
                values = {
                    "epoch": epoch + 1,
                    "epochs": self.epochs,
                    "loss": loss,
                    "avg_loss": sum(self.losses[-LOSS_WINDOW:]) / min(len(self.losses), LOSS_WINDOW),
                    "lr": scheduler.get_last_lr()[0],
                }
                self.report(step=step, total=self.max_steps, values=values, files=files, images=images)
                if last:
                    return (Progress(step, epoch + 1, 0) if group_index + 1 == len(groups) else here), False
            epoch += 1
            files, images = self._after_epoch(network, optimizer, scheduler, Progress(step, epoch, 0))
            if files or images:
                self.report(step=step, total=self.max_steps, message=f"epoch {epoch} done", files=files, images=images)
        return Progress(step, epoch, 0), False

    def _optimizer_step(self, group: list[list[int]], epoch: int, step: int, optimizer, scheduler) -> float:
        """One optimizer step over a group of micro-batches (gradient accumulation); returns the mean loss."""
        accelerator, config = self.accelerator, self.config
        _seed_everything(step_seed(config.seed, step, self.process))
        total = 0.0
        for micro in group:
            examples = [self.dataset.example(epoch, index) for index in micro]
            with accelerator.autocast():
                loss = self.batch_loss(self.make_batch(examples))
            value = float(loss.detach())
            finite = math.isfinite(value)
            if self.processes > 1:  # every process stops together, or the others would wait in the reduction
                flag = torch.tensor([0.0 if finite else 1.0], device=accelerator.device)
                finite = float(accelerator.reduce(flag, reduction="sum")) == 0
            if not finite:
                raise self._stop_on_non_finite(step + 1, epoch, value)
            accelerator.backward(loss / len(group))
            total += value / len(group)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if self.processes > 1:  # data parallel: the network is not DDP-wrapped (the host calls it), so reduce here
            mean_gradients(params, lambda flat: accelerator.reduce(flat, reduction="sum"), self.processes)
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    def _step_groups(self, epoch: int) -> list[list[list[int]]]:
        """This process's batches of the epoch, grouped into optimizer steps of gradient_accumulation_steps."""
        batches = self.dataset.epoch_batches(epoch, self.config.train_batch_size)[self.process :: self.processes]
        size = self.config.gradient_accumulation_steps
        return [batches[i : i + size] for i in range(0, len(batches), size)]

    # --- one batch ------------------------------------------------------------------------------------------------

    def make_batch(self, examples: list) -> Batch:
        """Latents, conditioning, noise and timesteps for some dataset examples (draws from the global RNG)."""
        config, adapter = self.config, self.adapter
        latents = self._latents(examples)
        cond = self._conditioning(examples)
        shape = tuple(latents.shape)
        if config.multires_noise_iterations:
            noise = multires_noise(shape, config.multires_noise_iterations, config.multires_noise_discount)
        else:
            noise = torch.randn(shape)
        if config.noise_offset:
            noise = noise + config.noise_offset * torch.randn(shape[0], shape[1], 1, 1)
        timesteps = torch.randint(config.min_timestep, config.max_timestep, (shape[0],))
        masks = [e.mask for e in examples]
        mask = None
        if config.masked_loss and all(m is not None for m in masks):
            mask = F.interpolate(torch.stack(masks).float(), size=shape[2:], mode="area").to(adapter.device)
        weights = torch.tensor([e.loss_weight for e in examples], dtype=torch.float32, device=adapter.device)
        return Batch(examples, latents, cond, noise.to(adapter.device), timesteps.to(adapter.device), weights, mask)

    def batch_loss(self, batch: Batch) -> Tensor:
        return self.hooks.batch_loss(self, batch) if self.hooks.batch_loss else self.diffusion_loss(batch)

    def diffusion_loss(self, batch: Batch) -> Tensor:
        """The standard objective: MSE to eps or v, masked, min-SNR- and prior-weighted, averaged over the batch."""
        adapter, config = self.adapter, self.config
        alphas = self.alphas_cumprod[batch.timesteps]
        shape = (-1,) + (1,) * (batch.latents.dim() - 1)
        noisy = alphas.sqrt().view(shape) * batch.latents + (1 - alphas).sqrt().view(shape) * batch.noise
        prediction = adapter.predict(noisy.to(adapter.dtype), batch.timesteps, batch.cond).float()
        target = training_target(batch.latents, batch.noise, alphas, adapter.prediction_type)
        error = F.mse_loss(prediction, target.float(), reduction="none")
        if batch.mask is not None:
            error = error * batch.mask
        per_sample = error.mean(dim=tuple(range(1, error.dim()))) * batch.loss_weights
        if config.min_snr_gamma:
            per_sample = per_sample * min_snr_weights(
                self.alphas_cumprod, batch.timesteps, config.min_snr_gamma, adapter.prediction_type == "v_prediction"
            )
        return per_sample.mean()

    def _latents(self, examples: list) -> Tensor:
        if self.latent_cache is not None:
            return self.latent_cache.latents(examples).to(self.adapter.device).float()
        pixels = torch.stack([e.pixels for e in examples]).to(self.adapter.device)
        with torch.no_grad():
            return self.adapter.encode_images(pixels).float()

    def _conditioning(self, examples: list) -> dict[str, Tensor]:
        """Text conditioning; without gradients (and cached per caption when asked) when the text encoder is frozen."""
        captions = [e.caption for e in examples]
        sizes = [(*e.original_size, *e.crop_top_left, *e.target_size) for e in examples]
        if self.config.trains_text_encoder() and self._has_text_modules():
            return self.adapter.encode_prompts(captions, sizes)
        if not self.config.cache_text_encoder_outputs:
            with torch.no_grad():
                return self.adapter.encode_prompts(captions, sizes)
        missing = [(c, s) for c, s in zip(captions, sizes) if (c, s) not in self.text_cache]
        if missing:
            with torch.no_grad():
                encoded = self.adapter.encode_prompts([c for c, _ in missing], [s for _, s in missing])
            for row, key in enumerate(missing):
                self.text_cache[key] = {name: value[row : row + 1] for name, value in encoded.items()}
        rows = [self.text_cache[(c, s)] for c, s in zip(captions, sizes)]
        return {name: torch.cat([row[name] for row in rows]) for name in rows[0]}

    def _has_text_modules(self) -> bool:
        return any(m.target.component != "unet" for m in self.network.lora_modules.values())

    def _prepare_latent_cache(self) -> None:
        from lorakit_ext.train.latent_cache import LatentCache

        self.latent_cache = LatentCache(self.adapter, self.config.cache_latents_to_disk)

    def _stop_on_non_finite(self, step: int, epoch: int, value: float) -> LorakitError:
        """The error for a NaN/Inf loss at (1-based) ``step``. The loss is checked before backward, so the network
        still holds the weights of the last good step: with no periodic file saved yet they are saved now as
        ``<name>-last-good-step<N>.safetensors``."""
        last = next((path for path in reversed(self.files) if path.exists()), None)
        if last is not None:
            kept = f"the last good file is {last}"
        elif step > 1 and self.accelerator.is_main_process:
            name = f"{self.config.output_name}-last-good-step{step - 1:08d}.safetensors"
            last = self._save(self.network, Progress(step - 1, epoch, 0), name)
            kept = f"the weights after step {step - 1} are saved as {last}"
        else:
            kept = "no step had completed, nothing was saved"
        advice = f"lower learning_rate (now {self.config.learning_rate:g})"
        if self.config.mixed_precision == "fp16":
            advice += ", use mixed_precision bf16 or no instead of fp16"
        if not self.config.max_grad_norm:
            advice += ", set max_grad_norm (1.0)"
        what = f"loss became {value}" if not math.isfinite(value) else "the loss of another process became non-finite"
        return LorakitError(f"{what} at step {step} (epoch {epoch + 1}): training stopped, {kept}; {advice}")

    # --- saving and sampling ----------------------------------------------------------------------------------------

    def _after_step(self, network, optimizer, scheduler, progress: Progress) -> tuple[list[str], list[str]]:
        config = self.config
        return self._save_and_sample(
            network, optimizer, scheduler, progress, "step", progress.global_step,
            config.save_every_n_steps, config.save_last_n_steps, config.sample_every_n_steps,
        )

    def _after_epoch(self, network, optimizer, scheduler, progress: Progress) -> tuple[list[str], list[str]]:
        config = self.config
        if progress.epoch >= self.epochs:  # the final save and samples come after the loop
            return [], []
        return self._save_and_sample(
            network, optimizer, scheduler, progress, "epoch", progress.epoch,
            config.save_every_n_epochs, config.save_last_n_epochs, config.sample_every_n_epochs,
        )

    def _save_and_sample(
        self, network, optimizer, scheduler, progress: Progress, kind: str, now: int,
        save_every: int | None, keep_last: int | None, sample_every: int | None,
    ) -> tuple[list[str], list[str]]:
        """The periodic save (with its state and kohya's last-N retention) and samples due after ``now`` steps or
        epochs; only the main process writes."""
        files, images = [], []
        if not self.accelerator.is_main_process:
            return files, images
        if save_every and now % save_every == 0:
            path = self._save(network, progress, saved_name(self.config.output_name, **{kind: now}))
            files.append(str(path))
            if self.config.save_state:
                self._save_state(network, optimizer, scheduler, progress, path.stem + "-state")
            self._retain(kind, now, save_every, keep_last)
        if sample_every and now % sample_every == 0:
            images += self._sample(network, progress)
        return files, images

    def _retain(self, kind: str, now: int, every: int, keep: int | None) -> None:
        """Delete the per-epoch/per-step file (and state) that fell out of kohya's save_last_n_epochs (files) or
        save_last_n_steps (steps) window."""
        if not keep:
            return
        if kind == "epoch":
            old = now - every * keep  # the last ``keep`` files stay
        else:
            old = now - keep - 1  # files of the last ``keep`` steps stay
            old -= old % every
        if old <= 0:
            return
        name = saved_name(self.config.output_name, **{kind: old})
        path = self.output_dir / name
        path.unlink(missing_ok=True)
        state = self.output_dir / (path.stem + "-state")
        if state.is_dir():
            shutil.rmtree(state)

    def _save(self, network: Network, progress: Progress, name: str, final: bool = False) -> Path:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / name
        dtype = SAVE_DTYPES[self.config.save_precision]
        metadata = self._metadata(progress, final)
        save_network(path, network.to_weights(dtype), dtype=dtype, metadata=metadata, arch=self.adapter.arch)
        self.files.append(path)
        return path

    def _save_state(self, network, optimizer, scheduler, progress: Progress, name: str) -> Path:
        folder = self.output_dir / name
        self.last_state = save_state(folder, network, optimizer, scheduler, progress, self.config.to_dict())
        return self.last_state

    def _sample(self, network: Network, progress: Progress) -> list[str]:
        """One PNG per sample prompt, at the prompt's multiplier (``--m``), named like kohya's."""
        from lorakit_ext.sampling import sample, to_pil

        folder = self.output_dir / "sample"
        folder.mkdir(parents=True, exist_ok=True)
        width, height = self.config.resolution
        written = []
        network.eval()
        try:
            for number, prompt in enumerate(self.sample_prompts):
                network.multiplier = prompt.multiplier
                seed = self.config.seed + number if prompt.seed is None else prompt.seed
                with self.accelerator.autocast():
                    image = sample(
                        self.adapter,
                        [prompt.prompt],
                        [seed],
                        negative_prompt=prompt.negative_prompt,
                        steps=prompt.steps,
                        cfg_scale=prompt.cfg_scale,
                        sampler=self.config.sample_sampler,
                        width=prompt.width or width,
                        height=prompt.height or height,
                    )
                path = folder / f"{self.config.output_name}_{progress.global_step:06d}_{number:02d}_{seed}.png"
                to_pil(image)[0].save(path)
                written.append(str(path))
        finally:
            network.multiplier = 1.0
            network.train()
        self.samples += [Path(p) for p in written]
        return written

    def _metadata(self, progress: Progress, final: bool) -> dict[str, object]:
        """kohya's training ``ss_*`` fields (the tensor-derived ones are added by ``save_network``)."""
        config, summary = self.config, self.dataset.summary
        buckets = {str(i): {"resolution": list(s), "count": n} for i, (s, n) in enumerate(summary.buckets.items())}
        optimizer_args = ",".join(f"{k}={v}" for k, v in parse_optimizer_args(config.optimizer_args).items())
        cls = optimizer_class(config.optimizer_type)
        metadata: dict[str, object] = {
            "ss_session_id": self.session_id,
            "ss_training_started_at": self.started_at,
            "ss_output_name": config.output_name,
            "ss_learning_rate": config.learning_rate,
            "ss_unet_lr": config.lr_for("unet"),
            "ss_text_encoder_lr": config.lr_for("te"),
            "ss_num_train_images": summary.images_with_repeats,
            "ss_num_reg_images": sum(c.images * c.repeats for c in summary.concepts if c.is_reg),
            "ss_num_batches_per_epoch": self.steps_per_epoch * config.gradient_accumulation_steps,
            "ss_num_epochs": self.epochs,
            "ss_epoch": progress.epoch,
            "ss_steps": progress.global_step,
            "ss_max_train_steps": self.max_steps,
            "ss_batch_size_per_device": config.train_batch_size,
            "ss_total_batch_size": config.train_batch_size * self.processes * config.gradient_accumulation_steps,
            "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
            "ss_gradient_checkpointing": config.gradient_checkpointing,
            "ss_lr_warmup_steps": warmup_steps(config, self.max_steps),
            "ss_lr_scheduler": config.lr_scheduler,
            "ss_optimizer": f"{cls.__module__}.{cls.__name__}" + (f"({optimizer_args})" if optimizer_args else ""),
            "ss_max_grad_norm": config.max_grad_norm,
            "ss_mixed_precision": config.mixed_precision,
            "ss_full_fp16": False,
            "ss_resolution": f"({config.resolution[0]}, {config.resolution[1]})",
            "modelspec.resolution": f"{config.resolution[0]}x{config.resolution[1]}",
            "ss_seed": config.seed,
            "ss_cache_latents": config.cache_latents,
            "ss_noise_offset": config.noise_offset or None,
            "ss_multires_noise_iterations": config.multires_noise_iterations or None,
            "ss_multires_noise_discount": config.multires_noise_discount if config.multires_noise_iterations else None,
            "ss_min_snr_gamma": config.min_snr_gamma,
            "ss_min_timestep": config.min_timestep,
            "ss_max_timestep": config.max_timestep,
            "ss_prior_loss_weight": config.prior_loss_weight,
            "ss_network_dropout": config.dropouts_resolved()[0] or None,
            "ss_caption_dropout_rate": config.caption_dropout_rate,
            "ss_shuffle_caption": config.shuffle_caption,
            "ss_keep_tokens": config.keep_tokens,
            "ss_flip_aug": config.flip_aug,
            "ss_masked_loss": config.masked_loss,
            "ss_enable_bucket": config.enable_bucket,
            "ss_min_bucket_reso": config.min_bucket_reso,
            "ss_max_bucket_reso": config.max_bucket_reso,
            "ss_bucket_no_upscale": config.bucket_no_upscale,
            "ss_bucket_info": json.dumps({"buckets": buckets}),
            "ss_dataset_dirs": json.dumps(
                {Path(c.path).name: {"n_repeats": c.repeats, "img_count": c.images} for c in summary.concepts}
            ),
            "ss_tag_frequency": json.dumps({Path(c.path).name: c.tag_frequency for c in summary.concepts}),
            "ss_training_comment": config.training_comment or None,
        }
        source = getattr(self.adapter, "source", None)  # a ModelSource, when whoever loaded the model gave one
        if source is not None:
            metadata.update(source.metadata())
        if final:
            metadata["ss_training_finished_at"] = time.time()
        metadata.update(self.hooks.metadata)
        return {key: value for key, value in metadata.items() if value is not None}

    # --- attachment -----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _network_attached(self) -> Iterator[Network]:
        """The trained network attached (and in training mode) for the block, detached afterwards whatever happens."""
        if self.hooks.network is not None:
            network = self.hooks.network
        else:
            _seed_everything(self.config.seed)  # the initial factors
            network, notes = build_network(self.config, self.adapter)
            for note in notes:
                self.report(message=note)
        network.to(self.adapter.device)
        network.requires_grad_(True)
        was_attached = network.attached
        if not was_attached:
            network.attach()
        network.train()
        try:
            yield network
        finally:
            if not was_attached:
                network.detach()
            network.eval()


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def process_state():
    """accelerate's process-wide ``PartialState``, created so that CPU-only data-parallel runs join their group.

    On a machine without a GPU, accelerate puts processes started by ``torchrun`` into one process group only when
    told to use the CPU (``accelerate launch --cpu`` sets ACCELERATE_USE_CPU); otherwise each would train alone on
    all the data. Whoever touches accelerate first (the CLI's model loading, the trainer) goes through here.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (several and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def _accelerator(mixed_precision: str):
    """An ``Accelerator`` for this run. accelerate keeps its settings in process-wide singletons that refuse a
    second, different ``mixed_precision``; the WebUI trains many times in one process, so the per-run part of that
    state is reset first (the distributed setup, ``PartialState``, is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    state = process_state()
    AcceleratorState._reset_state()
    GradientState._reset_state()
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=state.device.type == "cpu")
    except ValueError as error:  # e.g. older accelerate: "fp16 mixed precision requires a GPU"
        raise LorakitError(f"mixed_precision {mixed_precision}: {str(error).splitlines()[0]}") from None


@contextlib.contextmanager
def _host_preserved(adapter: ModelAdapter) -> Iterator[None]:
    """Restore every host module's training flag and every parameter's requires_grad and grad after the block."""
    modules = [m for root in adapter.components().values() for m in root.modules()]
    modes = [m.training for m in modules]
    params = [p for root in adapter.components().values() for p in root.parameters()]
    flags = [(p.requires_grad, p.grad) for p in params]
    try:
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.training = mode
        for param, (flag, grad) in zip(params, flags):
            param.requires_grad_(flag)
            param.grad = grad


@contextlib.contextmanager
def _gradient_checkpointing(adapter: ModelAdapter, enabled: bool) -> Iterator[None]:
    """Recompute UNet blocks in backward. diffusers UNets have their own switch; ldm/sgm's ``use_checkpoint`` runs
    its own autograd function that only differentiates the block's registered parameters (not our network's), so
    their blocks are wrapped in torch's non-reentrant checkpoint instead (instance ``forward``, removed after)."""
    unet = adapter.components()["unet"]
    if not enabled:
        yield
        return
    if hasattr(unet, "enable_gradient_checkpointing"):
        was = bool(getattr(unet, "is_gradient_checkpointing", False))
        was_training = unet.training
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints only in training mode; the dropouts of SD UNets are 0
        try:
            yield
        finally:
            if not was:
                unet.disable_gradient_checkpointing()
            unet.train(was_training)
        return
    blocks = [b for name in ("input_blocks", "output_blocks") for b in getattr(unet, name, [])]
    blocks += [unet.middle_block] if hasattr(unet, "middle_block") else []
    if not blocks:
        raise LorakitError("gradient_checkpointing: this UNet has neither diffusers' switch nor ldm's blocks")
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def _checkpointed(forward: Callable) -> Callable:
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
