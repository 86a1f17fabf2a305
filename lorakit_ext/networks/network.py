"""A network on a host model: modules for a set of targets, attached by wrapping the hosts' forwards.

Attaching leaves the host's parameters and state-dict keys alone: each targeted host module gets an instance
attribute ``forward`` (a ``_HostForward``) and the factors live in this ``nn.Module``, never under the host.
Whole Linear/Conv2d targets add a rank-sized bypass to the host's output; targets inside a parameter that the host
reads directly (q/k/v rows of ``nn.MultiheadAttention.in_proj_weight``, ``out_proj.weight``) run the host under
``torch.func.functional_call`` with the changed weight. Networks stack (the copier method applies one under
another) and detach in any order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lorakit_ext.errors import LorakitError
from lorakit_ext.formats.kohya import check_fits_model
from lorakit_ext.models.base import Block, Target
from lorakit_ext.networks.modules import NetworkModule, module_from_weights, new_module
from lorakit_ext.networks.weights import ModuleWeights, NetworkWeights

NetworkAlgo = Literal["lora", "locon", "loha"]

# kohya's defaults: plain LoRA trains attention/transformer blocks (and the text encoder); LoCon-style networks
# add the ResNet blocks and the down/upsampling convs.
DEFAULT_BLOCKS: dict[str, tuple[Block, ...]] = {
    "lora": ("transformer", "text"),
    "locon": ("transformer", "text", "resnet", "sampler"),
    "loha": ("transformer", "text", "resnet", "sampler"),
}


@dataclass(frozen=True)
class NetworkSpec:
    """What to train: the algorithm, ranks and alphas, Tucker, dropouts, and which targets.

    Linears and 1x1 convs get ``dim``/``alpha``; kxk convs get ``conv_dim``/``conv_alpha`` and are skipped when
    ``conv_dim`` is 0 or None. ``components`` (e.g. ("unet",) when the text encoder is not trained; "te" also
    selects "te1"/"te2") and ``blocks`` default to every component and to ``DEFAULT_BLOCKS[algo]``.
    """

    algo: NetworkAlgo = "lora"
    dim: int = 4
    alpha: float = 1.0
    conv_dim: int | None = None
    conv_alpha: float = 1.0
    use_tucker: bool = False
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    components: tuple[str, ...] | None = None
    blocks: tuple[Block, ...] | None = None

    def __post_init__(self) -> None:
        if self.algo not in DEFAULT_BLOCKS:
            raise LorakitError(f"network algo {self.algo!r} is not one of {', '.join(DEFAULT_BLOCKS)}")
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise LorakitError(f"network dim must be a positive integer, got {self.dim!r}")
        if self.conv_dim is not None and (not isinstance(self.conv_dim, int) or self.conv_dim < 0):
            raise LorakitError(f"conv_dim must be a non-negative integer, got {self.conv_dim!r}")
        for option in ("dropout", "rank_dropout", "module_dropout"):
            value = getattr(self, option)
            if not 0.0 <= value < 1.0:
                raise LorakitError(f"{option} must be in [0, 1), got {value!r}")

    def rank_for(self, target: Target) -> tuple[int, float] | None:
        """(dim, alpha) this spec trains ``target`` at, or None when it leaves the target out."""
        components = self.components
        if components is not None and not (
            target.component in components or ("te" in components and target.component.startswith("te"))
        ):
            return None
        if target.block not in (self.blocks or DEFAULT_BLOCKS[self.algo]):
            return None
        if target.kernel_size == (1, 1):
            return self.dim, self.alpha
        return (self.conv_dim, self.conv_alpha) if self.conv_dim else None


class Network(nn.Module):
    """Modules by kohya name, plus the state of their attachment to the host (enabled, multiplier, fused)."""

    def __init__(self, modules: Sequence[NetworkModule]):
        super().__init__()
        if not modules:
            raise LorakitError("the network has no modules: no target matched")
        self.lora_modules = nn.ModuleDict({module.name: module for module in modules})
        self.enabled = True
        self._multiplier = 1.0
        self._wrappers: list[_HostForward] = []
        self._host_grad_flags: list[tuple[nn.Parameter, bool]] = []
        self._originals: list[tuple[Tensor, Tensor]] = []  # (host parameter, its bits before fuse)

    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        """Sets every module's multiplier (a module's own can be changed afterwards)."""
        self._multiplier = float(value)
        for module in self.lora_modules.values():
            module.multiplier = float(value)

    @property
    def attached(self) -> bool:
        return bool(self._wrappers)

    @property
    def fused(self) -> bool:
        return bool(self._originals)

    def set_dropout(self, dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0) -> None:
        """Dropouts for every module (they act only in training mode)."""
        for module in self.lora_modules.values():
            module.dropout, module.rank_dropout, module.module_dropout = dropout, rank_dropout, module_dropout

    def attach(self) -> Network:
        """Wrap the targets' host forwards and freeze the hosts' parameters; returns self."""
        if self.attached:
            raise LorakitError("the network is already attached")
        by_host: dict[int, list[NetworkModule]] = {}
        for module in self.lora_modules.values():
            by_host.setdefault(id(module.target.module), []).append(module)
        for modules in by_host.values():
            host = modules[0].target.module
            for param in host.parameters():
                self._host_grad_flags.append((param, param.requires_grad))
                param.requires_grad_(False)
            self._wrappers.append(_HostForward(host, modules, self))
        return self

    def detach(self) -> None:
        """Unfuse if fused and restore every host forward and requires_grad flag exactly as they were."""
        self.unfuse()
        for wrapper in reversed(self._wrappers):
            wrapper.remove()
        for param, requires_grad in reversed(self._host_grad_flags):
            param.requires_grad_(requires_grad)
        self._wrappers.clear()
        self._host_grad_flags.clear()

    @torch.no_grad()
    def fuse(self, accumulate_dtype: torch.dtype = torch.float32) -> None:
        """Add multiplier * ΔW into the host weights (W = (W + ΔW) in ``accumulate_dtype``, cast back).

        The originals are kept so ``unfuse`` restores them bit for bit; while fused the forwards pass through.
        Networks fused onto the same weights must be unfused in the reverse order.
        """
        if self.fused:
            raise LorakitError("the network is already fused")
        saved: dict[int, Tensor] = {}
        for module in self.lora_modules.values():
            target = module.target
            weight = target.weight
            if id(weight) not in saved:
                saved[id(weight)] = weight.detach().clone()
                self._originals.append((weight, saved[id(weight)]))
            region = weight if target.rows is None else weight[target.rows[0] : target.rows[1]]
            delta = module.delta().to(device=region.device, dtype=accumulate_dtype)
            if module.multiplier != 1.0:
                delta.mul_(module.multiplier)
            region.copy_(delta.reshape(region.shape).add_(region))  # in place: fp32 + fp16 adds in fp32

    @torch.no_grad()
    def unfuse(self) -> None:
        """Put back the host weights saved by ``fuse`` (a no-op when not fused)."""
        for weight, original in self._originals:
            weight.copy_(original)
        self._originals.clear()

    def to_weights(self, dtype: torch.dtype | None = None) -> NetworkWeights:
        """The network as a file holds it (kohya key layout, alpha per module), on the CPU, as ``dtype``."""
        modules = {}
        for name, module in self.lora_modules.items():
            tensors = {
                suffix: t.detach().to(device="cpu", dtype=dtype, copy=True)
                for suffix, t in module.weights().tensors.items()
            }
            modules[name] = ModuleWeights(tensors, module.alpha)
        return NetworkWeights(modules)


def create_network(targets: Sequence[Target], spec: NetworkSpec) -> Network:
    """A new, zero-delta network for the targets ``spec`` selects (not attached yet)."""
    algo = "loha" if spec.algo == "loha" else "lora"
    modules = []
    for target in targets:
        rank = spec.rank_for(target)
        if rank is not None:
            modules.append(new_module(target, algo, rank[0], rank[1], spec.use_tucker))
    network = Network(modules)
    network.set_dropout(spec.dropout, spec.rank_dropout, spec.module_dropout)
    return network


def network_from_weights(
    weights: NetworkWeights,
    targets: Sequence[Target],
    model_arch: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Network:
    """A network holding every module of ``weights`` (copied as ``dtype``) on the model's targets.

    A module without a target or whose delta cannot take its target's shape is an error naming the file, its
    architecture and ``model_arch`` (the model's) and how many modules do not match, as one line.
    """
    by_name = {target.name: target for target in targets}
    check_fits_model(weights, {name: target.shape for name, target in by_name.items()}, model_arch)
    try:
        modules = [module_from_weights(by_name[name], module, dtype) for name, module in weights.modules.items()]
    except LorakitError as error:
        raise LorakitError(f"{weights.label}: {error}") from None
    return Network(modules)


class _HostForward:
    """The forward a host module has while a network is attached: the previous forward plus the network's change.

    ``previous`` is the instance attribute ``forward`` this replaced (another network's wrapper, say) or None when
    the host used its class's forward. A wrapper called again while it is running (``functional_call`` re-enters
    the host) passes straight through, so each network adds its change exactly once.
    """

    def __init__(self, host: nn.Module, modules: list[NetworkModule], network: Network):
        self.host = host
        self.modules = modules
        self.network: Network | None = network
        self.previous = host.__dict__.get("forward")
        self.inner = host.forward
        self.bypass = len(modules) == 1 and modules[0].target.is_wrapped_whole
        self.running = False
        host.forward = self

    def __call__(self, *args, **kwargs):
        network = self.network
        if self.running or network is None or not network.enabled or network.fused:
            return self.inner(*args, **kwargs)
        self.running = True
        try:
            return self._forward(args, kwargs)
        finally:
            self.running = False

    def _forward(self, args: tuple, kwargs: dict):
        if self.bypass:
            output = self.inner(*args, **kwargs)
            extra = self.modules[0].extra_output(args[0] if args else next(iter(kwargs.values())))
            return output if extra is None else output + extra
        overrides: dict[str, Tensor] = {}
        for module in self.modules:
            delta = module.weight_delta()
            if delta is not None:
                target = module.target
                weight = overrides.get(target.param, target.weight)
                overrides[target.param] = _add_delta(weight, delta, target.rows)
        if not overrides:
            return self.inner(*args, **kwargs)
        return torch.func.functional_call(self.host, overrides, args, kwargs)

    def remove(self) -> None:
        """Unlink this wrapper from the host's chain of forwards; if something foreign sits above it, go inert."""
        self.network = None
        current = self.host.__dict__.get("forward")
        if current is self:
            if self.previous is None:
                del self.host.__dict__["forward"]
            else:
                self.host.forward = self.previous
            return
        while isinstance(current, _HostForward):
            if current.previous is self:
                current.previous, current.inner = self.previous, self.inner
                return
            current = current.previous


def _add_delta(weight: Tensor, delta: Tensor, rows: tuple[int, int] | None) -> Tensor:
    """``weight`` with ``delta`` added (accumulated in fp32) to all of it or to a block of its rows, differentiably."""
    if rows is None:
        return (weight.float() + delta.reshape(weight.shape)).to(weight.dtype)
    start, end = rows
    block = (weight[start:end].float() + delta.reshape(weight[start:end].shape)).to(weight.dtype)
    return torch.cat([weight[:start], block, weight[end:]])
