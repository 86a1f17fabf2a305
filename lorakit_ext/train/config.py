"""``TrainConfig``: the one validated object the Train tab, the CLI and the HTTP API all hand to the trainer.

Option names are kohya sd-scripts' (a kohya ``--config_file`` TOML loads as is: its ``[section]`` tables are
flattened, and kohya options that are not fields here are mapped, noted or refused by ``kohya_keys``), so users
bring their configs along. The config is flat, like kohya's; each field's ``metadata`` says
which section it belongs to and what it means, which is what ``docs/train-config.md`` is generated from.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

from lorakit_ext.errors import LorakitError, check_can_write, check_option, clipped
from lorakit_ext.train.kohya_keys import network_args_dict

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Prodigy")  # or any optimizer class by dotted name
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
ALGOS = ("lora", "locon", "loha")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("float", "fp16", "bf16")
SAMPLERS = ("euler", "ddim")
NUM_TRAIN_TIMESTEPS = 1000
MAX_RANK = 4096  # above every SD1/SD2/SDXL layer's width, where more rank adds nothing but memory


def _option(section: str, help_text: str, default: Any, **kwargs) -> Any:
    """A config field with its documentation attached (the schema table in docs/train-config.md reads it)."""
    metadata = {"section": section, "help": help_text}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class TrainConfig:
    """Every training option, kohya-named. Build with ``from_dict``/``load_toml``; ``validate()`` before use."""

    # --- model
    pretrained_model_name_or_path: str | None = _option(
        "model",
        "ldm checkpoint (.safetensors with its .yaml beside it) or diffusers folder; empty: the toy model",
        None,
    )
    v2: bool | None = _option("model", "kohya's SD2 flag: checked against the model, which decides", None)
    v_parameterization: bool | None = _option(
        "model", "kohya's v-prediction flag: checked against the model's own objective", None
    )
    sdxl: bool | None = _option("model", "kohya_ss's SDXL flag: checked against the model", None)
    # --- dataset
    train_data_dir: str = _option("dataset", "folder of kohya `N_name` concept folders (N repeats)", "")
    reg_data_dir: str | None = _option("dataset", "folder of regularization concept folders", None)
    caption_extension: str = _option("dataset", "caption file extension beside each image", ".txt")
    default_caption: str = _option("dataset", "caption for images that have no caption file", "")
    resolution: tuple[int, int] = _option("dataset", "training size `W,H` (or one number for a square)", (512, 512))
    enable_bucket: bool = _option("dataset", "aspect-ratio buckets", False)
    min_bucket_reso: int = _option("dataset", "smallest bucket side", 256)
    max_bucket_reso: int = _option("dataset", "largest bucket side", 1024)
    bucket_reso_steps: int = _option("dataset", "bucket sides are multiples of this", 64)
    bucket_no_upscale: bool = _option("dataset", "never enlarge an image to fit a bucket", False)
    shuffle_caption: bool = _option("dataset", "shuffle comma-separated caption tags", False)
    keep_tokens: int = _option("dataset", "leading tags kept in place when shuffling", 0)
    caption_dropout_rate: float = _option("dataset", "probability of training an image with an empty caption", 0.0)
    caption_prefix: str = _option("dataset", "text put before every caption", "")
    caption_suffix: str = _option("dataset", "text put after every caption", "")
    flip_aug: bool = _option("dataset", "random horizontal flips", False)
    masked_loss: bool = _option("dataset", "weight the loss by a mask: mask_dir's file, else the alpha channel", False)
    mask_dir: str | None = _option("dataset", "masks named like the images (white = trained)", None)
    prior_loss_weight: float = _option("dataset", "loss weight of regularization images", 1.0)
    cache_latents: bool = _option("dataset", "encode every image once and keep the latents in memory", False)
    cache_latents_to_disk: bool = _option("dataset", "keep cached latents in files beside the images", False)
    cache_text_encoder_outputs: bool = _option(
        "dataset", "encode each caption once (only when the text encoder is not trained)", False
    )
    # --- network
    network_algo: str = _option("network", f"network type: {', '.join(ALGOS)}", "lora")
    network_dim: int = _option("network", "rank of linear and 1x1 modules", 4)
    network_alpha: float = _option("network", "alpha of linear and 1x1 modules (scale = alpha / dim)", 1.0)
    conv_dim: int | None = _option("network", "rank of kxk conv modules (locon/loha); empty: not trained", None)
    conv_alpha: float | None = _option("network", "alpha of kxk conv modules; empty: conv_dim's default 1", None)
    network_args: list[str] = _option(
        "network", "kohya/LyCORIS `key=value` strings: algo, conv_dim, conv_alpha and the dropouts are read", []
    )
    network_weights: str | None = _option("network", "start from this network file", None)
    network_dropout: float | None = _option("network", "dropout on the rank activations", None)
    rank_dropout: float | None = _option("network", "dropout of whole rank components", None)
    module_dropout: float | None = _option("network", "probability of skipping a module for a step", None)
    network_train_unet_only: bool = _option("network", "train the UNet only (the text encoder stays frozen)", False)
    # --- optimizer
    optimizer_type: str = _option("optimizer", f"{', '.join(OPTIMIZERS)} or a dotted class name", "AdamW")
    optimizer_args: list[str] = _option("optimizer", "`key=value` strings passed to the optimizer", [])
    learning_rate: float = _option("optimizer", "learning rate (default for unet_lr and text_encoder_lr)", 1e-4)
    unet_lr: float | None = _option("optimizer", "UNet learning rate", None)
    text_encoder_lr: float | None = _option("optimizer", "text encoder learning rate", None)
    lr_scheduler: str = _option("optimizer", f"{', '.join(SCHEDULERS)}", "constant")
    lr_warmup_steps: float = _option("optimizer", "warmup steps (a value below 1 is a fraction of all steps)", 0)
    lr_scheduler_num_cycles: int = _option("optimizer", "restarts of cosine_with_restarts", 1)
    lr_scheduler_power: float = _option("optimizer", "power of polynomial", 1.0)
    max_grad_norm: float = _option("optimizer", "clip gradients to this norm (0: no clipping)", 1.0)
    # --- training
    max_train_steps: int = _option("training", "optimizer steps (max_train_epochs wins when set)", 1600)
    max_train_epochs: int | None = _option("training", "epochs; sets max_train_steps", None)
    train_batch_size: int = _option("training", "images per batch", 1)
    gradient_accumulation_steps: int = _option("training", "batches per optimizer step", 1)
    mixed_precision: str = _option("training", f"{', '.join(MIXED_PRECISIONS)}", "no")
    gradient_checkpointing: bool = _option("training", "recompute activations in backward to save memory", False)
    seed: int = _option("training", "seed of data order, noise and timesteps", 42)
    noise_offset: float = _option("training", "offset noise strength (darker/brighter images)", 0.0)
    multires_noise_iterations: int = _option("training", "pyramid noise levels (0: off)", 0)
    multires_noise_discount: float = _option("training", "weight decay per pyramid noise level", 0.3)
    min_snr_gamma: float | None = _option("training", "min-SNR loss weighting gamma (5 is typical)", None)
    min_timestep: int = _option("training", "lowest timestep trained", 0)
    max_timestep: int = _option("training", "highest timestep trained (exclusive)", NUM_TRAIN_TIMESTEPS)
    # --- saving
    output_dir: str = _option("saving", "folder for networks, states and samples", "output")
    output_name: str = _option("saving", "file name stem", "lora")
    save_precision: str = _option("saving", f"{', '.join(SAVE_PRECISIONS)}", "fp16")
    save_every_n_epochs: int | None = _option("saving", "save `name-000004.safetensors` every N epochs", None)
    save_every_n_steps: int | None = _option("saving", "save `name-step00000500.safetensors` every N steps", None)
    save_last_n_epochs: int | None = _option("saving", "keep only the last N per-epoch files", None)
    save_last_n_steps: int | None = _option("saving", "keep only the per-step files of the last N steps", None)
    save_state: bool = _option("saving", "also save a resumable state folder with every file", False)
    resume: str | None = _option("saving", "continue from this state folder", None)
    training_comment: str = _option("saving", "written to ss_training_comment", "")
    # --- samples
    sample_every_n_epochs: int | None = _option("samples", "sample images every N epochs", None)
    sample_every_n_steps: int | None = _option("samples", "sample images every N steps", None)
    sample_prompts: str | None = _option(
        "samples", "prompt file, one prompt a line with --n --s --l --d --w --h --m flags", None
    )
    sample_sampler: str = _option("samples", f"{', '.join(SAMPLERS)}", "euler")

    # not an option: one note per kohya option accepted without effect (set by ``from_dict``, shown by ``warnings``)
    load_notes: ClassVar[tuple[str, ...]] = ()

    # --- building -------------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """A config from kohya-named values (``[section]`` tables flattened); kohya-only options are translated
        (``kohya_keys``, their notes kept for ``warnings()``), other unknown keys are refused by name."""
        from lorakit_ext.train.kohya_keys import translate

        flat, notes = translate(flatten_sections(values), source)
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(flat) - set(known))
        if unknown:
            raise LorakitError(f"{source}: unknown option {unknown[0]!r}" + _did_you_mean(unknown[0], known))
        hints = get_type_hints(cls)
        config = cls(**{key: _coerce(key, value, hints[key], source) for key, value in flat.items()})
        network_args_dict(config.network_args, source)  # keys that would change the network are refused here
        config.load_notes = tuple(notes)
        return config

    @classmethod
    def load_toml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_toml(path), source=str(path))

    def with_overrides(self, values: Mapping[str, Any], source: str = "overrides") -> TrainConfig:
        """A copy with some options replaced (CLI flags, UI fields), coerced like ``from_dict``."""
        config = TrainConfig.from_dict({**self.to_dict(), **values}, source=source)
        config.load_notes = self.load_notes + config.load_notes
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-ready values (tuples as lists), ``from_dict`` of which gives an equal config."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def to_toml(self) -> str:
        """The config as TOML in kohya-style sections, options left at None omitted."""
        sections: dict[str, list[str]] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                sections.setdefault(f.metadata["section"], []).append(f"{f.name} = {_toml_value(_plain(value))}")
        return "\n".join(f"[{name}]\n" + "\n".join(lines) + "\n" for name, lines in sections.items())

    # --- checking -------------------------------------------------------------------------------------------------

    def validate(self) -> TrainConfig:
        """Raise ``LorakitError`` naming the first bad option; returns self so calls chain."""
        self.dataset_config().validate()
        check_option(self.network_algo_resolved() in ALGOS, "network_algo", f"must be one of {', '.join(ALGOS)}")
        check_option(0 < self.network_dim <= MAX_RANK, "network_dim", f"must be between 1 and {MAX_RANK}")
        check_option(self.network_alpha > 0, "network_alpha", "must be positive")
        conv_dim, _ = self.conv_resolved()
        check_option(conv_dim is None or 0 <= conv_dim <= MAX_RANK, "conv_dim", f"must be between 0 and {MAX_RANK}")
        check_option(0 <= self.seed < 2**32, "seed", f"must be between 0 and {2**32 - 1}")
        for name, value in zip(("network_dropout", "rank_dropout", "module_dropout"), self.dropouts_resolved()):
            check_option(0 <= value < 1, name, "must be in [0, 1)")
        check_option(self.learning_rate > 0, "learning_rate", "must be positive")
        for name in ("unet_lr", "text_encoder_lr"):
            check_option(getattr(self, name) is None or getattr(self, name) >= 0, name, "must be 0 or more")
        check_option(self.lr_scheduler in SCHEDULERS, "lr_scheduler", f"must be one of {', '.join(SCHEDULERS)}")
        check_option(self.lr_warmup_steps >= 0, "lr_warmup_steps", "must be 0 or more")
        check_option(self.lr_scheduler_num_cycles >= 1, "lr_scheduler_num_cycles", "must be at least 1")
        check_option(self.max_grad_norm >= 0, "max_grad_norm", "must be 0 or more")
        from lorakit_ext.train.optim import check_optimizer_name, parse_optimizer_args

        check_optimizer_name(self.optimizer_type)
        parse_optimizer_args(self.optimizer_args)
        check_option(self.max_train_steps > 0, "max_train_steps", "must be positive")
        check_option(self.max_train_epochs is None or self.max_train_epochs > 0, "max_train_epochs", "must be positive")
        check_option(self.train_batch_size > 0, "train_batch_size", "must be positive")
        check_option(self.gradient_accumulation_steps > 0, "gradient_accumulation_steps", "must be positive")
        check_option(
            self.mixed_precision in MIXED_PRECISIONS, "mixed_precision", f"must be {', '.join(MIXED_PRECISIONS)}"
        )
        check_option(self.save_precision in SAVE_PRECISIONS, "save_precision", f"must be {', '.join(SAVE_PRECISIONS)}")
        check_option(self.noise_offset >= 0, "noise_offset", "must be 0 or more")
        check_option(self.multires_noise_iterations >= 0, "multires_noise_iterations", "must be 0 or more")
        check_option(0 <= self.multires_noise_discount <= 1, "multires_noise_discount", "must be in [0, 1]")
        check_option(self.min_snr_gamma is None or self.min_snr_gamma > 0, "min_snr_gamma", "must be positive")
        check_option(
            0 <= self.min_timestep < self.max_timestep <= NUM_TRAIN_TIMESTEPS,
            "min_timestep/max_timestep",
            f"need 0 <= min_timestep < max_timestep <= {NUM_TRAIN_TIMESTEPS}",
        )
        for name in (
            "save_every_n_epochs",
            "save_every_n_steps",
            "save_last_n_epochs",
            "save_last_n_steps",
            "sample_every_n_epochs",
            "sample_every_n_steps",
        ):
            check_option(getattr(self, name) is None or getattr(self, name) > 0, name, "must be positive")
        check_option(
            bool(self.output_name.strip()) and "/" not in self.output_name, "output_name", "must be a file stem"
        )
        check_option(self.sample_sampler in SAMPLERS, "sample_sampler", f"must be one of {', '.join(SAMPLERS)}")
        if self.sample_every_n_epochs or self.sample_every_n_steps:
            check_option(bool(self.sample_prompts), "sample_prompts", "is needed when sampling every N epochs/steps")
        for name in ("sample_prompts", "network_weights"):
            path = getattr(self, name)
            check_option(path is None or Path(path).is_file(), name, f"file {path} does not exist")
        if self.sample_prompts:
            from lorakit_ext.train.prompts import read_prompt_file

            read_prompt_file(self.sample_prompts)  # every line parses, before any training
        check_can_write(self.output_dir, "output_dir")
        if self.resume is not None:
            from lorakit_ext.train.state import check_state_folder

            check_state_folder(self.resume)
        if self.cache_text_encoder_outputs and self.trains_text_encoder():
            raise LorakitError(
                "cache_text_encoder_outputs needs a frozen text encoder: "
                "set network_train_unet_only or text_encoder_lr = 0"
            )
        if self.cache_latents_to_disk and not self.cache_latents:
            raise LorakitError("cache_latents_to_disk needs cache_latents")
        return self

    def warnings(self) -> list[str]:
        """Settings that are allowed but probably not meant (shown before training starts)."""
        notes = list(self.load_notes)
        if self.multires_noise_iterations == 0 and self.multires_noise_discount != TrainConfig.multires_noise_discount:
            notes.append("multires_noise_discount is set but multires_noise_iterations is 0: no multires noise is used")
        if self.noise_offset and self.multires_noise_iterations:
            notes.append("noise_offset and multires noise are both on; kohya uses one or the other")
        return notes

    # --- derived values ---------------------------------------------------------------------------------------------

    def network_algo_resolved(self) -> str:
        """``network_algo``, or LyCORIS' ``algo=`` from ``network_args`` when a kohya config gives one."""
        return network_args_dict(self.network_args).get("algo", self.network_algo)

    def conv_resolved(self) -> tuple[int | None, float]:
        """(conv_dim, conv_alpha), where ``network_args`` may give them as kohya configs do."""
        args = network_args_dict(self.network_args)
        conv_dim = int(args["conv_dim"]) if "conv_dim" in args else self.conv_dim
        conv_alpha = float(args["conv_alpha"]) if "conv_alpha" in args else self.conv_alpha
        return conv_dim, 1.0 if conv_alpha is None else conv_alpha

    def dropouts_resolved(self) -> tuple[float, float, float]:
        """(network_dropout, rank_dropout, module_dropout), where ``network_args`` may give them as kohya configs do
        (``dropout=``, ``rank_dropout=``, ``module_dropout=``); the options win."""
        args = network_args_dict(self.network_args)
        return tuple(
            float(own if own is not None else args.get(key, 0.0))
            for own, key in (
                (self.network_dropout, "dropout"),
                (self.rank_dropout, "rank_dropout"),
                (self.module_dropout, "module_dropout"),
            )
        )

    def lr_for(self, component: str) -> float:
        """The learning rate of the UNet ("unet") or text encoder factors: its own option, else learning_rate."""
        own = self.unet_lr if component == "unet" else self.text_encoder_lr
        return self.learning_rate if own is None else own

    def trains_text_encoder(self) -> bool:
        return not self.network_train_unet_only and self.text_encoder_lr != 0

    def dataset_config(self):
        """The dataset engineer's ``DatasetConfig`` for these options."""
        from lorakit_ext.train.dataset import DatasetConfig

        names = {f.name for f in fields(DatasetConfig)}
        return DatasetConfig(**{name: getattr(self, name) for name in names if hasattr(self, name)})




def read_toml(path: str | Path) -> dict[str, Any]:
    """A config file's values as written (``[section]`` tables kept), for ``from_dict`` or to lay over a recipe."""
    try:
        with open(path, "rb") as file:
            return _toml().load(file)
    except OSError as error:
        raise LorakitError(f"{path}: cannot read ({error.strerror})") from None
    except ValueError as error:  # tomllib.TOMLDecodeError is a ValueError
        raise LorakitError(f"{path}: not valid TOML ({error})") from None


def flatten_sections(values: Mapping[str, Any]) -> dict[str, Any]:
    """kohya-style ``[section]`` tables flattened into one mapping of option -> value."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _toml():
    """``tomllib`` (Python 3.11+) or its backport ``tomli`` (the WebUI's Python 3.10)."""
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ImportError:
        raise LorakitError("reading TOML on Python 3.10 needs the tomli package (pip install tomli)") from None
    return tomli


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """``value`` as the field's type: CLI and UI strings become numbers, "512,768" a resolution, etc."""
    optional = type(None) in get_args(hint)
    if value is None or (optional and value == ""):
        if optional:
            return None
        raise LorakitError(f"{source}: {name} cannot be empty")
    kind = unwrap_optional(hint)
    try:
        if name == "resolution":
            return _resolution(value)
        if get_origin(kind) is list:
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else _split_list(str(value))
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if isinstance(value, bool) or isinstance(value, (list, tuple, dict)):  # true is no number, [1] no text
            raise TypeError(value)
        if kind is int:
            if isinstance(value, int):
                return value
            number = float(value)  # "1e3" and 1000.0 are 1000; 1.5, nan and inf are no int
            if not math.isfinite(number) or number != int(number):
                raise ValueError(value)
            return int(number)
        if kind is float:
            number = float(value)
            if not math.isfinite(number):  # no option means anything at inf or nan; each check below assumes finite
                raise ValueError(value)
            return number
        return str(value)
    # a list literal too deep or unclosed raises SyntaxError / RecursionError / MemoryError in ast.literal_eval
    except (TypeError, ValueError, OverflowError, SyntaxError, RecursionError, MemoryError):
        kind_name = getattr(kind, "__name__", kind)
        raise LorakitError(f"{source}: {name} = {clipped(repr(value))} is not a valid {kind_name}") from None


def _resolution(value: Any) -> tuple[int, int]:
    """kohya's resolution: "512", "512,768" (width, height), 512 or [512, 768]."""
    parts = [int(p) for p in value.split(",")] if isinstance(value, str) else (
        [int(value)] if isinstance(value, (int, float)) else [int(p) for p in value]
    )
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise ValueError(value)
    return parts[0], parts[1]


def _split_list(text: str) -> list[str]:
    """A list option given as one string: a Python-style list literal, or space-separated ``key=value`` items."""
    text = text.strip()
    if text.startswith("["):
        return [str(v) for v in ast.literal_eval(text)]
    return text.split()


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        raise LorakitError(f"cannot write {value} to TOML")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _did_you_mean(name: str, known: Mapping[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def schema_markdown() -> str:
    """The options table of docs/train-config.md, generated from the dataclass so the two cannot drift apart."""
    hints = get_type_hints(TrainConfig)
    rows = ["| option | section | type | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for f in fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = str(hints[f.name]).replace("<class '", "").replace("'>", "").replace(" | ", " or ")
        shown = "" if default is None else _toml_value(_plain(default))
        text = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{f.name}` | {f.metadata['section']} | {kind} | {shown} | {text} |")
    return "\n".join(rows) + "\n"


def unwrap_optional(hint: Any) -> Any:
    """``int | None`` -> ``int``; other hints as they are."""
    if isinstance(hint, types.UnionType) or get_origin(hint) is Union:
        return next(a for a in get_args(hint) if a is not type(None))
    return hint
