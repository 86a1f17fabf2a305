"""What the tabs and the HTTP API can ask for, turned into validated ``Operation``s before anything runs.

Training takes the CLI's own ``TrainConfig`` (same kohya names, same TOML); merges take ``MergeRequest``, whose
field names are the merge verbs' flags. Both pass the host's path rules here: outputs under the Lora folder,
sanitized names, inputs that exist. Each operation's ``run`` returns a JSON-ready result with the written
``files``, the final ``output`` and its ``hash`` (the short sha256 the WebUI shows for a Lora).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import torch

from lorakit_ext.errors import LorakitError, clipped
from lorakit_ext.formats.safetensors_io import check_save_to, file_sha256, lora_short_hash, write_atomic
from lorakit_ext.train.config import TrainConfig, unwrap_optional
from lorakit_ext.ui import paths
from lorakit_ext.ui.host import Host
from lorakit_ext.ui.jobs import Operation

MERGE_MODES: tuple[str, ...] = ("merge", "resize", "extract", "merge_into")
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}  # the training config's names
SAVE_PRECISIONS = tuple(SAVE_DTYPES)
SLIDER_METHODS = ("copier", "difference", "paired")


# --- checking values -----------------------------------------------------------------------------------------------


def checked(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the ``hint`` (bool, str, int, float, a list of one of those; ``X | None`` lets None through), or a
    one-line error naming ``name``. Strict, unlike the CLI's string parsing (``TrainConfig``): JSON and gradio hand
    typed values, so "false" is no bool and "2" no int; only an int given as a whole float (JSON, gradio) is taken."""
    kind = unwrap_optional(hint)
    if value is None and kind is not hint:
        return None
    if get_origin(kind) is list:
        if not isinstance(value, list):
            raise LorakitError(f"{name}: expected a list of {get_args(kind)[0].__name__}, got {clipped(repr(value))}")
        return [checked(name, item, get_args(kind)[0]) for item in value]
    if kind in (int, float):
        if isinstance(value, float) and not math.isfinite(value):
            raise LorakitError(f"{name}: {value} is not a finite number")
        fits = isinstance(value, (int, float)) and not isinstance(value, bool)
        fits = fits and (kind is float or value == int(value))
    else:
        fits = isinstance(value, kind)
    if not fits:
        raise LorakitError(f"{name}: expected {kind.__name__}, got {clipped(repr(value))}")
    return kind(value)


# --- training ------------------------------------------------------------------------------------------------------


def train_config(values: dict[str, Any], host: Host, source: str = "train") -> TrainConfig:
    """The CLI's ``TrainConfig`` from kohya-named values, with its output placed under the host's Lora folder
    (``output_dir`` relative to it; left at the CLI's default ``output``, the host's LoRA Kit folder)."""
    config = TrainConfig.from_dict(values, source=source)
    if config.pretrained_model_name_or_path:
        raise LorakitError(
            "pretrained_model_name_or_path: this host trains on the model it has loaded; leave the option empty"
        )
    default_dir = TrainConfig.__dataclass_fields__["output_dir"].default
    folder = host.output_dir() if config.output_dir in ("", default_dir) else config.output_dir
    placed = {
        "output_dir": str(paths.output_dir(host.lora_root(), folder)),
        "output_name": paths.sanitize_name(config.output_name),
    }
    return config.with_overrides(placed, source=source).validate()


def train_operation(config: TrainConfig) -> Operation:
    def run(adapter, report, token) -> dict:
        from lorakit_ext.train.trainer import train

        result = train(config, adapter, report, token)
        return {
            **file_result(result.output, result.files),
            "steps": result.steps,
            "epochs": result.epochs,
            "stopped": result.stopped,
            "final_loss": result.losses[-1] if result.losses else None,
        }

    return Operation("train", f"train {config.network_algo_resolved()} '{config.output_name}'", run, needs_model=True)


def dataset_preview(values: dict[str, Any]) -> dict:
    """What a dataset folder holds (concepts, repeats, images, captions, buckets), for the Train tab."""
    from lorakit_ext.train.dataset import scan_dataset

    config = TrainConfig.from_dict(values, source="dataset")
    dataset = config.dataset_config()
    dataset.validate()
    return scan_dataset(dataset).to_dict()


# --- merging -------------------------------------------------------------------------------------------------------


@dataclass
class MergeRequest:
    """A merge, resize, extract or merge-into, named as the verbs' flags are. ``models`` holds names from the
    host's Lora list or paths; ``output_name`` is a file stem placed under the Lora folder (merge_into: beside
    the loaded checkpoint)."""

    mode: str = "merge"
    models: list[str] = field(default_factory=list)
    ratios: list[float] | None = None
    new_rank: int | None = None
    new_conv_rank: int | None = None
    dynamic: str | None = None
    clamp_quantile: float | None = None
    base: str = ""  # extract: the original checkpoint
    tuned: str = ""  # extract: the fine-tuned checkpoint
    save_precision: str = "fp16"
    output_name: str = "merged"
    output_dir: str = ""

    def __post_init__(self) -> None:
        """Every field checked for its type (``checked``), however the request was built: a JSON body or the tab."""
        for name, hint in get_type_hints(type(self)).items():
            setattr(self, name, checked(name, getattr(self, name), hint))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MergeRequest:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LorakitError(f"merge: unknown option {unknown[0]!r}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def rank_rule(rank: int | None, conv_rank: int | None, dynamic: str | None):
    """The merge verbs' rank options (``new_rank``, ``new_conv_rank``, ``dynamic`` "METHOD:VALUE") as a ``RankRule``."""
    from lorakit_ext.merge.svd import RankRule, parse_dynamic

    for option, value in (("new_rank", rank), ("new_conv_rank", conv_rank)):
        if value is not None and value < 1:
            raise LorakitError(f"{option} must be at least 1, got {value}")
    method, value = parse_dynamic(dynamic) if dynamic else (None, None)
    return RankRule(rank=rank, conv_rank=conv_rank, dynamic=method, value=value)


def merge_operation(request: MergeRequest, host: Host) -> Operation:
    """Validate ``request`` against the host (inputs exist, output placed) and return its operation."""
    if request.mode not in MERGE_MODES:
        raise LorakitError(f"mode: {request.mode!r} is not one of {', '.join(MERGE_MODES)}")
    if request.save_precision not in SAVE_PRECISIONS:
        raise LorakitError(f"save_precision: must be one of {', '.join(SAVE_PRECISIONS)}")
    if request.clamp_quantile is not None and not 0.0 < request.clamp_quantile <= 1.0:
        raise LorakitError(f"clamp_quantile must be in (0, 1], got {request.clamp_quantile}")
    rule = rank_rule(request.new_rank, request.new_conv_rank, request.dynamic or None)
    networks = host.list_networks()
    models = [resolve_network(name, networks) for name in request.models]
    if request.mode in ("merge", "merge_into") and not models:
        raise LorakitError("models: pick at least one LoRA")
    if request.mode == "resize" and len(models) != 1:
        raise LorakitError("models: resize takes exactly one LoRA")
    if request.mode == "resize" and rule.rank is None and rule.dynamic is None:
        raise LorakitError("new_rank: resize needs a new rank or a dynamic rule")
    ratios = request.ratios if request.ratios is not None else [1.0] * len(models)
    if len(ratios) != len(models):
        raise LorakitError(f"ratios: {len(ratios)} ratios for {len(models)} models")
    if request.mode == "merge_into":
        checkpoint = host.checkpoint_path()
        if checkpoint is None:
            raise LorakitError("merge_into: no checkpoint is loaded")
        save_to = host.checkpoint_output_dir() / f"{paths.sanitize_name(request.output_name)}.safetensors"
    else:
        save_to = paths.output_path(host.lora_root(), request.output_name, request.output_dir or host.output_dir())
    base = tuned = None
    if request.mode == "extract":
        if rule.rank is None and rule.dynamic is None:
            from lorakit_ext.merge.cli_extract import DEFAULT_DIM

            rule = rank_rule(DEFAULT_DIM, request.new_conv_rank, None)
        base, tuned = paths.existing_file(request.base, "base"), paths.existing_file(request.tuned, "tuned")
    inputs = {"models": models, "base": [base] if base else [], "tuned": [tuned] if tuned else [],
              "the loaded checkpoint": [checkpoint] if request.mode == "merge_into" else []}
    check_save_to(save_to, inputs)
    from lorakit_ext.merge.cli_common import bytes_per_value

    dtype = SAVE_DTYPES[request.save_precision]
    value_bytes = bytes_per_value(dtype)
    compress = rule.rank is not None or rule.conv_rank is not None or rule.dynamic is not None

    def run(adapter, report, token) -> dict:
        from lorakit_ext.formats.kohya import load_network, save_network
        from lorakit_ext.merge import algebra, svd
        from lorakit_ext.merge import checkpoint as checkpoint_merge

        def progress(done: int, total: int, name: str) -> None:
            token.raise_if_cancelled()
            if token.stop_requested:  # half a merge is no file: a stop abandons it
                token.cancel()
                token.raise_if_cancelled()
            report(step=done, total=total, message=name)

        save_to.parent.mkdir(parents=True, exist_ok=True)
        sources = [p.name for p in models]
        loaded = [load_network(p) for p in models]
        report_data = None
        if request.mode == "merge_into":
            summary = checkpoint_merge.merge_into_checkpoint(
                host.checkpoint_path(), loaded, ratios, save_to, save_dtype=dtype, sources=sources, progress=progress
            )
            written = [save_to, *copy_checkpoint_config(host.checkpoint_path(), save_to)]
            return {**file_result(save_to, written), "weights_changed": summary["weights_changed"]}
        if request.mode == "extract":
            merged, report_data = checkpoint_merge.extract_lora(
                base, tuned, rule, include_kxk_convs=rule.conv_rank is not None, clamp_quantile=request.clamp_quantile,
                bytes_per_value=value_bytes, progress=progress,
            )
        elif compress:
            merged, report_data = svd.merge_compressed(
                loaded, ratios, rule, clamp_quantile=request.clamp_quantile, bytes_per_value=value_bytes,
                sources=sources, progress=progress,
            )
            if request.mode == "resize":
                merged.metadata = {**loaded[0].metadata, **merged.metadata}
        else:
            merged = algebra.merge_networks(loaded, ratios, sources=sources, dtype=dtype, progress=progress)
        written = save_network(save_to, merged, dtype=dtype)
        return {
            **file_result(save_to, [save_to]),
            "modules": len(merged.modules),
            "network_dim": written.get("ss_network_dim"),
            **(report_data.summary() if report_data else {}),
        }

    title = f"{request.mode.replace('_', ' ')} -> {save_to.name}"
    return Operation(request.mode, title, run, needs_model=False)


def resolve_network(name_or_path: str, networks: dict[str, Path], option: str = "models") -> Path:
    """A Lora list name (as in ``<lora:name:w>``) or an existing file."""
    if name_or_path in networks:
        return networks[name_or_path]
    return paths.existing_file(name_or_path, option)


def describe_inputs(models: list[str], networks: dict[str, Path]) -> list[dict]:
    """Type, rank and architecture of each picked LoRA, for the Merge tab's summary."""
    from lorakit_ext.formats.kohya import describe_network, load_network

    rows = []
    for name in models:
        path = resolve_network(name, networks)
        info = describe_network(load_network(path))
        ranks = sorted({rank for values in info["ranks"].values() for rank in values})
        rows.append(
            {
                "name": name,
                "type": ", ".join(info["algorithms"]) or "?",
                "rank": "-".join(str(r) for r in (ranks[:1] + ranks[-1:] if len(ranks) > 1 else ranks)) or "?",
                "arch": info["arch"] or "?",
                "modules": info["modules"]["total"],
            }
        )
    return rows


# --- sliders -------------------------------------------------------------------------------------------------------


# each slider method's own options (beside the training options), with their types: the CLI verbs' flags
METHOD_OPTIONS: dict[str, dict[str, type]] = {
    "copier": {"ensemble": int, "anchor": float, "verify_seeds": int, "reuse_a": str, "keep_a": str},
    "difference": {"b_from_a": bool, "anchor": float, "rank": int, "shuffle": bool, "reuse_a": str, "keep_a": str},
    "paired": {"weight": float},
}


def method_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The method's own options taken out of ``options`` (what is left are training options), each checked for its
    type; another method's option is refused by name."""
    own = {}
    for name, kind in METHOD_OPTIONS[method].items():
        if name not in options:
            continue
        value = options.pop(name)
        if value is None or value == "":
            continue
        own[name] = checked(name, value, kind)
    for name in options:  # in the request's order: the first one is named
        owners = [other for other, names in METHOD_OPTIONS.items() if name in names]
        if owners:
            raise LorakitError(f"{name}: an option of the {' and '.join(owners)} method, not of {method}")
    return own


def slider_operation(method: str, values: dict[str, Any], host: Host) -> Operation:
    """Copier / difference / paired slider from before/after pairs. ``values``: ``a`` and ``b`` (folders of A and
    B images matched by name), ``output_name``, optionally ``output_dir``, ``masked``, ``report`` (default true:
    the weight x seed x prompt grid and its numbers), the method's own options (``METHOD_OPTIONS``, as the CLI
    verbs have them) and any training option (kohya names) over the recipe."""
    if method not in SLIDER_METHODS:
        raise LorakitError(f"method: {method!r} is not one of {', '.join(SLIDER_METHODS)}")
    from lorakit_ext.slider.methods import check_options, run_method, slider_config
    from lorakit_ext.slider.pairs import load_pairs
    from lorakit_ext.slider.report import SweepSettings, default_prompts, report_paths

    options = dict(values)
    a_dir = paths.existing_dir(checked("a", options.pop("a", ""), str), "a")
    b_dir = paths.existing_dir(checked("b", options.pop("b", ""), str), "b")
    masked = checked("masked", options.pop("masked", False), bool)
    with_report = checked("report", options.pop("report", True), bool)
    own = method_options(method, options)
    check_options(method, own)
    if "reuse_a" in own and "keep_a" in own:
        raise LorakitError("keep_a: A is reused (reuse_a), so there is no trained A to keep")
    folder = checked("output_dir", options.pop("output_dir", ""), str) or host.output_dir()
    out = paths.output_path(host.lora_root(), checked("output_name", options.pop("output_name", "slider"), str), folder)
    # LoRA A: reused from the Lora list (a name or a file), or kept beside the output under a name of its own
    if "reuse_a" in own:
        own["reuse_a"] = resolve_network(own["reuse_a"], host.list_networks(), "reuse_a")
        if own["reuse_a"].resolve() == out.resolve():  # the slider's save would replace the A it was trained over
            raise LorakitError(f"reuse_a: {out.name} is the slider's own file; give the slider another name")
    if "keep_a" in own:
        own["keep_a"] = paths.output_path(host.lora_root(), own["keep_a"], folder, "keep_a")
        if own["keep_a"] == out:
            raise LorakitError(f"keep_a: {own['keep_a'].name} is the slider's own file; give A another name")
    if options.get("pretrained_model_name_or_path"):
        raise LorakitError("pretrained_model_name_or_path: this host trains on the model it has loaded")
    pair_set = load_pairs(a_dir, b_dir)
    config = slider_config(pair_set, options)
    width, height = config.resolution
    prompts = default_prompts(config.default_caption)
    settings = SweepSettings(prompts=prompts, width=width, height=height) if with_report else None

    def run(adapter, report, token) -> dict:
        out.parent.mkdir(parents=True, exist_ok=True)
        result = run_method(method, pair_set, config, adapter, out, settings, masked=masked or config.masked_loss,
                            report=report, token=token, **own)
        grid, numbers = report_paths(out)
        written = [*([result.kept_a] if result.kept_a else []), *result.saved]  # A first: it was trained first
        return {
            **result.summary(),
            **file_result(result.output, [path for path in written if path.is_file()]),
            "report_grid": str(grid) if grid.is_file() else None,
            "report_json": str(numbers) if numbers.is_file() else None,
        }

    return Operation(method, f"{method} slider '{out.stem}' from {len(pair_set.pairs)} pairs", run, needs_model=True)


# --- epoch x weight grid ------------------------------------------------------------------------------------------

GRID_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
GRID_SUFFIX = ".epoch_grid.png"


def grid_operation(files: list[str], weights: tuple[float, ...] = GRID_WEIGHTS, seed: int = 0, steps: int = 20,
                   cfg_scale: float = 7.0, size: tuple[int, int] = (512, 512), prompt: str = "") -> Operation:
    """One row per network file (the epochs of a run), one column per weight, all from ``prompt`` (empty by
    default, what a LoRA learned on its own) and one fixed seed, on the host's model; saved beside the last file."""
    networks = [paths.existing_file(f, "files") for f in files]
    if not networks:
        raise LorakitError("files: no network files to compare (train or run a slider first)")
    output = networks[-1].with_suffix(GRID_SUFFIX)

    def run(adapter, report, token) -> dict:
        from lorakit_ext.formats.kohya import load_network
        from lorakit_ext.networks.network import network_from_weights
        from lorakit_ext.sampling import grid, sample

        rows = []
        for number, path in enumerate(networks):
            network = network_from_weights(load_network(path), adapter.targets(), adapter.arch)
            network.to(adapter.device).eval().attach()
            try:
                with torch.no_grad():
                    for column, weight in enumerate(weights):
                        token.raise_if_cancelled()
                        network.multiplier = weight
                        rows.append(sample(adapter, [prompt], [seed], steps=steps, cfg_scale=cfg_scale,
                                           width=size[0], height=size[1]))
                        report(step=number * len(weights) + column + 1, total=len(networks) * len(weights),
                               message=f"{path.stem} at {weight:g}")
            finally:
                network.detach()
        image = grid(torch.cat(rows), columns=len(weights), row_labels=[p.stem for p in networks])
        image.save(output)
        report(step=len(rows), total=len(rows), message="grid written", images=[str(output)])
        return {**file_result(output, []), "weights": list(weights), "rows": [str(p) for p in networks]}

    return Operation("grid", f"epoch x weight grid of {networks[-1].stem}", run, needs_model=True)


def copy_checkpoint_config(checkpoint: Path, merged: Path) -> list[Path]:
    """The checkpoint's ``.yaml`` copied beside the merged file: the WebUI builds a checkpoint from the config
    beside it, and without one guesses from the weights (a real WebUI 1.10.1 then failed to load the toy model's
    merge). [] when the checkpoint has none."""
    config = checkpoint.with_suffix(".yaml")
    if not config.is_file():
        return []
    copied = merged.with_suffix(".yaml")
    write_atomic(copied, [config.read_bytes()])
    return [copied]


# --- results -------------------------------------------------------------------------------------------------------


def file_result(output: Path | None, files: list[Path]) -> dict:
    return {
        "output": str(output) if output else None,
        "files": [str(f) for f in files],
        "hash": lora_short_hash(file_sha256(output)) if output else None,
    }
