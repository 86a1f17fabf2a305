"""``merge-into``: LoRAs with ratios baked into a single-file checkpoint (SD1 / SD2 / SDXL, ldm layout)."""

from __future__ import annotations

import argparse
import time

from lorakit_ext.merge import cli_common
from lorakit_ext.merge.checkpoint import merge_into_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", "--sd_model", required=True, help="single-file checkpoint to merge into")
    parser.add_argument("--models", nargs="+", required=True, help="network files to merge")
    parser.add_argument("--ratios", nargs="+", type=float, default=None, help="one ratio per model (default 1)")
    cli_common.add_output_arguments(parser, default_precision=None)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    ratios = cli_common.ratios_for(args.models, args.ratios)
    cli_common.check_files({"--checkpoint": [args.checkpoint], "--models": args.models}, args.save_to)
    device = cli_common.check_device(args.device)
    dtype = cli_common.PRECISIONS[args.save_precision] if args.save_precision else None
    networks = cli_common.load_networks(args.models)
    summary = merge_into_checkpoint(
        args.checkpoint,
        networks,
        ratios,
        args.save_to,
        save_dtype=dtype,
        device=device,
        sources=cli_common.source_names(args.models),
    )
    cli_common.print_summary({**summary, "ratios": ratios, "seconds": round(time.perf_counter() - started, 3)})
    return 0
