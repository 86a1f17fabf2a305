"""``python -m lorakit_ext train --config FILE.toml [--learning_rate 1e-4 ...] [--model PATH] [--dry-run]``.

Every ``TrainConfig`` option is also a flag of the same (kohya) name, laid over the TOML file. ``--dry-run``
validates and prints the resolved plan as JSON. Ctrl-C stops at the next step and saves (file + state); a second
Ctrl-C abandons the run. The same command runs data-parallel under ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import get_origin, get_type_hints

from lorakit_ext.errors import LorakitError
from lorakit_ext.train.config import TrainConfig, unwrap_optional


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file of options (kohya names; [sections] allowed)")
    parser.add_argument(
        "--model", help="ldm checkpoint (.safetensors with its .yaml beside it) or diffusers folder; default: toy model"
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and print the resolved plan as JSON")
    options = parser.add_argument_group("options", "any config option, overriding the file (see docs/train-config.md)")
    hints = get_type_hints(TrainConfig)
    for option in fields(TrainConfig):
        hint = hints[option.name]
        kind = unwrap_optional(hint)
        flag = f"--{option.name}"
        help_text = option.metadata["help"]
        if kind is bool:  # kohya's store_true flags, and "--flip_aug false" to turn one off
            options.add_argument(flag, nargs="?", const="true", metavar="BOOL", help=help_text)
        elif get_origin(kind) is list:
            options.add_argument(flag, nargs="*", metavar="KEY=VALUE", help=help_text)
        else:
            options.add_argument(flag, metavar=option.name.split("_")[-1].upper(), help=help_text)


def config_overrides(args: argparse.Namespace) -> dict:
    """The training options given as flags (those left unset are not overrides), ``--model`` among them."""
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    if args.model:
        overrides["pretrained_model_name_or_path"] = args.model
    return overrides


def run(args: argparse.Namespace) -> int:
    config = TrainConfig.load_toml(args.config) if args.config else TrainConfig()
    config = config.with_overrides(config_overrides(args), source="command line").validate()
    adapter = load_adapter(config.pretrained_model_name_or_path)
    if args.dry_run:
        from lorakit_ext.train.trainer import plan

        print(json.dumps(plan(config, adapter).to_dict(), indent=2))
        return 0
    return _train(config, adapter)


def _train(config: TrainConfig, adapter) -> int:
    from lorakit_ext.train.job import Job
    from lorakit_ext.train.trainer import train

    job = Job(lambda report, token: train(config, adapter, report, token), name="train")
    job.subscribe(_print_event)
    job.start()
    try:
        while not job.wait(0.5):
            pass
    except KeyboardInterrupt:
        print("stopping at the next step and saving (Ctrl-C again to abandon)", file=sys.stderr)
        job.stop()
        try:
            job.wait()
        except KeyboardInterrupt:
            job.cancel()
            job.wait()
    if job.status == "failed":
        raise LorakitError(job.error or "training failed")
    if job.status == "cancelled":
        print("cancelled: nothing saved", file=sys.stderr)
        return 130
    print(f"{job.status}: {job.result.output}")
    return 0


def _print_event(event) -> None:
    values = event.values
    if "loss" in values:
        eta = f" eta {event.eta_s:.0f}s" if event.eta_s is not None else ""
        rate = f" {event.it_per_s:.2f} it/s" if event.it_per_s else ""
        line = (
            f"step {event.step}/{event.total} epoch {values['epoch']}/{values['epochs']} "
            f"loss {values['loss']:.4f} avg {values['avg_loss']:.4f} lr {values['lr']:.3g}{rate}{eta}"
        )
    else:
        line = event.message
    for path in event.files + event.images:
        line += f"\n  wrote {path}"
    if line:
        print(line, flush=True)


def load_adapter(path: str | None):
    """The model to train on this process's device: the toy model, an ldm checkpoint + yaml, or a diffusers folder,
    with its ``ModelSource`` (name and hash for the saved files' metadata) attached as ``adapter.source``."""
    adapter, source = _load(path)
    adapter.source = source
    return adapter


def _load(path: str | None):
    from lorakit_ext.models.ldm import LdmAdapter
    from lorakit_ext.train.model_source import ModelSource
    from lorakit_ext.train.trainer import process_state

    device = process_state().device
    if not path:
        from lorakit_ext.toy.model import CHECKPOINT_PATH, load_toy_model

        return LdmAdapter(load_toy_model(device)), ModelSource(CHECKPOINT_PATH)
    location = Path(path)
    if location.is_dir():
        from diffusers import DiffusionPipeline

        from lorakit_ext.models.diffusers_adapter import DiffusersAdapter

        pipe = DiffusionPipeline.from_pretrained(location, local_files_only=True).to(device)
        return DiffusersAdapter.from_pipeline(pipe), ModelSource(location)
    if not location.is_file():
        raise LorakitError(f"--model {path}: no such file or folder")
    yaml = location.with_suffix(".yaml")
    if not yaml.is_file():
        raise LorakitError(f"--model {path}: the ldm config {yaml.name} must sit beside the checkpoint")
    from omegaconf import OmegaConf

    from lorakit_ext.toy.model import load_checkpoint

    config = OmegaConf.to_container(OmegaConf.load(yaml), resolve=True)
    return LdmAdapter(load_checkpoint(location, config, device)), ModelSource(location)
