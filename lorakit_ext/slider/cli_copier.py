"""``python -m lorakit_ext copier --a DIR --b DIR --out FILE [training options]``: the copier slider method."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit_ext.slider.cli_common import add_common_arguments, run_verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    copier = parser.add_argument_group("copier")
    copier.add_argument("--reuse-a", type=Path, help="use this LoRA A instead of training one")
    copier.add_argument("--keep-a", type=Path, help="save the trained LoRA A here, to reuse it")
    copier.add_argument("--verify-seeds", type=int, default=4, help="seeds for checking that A copies the A images")
    copier.add_argument("--ensemble", type=int, default=1, metavar="K",
                        help="train B K times over A (seeds seed..seed+K-1) and save their exact average")
    copier.add_argument("--anchor", type=float, default=0.0, metavar="L",
                        help="add L x the squared distance of B's weights from their start to B's loss: a cleaner,"
                             " weaker slider (the toy task: 3e-4 with --ensemble 3)")


def run(args: argparse.Namespace) -> int:
    return run_verb("copier", args, reuse_a=args.reuse_a, keep_a=args.keep_a, verify_seeds=args.verify_seeds,
                    ensemble=args.ensemble, anchor=args.anchor)
