"""``python -m lorakit_ext difference --a DIR --b DIR --out FILE [--rank R] [--shuffle] [--b-from-a
[--anchor L]]``: B x 1 + A x (-1)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit_ext.slider.cli_common import add_common_arguments, run_verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    difference = parser.add_argument_group("difference")
    difference.add_argument("--rank", type=int, help="re-compress the exact difference to this rank (factor SVD)")
    difference.add_argument("--shuffle", action="store_true", help="permute the rank axis (same delta)")
    difference.add_argument("--reuse-a", type=Path, help="use this LoRA A instead of training one")
    difference.add_argument("--keep-a", type=Path, help="save the trained LoRA A here, to reuse it")
    difference.add_argument("--b-from-a", action="store_true",
                            help="start LoRA B's training from LoRA A's weights instead of zero")
    difference.add_argument("--anchor", type=float, default=0.0, metavar="L",
                            help="with --b-from-a: add L x the squared distance of B's weights from A's to B's loss,"
                                 " so less of B's drift is left in B - A (the toy task: 1e-3)")


def run(args: argparse.Namespace) -> int:
    return run_verb(
        "difference", args, rank=args.rank, shuffle=args.shuffle, reuse_a=args.reuse_a, keep_a=args.keep_a,
        b_from_a=args.b_from_a, anchor=args.anchor,
    )
