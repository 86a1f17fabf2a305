"""``python -m lorakit_ext toy grid --out DIR``: what the toy model draws, as a prompt x seed grid PNG."""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

from lorakit_ext.errors import check_option
from lorakit_ext.sampling import SAMPLERS
from lorakit_ext.toy.config import NUM_TIMESTEPS

PROMPTS = (
    "a red circle",
    "a large blue square",
    "a small yellow triangle",
    "a green circle on a white background",
    "a white square on a black background",
    "a large black triangle on a gray background",
)
SEEDS = 4
GRID_NAME = "toy_grid.png"
SEED_RANGE = range(-(2**63), 2**64)  # what torch.Generator.manual_seed takes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for the grid PNG")
    parser.add_argument("--prompt", action="append", dest="prompts", help="a row of the grid (repeatable)")
    parser.add_argument("--seeds", type=int, default=SEEDS, help="columns: seeds 0..N-1 plus --seed")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=5.0)
    parser.add_argument("--sampler", choices=SAMPLERS, default="euler")


def run(args: argparse.Namespace) -> int:
    import torch

    from lorakit_ext import sampling
    from lorakit_ext.errors import writable_folder
    from lorakit_ext.formats.safetensors_io import write_atomic
    from lorakit_ext.models.ldm import LdmAdapter
    from lorakit_ext.toy.model import TOY_IMAGE_SIZE, load_toy_model

    check_numbers(args)
    writable_folder(args.out, "--out")
    prompts = args.prompts or list(PROMPTS)
    adapter = LdmAdapter(load_toy_model())
    seeds = [args.seed + column for column in range(args.seeds)]
    with torch.inference_mode():
        images = sampling.sample(
            adapter,
            [prompt for prompt in prompts for _ in seeds],
            seeds * len(prompts),
            steps=args.steps,
            cfg_scale=args.cfg_scale,
            sampler=args.sampler,
            width=TOY_IMAGE_SIZE,
            height=TOY_IMAGE_SIZE,
        )
    picture = sampling.grid(images, columns=len(seeds), row_labels=prompts, scale=2)
    target = args.out / GRID_NAME
    png = io.BytesIO()
    picture.save(png, format="PNG")
    write_atomic(target, [png.getvalue()])
    print(f"wrote {target}: {len(prompts)} prompts (rows) x seeds {seeds[0]}..{seeds[-1]} (columns)")
    return 0


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse what would fail only after the model loads (steps, seeds) or give a black grid (a NaN cfg scale)."""
    steps, seeds, cfg_scale = args.steps, args.seeds, args.cfg_scale
    check_option(seeds >= 1, "--seeds", f"must be at least 1, got {seeds}")
    check_option(1 <= steps <= NUM_TIMESTEPS, "--steps", f"must be between 1 and {NUM_TIMESTEPS}, got {steps}")
    last_seed = args.seed + seeds - 1
    check_option(args.seed in SEED_RANGE and last_seed in SEED_RANGE, "--seed", f"must fit in 64 bits, got {args.seed}")
    check_option(0 <= cfg_scale < math.inf, "--cfg-scale", f"must be a number 0 or above, got {cfg_scale}")  # not NaN
