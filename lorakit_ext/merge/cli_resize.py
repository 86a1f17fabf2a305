"""``resize``: one network re-compressed to a new (or dynamic) rank; the best LoRA of that rank."""

from __future__ import annotations

import argparse
import time

from lorakit_ext.errors import LorakitError
from lorakit_ext.merge import cli_common
from lorakit_ext.merge.svd import merge_compressed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="network file to resize (LoRA, LoCon, LoHa, LoKr)")
    cli_common.add_rank_arguments(parser, "--new_rank", "--new_conv_rank")
    cli_common.add_output_arguments(parser, default_precision="fp16")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    cli_common.check_files({"--model": [args.model]}, args.save_to)
    cli_common.check_clamp(args.clamp_quantile)
    rule = cli_common.rank_rule(args.new_rank, args.new_conv_rank, args, "--new_rank")
    if rule.rank is None and rule.dynamic is None:
        raise LorakitError("resize needs --new_rank or --dynamic")
    device = cli_common.check_device(args.device)
    dtype = cli_common.PRECISIONS[args.save_precision]
    (network,) = cli_common.load_networks([args.model], device)
    resized, report = merge_compressed(
        [network],
        [1.0],
        rule,
        clamp_quantile=args.clamp_quantile,
        bytes_per_value=cli_common.bytes_per_value(dtype),
        sources=cli_common.source_names([args.model]),
        metadata=network.metadata,
    )
    cli_common.save_and_summarize(args, resized, dtype, report, started, model=args.model)
    return 0
