"""What the three slider verbs share: the pair inputs, the training engine's options, the report, the job."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from lorakit_ext.slider.pairs import DEFAULT_SUFFIX
from lorakit_ext.slider.report import DEFAULT_SEEDS, DEFAULT_WEIGHTS, UNRELATED_PROMPTS, default_prompts


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Pairs, output, report options, and every training option (``--config`` TOML and kohya-named flags)."""
    from lorakit_ext.train import cli as train_cli

    pairs = parser.add_argument_group("pairs", "give them one way")
    pairs.add_argument("--a", type=Path, help="folder of A (before) images")
    pairs.add_argument("--b", type=Path, help="folder of B (after) images, matched to A by file name")
    pairs.add_argument("--pairs", type=Path, help="one folder: img.png (A) beside img<suffix>.png (B)")
    pairs.add_argument("--suffix", default=DEFAULT_SUFFIX, help=f"B's file-name suffix for --pairs ({DEFAULT_SUFFIX})")
    pairs.add_argument("--side-by-side", type=Path, help="folder of images holding A in the left half, B in the right")
    pairs.add_argument("--masked", action="store_true", help="weight the loss by the |B - A| difference mask")
    parser.add_argument("--out", type=Path, required=True, help="the slider file to write (.safetensors)")
    report = parser.add_argument_group("report", "the weight x seed x prompt grid and metrics written beside --out")
    report.add_argument("--report-weights", type=float, nargs="+", default=list(DEFAULT_WEIGHTS), metavar="W")
    report.add_argument("--report-seeds", type=int, default=len(DEFAULT_SEEDS), metavar="N", help="seeds 0..N-1")
    report.add_argument("--report-prompt", action="append", dest="report_prompts", metavar="TEXT",
                        help="a prompt row (repeatable; default: the pairs' caption, then "
                             f"{', '.join(repr(p) for p in UNRELATED_PROMPTS)})")
    report.add_argument("--report-steps", type=int, default=20)
    report.add_argument("--report-cfg-scale", type=float, default=5.0)
    report.add_argument("--no-report", action="store_true", help="skip the report")
    train_cli.add_arguments(parser)


def run_verb(method: str, args: argparse.Namespace, **options) -> int:
    """Load the pairs and the model, run the method (and its report) as a job in this thread, print a JSON summary."""
    from lorakit_ext.slider.methods import check_files, check_options, run_method, slider_config
    from lorakit_ext.slider.pairs import load_pairs
    from lorakit_ext.slider.report import SweepSettings
    from lorakit_ext.train.cli import _print_event, config_overrides, load_adapter
    from lorakit_ext.train.job import Job

    check_options(method, options)
    check_files(args.out, options.get("keep_a"), options.get("reuse_a"))
    pair_set = load_pairs(args.a, args.b, args.pairs, args.suffix, args.side_by_side)
    for name in pair_set.unmatched:
        print(f"warning: {name} has no partner and is left out", file=sys.stderr)
    # each training pass validates the config with its data folder
    config = slider_config(pair_set, config_overrides(args), args.config)
    settings = None
    if not args.no_report:
        width, height = config.resolution
        settings = SweepSettings(
            weights=tuple(args.report_weights),
            prompts=tuple(args.report_prompts or default_prompts(config.default_caption)),
            seeds=tuple(range(args.report_seeds)),
            steps=args.report_steps,
            cfg_scale=args.report_cfg_scale,
            width=width,
            height=height,
            toy_world=not config.pretrained_model_name_or_path,  # no --model: the toy model (load_adapter)
        )
    if args.dry_run:
        plan = {"method": method, "pairs": [p.name for p in pair_set.pairs], "unmatched": pair_set.unmatched,
                "config": config.to_dict(), "options": {k: str(v) for k, v in options.items()},
                "report": dataclasses.asdict(settings) if settings else None}
        print(json.dumps(plan, indent=2))
        return 0
    adapter = load_adapter(config.pretrained_model_name_or_path)
    masked = args.masked or config.masked_loss

    def work(report, token):
        return run_method(
            method, pair_set, config, adapter, args.out, settings, masked=masked, report=report, token=token, **options
        )

    job = Job(work, name=method)
    job.subscribe(_print_event)
    result = job.run_here()
    if result is None:
        print("cancelled: nothing saved", file=sys.stderr)
        return 130
    print(json.dumps(result.summary(), indent=2))
    return 0
