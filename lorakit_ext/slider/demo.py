"""``python -m lorakit_ext demo --out DIR``: a copier slider on the toy world, end to end, in a few CPU minutes.

The task: A is a red circle, B the same image with the circle 1.6x wider and every other pixel identical, on each of
the toy world's three backgrounds. The demo trains the copier slider on those pairs and writes the LoRA, its weight x
seed x prompt grid and its metrics, measured on prompts of other colors and shapes. ``benchmarks/slider_toy.py`` and
the CI test use the same task.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from lorakit_ext.toy.shapes import ShapeSpec, render, with_extent

TOY_A = ShapeSpec("circle", "red", "white", extent=0.35, center=(32.0, 32.0))
GROWTH = 1.6
# the pair on each of the toy world's backgrounds (the recipe's "two images, or a few sets"): from one pair on white
# the slider learns "grow into white", and on black backgrounds it shrinks shapes instead
TOY_BACKGROUNDS = ("white", "gray", "black")
TOY_CAPTION = "a red circle"  # what the pairs show, in the toy world's words
# the training prompt and unrelated prompts of other colors and shapes
TOY_PROMPTS = (TOY_CAPTION, "a blue square", "a green triangle", "a yellow circle")
# what the toy model needs (docs/sliders.md has the measurements): lr 5e-3 at dim 8 / alpha 8 to overfit 64x64
# images in a few hundred steps (the recipe's lr 1e-3 at dim 4 / alpha 1 takes several times longer); a caption
# that names the pair's content; timesteps from 600 only, where a toy image's layout and sizes are decided, so B
# carries less of the pairs' own colors and edges. Everything else is the slider recipe.
TOY_TRAINING: dict[str, object] = {
    "max_train_steps": 450,
    "train_batch_size": 4,
    "learning_rate": 5e-3,
    "network_dim": 8,
    "network_alpha": 8.0,
    "default_caption": TOY_CAPTION,
    "min_timestep": 600,
    "save_precision": "float",
    "seed": 0,
}


def toy_pair_set(folder: str | Path, backgrounds: tuple[str, ...] = TOY_BACKGROUNDS):
    """Render the task's pair into ``folder/A`` and ``folder/B`` (the user can look at them) and load it back: one
    pair per background (the recipe's "two images, or a few sets"), the circle the same on each."""
    from dataclasses import replace

    from lorakit_ext.slider.pairs import load_pairs

    folder = Path(folder)
    for side in ("A", "B"):
        (folder / side).mkdir(parents=True, exist_ok=True)
    for background in backgrounds:
        a_spec = replace(TOY_A, background=background)
        name = "circle.png" if len(backgrounds) == 1 else f"circle_{background}.png"
        for side, spec in (("A", a_spec), ("B", with_extent(a_spec, a_spec.extent * GROWTH))):
            Image.fromarray(render(spec)[0]).save(folder / side / name)
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
    parser.add_argument("--ensemble", type=int, default=1, metavar="K",
                        help="average K runs of B (the copier's --ensemble: 3 is steadier; each run is one more pass)")


def run(args: argparse.Namespace) -> int:
    import torch

    from lorakit_ext.errors import LorakitError, writable_folder
    from lorakit_ext.models.ldm import LdmAdapter
    from lorakit_ext.slider.methods import run_method
    from lorakit_ext.slider.report import SweepSettings, report_paths
    from lorakit_ext.toy.config import NUM_TIMESTEPS
    from lorakit_ext.toy.model import load_toy_model

    # everything the run could refuse, before the pairs are written and minutes of training begin
    if min(args.steps, args.seeds, args.sample_steps, args.verify_seeds, args.ensemble) < 1:
        raise LorakitError("--steps, --seeds, --sample-steps, --verify-seeds and --ensemble must be at least 1")
    if args.sample_steps > NUM_TIMESTEPS:
        raise LorakitError(f"--sample-steps must be at most {NUM_TIMESTEPS}, got {args.sample_steps}")
    settings = SweepSettings(
        prompts=TOY_PROMPTS, seeds=tuple(range(args.seeds)), steps=args.sample_steps, toy_world=True
    )
    writable_folder(args.out, "--out")
    pair_set = toy_pair_set(args.out / "pairs")
    config = toy_config(pair_set, max_train_steps=args.steps)
    adapter = LdmAdapter(load_toy_model())

    def show(message: str = "", step: int = 0, total: int = 0, **_) -> None:
        if message or (total and step % 20 == 0):
            print(message or f"step {step}/{total}", flush=True)

    with torch.random.fork_rng():
        out = args.out / "copier_slider.safetensors"
        result = run_method(
            "copier", pair_set, config, adapter, out, settings, report=show, verify_seeds=args.verify_seeds,
            ensemble=args.ensemble,
        )
    grid_path, metrics_path = report_paths(out)
    summary = result.metrics.get("summary", {}) if result.metrics else {}
    copying = {"copy_similarity": result.copy_similarity, "base_similarity": result.base_similarity}
    print(json.dumps({**copying, **summary, "warnings": result.warnings}, indent=2))
    print(f"wrote the LoRA {result.output}\nwrote the weight grid {grid_path}\nwrote the metrics {metrics_path}")
    return 0
