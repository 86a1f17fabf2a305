"""``python -m lorakit_ext slider --a DIR --b DIR --out FILE [--weight W]``: one LoRA trained at +w on B, -w on A."""

from __future__ import annotations

import argparse

from lorakit_ext.slider.cli_common import add_common_arguments, run_verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--weight", type=float, default=1.0, help="the multiplier B is trained at (A at minus it)")


def run(args: argparse.Namespace) -> int:
    return run_verb("paired", args, weight=args.weight)
