"""``merge``: LoRAs (any kind) with ratios into one LoRA, exactly or re-compressed to a new / dynamic rank."""

from __future__ import annotations

import argparse
import time

from lorakit_ext.merge import cli_common
from lorakit_ext.merge.algebra import merge_networks
from lorakit_ext.merge.svd import merge_compressed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", required=True, help="network files to merge")
    parser.add_argument("--ratios", nargs="+", type=float, default=None, help="one ratio per model (default 1)")
    cli_common.add_rank_arguments(parser, "--new_rank", "--new_conv_rank")
    cli_common.add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    ratios = cli_common.ratios_for(args.models, args.ratios)
    cli_common.check_files({"--models": args.models}, args.save_to)
    cli_common.check_clamp(args.clamp_quantile)
    device = cli_common.check_device(args.device)
    dtype = cli_common.PRECISIONS[args.save_precision]
    rule = cli_common.rank_rule(args.new_rank, args.new_conv_rank, args, "--new_rank")
    networks = cli_common.load_networks(args.models, device)
    sources = cli_common.source_names(args.models)
    compress = rule.rank is not None or rule.conv_rank is not None or rule.dynamic is not None
    report = None
    if compress:
        merged, report = merge_compressed(
            networks,
            ratios,
            rule,
            clamp_quantile=args.clamp_quantile,
            bytes_per_value=cli_common.bytes_per_value(dtype),
            sources=sources,
        )
    else:
        merged = merge_networks(networks, ratios, sources=sources, dtype=dtype)
    cli_common.save_and_summarize(
        args, merged, dtype, report, started, models=args.models, ratios=ratios, exact=not compress
    )
    return 0
