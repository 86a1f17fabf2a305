"""``python -m lorakit_ext toy export --to DIR``: the toy model as a WebUI checkpoint (weights + yaml)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = actions.add_parser("export", help="write the checkpoint and its .yaml into a folder")
    export.add_argument("--to", type=Path, required=True, help="e.g. stable-diffusion-webui/models/Stable-diffusion")


def run(args: argparse.Namespace) -> int:
    from lorakit_ext.toy.export import export_checkpoint

    target = export_checkpoint(args.to)
    print(f"wrote {target} and {target.with_suffix('.yaml').name}")
    return 0
