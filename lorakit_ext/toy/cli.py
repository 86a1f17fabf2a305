"""``python -m lorakit_ext toy export --to DIR``: the toy model as a WebUI checkpoint (weights + yaml);
``toy grid --out DIR``: what it draws, as a prompt x seed grid PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit_ext.toy import grid


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = actions.add_parser("export", help="write the checkpoint and its .yaml into a folder")
    export.add_argument("--to", type=Path, required=True, help="e.g. stable-diffusion-webui/models/Stable-diffusion")
    grid.add_arguments(actions.add_parser("grid", help="sample a prompt x seed grid PNG from the toy model"))


def run(args: argparse.Namespace) -> int:
    if args.action == "grid":
        return grid.run(args)
    from lorakit_ext.toy.export import export_checkpoint

    target = export_checkpoint(args.to)
    print(f"wrote {target} and {target.with_suffix('.yaml').name}")
    return 0
