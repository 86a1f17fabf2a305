"""Slider quality on the toy world: copier, difference, paired, and a naive LoRA trained on B alone, side by side.

Task (lorakit_ext.slider.demo): A = a red circle, B = the same image with the circle 1.6x wider, on each of the toy
world's backgrounds (``--backgrounds white`` for one pair), with the demo's training settings (``--set`` changes
any). Each method's LoRA is applied to the base toy model for 4 prompts of other colors and shapes x 16 seeds x
weights -1, -0.5, 0, 0.5, 1, and measured on pixels: Spearman rho between weight and foreground area, hue and
centroid drift of the shape from weight 0 (the largest over the weights), background change. The training prompt
is rendered too (the grid's first rows) but not judged.

Goals for copier and difference, judged per prompt/seed run: rho >= 0.9, hue drift <= 10 degrees, centroid drift
<= 2 px (a drift that cannot be measured, because the shape vanished or lost its colour, fails). A method meets the
goal when at least 90% of its runs pass each of the three. Per run the JSON lists the numbers and the three
judgments; per method the fraction of runs passing each, all three, and the median / 90th percentile of the drifts.
How strong the effect is stands beside them: the median growth, the shape's area at the largest weight over its
area at the smallest (the goals do not ask for strength, and a LoRA that barely changes the image meets the hue
and centroid goals by doing little).

Beside the methods it scores a perfect slider, measured the same way: each base image's shape scaled 1.6 ** weight
in place, moved only as far as the image border forces it. That is the ceiling of each goal on what the base model
draws (large shapes near the border must move to grow). Each method's centroid drift is also judged beyond the
perfect slider's on the same base image (``meets_goal_beyond_border``): the drift the border does not force.

    OMP_NUM_THREADS=1 python benchmarks/slider_toy.py --out /tmp/slider_bench [--seeds 16] [--steps 80]
        [--methods copier ...] [--backgrounds white gray black] [--masked] [--ensemble K] [--set OPTION=VALUE ...]
    OMP_NUM_THREADS=1 python benchmarks/slider_toy.py --out /tmp/slider_quick --quick   # starts, ~2 min
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: run as python benchmarks/NAME.py

from lorakit_ext.slider.demo import GROWTH, TOY_BACKGROUNDS, toy_config, toy_pair_set
from lorakit_ext.toy.shapes import BACKGROUNDS

# judged: four prompts of other colors and shapes (the report renders the training prompt first, not judged)
JUDGED_PROMPTS = ("a blue square", "a green triangle", "a yellow circle", "a blue triangle")
GOAL_RHO, GOAL_FRACTION, GOAL_HUE_DEG, GOAL_CENTROID_PX = 0.9, 0.9, 10.0, 2.0
QUICK = {"seeds": 2, "steps": 4, "sample_steps": 4}
# benchmark name: (slider method, its options); "naive" is a LoRA trained on B alone
METHODS = {
    "copier": ("copier", {}),
    "copier-anchored": ("copier", {"anchor": 3e-4}),
    "difference": ("difference", {}),
    "difference-b-from-a": ("difference", {"b_from_a": True}),
    "difference-anchored": ("difference", {"b_from_a": True, "anchor": 1e-3}),
    "paired": ("paired", {}),
    "naive": (None, {}),
}


def judged_runs(metrics: dict, perfect: list[dict] | None = None) -> list[dict]:
    """Each unrelated-prompt run's numbers with its pass/fail against the three goals. With ``perfect`` (the perfect
    slider's judged runs), also the centroid drift beyond the perfect slider's on the same base image: the part of
    the drift that the image border does not force."""
    forced = {(r["prompt"], r["seed"]): r["centroid_drift_px"] for r in perfect or ()}
    judged = []
    for run in metrics["runs"]:
        if run["prompt"] not in JUDGED_PROMPTS:
            continue
        hue, centroid, areas = run["hue_drift_deg"], run["centroid_drift_px"], run["area"]
        judged.append({
            "prompt": run["prompt"],
            "seed": run["seed"],
            "rho": run["rho"],
            "hue_drift_deg": hue,
            "centroid_drift_px": centroid,
            "background_change": run["background_change"],
            "growth": areas[-1] / areas[0] if areas[0] > 0 else None,
            "rho_ok": bool(run["rho"] >= GOAL_RHO),
            "hue_ok": bool(hue is not None and hue <= GOAL_HUE_DEG),
            "centroid_ok": bool(centroid is not None and centroid <= GOAL_CENTROID_PX),
        })
        if perfect is not None:
            border = forced.get((run["prompt"], run["seed"]))
            beyond = None if centroid is None or border is None else max(0.0, centroid - border)
            judged[-1]["centroid_beyond_perfect_px"] = beyond
            judged[-1]["centroid_beyond_perfect_ok"] = bool(beyond is not None and beyond <= GOAL_CENTROID_PX)
    return judged


def goals(runs: list[dict]) -> dict:
    """A method's verdict over its judged runs: ``meets_goal`` on the three goals as stated, and, where the runs
    carry it, ``meets_goal_beyond_border`` with the centroid judged beyond the perfect slider's drift."""

    def fraction(key: str) -> float:
        return sum(r[key] for r in runs) / len(runs)

    def percentile(key: str, q: float) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return float(np.percentile(values, q)) if values else None

    passing = {key: fraction(key) for key in ("rho_ok", "hue_ok", "centroid_ok")}
    background = [r["background_change"] for r in runs if r["background_change"] is not None]
    verdict = {
        "runs": len(runs),
        "rho_ok_fraction": passing["rho_ok"],
        "hue_ok_fraction": passing["hue_ok"],
        "centroid_ok_fraction": passing["centroid_ok"],
        "all_ok_fraction": sum(r["rho_ok"] and r["hue_ok"] and r["centroid_ok"] for r in runs) / len(runs),
        "hue_drift_deg_median": percentile("hue_drift_deg", 50),
        "hue_drift_deg_p90": percentile("hue_drift_deg", 90),
        "centroid_drift_px_median": percentile("centroid_drift_px", 50),
        "centroid_drift_px_p90": percentile("centroid_drift_px", 90),
        "background_change_mean": float(np.mean(background)) if background else None,
        "growth_median": percentile("growth", 50),
        "meets_goal": all(value >= GOAL_FRACTION for value in passing.values()),
    }
    if runs and "centroid_beyond_perfect_ok" in runs[0]:
        beyond = fraction("centroid_beyond_perfect_ok")
        verdict["centroid_beyond_perfect_ok_fraction"] = beyond
        verdict["centroid_beyond_perfect_px_median"] = percentile("centroid_beyond_perfect_px", 50)
        verdict["meets_goal_beyond_border"] = min(passing["rho_ok"], passing["hue_ok"], beyond) >= GOAL_FRACTION
    return verdict


def perfect_slider_sweep(image: np.ndarray, weights, growth: float = GROWTH) -> np.ndarray | None:
    """What a perfect slider would draw from a base image: at weight w its shape scaled ``growth ** w`` about its
    own center, moved only as far as it must to stay inside the image, everything else untouched; (weights, H, W, 3)
    uint8, or None when the image has no shape. Measured like a method's images, it is the ceiling of every goal."""
    from PIL import Image

    from lorakit_ext.toy.shapes import border_color, foreground_mask, largest_region

    shape = largest_region(foreground_mask(image))
    if not shape.any():
        return None
    size = image.shape[0]
    rows, cols = np.nonzero(shape)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    empty = image.copy()  # the base image without its shape (the bounding box and its antialiased rim filled)
    empty[max(top - 1, 0) : bottom + 1, max(left - 1, 0) : right + 1] = border_color(image).astype(np.uint8)
    crop = Image.fromarray(image[top:bottom, left:right])
    crop_mask = Image.fromarray(shape[top:bottom, left:right].astype(np.uint8) * 255)
    sweep = []
    for weight in weights:
        if weight == 0:
            sweep.append(image.copy())
            continue
        scale = growth**weight
        height, width = max(1, round((bottom - top) * scale)), max(1, round((right - left) * scale))
        pixels = np.asarray(crop.resize((width, height), Image.BILINEAR))
        inside = np.asarray(crop_mask.resize((width, height), Image.BILINEAR)) >= 128
        origin = []
        for low, high, extent in ((top, bottom, height), (left, right, width)):
            center, half = (low + high) / 2, extent / 2
            center = min(max(center, half), size - half) if extent < size else size / 2
            origin.append(round(center - half))
        canvas = empty.copy()
        y0, x0 = origin
        ys, xs = slice(max(y0, 0), min(y0 + height, size)), slice(max(x0, 0), min(x0 + width, size))
        region = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
        canvas[ys, xs] = np.where(inside[region][..., None], pixels[region], canvas[ys, xs])
        sweep.append(canvas)
    return np.stack(sweep)


def perfect_slider(adapter, settings) -> list[dict]:
    """The judged runs of a perfect slider (``perfect_slider_sweep``) over the judged prompts' base images: how far
    each goal can be met at all on what the base model draws."""
    from lorakit_ext.sampling import sample, to_uint8
    from lorakit_ext.slider.report import run_metrics

    judged = [prompt for prompt in settings.prompts if prompt in JUDGED_PROMPTS]
    prompts = [prompt for prompt in judged for _ in settings.seeds]
    seeds = list(settings.seeds) * len(judged)
    with torch.no_grad():
        images = to_uint8(sample(adapter, prompts, seeds, steps=settings.steps, cfg_scale=settings.cfg_scale,
                                 sampler=settings.sampler, width=settings.width, height=settings.height))
    runs = []
    for prompt, seed, image in zip(prompts, seeds, images):
        sweep = perfect_slider_sweep(image, settings.weights)
        numbers = run_metrics(sweep, settings.weights) if sweep is not None else {
            "area": [0.0] * len(settings.weights), "rho": 0.0, "hue_drift_deg": None, "centroid_drift_px": None,
            "background_change": None}
        runs.append({"prompt": prompt, "seed": seed, **numbers})
    return judged_runs({"runs": runs})


def training_override(text: str) -> tuple[str, object]:
    """``OPTION=VALUE`` with VALUE read as JSON where it parses (numbers, booleans, lists), else as text."""
    option, separator, value = text.partition("=")
    if not separator or not option:
        raise argparse.ArgumentTypeError(f"{text!r}: expected OPTION=VALUE")
    try:
        return option, json.loads(value)
    except json.JSONDecodeError:
        return option, value


def table(results: dict) -> str:
    """The methods side by side, as a markdown table."""
    lines = [
        "| method | runs | rho >= 0.9 | hue <= 10 deg | centroid <= 2 px | all three | centroid beyond perfect <= 2 px |"
        " hue median / p90 | centroid median / p90 | background | growth | meets goal | ... beyond the border |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def number(value, unit=""):
        return "n/a" if value is None else f"{value:.1f}{unit}"

    def verdict(value):
        return "n/a" if value is None else "yes" if value else "no"

    for method, r in results.items():
        beyond = r.get("centroid_beyond_perfect_ok_fraction")
        lines.append(
            f"| {method} | {r['runs']} | {r['rho_ok_fraction']:.0%} | {r['hue_ok_fraction']:.0%} |"
            f" {r['centroid_ok_fraction']:.0%} | {r['all_ok_fraction']:.0%} |"
            f" {'n/a' if beyond is None else f'{beyond:.0%}'} |"
            f" {number(r['hue_drift_deg_median'])} / {number(r['hue_drift_deg_p90'], ' deg')} |"
            f" {number(r['centroid_drift_px_median'])} / {number(r['centroid_drift_px_p90'], ' px')} |"
            f" {number(r['background_change_mean'])} | {number(r['growth_median'], 'x')} |"
            f" {verdict(r['meets_goal'])} |"
            f" {verdict(r.get('meets_goal_beyond_border'))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="training steps per pass (default: the demo's)")
    parser.add_argument("--sample-steps", type=int, default=12)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--backgrounds", nargs="+", default=list(TOY_BACKGROUNDS), choices=list(BACKGROUNDS),
                        help="one pair per background, the same circle on each (default: the demo's)")
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", type=training_override,
                        help="a training option over the demo's (repeatable), e.g. --set min_timestep=200")
    parser.add_argument("--masked", action="store_true", help="weight the loss by the pairs' difference mask")
    parser.add_argument("--ensemble", type=int, default=3, metavar="K",
                        help="the copier's --ensemble (default 3; 1: the demo's single run of B)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.sample_steps = QUICK["seeds"], QUICK["steps"], QUICK["sample_steps"]
    torch.set_num_threads(1)

    from lorakit_ext.models.ldm import LdmAdapter
    from lorakit_ext.slider.methods import run_method, train_pass
    from lorakit_ext.slider.pairs import write_dataset
    from lorakit_ext.slider.report import SweepSettings, slider_report
    from lorakit_ext.toy.model import load_toy_model

    args.out.mkdir(parents=True, exist_ok=True)
    pair_set = toy_pair_set(args.out / "pairs", tuple(args.backgrounds))
    overrides = dict(args.set, **({"max_train_steps": args.steps} if args.steps else {}))
    config = toy_config(pair_set, **overrides)
    adapter = LdmAdapter(load_toy_model())
    prompts = (config.default_caption, *JUDGED_PROMPTS)  # the pairs' caption first: the effect along A -> B
    settings = SweepSettings(prompts=prompts, seeds=tuple(range(args.seeds)), steps=args.sample_steps, toy_world=True)
    perfect = perfect_slider(adapter, settings)
    results, runs = {}, {}
    for method in args.methods:
        started = time.time()
        out = args.out / f"{method}.safetensors"
        extra = {}
        slider_method, options = METHODS[method]
        if slider_method is None:
            data = write_dataset(pair_set, "b", args.out / "naive_data", masked=args.masked)
            train_pass(config.with_overrides({"masked_loss": args.masked}, source="benchmark"), adapter, data, out,
                       lambda **_: None, None)
        else:
            # copier and difference train the same LoRA A (same data, config and seed): train it once
            lora_a = args.out / "lora_a.safetensors"
            if slider_method != "paired":
                options = {**options, **({"reuse_a": lora_a} if lora_a.is_file() else {"keep_a": lora_a})}
            if slider_method == "copier":
                options["ensemble"] = args.ensemble
            result = run_method(slider_method, pair_set, config, adapter, out, masked=args.masked, **options)
            extra["copy_similarity"] = result.copy_similarity
        trained_s = time.time() - started
        metrics = slider_report(adapter, out, settings, pair_set, method)
        runs[method] = judged_runs(metrics, perfect)
        results[method] = {
            **goals(runs[method]),
            **extra,
            "effect_along_ab": metrics["summary"].get("effect_along_ab"),
            "warnings": metrics["warnings"],
            "train_s": round(trained_s, 1),
            "report_s": round(time.time() - started - trained_s, 1),
        }
        print(method, json.dumps(results[method]), flush=True)
    results["perfect slider"] = goals(perfect)
    runs["perfect slider"] = perfect
    report = {
        "settings": {**vars(args), "out": str(args.out), "prompts": prompts},
        "methods": results,
        "runs": runs,
    }
    (args.out / "slider_toy.json").write_text(json.dumps(report, indent=2))
    print(table(results))
    print(f"perfect slider: each base image's shape scaled {GROWTH} ** weight in place, moved only as far as the "
          "image border forces; the ceiling of every goal on what the base model draws.")


if __name__ == "__main__":
    main()
