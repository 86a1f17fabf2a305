"""Optimizers by kohya name with optimizer_args, and the learning-rate schedules' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit_ext.errors import LorakitError
from lorakit_ext.train import optim


def _params():
    return [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 0.5}]


def test_optimizer_args_are_python_literals_like_kohya():
    args = optim.parse_optimizer_args(["weight_decay=0.1", "betas=0.9,0.99", "decouple=True", "mode=fast"])
    assert args == {"weight_decay": 0.1, "betas": (0.9, 0.99), "decouple": True, "mode": "fast"}
    with pytest.raises(LorakitError, match="optimizer_args: 'weight_decay' is not key=value"):
        optim.parse_optimizer_args(["weight_decay"])


@pytest.mark.parametrize("name, cls", [("AdamW", "AdamW"), ("Lion", "Lion"), ("Prodigy", "Prodigy"), ("torch.optim.SGD", "SGD")])
def test_named_optimizers_build_with_group_lrs(name, cls):
    optimizer = optim.build_optimizer(name, _params(), 1e-3, ["weight_decay=0.01"])
    assert type(optimizer).__name__ == cls
    assert optimizer.param_groups[0]["lr"] == 0.5 and optimizer.param_groups[0]["weight_decay"] == 0.01


def test_unusable_optimizers_say_why(monkeypatch):
    with pytest.raises(LorakitError, match="optimizer_type came_pytorch.NoSuchClass needs the came_pytorch package"):
        with monkeypatch.context() as patched:  # an allowed package that is not installed (whether it is or not)
            patched.setattr(optim.importlib, "import_module", lambda name: (_ for _ in ()).throw(ImportError(name)))
            optim.optimizer_class("came_pytorch.NoSuchClass")
    with pytest.raises(LorakitError, match="optimizer_type no_such_pkg.Opt: a dotted class must come from torch, "):
        optim.optimizer_class("no_such_pkg.Opt")
    with pytest.raises(LorakitError, match="is not a torch optimizer class"):
        optim.optimizer_class("torch.nn.Linear")
    with pytest.raises(LorakitError, match="optimizer_args for AdamW"):
        optim.build_optimizer("AdamW", _params(), 1e-3, ["no_such_arg=1"])
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(LorakitError, match="AdamW8bit needs the bitsandbytes package"):
            optim.optimizer_class("AdamW8bit")


def test_schedule_formulas():
    f = optim.schedule_factor
    assert [f("constant_with_warmup", s, 4, 20) for s in (0, 2, 4, 19)] == [0.0, 0.5, 1.0, 1.0]
    assert f("linear", 12, 4, 20) == pytest.approx(0.5)
    assert f("cosine", 12, 4, 20) == pytest.approx(0.5)
    assert f("cosine", 20, 4, 20) == pytest.approx(0.0)
    # two cycles: back at the top halfway, at the bottom just before
    assert f("cosine_with_restarts", 12, 4, 20, num_cycles=2) == pytest.approx(1.0)
    assert f("cosine_with_restarts", 11, 4, 20, num_cycles=2) < 0.05
    assert f("polynomial", 12, 4, 20, power=2.0, base_lr=1.0) == pytest.approx((1 - 1e-7) * 0.25 + 1e-7)


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"])
def test_fallback_schedule_matches_diffusers(name, monkeypatch):
    total, warmup = 30, 5
    optimizer = torch.optim.SGD(_params(), lr=1e-3)
    reference = optim.build_scheduler(name, optimizer, warmup, total, num_cycles=3, power=2.0)  # diffusers
    lrs_diffusers = []
    for _ in range(total + 2):
        lrs_diffusers.append(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()
    monkeypatch.setitem(__import__("sys").modules, "diffusers.optimization", None)  # as in the WebUI
    optimizer = torch.optim.SGD(_params(), lr=1e-3)
    fallback = optim.build_scheduler(name, optimizer, warmup, total, num_cycles=3, power=2.0)
    assert "diffusers" not in type(fallback).__module__ and fallback.lr_lambdas[0].__module__ == optim.__name__
    lrs = []
    for _ in range(total + 2):
        lrs.append(fallback.get_last_lr()[0])
        optimizer.step()
        fallback.step()
    assert lrs == pytest.approx(lrs_diffusers, rel=1e-9, abs=1e-12)
    assert not any(math.isnan(v) for v in lrs)
