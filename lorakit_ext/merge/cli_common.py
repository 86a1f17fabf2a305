"""Flags and output shared by the merge verbs, spelled as kohya's scripts spell them so users' scripts carry over."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from lorakit_ext.errors import LorakitError
from lorakit_ext.formats import safetensors_io
from lorakit_ext.formats.kohya import load_network, save_network
from lorakit_ext.merge.algebra import check_finite_ratios
from lorakit_ext.merge.svd import DYNAMIC_METHODS, RankRule, parse_dynamic
from lorakit_ext.networks.weights import NetworkWeights

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "float": torch.float32}


def add_output_arguments(parser: argparse.ArgumentParser, default_precision: str | None = "fp32") -> None:
    parser.add_argument("--save_to", required=True, help="output .safetensors file (written atomically)")
    parser.add_argument(
        "--save_precision", choices=sorted(PRECISIONS), default=default_precision, help="dtype of the saved tensors"
    )
    parser.add_argument("--device", default="cpu", help="where to compute: cpu (default), cuda, cuda:1, ...")


def add_rank_arguments(parser: argparse.ArgumentParser, rank_flag: str, conv_flag: str) -> None:
    parser.add_argument(rank_flag, type=int, default=None, help="rank of the output (cap for --dynamic)")
    parser.add_argument(conv_flag, type=int, default=None, help="rank of kxk conv layers (default: the rank above)")
    parser.add_argument(
        "--dynamic",
        default=None,
        metavar="METHOD:VALUE",
        help="rank per layer: sv_ratio:X, sv_fro:X (0-1], sv_cumulative:X (0-1], or size:N[KB|MB] for a file size",
    )
    parser.add_argument("--dynamic_method", choices=DYNAMIC_METHODS[:3], help="kohya's spelling of --dynamic METHOD:")
    parser.add_argument("--dynamic_param", type=float, help="kohya's spelling of --dynamic :VALUE")
    parser.add_argument(
        "--clamp_quantile", type=float, default=None, help="clamp factors at this quantile (kohya's 0.99; default off)"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="list each module's rank, retained Frobenius fraction and energy, error"
    )


def dynamic_spec(args: argparse.Namespace) -> str | None:
    """``--dynamic METHOD:VALUE``, or kohya's ``--dynamic_method METHOD --dynamic_param VALUE`` (not both)."""
    if (args.dynamic_method is None) != (args.dynamic_param is None):
        raise LorakitError("--dynamic_method and --dynamic_param go together")
    if args.dynamic_method is None:
        return args.dynamic
    if args.dynamic:
        raise LorakitError("give either --dynamic or --dynamic_method/--dynamic_param, not both")
    return f"{args.dynamic_method}:{args.dynamic_param}"


def rank_rule(rank: int | None, conv_rank: int | None, args: argparse.Namespace, rank_flag: str) -> RankRule:
    for flag, value in ((rank_flag, rank), ("conv rank", conv_rank)):
        if value is not None and value < 1:
            raise LorakitError(f"{flag} must be at least 1, got {value}")
    spec = dynamic_spec(args)
    method, value = parse_dynamic(spec) if spec else (None, None)
    return RankRule(rank=rank, conv_rank=conv_rank, dynamic=method, value=value)


def check_clamp(quantile: float | None) -> None:
    if quantile is not None and not 0.0 < quantile <= 1.0:
        raise LorakitError(f"--clamp_quantile must be in (0, 1], got {quantile}")


def check_files(inputs: dict[str, list[str]], save_to: str) -> None:
    """Every input (flag -> paths) an existing file, and ``--save_to`` a .safetensors file that is none of them,
    before any work: a run must never replace one of its own inputs."""
    for flag, paths in inputs.items():
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise LorakitError(f"{flag}: no such file: {missing[0]}")
    safetensors_io.check_output_file(save_to, "--save_to", inputs)


def check_device(device: str) -> torch.device:
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise LorakitError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LorakitError(f"--device {device}: CUDA is not available here")
    return resolved


def ratios_for(models: list[str], ratios: list[float] | None) -> list[float]:
    ratios = ratios if ratios is not None else [1.0] * len(models)
    if len(ratios) != len(models):
        raise LorakitError(f"--ratios: {len(ratios)} ratios for {len(models)} --models")
    check_finite_ratios(ratios)
    return ratios


def save_and_summarize(
    args: argparse.Namespace, network: NetworkWeights, dtype: torch.dtype, report, started: float, **inputs
) -> None:
    """Save ``network`` to ``--save_to`` and print the verb's one-line JSON summary: the inputs, what was written,
    the re-compression report (when there was one) and the time since ``started``."""
    written = save_network(args.save_to, network, dtype=dtype)
    print_summary({
        "save_to": args.save_to,
        **inputs,
        "modules": len(network.modules),
        "network_dim": written["ss_network_dim"],
        "bytes": os.path.getsize(args.save_to),
        **(report.summary(args.verbose) if report else {}),
        "seconds": round(time.perf_counter() - started, 3),
    })


def print_summary(summary: dict) -> None:
    print(json.dumps(summary), file=sys.stdout)


def load_networks(paths: list[str], device: torch.device | str = "cpu") -> list[NetworkWeights]:
    """The networks, each with its ``sshs_model_hash`` (computed from the file where its metadata lacks it), so
    that merged files record every input's hash."""
    networks = []
    for path in paths:
        network = load_network(path).to(device=device)
        if not network.metadata.get("sshs_model_hash") and safetensors_io.is_safetensors(path):
            network.metadata["sshs_model_hash"] = safetensors_io.file_model_hash(path)
        networks.append(network)
    return networks


def source_names(paths: list[str]) -> list[str]:
    return [Path(p).name for p in paths]


def bytes_per_value(dtype: torch.dtype) -> int:
    """``dtype.itemsize``, which torch only has from 2.1 on (the WebUI may run 2.0)."""
    return torch.empty((), dtype=dtype).element_size()
