"""Optimizers and learning-rate schedules by kohya's names.

Optimizers come from the libraries users know (torch AdamW, bitsandbytes AdamW8bit, lion-pytorch, prodigyopt, or
any class by dotted name) with kohya-style ``optimizer_args`` strings. Schedules are diffusers' when diffusers is
installed (the CLI and tests) and a ``LambdaLR`` over ``schedule_factor``, the same formulas, where it is not (the
WebUI); both are ``LambdaLR`` so their state dicts are interchangeable.
"""

from __future__ import annotations

import ast
import importlib
import math
from collections.abc import Iterable

import torch

from lorakit_ext.errors import LorakitError

# kohya name -> (module, class, pip package that provides it)
OPTIMIZER_CLASSES: dict[str, tuple[str, str, str]] = {
    "AdamW": ("torch.optim", "AdamW", "torch"),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "Lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
}


def parse_optimizer_args(items: Iterable[str]) -> dict[str, object]:
    """kohya's ``optimizer_args``: ``key=value`` strings whose values are Python literals (``betas=0.9,0.99``)."""
    kwargs: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise LorakitError(f"optimizer_args: {item!r} is not key=value")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()  # a bare word: a string, as kohya reads it
        kwargs[key.strip()] = value
    return kwargs


# the packages a dotted optimizer_type may name: importing a module runs its code, and the name can come over HTTP
OPTIMIZER_PACKAGES = (
    "torch", "bitsandbytes", "lion_pytorch", "prodigyopt", "dadaptation", "transformers", "torch_optimizer",
    "pytorch_optimizer", "came_pytorch", "schedulefree",
)


def check_optimizer_name(name: str) -> None:
    """Refuse an ``optimizer_type`` that is neither a kohya name nor a dotted class in ``OPTIMIZER_PACKAGES``,
    without importing anything."""
    if name in OPTIMIZER_CLASSES:
        return
    if "." not in name:
        raise LorakitError(f"optimizer_type must be one of {', '.join(OPTIMIZER_CLASSES)} or a dotted class name like"
                           " torch.optim.SGD")
    if name.split(".")[0] not in OPTIMIZER_PACKAGES:
        raise LorakitError(f"optimizer_type {name}: a dotted class must come from {', '.join(OPTIMIZER_PACKAGES)}")


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class for a kohya optimizer name or a dotted ``module.Class`` path (``check_optimizer_name``)."""
    check_optimizer_name(name)
    module_name, class_name, package = OPTIMIZER_CLASSES.get(name, (*name.rsplit(".", 1), name.split(".")[0]))
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError:
        raise LorakitError(f"optimizer_type {name} needs the {package} package, which is not installed") from None
    except AttributeError:
        raise LorakitError(f"optimizer_type {name}: {module_name} has no {class_name}") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise LorakitError(f"optimizer_type {name} is not a torch optimizer class")
    return cls


def build_optimizer(name: str, param_groups: list[dict], lr: float, args: Iterable[str]) -> torch.optim.Optimizer:
    """The optimizer over ``param_groups`` (each may carry its own ``lr``), ``lr`` the default."""
    cls = optimizer_class(name)
    try:
        return cls(param_groups, lr=lr, **parse_optimizer_args(args))
    except TypeError as error:
        raise LorakitError(f"optimizer_args for {name}: {error}") from None


POLYNOMIAL_LR_END = 1e-7  # diffusers' end learning rate for the polynomial schedule (absolute, not a factor)


def schedule_factor(
    name: str,
    step: int,
    warmup_steps: int,
    total_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
    base_lr: float = 1.0,
) -> float:
    """The factor on the base learning rate after ``step`` scheduler steps (diffusers' formulas; ``base_lr`` is
    needed by polynomial only, which decays to an absolute ``POLYNOMIAL_LR_END``)."""
    if name == "constant":
        return 1.0
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if name == "constant_with_warmup":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if name == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if name == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))
    if name == "polynomial":
        if step > total_steps:
            return POLYNOMIAL_LR_END / base_lr
        return ((base_lr - POLYNOMIAL_LR_END) * (1 - progress) ** power + POLYNOMIAL_LR_END) / base_lr
    raise LorakitError(f"lr_scheduler {name!r} is unknown")


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule, stepped once per optimizer step; diffusers' implementation when it is installed."""
    try:
        from diffusers.optimization import get_scheduler
    except ImportError:
        get_scheduler = None
    if get_scheduler is not None:
        return get_scheduler(
            name,
            optimizer,
            num_warmup_steps=warmup_steps,
            num_training_steps=total_steps,
            num_cycles=num_cycles,
            power=power,
        )
    base_lr = optimizer.defaults["lr"]
    if name == "polynomial" and base_lr <= POLYNOMIAL_LR_END:
        raise LorakitError(f"learning_rate ({base_lr}) must be above {POLYNOMIAL_LR_END} for polynomial")
    schedule_factor(name, 0, warmup_steps, total_steps, num_cycles, power, base_lr)  # raises for an unknown name
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule_factor(name, step, warmup_steps, total_steps, num_cycles, power, base_lr)
    )
