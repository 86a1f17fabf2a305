"""``extract``: a LoRA from a tuned checkpoint minus its base, at a fixed or dynamic rank."""

from __future__ import annotations

import argparse
import time

from lorakit_ext.merge import cli_common
from lorakit_ext.merge.checkpoint import extract_lora

DEFAULT_DIM = 4  # kohya's extract_lora_from_models.py default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", "--model_org", required=True, help="the original checkpoint")
    parser.add_argument("--tuned", "--model_tuned", required=True, help="the fine-tuned checkpoint")
    cli_common.add_rank_arguments(parser, "--dim", "--conv_dim")
    cli_common.add_output_arguments(parser, default_precision="fp16")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    cli_common.check_files({"--base": [args.base], "--tuned": [args.tuned]}, args.save_to)
    cli_common.check_clamp(args.clamp_quantile)
    dynamic = cli_common.dynamic_spec(args)
    dim = args.dim if args.dim is not None or dynamic else DEFAULT_DIM
    rule = cli_common.rank_rule(dim, args.conv_dim, args, "--dim")
    device = cli_common.check_device(args.device)
    dtype = cli_common.PRECISIONS[args.save_precision]
    network, report = extract_lora(
        args.base,
        args.tuned,
        rule,
        include_kxk_convs=args.conv_dim is not None,
        device=device,
        clamp_quantile=args.clamp_quantile,
        bytes_per_value=cli_common.bytes_per_value(dtype),
    )
    cli_common.save_and_summarize(args, network, dtype, report, started)
    return 0
