"""The three ways to turn before/after pairs into a slider LoRA, each one job on any ``ModelAdapter``.

- copier: overfit LoRA A on the A images, check that it copies them, keep it applied as a frozen fp32 branch, train
  LoRA B on the B images on top of it, detach A, save B. B then holds only what turns A into B.
- difference: overfit A and B separately on the base model and write B x 1 + A x (-1) exactly (rank concatenation,
  the merge code's), optionally re-compressed to a rank by its factor SVD. Unlike kohya's ``--concat --ratios 1 -1``
  the result is the whole of B - A, not half of it.
- paired: one LoRA trained at multiplier +w on B and -w on A with the same noise and timestep (the Concept Sliders
  image-pair objective), for comparison.

Every pass trains through ``lorakit_ext.train.trainer.train`` (``train_pass``), so every training option applies to
each pass. Every output is a plain kohya LoRA whose metadata names the method and the pair images' sha256.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorakit_ext.errors import LorakitError
from lorakit_ext.slider.pairs import PairSet, resized, write_dataset

# The established slider recipe; a TOML file and command-line options override any of it.
SLIDER_DEFAULTS: dict[str, object] = {
    "learning_rate": 1e-3,
    "network_dim": 4,
    "network_alpha": 1.0,
    "network_train_unet_only": True,
    "optimizer_type": "AdamW",
    "lr_scheduler": "cosine_with_restarts",
    "noise_offset": 0.1,
    "default_caption": "",
}
METHODS = ("copier", "difference", "paired")
COPY_SIMILARITY_MIN = 0.85  # below this mean pixel similarity LoRA A is said not to copy the A images
# ... and unless it leaves at most this fraction of the base model's distance to them: a caption that names the
# pairs' content makes the base model itself draw something like A (the toy model's "a red circle": 0.90)
COPY_DISTANCE_LEFT_MAX = 0.5
METADATA_METHOD = "lorakit_slider_method"
METADATA_SOURCES = "lorakit_slider_sources"
METADATA_ENSEMBLE = "lorakit_slider_ensemble"
METADATA_ANCHOR = "lorakit_slider_anchor"

Reporter = Callable[..., None]


@dataclass
class SliderResult:
    """What a slider job produced. ``output`` is None when it was stopped before the final file; ``saved`` is every
    slider file the job wrote (per-epoch / per-step saves, then ``output``)."""

    method: str
    output: Path | None
    saved: list[Path] = field(default_factory=list)
    kept_a: Path | None = None
    copy_similarity: float | None = None
    base_similarity: float | None = None  # the base model's, for scale
    metrics: dict | None = None
    warnings: list[str] = field(default_factory=list)
    stopped: bool = False

    def summary(self) -> dict:
        """The JSON-ready outcome: what the CLI prints and what a WebUI / HTTP job returns beside its file fields."""
        return {
            "method": self.method,
            "output": str(self.output) if self.output else None,
            "kept_a": str(self.kept_a) if self.kept_a else None,
            "copy_similarity": self.copy_similarity,
            "base_similarity": self.base_similarity,
            "stopped": self.stopped,
            "report": (self.metrics or {}).get("summary"),
            "warnings": self.warnings,
        }


def slider_config(pair_set: PairSet, values: Mapping[str, object] | None = None, toml: str | Path | None = None):
    """The ``TrainConfig`` of a slider job: the recipe, then the TOML file, then ``values``; the resolution defaults
    to the pairs' image size."""
    from lorakit_ext.train.config import TrainConfig, flatten_sections, read_toml

    width, height = pair_set.pairs[0].size
    base = {**SLIDER_DEFAULTS, "resolution": (width, height)}
    if toml is not None:  # every option the file names, even one at the engine's default, wins over the recipe
        base.update(flatten_sections(read_toml(toml)))
    config = TrainConfig.from_dict(base, source="slider recipe" if toml is None else f"{toml} over the slider recipe")
    return config.with_overrides(dict(values or {}), source="slider options") if values else config


def slider_metadata(method: str, pair_set: PairSet, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {METADATA_METHOD: method, METADATA_SOURCES: pair_set.sources_json(), **dict(extra or {})}


def train_pass(config, adapter, data_dir: Path, out: Path, report: Reporter, token, hooks=None):
    """One training pass through the engine, writing ``out``: the single place the slider methods call the trainer."""
    from lorakit_ext.train.trainer import train

    run = config.with_overrides(
        {"train_data_dir": str(data_dir), "output_dir": str(out.parent), "output_name": out.stem}, source="slider"
    )
    return train(run, adapter, report, token, hooks)


def _phase(report: Reporter, name: str) -> Reporter:
    """``report`` with each message prefixed by the pass it comes from."""

    def phase_report(**event) -> None:
        if event.get("message"):
            event["message"] = f"{name}: {event['message']}"
        report(**event)

    return phase_report


def check_files(out: str | Path, keep_a: str | Path | None = None, reuse_a: str | Path | None = None) -> None:
    """Refuse output files that cannot be written and a LoRA A to reuse that cannot be read or would be replaced,
    before anything trains (the methods and the CLI's ``--dry-run`` check here; the HTTP routes check the same
    under their own names before submitting)."""
    from lorakit_ext.formats.kohya import load_network
    from lorakit_ext.formats.safetensors_io import check_output_file

    out = Path(out)
    for flag, path in (("--out", out), ("--keep-a", keep_a)):
        if path is not None:
            check_output_file(path, flag)
    if keep_a is not None and reuse_a is not None:
        raise LorakitError("--keep-a: A is reused (--reuse-a), so there is no trained A to keep")
    if keep_a is not None and _same_file(keep_a, out):
        raise LorakitError(f"--keep-a {Path(keep_a).name} is the slider's own file (--out): give A another name")
    if reuse_a is not None:
        if not Path(reuse_a).is_file():
            raise LorakitError(f"--reuse-a {reuse_a}: no such file")
        if _same_file(reuse_a, out):  # the slider's save would replace the A it was trained over
            raise LorakitError(f"--reuse-a {Path(reuse_a).name} is the slider's own file (--out): write the slider"
                               " to another file")
        load_network(reuse_a)  # a readable LoRA: its architecture is checked when it is applied to the model


def _same_file(first: str | Path, second: str | Path) -> bool:
    """The same file by any spelling or link (files that do not exist yet compare by their resolved paths)."""
    first, second = Path(first), Path(second)
    if first.exists() and second.exists():
        return os.path.samefile(first, second)
    return first.resolve() == second.resolve()


def copy_similarity(adapter, weights, pair_set: PairSet, seeds: list[int], config) -> float:
    """How well LoRA A alone (``weights``; None: the base model) reproduces the A images from the training caption:
    the mean over seeds of 1 - mean |generated - nearest A image| / 255 (1: pixel-identical)."""
    from lorakit_ext.networks.network import network_from_weights
    from lorakit_ext.sampling import sample, to_uint8

    width, height = config.resolution
    network = None if weights is None else network_from_weights(weights, adapter.targets(), adapter.arch)
    if network is not None:
        network.to(adapter.device).eval().attach()
    try:
        images = to_uint8(
            sample(adapter, [config.default_caption] * len(seeds), seeds, cfg_scale=1.0, width=width, height=height)
        ).astype(np.float32)
    finally:
        if network is not None:
            network.detach()
    targets = [np.asarray(resized(p.a, width, height), dtype=np.float32) for p in pair_set.pairs]
    return float(np.mean([1 - min(np.abs(image - t).mean() for t in targets) / 255.0 for image in images]))


def _frozen_branch(weights, adapter):
    """Network A attached as an fp32 branch that training cannot change (B's wrapper stacks above it)."""
    from lorakit_ext.networks.network import network_from_weights

    network = network_from_weights(weights, adapter.targets(), adapter.arch, dtype=torch.float32)
    network.to(adapter.device).requires_grad_(False).eval()
    return network.attach()


def _new_network(config, adapter):
    """The zero-delta network the config trains, initialised from the config's seed as the trainer would."""
    from lorakit_ext.networks.network import create_network
    from lorakit_ext.train.trainer import network_spec

    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        return create_network(adapter.targets(), network_spec(config))


def _overfit(
    config, adapter, pair_set: PairSet, side: str, out: Path, work: Path, report, token, masked: bool, start=None,
    anchor: float = 0.0,
):
    """Overfit a LoRA on one side's images, from zero or, with ``start`` (network weights), from that network; with
    ``anchor`` > 0, held near ``start`` by ``anchor`` x the squared distance of its weights from there (L2-SP)."""
    from lorakit_ext.networks.network import network_from_weights
    from lorakit_ext.train.trainer import TrainHooks

    data = write_dataset(pair_set, side, work / f"data_{side}", masked=masked)
    run = config.with_overrides({"masked_loss": masked, "save_precision": "float"}, source="slider")
    hooks = None
    if start is not None:
        network = network_from_weights(start, adapter.targets(), adapter.arch).requires_grad_(True)
        hooks = TrainHooks(network=network, batch_loss=_anchored_loss(network, anchor))
    name = f"LoRA {side.upper()}" + (" from A" if start is not None else "")
    return train_pass(run, adapter, data, out, _phase(report, name), token, hooks)


def _anchored_loss(network, anchor: float):
    """The diffusion loss plus ``anchor`` x the squared distance of the network's weights from where they are now;
    None (the plain loss) when ``anchor`` is 0."""
    if not anchor:
        return None
    anchors = [(parameter, parameter.detach().clone()) for parameter in network.parameters() if parameter.requires_grad]

    def loss(run, batch):
        distance = sum(((parameter - start) ** 2).sum() for parameter, start in anchors)
        return run.diffusion_loss(batch) + anchor * distance

    return loss


def _lora_a(config, adapter, pair_set, work: Path, reuse_a, keep_a, report, token, masked: bool) -> Path | None:
    """LoRA A's file: ``reuse_a`` as given, or A trained now (into ``keep_a`` when given); None when stopped."""
    if reuse_a is not None:  # checked by check_files
        return Path(reuse_a)
    a_path = Path(keep_a) if keep_a is not None else work / "lora_a.safetensors"
    return None if _overfit(config, adapter, pair_set, "a", a_path, work, report, token, masked).stopped else a_path


def copier(
    pair_set: PairSet,
    config,
    adapter,
    out: str | Path,
    *,
    reuse_a: str | Path | None = None,
    keep_a: str | Path | None = None,
    masked: bool = False,
    verify_seeds: int = 4,
    ensemble: int = 1,
    anchor: float = 0.0,
    report: Reporter | None = None,
    token=None,
) -> SliderResult:
    """The copier method (module docstring). ``reuse_a`` skips training A; ``keep_a`` saves the trained A there.
    ``masked`` weights B's loss by the pairs' difference mask. ``ensemble`` > 1 trains B that many times over A, with
    seeds ``seed``, ``seed + 1``, ..., and saves their exact average (rank ``ensemble`` x dim): what every run learns
    stays whole, what one seed's run picked up alone is divided by ``ensemble``. ``anchor`` adds ``anchor`` x the
    squared distance of B's weights from their start to B's loss: B then holds less of what its seed alone picked
    up, a cleaner and weaker slider."""
    from lorakit_ext.formats.kohya import load_network, save_network
    from lorakit_ext.merge.algebra import merge_networks
    from lorakit_ext.train.job import StopToken
    from lorakit_ext.train.trainer import SAVE_DTYPES, TrainHooks

    out, report, token = Path(out), report or (lambda **_: None), token or StopToken()
    check_files(out, keep_a, reuse_a)
    check_options("copier", {"ensemble": ensemble, "anchor": anchor, "verify_seeds": verify_seeds})
    result = SliderResult("copier", None)
    with tempfile.TemporaryDirectory(prefix="lorakit-copier-") as temp:
        work = Path(temp)
        a_path = _lora_a(config, adapter, pair_set, work, reuse_a, keep_a, report, token, masked=False)
        if a_path is None:
            return dataclasses.replace(result, stopped=True)
        result.kept_a = Path(keep_a) if keep_a is not None else None
        weights_a = load_network(a_path)
        seeds = list(range(config.seed, config.seed + verify_seeds))
        result.copy_similarity = copy_similarity(adapter, weights_a, pair_set, seeds, config)
        result.base_similarity = copy_similarity(adapter, None, pair_set, seeds, config)
        similarity, base = result.copy_similarity, result.base_similarity
        report(message=f"LoRA A copies the A images with similarity {similarity:.3f} (the base model: {base:.3f})")
        if similarity < COPY_SIMILARITY_MIN or 1 - similarity > COPY_DISTANCE_LEFT_MAX * (1 - base):
            needed = max(COPY_SIMILARITY_MIN, 1 - COPY_DISTANCE_LEFT_MAX * (1 - base))
            result.warnings.append(
                f"LoRA A does not copy the A images (similarity {similarity:.3f}, needed {needed:.3f}: at least"
                f" {COPY_SIMILARITY_MIN}, and {1 - COPY_DISTANCE_LEFT_MAX:.0%} of the way from the base model's"
                f" {base:.3f} to 1): train it longer or at a higher learning rate, or the slider will carry A's content"
            )
            report(message="warning: " + result.warnings[-1])
        data_b = write_dataset(pair_set, "b", work / "data_b", masked=masked)
        metadata = slider_metadata("copier", pair_set, {**_a_note(a_path, weights_a), METADATA_ANCHOR: str(anchor)})
        members = []
        branch_a = _frozen_branch(weights_a, adapter)
        try:
            for member in range(ensemble):
                run = config.with_overrides({"masked_loss": masked, "seed": config.seed + member}, source="slider")
                target = out if ensemble == 1 else work / f"lora_b_{member + 1}.safetensors"
                name = "LoRA B on A" if ensemble == 1 else f"LoRA B {member + 1}/{ensemble} on A"
                network = _new_network(run, adapter)
                hooks = TrainHooks(network=network, batch_loss=_anchored_loss(network, anchor), metadata=metadata)
                members.append(train_pass(run, adapter, data_b, target, _phase(report, name), token, hooks))
                if members[-1].stopped:
                    break
        finally:
            branch_a.detach()
        result.stopped = members[-1].stopped
        if ensemble == 1:
            result.output, result.saved = members[0].output, list(members[0].files)
            return result
        finished = [member for member in members if not member.stopped]
        if not finished:  # stopped during the first run: nothing to average
            return result
        # stopped later: the runs that finished are averaged, so a stop loses none of them
        metadata[METADATA_ENSEMBLE] = str(len(finished))
        sources = [f"lora_b_{number}" for number in range(1, len(finished) + 1)]
        ratios = [1.0 / len(finished)] * len(finished)
        # each earlier save (epoch / step) every run wrote is averaged too, and written beside ``out``
        for target, paths in [*_earlier_saves(finished, out), (out, [member.output for member in finished])]:
            weights = [load_network(path) for path in paths]
            averaged = merge_networks(weights, ratios, sources=sources)
            progress = _progress_fields(weights[0]) if target != out else {}
            save_network(target, averaged, dtype=SAVE_DTYPES[config.save_precision],
                         metadata={**metadata, **progress, "ss_output_name": out.stem}, arch=adapter.arch)
            result.saved.append(target)
    report(message=f"average of {len(finished)} B runs saved", files=[str(path) for path in result.saved])
    result.output = out
    return result


def _earlier_saves(passes, out: Path) -> list[tuple[Path, list[Path]]]:
    """The earlier saves (``name-000002.safetensors``, ``name-step00000500.safetensors``) that every one of the
    finished training ``passes`` wrote, each as (the file of that name beside ``out``, the passes' files), in the
    order they were written. Saves that ``save_last_n_epochs`` / ``_steps`` deleted are skipped."""
    by_suffix: dict[str, list[Path]] = {}
    for done in passes:
        for path in done.files:
            if path != done.output and path.is_file():
                by_suffix.setdefault(path.name[len(done.output.stem):], []).append(path)
    every = [(suffix, paths) for suffix, paths in by_suffix.items() if len(paths) == len(passes)]
    return [(out.with_name(out.stem + suffix), paths) for suffix, paths in every]


def _progress_fields(weights) -> dict[str, str]:
    """The training-progress fields of an earlier save (its epoch and step), for the file derived from it."""
    return {key: weights.metadata[key] for key in ("ss_epoch", "ss_steps") if key in weights.metadata}


def _a_note(a_path: Path, weights_a) -> dict[str, str]:
    source = {"file": a_path.name, "sshs_model_hash": weights_a.metadata.get("sshs_model_hash", "")}
    return {"lorakit_slider_a": json.dumps(source)}


def shuffled_ranks(weights, seed: int):
    """The same network with each LoRA module's rank axis permuted: the same delta, factors that no longer show
    which rows came from which training image."""
    from lorakit_ext.networks.weights import LORA_DOWN, LORA_UP, ModuleWeights, NetworkWeights

    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, module in weights.modules.items():
        if module.algo != "lora" or "lora_mid.weight" in module.tensors:
            raise LorakitError(f"--shuffle works on plain LoRA modules; {name} is {module.algo}")
        order = torch.randperm(module.rank, generator=generator)
        tensors = dict(module.tensors)
        tensors[LORA_DOWN] = module.tensors[LORA_DOWN][order].contiguous()
        tensors[LORA_UP] = module.tensors[LORA_UP][:, order].contiguous()
        modules[name] = ModuleWeights(tensors, module.alpha)
    return NetworkWeights(modules, dict(weights.metadata))


def difference_weights(
    weights_b, weights_a, *, rank: int | None = None, shuffle: bool = False, seed: int = 0, report: Reporter | None = None
):
    """B x 1 + A x (-1) as one LoRA: exact by rank concatenation, or the best rank-``rank`` approximation; with
    ``shuffle`` the rank axis is permuted (same delta)."""
    from lorakit_ext.merge.algebra import merge_networks
    from lorakit_ext.merge.svd import RankRule, merge_compressed

    sources, ratios = ["lora_b", "lora_a"], [1.0, -1.0]
    if rank is None:
        merged = merge_networks([weights_b, weights_a], ratios, sources=sources)
    else:
        rule = RankRule(rank=rank, conv_rank=rank)
        merged, compression = merge_compressed([weights_b, weights_a], ratios, rule, sources=sources)
        if report is not None:
            report(message=f"compressed to rank {rank}: relative error {compression.relative_error:.4f}")
    return shuffled_ranks(merged, seed) if shuffle else merged


def difference(
    pair_set: PairSet,
    config,
    adapter,
    out: str | Path,
    *,
    rank: int | None = None,
    shuffle: bool = False,
    reuse_a: str | Path | None = None,
    keep_a: str | Path | None = None,
    b_from_a: bool = False,
    anchor: float = 0.0,
    masked: bool = False,
    report: Reporter | None = None,
    token=None,
) -> SliderResult:
    """The difference method (module docstring): B x 1 + A x (-1), exact, or re-compressed to ``rank``.
    ``b_from_a`` starts B's training from A's weights instead of zero: B then differs from A only by what turns A's
    images into B's, and less of the two passes' separate noise is left in B - A. ``anchor`` (with ``b_from_a``)
    adds ``anchor`` x the squared distance of B's weights from A's to B's loss: B moves from A only where the B
    images keep pulling it, so less of the pass's drift is left in B - A."""
    from lorakit_ext.formats.kohya import load_network, save_network
    from lorakit_ext.train.job import StopToken
    from lorakit_ext.train.trainer import SAVE_DTYPES

    out, report, token = Path(out), report or (lambda **_: None), token or StopToken()
    check_files(out, keep_a, reuse_a)
    check_options("difference", {"rank": rank, "b_from_a": b_from_a, "anchor": anchor})
    result = SliderResult("difference", None)
    with tempfile.TemporaryDirectory(prefix="lorakit-difference-") as temp:
        work = Path(temp)
        a_path = _lora_a(config, adapter, pair_set, work, reuse_a, keep_a, report, token, masked)
        if a_path is None:
            return dataclasses.replace(result, stopped=True)
        result.kept_a = Path(keep_a) if keep_a is not None else None
        b_path = work / "lora_b.safetensors"
        start = load_network(a_path) if b_from_a else None
        pass_b = _overfit(config, adapter, pair_set, "b", b_path, work, report, token, masked, start, anchor)
        if pass_b.stopped:
            return dataclasses.replace(result, stopped=True)
        weights_a = load_network(a_path)
        extra = {
            "ss_output_name": out.stem,
            "lorakit_slider_shuffled": str(shuffle),
            "lorakit_slider_b_from_a": str(b_from_a),
            METADATA_ANCHOR: str(anchor),
        }
        metadata = slider_metadata("difference", pair_set, extra)
        # each earlier save of B (epoch / step) minus the final A is written beside ``out`` too
        for target, (path,) in [*_earlier_saves([pass_b], out), (out, [b_path])]:
            weights_b = load_network(path)
            merged = difference_weights(weights_b, weights_a, rank=rank, shuffle=shuffle, seed=config.seed,
                                        report=report if target == out else None)
            progress = _progress_fields(weights_b) if target != out else {}
            save_network(target, merged, dtype=SAVE_DTYPES[config.save_precision], metadata={**metadata, **progress},
                         arch=adapter.arch)
            result.saved.append(target)
    report(message="difference saved", files=[str(path) for path in result.saved])
    result.output = out
    return result


def paired(
    pair_set: PairSet,
    config,
    adapter,
    out: str | Path,
    *,
    weight: float = 1.0,
    masked: bool = False,
    report: Reporter | None = None,
    token=None,
) -> SliderResult:
    """The paired method (module docstring): each batch of B images is trained at multiplier +``weight`` and its A
    partners at -``weight``, with the same noise and timesteps; the loss is the mean of the two."""
    from lorakit_ext.train.job import StopToken
    from lorakit_ext.train.trainer import TrainHooks

    out, report, token = Path(out), report or (lambda **_: None), token or StopToken()
    check_files(out)
    check_options("paired", {"weight": weight})
    partners = PairPartners(pair_set)

    def paired_loss(run, batch):
        network = run.network
        a_latents = partners.latents(run.adapter, batch.examples)
        try:
            network.multiplier = weight
            loss_b = run.diffusion_loss(batch)
            network.multiplier = -weight
            loss_a = run.diffusion_loss(dataclasses.replace(batch, latents=a_latents))
        finally:
            network.multiplier = 1.0
        return (loss_a + loss_b) / 2

    metadata = slider_metadata("paired", pair_set, {"lorakit_slider_weight": str(weight)})
    hooks = TrainHooks(batch_loss=paired_loss, metadata=metadata)
    with tempfile.TemporaryDirectory(prefix="lorakit-paired-") as temp:
        data_b = write_dataset(pair_set, "b", Path(temp) / "data_b", masked=masked)
        run = config.with_overrides({"masked_loss": masked}, source="slider")
        trained = train_pass(run, adapter, data_b, out, _phase(report, "paired LoRA"), token, hooks)
    return SliderResult("paired", trained.output, list(trained.files), stopped=trained.stopped)


class PairPartners:
    """The A image of each B training example, found by pixels (the nearest B of the pairs at the example's size,
    flipped or not), so it works whatever the dataset's keys look like and follows flip augmentation."""

    def __init__(self, pair_set: PairSet):
        self.pair_set = pair_set
        self._by_size: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _stacks(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (height, width) not in self._by_size:

            def stack(side: str) -> torch.Tensor:
                images = [resized(getattr(p, side), width, height) for p in self.pair_set.pairs]
                return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1

            self._by_size[(height, width)] = (stack("a"), stack("b"))
        return self._by_size[(height, width)]

    def pixels(self, example) -> torch.Tensor:
        """(3, H, W) in [-1, 1]: the A partner of ``example`` under the same flip."""
        height, width = example.pixels.shape[1:]
        a_images, b_images = self._stacks(height, width)
        pixels = example.pixels.float().cpu()
        plain = (b_images - pixels).abs().flatten(1).mean(1)
        flipped = (b_images.flip(-1) - pixels).abs().flatten(1).mean(1)
        index = int(torch.minimum(plain, flipped).argmin())
        partner = a_images[index]
        return partner.flip(-1) if flipped[index] < plain[index] else partner

    def latents(self, adapter, examples) -> torch.Tensor:
        pixels = torch.stack([self.pixels(e) for e in examples]).to(adapter.device)
        with torch.no_grad():
            return adapter.encode_images(pixels).float()


def check_options(method: str, options: Mapping[str, object]) -> None:
    """Refuse a method's own options that cannot work, before anything trains (the methods, the CLI's
    ``--dry-run`` and the HTTP routes all check here)."""
    anchor = options.get("anchor", 0.0)
    if anchor < 0 or not math.isfinite(anchor):
        raise LorakitError(f"--anchor must be a number 0 or above, got {anchor}")
    for option in ("ensemble", "verify_seeds"):
        if method == "copier" and options.get(option, 1) < 1:
            raise LorakitError(f"--{option.replace('_', '-')} must be at least 1, got {options[option]}")
    weight = options.get("weight", 1.0)
    if method == "paired" and not (weight > 0 and math.isfinite(weight)):
        raise LorakitError(f"--weight must be a positive number, got {weight}")
    if method != "difference":
        return
    rank = options.get("rank")
    if rank is not None and rank < 1:
        raise LorakitError(f"--rank must be at least 1, got {rank}")
    if anchor and not options.get("b_from_a"):  # B from zero: A's own wandering would stay whole in B - A
        raise LorakitError("--anchor holds B near A's weights, so B must start from them: add --b-from-a")


def run_method(
    method: str, pair_set: PairSet, config, adapter, out: str | Path, report_settings=None, **options
) -> SliderResult:
    """Run one method and, when ``report_settings`` (a ``SweepSettings``) is given, the slider report on each file
    it saved: the final file with ``report_settings``, each earlier save (``save_every_n_epochs`` / ``_steps``) with
    its first seed only, so the epochs can be compared cheaply. The reports run after training, since the networks
    being trained are attached to the model while it trains. The CLI verbs, the WebUI tab and the HTTP API all
    come through here."""
    from lorakit_ext.slider.report import report_paths, slider_report

    functions = {"copier": copier, "difference": difference, "paired": paired}
    if method not in functions:
        raise LorakitError(f"slider method {method!r} is not one of {', '.join(METHODS)}")
    result = functions[method](pair_set, config, adapter, out, **options)
    if report_settings is None:
        return result
    reporter = options.get("report") or (lambda **_: None)
    earlier = dataclasses.replace(report_settings, seeds=report_settings.seeds[:1])
    for path in result.saved:
        if not path.is_file():  # an earlier save that save_last_n_epochs / _steps deleted
            continue
        settings = report_settings if path == result.output else earlier
        sizes = f"{len(settings.weights)} weights x {len(settings.seeds)} seeds x {len(settings.prompts)} prompts"
        reporter(message=f"slider report of {path.name}: {sizes}")
        metrics = slider_report(adapter, path, settings, pair_set, method)
        written = [str(report) for report in report_paths(path) if report.is_file()]
        reporter(message=f"slider report of {path.name} written", files=written)
        if path == result.output:
            result.metrics = metrics
            result.warnings += metrics["warnings"]
    return result
