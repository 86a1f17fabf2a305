"""Does a slider work? A weight x seed x prompt sweep rendered as a grid PNG, and numbers measured on its pixels.

The numbers are plain pixel measures (no external model): the foreground is what differs from the image's border
color, its area, hue and centroid are tracked across weights. For each prompt/seed run: Spearman rho between weight
and foreground area (monotonicity), the largest hue and centroid drift from weight 0, the mean change of the
background. Over the sweep: symmetry of the effect at -w and +w, the effect projected on the A -> B pixel direction,
collateral change outside the pairs' difference mask, and leakage of the B image into unrelated prompts. A file
holding NaN/Inf, or a LoRA whose effect is nil, gets an explicit warning instead of numbers that look fine.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lorakit_ext.errors import LorakitError
from lorakit_ext.train.config import NUM_TRAIN_TIMESTEPS

DEFAULT_WEIGHTS = (-1.0, -0.5, 0.0, 0.5, 1.0)
UNRELATED_PROMPTS = ("a blue square", "a green triangle on a black background")


def default_prompts(caption: str = "") -> tuple[str, ...]:
    """The report's prompt rows: the pairs' caption (the prompt trained, where the effect along A -> B is measured;
    empty in the recipe) first, then unrelated toy-world prompts."""
    return (caption, *UNRELATED_PROMPTS)


DEFAULT_PROMPTS = default_prompts()
DEFAULT_SEEDS = (0, 1, 2)
MONOTONIC_RHO = 0.9  # a run counts as monotonic at or above this Spearman rho
NO_EFFECT_AREA = 0.002  # foreground-area change (fraction of the image) below which a weight did nothing visible
# effect along A -> B (1 = the whole mean B - A change) below which the ends of the sweep did nothing (real models)
NO_EFFECT_ALONG_AB = 0.02
NO_EFFECT_PIXELS = 0.5  # mean |change| (0-255) below which the ends did nothing, when there is no pair to project on
MIN_SATURATION = 0.25  # below this the foreground has no meaningful hue (white, black, gray shapes)


@dataclass(frozen=True)
class SweepSettings:
    """What the report renders: every weight for every prompt and seed, with the sampler settings. ``toy_world``:
    the images are toy-world shapes on plain backgrounds, so "no effect" is judged by foreground area; otherwise
    by the change along the A -> B pixel direction (foreground area means nothing on a photograph)."""

    weights: tuple[float, ...] = DEFAULT_WEIGHTS
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    steps: int = 20
    cfg_scale: float = 5.0
    sampler: str = "euler"
    width: int = 64
    height: int = 64
    toy_world: bool = False

    def __post_init__(self) -> None:
        if 0.0 not in self.weights:
            raise LorakitError("--report-weights must include 0 (the base model every change is measured from)")
        if len(self.weights) < 3 or not self.prompts or not self.seeds:
            raise LorakitError("the report needs at least 3 weights, 1 prompt and 1 seed")
        if not all(math.isfinite(weight) for weight in self.weights):
            raise LorakitError(f"--report-weights must be numbers, got {list(self.weights)}")
        if not 1 <= self.steps <= NUM_TRAIN_TIMESTEPS:
            raise LorakitError(f"--report-steps must be between 1 and {NUM_TRAIN_TIMESTEPS}, got {self.steps}")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise LorakitError(f"--report-cfg-scale must be a number 0 or above, got {self.cfg_scale}")


@dataclass(frozen=True)
class PixelMeasure:
    """One image's foreground: area (fraction of the image, every foreground pixel), the shape's hue in degrees
    (None when unsaturated or empty) and centroid (x, y) in pixels (None when empty), and the foreground mask. The
    shape is the largest connected foreground region, so a stray speck does not move its centroid or hue."""

    area: float
    hue: float | None
    centroid: tuple[float, float] | None
    foreground: np.ndarray = field(repr=False)


def measure_pixels(image: np.ndarray, background: np.ndarray | None = None) -> PixelMeasure:
    """Foreground = pixels far from the background color (the toy world's measure, any plain background):
    ``background`` where given, else the image's border color."""
    from lorakit_ext.toy.shapes import foreground_mask, largest_region

    mask = foreground_mask(image, background=background)
    if not mask.any():
        return PixelMeasure(0.0, None, None, mask)
    shape = largest_region(mask)
    rows, cols = np.nonzero(shape)
    red, green, blue = image[shape].astype(np.float64).mean(axis=0) / 255.0
    hue, saturation, _ = colorsys.rgb_to_hsv(red, green, blue)
    return PixelMeasure(
        float(mask.mean()),
        hue * 360.0 if saturation >= MIN_SATURATION else None,
        (float(cols.mean()), float(rows.mean())),
        mask,
    )


def spearman(values: Sequence[float], ranks_of: Sequence[float]) -> float:
    """Spearman rho of two sequences; 0 when either is constant (no monotonic relation to speak of). Rounded to 9
    places: rho of ranks is a ratio of small integers, and one swap in 5 must give 0.9, not 0.8999999999999998."""
    from scipy.stats import spearmanr

    if len(set(values)) < 2 or len(set(ranks_of)) < 2:
        return 0.0
    return round(float(spearmanr(values, ranks_of).statistic), 9)


def hue_distance(first: float, second: float) -> float:
    """Degrees between two hues on the color circle (0..180)."""
    difference = abs(first - second) % 360.0
    return min(difference, 360.0 - difference)


def background_of(image: np.ndarray, base_background: np.ndarray, base_shape: np.ndarray | None) -> np.ndarray:
    """The background color to measure ``image`` (one weight of a run) against: its own border color (which
    follows a background the LoRA recolors), unless that color is the base image's shape color (``base_shape``), as
    when the shape has grown over most of the border: then the base image's background (a square filling the frame
    is area 1, not 0)."""
    from lorakit_ext.toy.shapes import FOREGROUND_DISTANCE, border_color

    own = border_color(image)
    if base_shape is not None and np.linalg.norm(own - base_shape) <= FOREGROUND_DISTANCE:
        return base_background
    return own


def run_metrics(images: np.ndarray, weights: Sequence[float]) -> dict:
    """Numbers for one prompt/seed run: ``images`` (W, H, W, 3) uint8, one per weight."""
    from lorakit_ext.toy.shapes import border_color

    base_index = list(weights).index(0.0)
    base = measure_pixels(images[base_index])
    base_background = border_color(images[base_index])
    base_shape = images[base_index][base.foreground].astype(np.float32).mean(axis=0) if base.foreground.any() else None
    measures = [
        base if index == base_index else measure_pixels(image, background_of(image, base_background, base_shape))
        for index, image in enumerate(images)
    ]
    areas = [m.area for m in measures]
    hue_drift = [hue_distance(m.hue, base.hue) for m in measures if m.hue is not None and base.hue is not None]
    centroid_drift = [
        math.dist(m.centroid, base.centroid) for m in measures if m.centroid is not None and base.centroid is not None
    ]
    background_change = []
    for index, measure in enumerate(measures):
        if index == base_index:
            continue
        outside = ~(measure.foreground | base.foreground)
        if outside.any():
            change = np.abs(images[index].astype(np.float32) - images[base_index].astype(np.float32)).mean(axis=-1)
            background_change.append(float(change[outside].mean()))
    return {
        "area": areas,
        "rho": spearman(list(weights), areas),
        "hue_drift_deg": max(hue_drift) if len(hue_drift) > 1 else None,
        "centroid_drift_px": max(centroid_drift) if len(centroid_drift) > 1 else None,
        "background_change": float(np.mean(background_change)) if background_change else None,
    }


def pair_metrics(images: np.ndarray, settings: SweepSettings, pair_set) -> dict:
    """Measures that need the training pairs: effect along A -> B, collateral change outside the difference mask
    (both on the first prompt, the one trained), and leakage of B into the other prompts."""
    from lorakit_ext.slider.pairs import difference_mask, resized

    width, height = settings.width, settings.height
    mean_a = np.mean([resized(p.a, width, height).astype(np.float32) for p in pair_set.pairs], axis=0)
    mean_b = np.mean([resized(p.b, width, height).astype(np.float32) for p in pair_set.pairs], axis=0)
    masks = [resized((difference_mask(p) * 255).astype(np.uint8), width, height) for p in pair_set.pairs]
    changed = np.max(masks, axis=0) > 0
    direction = (mean_b - mean_a).ravel()
    norm = float(direction @ direction)
    weights = list(settings.weights)
    base_index = weights.index(0.0)
    strongest = max(range(len(weights)), key=lambda i: abs(weights[i]))
    trained = images[0].astype(np.float32)  # (seeds, weights, H, W, 3)
    change = trained - trained[:, base_index : base_index + 1]
    effect = [
        float(np.mean([(change[s, w].ravel() @ direction) / norm for s in range(change.shape[0])])) if norm else 0.0
        for w in range(len(weights))
    ]
    collateral = float(np.abs(change[:, strongest]).mean(axis=-1)[:, ~changed].mean()) if (~changed).any() else None
    leakage = []
    for prompt_images in images[1:].astype(np.float32):
        for run in prompt_images:
            before = float(np.abs(run[base_index] - mean_b).mean())
            after = float(np.abs(run[strongest] - mean_b).mean())
            if before > 0:
                leakage.append((before - after) / before)
    return {
        "effect_along_ab": effect,
        "collateral_outside_mask": collateral,
        "leakage_toward_b": float(np.mean(leakage)) if leakage else None,
    }


def _quantity(values: list, reduce) -> float | None:
    present = [v for v in values if v is not None]
    return float(reduce(present)) if present else None


def sweep_metrics(images: np.ndarray, settings: SweepSettings, pair_set=None) -> dict:
    """All numbers of a sweep: ``images`` (prompts, seeds, weights, H, W, 3) uint8. JSON-ready."""
    weights = list(settings.weights)
    runs = []
    for p, prompt in enumerate(settings.prompts):
        for s, seed in enumerate(settings.seeds):
            runs.append({"prompt": prompt, "seed": seed, **run_metrics(images[p, s], weights)})
    base_index = weights.index(0.0)
    low, high = weights.index(min(weights)), weights.index(max(weights))
    up = [r["area"][high] - r["area"][base_index] for r in runs]
    down = [r["area"][low] - r["area"][base_index] for r in runs]
    symmetric = [-d / u for u, d in zip(up, down) if abs(u) >= NO_EFFECT_AREA]
    per_prompt = {}
    for prompt in settings.prompts:
        mine = [r for r in runs if r["prompt"] == prompt]
        per_prompt[prompt] = {
            "monotonic_fraction": sum(r["rho"] >= MONOTONIC_RHO for r in mine) / len(mine),
            "rho_mean": float(np.mean([r["rho"] for r in mine])),
            "area_mean": np.mean([r["area"] for r in mine], axis=0).tolist(),
        }
    summary = {
        "monotonic_fraction": sum(r["rho"] >= MONOTONIC_RHO for r in runs) / len(runs),
        "rho_median": float(np.median([r["rho"] for r in runs])),
        "hue_drift_deg_max": _quantity([r["hue_drift_deg"] for r in runs], max),
        "hue_drift_deg_median": _quantity([r["hue_drift_deg"] for r in runs], np.median),
        "centroid_drift_px_max": _quantity([r["centroid_drift_px"] for r in runs], max),
        "centroid_drift_px_median": _quantity([r["centroid_drift_px"] for r in runs], np.median),
        "background_change_mean": _quantity([r["background_change"] for r in runs], np.mean),
        "area_change_at_max_weight": float(np.mean(up)),
        "area_change_at_min_weight": float(np.mean(down)),
        "symmetry": float(np.median(symmetric)) if symmetric else None,
    }
    if pair_set is not None:
        summary.update(pair_metrics(images, settings, pair_set))
    area_medians = (float(np.median(down)), float(np.median(up)))
    warning = no_effect_warning(images, settings, summary, area_medians)
    return {
        "weights": weights,
        "prompts": list(settings.prompts),
        "seeds": list(settings.seeds),
        "summary": summary,
        "per_prompt": per_prompt,
        "runs": runs,
        "warnings": [] if warning is None else [warning],
    }


def no_effect_warning(
    images: np.ndarray, settings: SweepSettings, summary: dict, area_medians: tuple[float, float]
) -> str | None:
    """The warning for a LoRA whose ends of the sweep (lowest and highest weight) change nothing, or None. Toy world:
    the median over runs of the foreground-area change (``area_medians``, at the lowest and highest weight); with
    pairs: the effect along A -> B on the trained prompt; else the mean absolute pixel change."""
    weights = list(settings.weights)
    ends = (weights.index(min(weights)), weights.index(max(weights)))
    if settings.toy_world:
        if max(abs(a) for a in area_medians) < NO_EFFECT_AREA:
            return "the LoRA has no visible effect: the foreground area barely changes from weight 0 to the ends"
        return None
    if "effect_along_ab" in summary:
        effect = [summary["effect_along_ab"][i] for i in ends]
        if max(abs(e) for e in effect) < NO_EFFECT_ALONG_AB:
            return (
                f"the LoRA has no visible effect: the images move {effect[0]:+.3f} / {effect[1]:+.3f} of the way"
                f" from A to B at weight {min(weights):g} / {max(weights):g}"
            )
        return None
    base = images[:, :, weights.index(0.0)].astype(np.float32)
    change = max(float(np.abs(images[:, :, i].astype(np.float32) - base).mean()) for i in ends)
    if change < NO_EFFECT_PIXELS:
        return f"the LoRA has no visible effect: the mean pixel change at the ends is {change:.2f} of 255"
    return None


def render_sweep(adapter, network_weights, settings: SweepSettings) -> np.ndarray:
    """The sweep's images, (prompts, seeds, weights, H, W, 3) uint8: the network attached at each weight in turn."""
    import torch

    from lorakit_ext.networks.network import network_from_weights
    from lorakit_ext.sampling import sample, to_uint8

    prompts = [prompt for prompt in settings.prompts for _ in settings.seeds]
    seeds = [seed for _ in settings.prompts for seed in settings.seeds]
    per_weight = []
    network = network_from_weights(network_weights, adapter.targets(), adapter.arch).to(adapter.device).eval()
    network.attach()
    try:
        with torch.no_grad():
            for weight in settings.weights:
                network.multiplier = weight
                images = sample(
                    adapter,
                    prompts,
                    seeds,
                    steps=settings.steps,
                    cfg_scale=settings.cfg_scale,
                    sampler=settings.sampler,
                    width=settings.width,
                    height=settings.height,
                )
                per_weight.append(to_uint8(images))
    finally:
        network.detach()
    stacked = np.stack(per_weight, axis=1)  # (prompts * seeds, weights, H, W, 3)
    return stacked.reshape(len(settings.prompts), len(settings.seeds), *stacked.shape[1:])


def sweep_grid(images: np.ndarray, settings: SweepSettings, scale: int = 2):
    """A PIL image: one row per prompt/seed, one column per weight, labelled on both axes."""
    import torch
    from PIL import Image, ImageDraw

    from lorakit_ext.sampling import grid

    prompts, seeds, weights = images.shape[:3]
    flat = torch.from_numpy(images.reshape(-1, *images.shape[3:])).permute(0, 3, 1, 2).float() / 255.0
    labels = [f"{prompt or '(empty)'} | seed {seed}" for prompt in settings.prompts for seed in settings.seeds]
    body = grid(flat, columns=weights, row_labels=labels, scale=scale)
    cell = settings.width * scale
    margin = body.width - weights * cell
    header = 16
    canvas = Image.new("RGB", (body.width, body.height + header), "white")
    canvas.paste(body, (0, header))
    draw = ImageDraw.Draw(canvas)
    for column, weight in enumerate(settings.weights):
        draw.text((margin + column * cell + cell // 2 - 10, 2), f"{weight:+g}", fill="black")
    return canvas


def non_finite_tensors(path: str | Path) -> list[str]:
    """Names of the file's tensors holding NaN or Inf (read raw, so the report can say so instead of failing)."""
    import torch

    from lorakit_ext.formats.safetensors_io import load_tensors

    return [name for name, tensor in load_tensors(path).items() if not bool(torch.isfinite(tensor.float()).all())]


def report_paths(network_path: str | Path) -> tuple[Path, Path]:
    """Where the report of ``x.safetensors`` goes: ``x.slider.png`` and ``x.slider.json`` beside it."""
    path = Path(network_path)
    return path.with_suffix(".slider.png"), path.with_suffix(".slider.json")


def slider_report(adapter, network_path: str | Path, settings: SweepSettings, pair_set=None, method: str = "") -> dict:
    """Render, measure and write the report of a saved slider file; returns the metrics (also in the JSON)."""
    from lorakit_ext.formats.kohya import load_network
    from lorakit_ext.formats.safetensors_io import write_atomic

    grid_path, json_path = report_paths(network_path)
    bad = non_finite_tensors(network_path)
    if bad:
        warning = f"the file holds NaN/Inf in {len(bad)} tensors (e.g. {bad[0]}): it is unusable"
        metrics = {"file": str(network_path), "method": method, "warnings": [warning]}
    else:
        images = render_sweep(adapter, load_network(network_path), settings)
        metrics = {"file": str(network_path), "method": method, **sweep_metrics(images, settings, pair_set)}
        buffer = io.BytesIO()
        sweep_grid(images, settings).save(buffer, format="PNG")
        write_atomic(grid_path, [buffer.getvalue()])
        metrics["grid"] = str(grid_path)
    metrics["settings"] = asdict(settings)
    write_atomic(json_path, [json.dumps(metrics, indent=2).encode()])
    return metrics
