"""Slider quality on the toy world: copier, difference, paired, and a naive LoRA trained on B alone.

Task (lorakit_ext.slider.demo): A = a red circle, B = the same image with the circle 1.6x wider. Each method's LoRA is
applied to the base toy model for prompts of other colors and shapes over seeds x weights -1..1, and measured on
pixels: Spearman rho between weight and foreground area, hue and centroid drift from weight 0, background change.
Goals for copier and difference: rho >= 0.9 on >= 90% of prompt/seed runs, hue drift <= 10 degrees, centroid drift
<= 2 px (both taken over the runs, median and 90th percentile reported).

    OMP_NUM_THREADS=1 python benchmarks/slider_toy.py --out /tmp/slider_bench [--seeds 16] [--steps 80]
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

from lorakit_ext.slider.demo import toy_config, toy_pair_set

# the training prompt (empty) plus four prompts of other colors and shapes; the goals are over the four
PROMPTS = ("", "a blue square", "a green triangle", "a yellow circle", "a blue triangle")
GOAL_RHO, GOAL_FRACTION, GOAL_HUE_DEG, GOAL_CENTROID_PX = 0.9, 0.9, 10.0, 2.0


def goals(metrics: dict) -> dict:
    """The benchmark's pass/fail numbers over the unrelated-prompt runs (the empty training prompt excluded)."""
    runs = [r for r in metrics["runs"] if r["prompt"]]
    hue = [r["hue_drift_deg"] for r in runs if r["hue_drift_deg"] is not None]
    centroid = [r["centroid_drift_px"] for r in runs if r["centroid_drift_px"] is not None]
    fraction = sum(r["rho"] >= GOAL_RHO for r in runs) / len(runs)
    return {
        "monotonic_fraction": fraction,
        "hue_drift_deg_median": float(np.median(hue)) if hue else None,
        "hue_drift_deg_p90": float(np.percentile(hue, 90)) if hue else None,
        "centroid_drift_px_median": float(np.median(centroid)) if centroid else None,
        "centroid_drift_px_p90": float(np.percentile(centroid, 90)) if centroid else None,
        "background_change_mean": float(np.mean([r["background_change"] or 0.0 for r in runs])),
        "meets_goal": bool(
            fraction >= GOAL_FRACTION
            and hue and np.percentile(hue, 90) <= GOAL_HUE_DEG
            and centroid and np.percentile(centroid, 90) <= GOAL_CENTROID_PX
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="training steps per pass (default: the demo's)")
    parser.add_argument("--sample-steps", type=int, default=12)
    parser.add_argument("--methods", nargs="+", default=["copier", "difference", "paired", "naive"])
    args = parser.parse_args()
    torch.set_num_threads(1)

    from lorakit_ext.models.ldm import LdmAdapter
    from lorakit_ext.slider.methods import run_method, train_pass
    from lorakit_ext.slider.pairs import write_dataset
    from lorakit_ext.slider.report import SweepSettings, slider_report
    from lorakit_ext.toy.model import load_toy_model

    args.out.mkdir(parents=True, exist_ok=True)
    pair_set = toy_pair_set(args.out / "pairs")
    config = toy_config(pair_set, **({"max_train_steps": args.steps} if args.steps else {}))
    adapter = LdmAdapter(load_toy_model())
    settings = SweepSettings(prompts=PROMPTS, seeds=tuple(range(args.seeds)), steps=args.sample_steps)
    results = {}
    for method in args.methods:
        started = time.time()
        out = args.out / f"{method}.safetensors"
        if method == "naive":
            data = write_dataset(pair_set, "b", args.out / "naive_data")
            train_pass(config, adapter, data, out, lambda **_: None, None)
            trained_s = time.time() - started
            metrics = slider_report(adapter, out, settings, pair_set, "naive")
            extra = {}
        else:
            # copier and difference train the same LoRA A (same data, config and seed): train it once
            lora_a = args.out / "lora_a.safetensors"
            options = {"reuse_a": lora_a} if lora_a.is_file() else {"keep_a": lora_a}
            result = run_method(method, pair_set, config, adapter, out, **({} if method == "paired" else options))
            trained_s = time.time() - started
            metrics = slider_report(adapter, out, settings, pair_set, method)
            extra = {"copy_similarity": result.copy_similarity}
        results[method] = {
            **goals(metrics),
            **extra,
            "summary": metrics["summary"],
            "warnings": metrics["warnings"],
            "train_s": round(trained_s, 1),
            "report_s": round(time.time() - started - trained_s, 1),
        }
        print(method, json.dumps({k: v for k, v in results[method].items() if k != "summary"}), flush=True)
    (args.out / "slider_toy.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
