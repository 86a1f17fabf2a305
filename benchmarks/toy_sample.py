"""Seconds to sample one 64x64 toy image with 20 steps (CFG on, so 40 UNet evaluations) plus the VAE decode.

    OMP_NUM_THREADS=1 python benchmarks/toy_sample.py [--runs 5] [--threads 1] [--sampler euler]

Prints one JSON line: median wall and CPU seconds per image over the runs, after one warm-up run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: run as python benchmarks/NAME.py

from lorakit_ext import sampling
from lorakit_ext.models.ldm import LdmAdapter
from lorakit_ext.toy.model import TOY_IMAGE_SIZE, load_toy_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", choices=sampling.SAMPLERS, default="euler")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapter = LdmAdapter(load_toy_model())

    def one_image(seed: int) -> None:
        sampling.sample(adapter, ["a red circle"], [seed], steps=args.steps, cfg_scale=5.0, sampler=args.sampler,
                        width=TOY_IMAGE_SIZE, height=TOY_IMAGE_SIZE)

    one_image(0)
    wall, cpu = [], []
    for run in range(args.runs):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        one_image(run + 1)
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    print(json.dumps({
        "benchmark": "toy_sample", "steps": args.steps, "sampler": args.sampler, "threads": args.threads,
        "runs": args.runs, "wall_s": round(statistics.median(wall), 4), "cpu_s": round(statistics.median(cpu), 4),
    }))


if __name__ == "__main__":
    main()
