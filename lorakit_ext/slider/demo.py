"""``python -m lorakit_ext demo --out DIR``: a copier slider on the toy world, end to end, in a few CPU minutes.

The task: A is a red circle, B the same image with the circle 1.6x wider and every other pixel identical. The demo
trains the copier slider on that one pair and writes the LoRA, its weight x seed x prompt grid and its metrics,
measured on prompts of other colors and shapes. ``benchmarks/slider_toy.py`` and the CI test use the same task.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from lorakit_ext.toy.shapes import ShapeSpec, render, with_extent

TOY_A = ShapeSpec("circle", "red", "white", extent=0.35, center=(32.0, 32.0))
GROWTH = 1.6
# the training prompt (empty, as the pairs were captioned) and unrelated prompts of other colors and shapes
TOY_PROMPTS = ("", "a blue square", "a green triangle", "a yellow circle")
# what the toy model needs to overfit one 64x64 image (the recipe's lr 1e-3 at dim 4 / alpha 1 takes several times
# longer on it): at 300 steps LoRA A copies A (similarity 0.96 on the empty prompt; 0.71 at 80 steps, below the
# copy check's 0.85); everything else is the slider recipe
TOY_TRAINING: dict[str, object] = {
    "max_train_steps": 300,
    "train_batch_size": 4,
    "learning_rate": 5e-3,
    "network_dim": 8,
    "network_alpha": 8.0,
    "save_precision": "float",
    "seed": 0,
}


def toy_pair_set(folder: str | Path):
    """Render the task's pair into ``folder/A`` and ``folder/B`` (the user can look at them) and load it back."""
    from lorakit_ext.slider.pairs import load_pairs

    a_image, _ = render(TOY_A)
    b_image, _ = render(with_extent(TOY_A, TOY_A.extent * GROWTH))
    folder = Path(folder)
    for side, pixels in (("A", a_image), ("B", b_image)):
        (folder / side).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / side / "circle.png")
    return load_pairs(folder / "A", folder / "B")


def toy_config(pair_set, **overrides):
    """The slider recipe with the toy world's training settings (``overrides`` last)."""
    from lorakit_ext.slider.methods import slider_config

    return slider_config(pair_set, {**TOY_TRAINING, **overrides})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for the pair, the LoRA, its grid and metrics")
    parser.add_argument("--steps", type=int, default=TOY_TRAINING["max_train_steps"], help="training steps per pass")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt in the report")
    parser.add_argument("--sample-steps", type=int, default=12, help="sampler steps of the report images")
    parser.add_argument("--verify-seeds", type=int, default=4, help="seeds for checking that LoRA A copies A")


def run(args: argparse.Namespace) -> int:
    import torch

    from lorakit_ext.errors import LorakitError
    from lorakit_ext.models.ldm import LdmAdapter
    from lorakit_ext.slider.methods import run_method
    from lorakit_ext.slider.report import SweepSettings, report_paths
    from lorakit_ext.toy.model import load_toy_model

    if min(args.steps, args.seeds, args.sample_steps, args.verify_seeds) < 1:
        raise LorakitError("--steps, --seeds, --sample-steps and --verify-seeds must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    pair_set = toy_pair_set(args.out / "pairs")
    config = toy_config(pair_set, max_train_steps=args.steps)
    adapter = LdmAdapter(load_toy_model())
    settings = SweepSettings(
        prompts=TOY_PROMPTS, seeds=tuple(range(args.seeds)), steps=args.sample_steps, toy_world=True
    )

    def show(message: str = "", step: int = 0, total: int = 0, **_) -> None:
        if message or (total and step % 20 == 0):
            print(message or f"step {step}/{total}", flush=True)

    with torch.random.fork_rng():
        out = args.out / "copier_slider.safetensors"
        result = run_method(
            "copier", pair_set, config, adapter, out, settings, report=show, verify_seeds=args.verify_seeds
        )
    grid_path, metrics_path = report_paths(out)
    summary = result.metrics.get("summary", {}) if result.metrics else {}
    print(json.dumps({"copy_similarity": result.copy_similarity, **summary, "warnings": result.warnings}, indent=2))
    print(f"wrote the LoRA {result.output}\nwrote the weight grid {grid_path}\nwrote the metrics {metrics_path}")
    return 0
