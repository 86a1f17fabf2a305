"""One trainable network module per target: its factors as parameters, and what it adds to the target's output.

The factors are stored under the same kohya/LyCORIS suffixes a file uses, so exporting is a rename of nothing, and
every delta goes through ``ModuleWeights.delta`` (hence ``functional``), the code the file format and merges use.

Dropouts follow kohya for LoRA (``dropout`` and ``rank_dropout`` act on the rank activations, rank dropout rescales
by 1/(1-p)) and LyCORIS for LoHa/LoKr (``rank_dropout`` zeroes rows of ΔW, ``dropout`` acts on the extra output).
Where the delta is folded into a weight (rows of ``nn.MultiheadAttention``) there are no per-sample activations,
so the masks are drawn once per call: over rank components for LoRA, over ΔW rows for LoHa/LoKr.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit_ext.errors import LorakitError
from lorakit_ext.models.base import Target
from lorakit_ext.networks import functional
from lorakit_ext.networks.functional import ConvGeometry
from lorakit_ext.networks.weights import LORA_DOWN, LORA_MID, LORA_UP, ModuleWeights

# LyCORIS initialises LoHa with these standard deviations (w2_a at zero, so ΔW starts at zero).
LOHA_INIT_STD_A = 0.1
LOHA_INIT_STD_B = 1.0
LOHA_INIT_STD_TUCKER = 0.1


class NetworkModule(nn.Module):
    """The factors for one target and the change they make to its output, scaled by ``multiplier``."""

    def __init__(self, target: Target, tensors: dict[str, Tensor], alpha: float | None):
        super().__init__()
        self.target = target  # a dataclass, not an nn.Module: the host stays unregistered here
        self.factors = nn.ParameterDict({_param_key(suffix): nn.Parameter(t) for suffix, t in tensors.items()})
        self.alpha = alpha
        self.multiplier = 1.0
        self.dropout = 0.0
        self.rank_dropout = 0.0
        self.module_dropout = 0.0
        weights = self.weights()
        self.algo = weights.algo
        _check_fits(target, weights)
        self.geometry = _conv_geometry(target)

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def scale(self) -> float:
        return self.weights().scale

    def weights(self) -> ModuleWeights:
        """The live factors (gradients flow through them) keyed by file suffix."""
        return ModuleWeights({_suffix(key): param for key, param in self.factors.items()}, self.alpha)

    def delta(self) -> Tensor:
        """ΔW in fp32 in the target's shape, scale included, multiplier and dropouts not."""
        return self.weights().delta(self.target.shape)

    def extra_output(self, x: Tensor) -> Tensor | None:
        """What the module adds to a whole Linear/Conv2d target's output for input ``x`` (None: dropped this step)."""
        if self._module_dropped():
            return None
        if self.algo != "lora":
            extra = functional.delta_forward(x, self._training_delta(), self.geometry)
            return F.dropout(extra, self.dropout, training=self.training) if self.dropout else extra
        tensors = self.weights().tensors
        hidden = functional.lora_bypass_down(x, tensors[LORA_DOWN], tensors.get(LORA_MID), self.geometry)
        scale = self.scale * self.multiplier
        if self.training and self.dropout:
            hidden = F.dropout(hidden, self.dropout)
        if self.training and self.rank_dropout:
            keep = torch.rand(hidden.shape[0], hidden.shape[self._rank_axis(hidden)], device=hidden.device)
            keep = (keep > self.rank_dropout).to(hidden.dtype)
            hidden = hidden * self._broadcast_rank_mask(keep, hidden)
            scale /= 1.0 - self.rank_dropout
        return functional.lora_bypass_up(hidden, tensors[LORA_UP], scale, conv=self.geometry is not None)

    def weight_delta(self) -> Tensor | None:
        """multiplier * ΔW (fp32) to fold into the target's weight this call (None: dropped this step)."""
        if self._module_dropped():
            return None
        delta = self._training_delta()
        if self.training and self.dropout and self.algo != "lora":
            rows = F.dropout(torch.ones(delta.shape[0], device=delta.device), self.dropout)
            delta = delta * rows.view(-1, *(1,) * (delta.dim() - 1))
        return delta

    def _training_delta(self) -> Tensor:
        """multiplier * ΔW with this call's rank masks drawn (none outside training)."""
        if not self.training:
            return self.delta() * self.multiplier
        if self.algo == "lora":
            return self._lora_delta_with_rank_mask() * self.multiplier
        delta = self.delta()
        if self.rank_dropout:
            rows = torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout
            delta = delta * rows.view(-1, *(1,) * (delta.dim() - 1))
        return delta * self.multiplier

    def _lora_delta_with_rank_mask(self) -> Tensor:
        """LoRA ΔW with rank components dropped (neuron and rank dropout drawn once for the whole call)."""
        weights = self.weights()
        if not (self.dropout or self.rank_dropout):
            return weights.delta(self.target.shape)
        up = weights.tensors[LORA_UP]
        keep = torch.ones(up.shape[1], device=up.device)
        if self.dropout:
            keep = F.dropout(keep, self.dropout)
        if self.rank_dropout:
            keep = keep * (torch.rand_like(keep) > self.rank_dropout) / (1.0 - self.rank_dropout)
        masked = dict(weights.tensors)
        masked[LORA_UP] = up * keep.view(1, -1, *(1,) * (up.dim() - 2))
        return ModuleWeights(masked, self.alpha).delta(self.target.shape)

    def _module_dropped(self) -> bool:
        return self.training and self.module_dropout > 0 and bool(torch.rand(()) < self.module_dropout)

    def _rank_axis(self, hidden: Tensor) -> int:
        return 1 if self.geometry is not None else hidden.dim() - 1

    def _broadcast_rank_mask(self, keep: Tensor, hidden: Tensor) -> Tensor:
        """(batch, rank) mask shaped to the rank activations: (B, r, 1, 1) for convs, (B, 1.., r) for Linears."""
        if self.geometry is not None:
            return keep[:, :, None, None]
        return keep.view(keep.shape[0], *(1,) * (hidden.dim() - 2), keep.shape[1])


def new_module(target: Target, algo: str, dim: int, alpha: float, use_tucker: bool = False) -> NetworkModule:
    """A freshly initialised module whose ΔW is zero: LoRA as kohya (down kaiming-uniform, up zeros), LoHa as LyCORIS.

    ``algo`` is "lora" (LoCon is LoRA on convs) or "loha"; Tucker applies to convs with a kernel larger than 1x1.
    """
    shape = target.shape
    out_features, in_features = shape[0], shape[1]
    tucker = use_tucker and target.kernel_size != (1, 1)
    if algo == "lora":
        tensors = _new_lora_factors(out_features, in_features, shape[2:], dim, tucker)
    elif algo == "loha":
        tensors = _new_loha_factors(out_features, in_features, shape[2:], dim, tucker)
    else:
        raise LorakitError(f"unknown network algorithm {algo!r} for {target.name} (use lora, locon or loha)")
    return NetworkModule(target, tensors, alpha)


def module_from_weights(target: Target, weights: ModuleWeights, dtype: torch.dtype = torch.float32) -> NetworkModule:
    """A module holding a file's tensors (copied, as ``dtype``) for ``target``; checks they fit its weight."""
    tensors = {suffix: t.detach().to(dtype=dtype, copy=True) for suffix, t in weights.tensors.items()}
    return NetworkModule(target, tensors, weights.alpha)


def _new_lora_factors(out_features: int, in_features: int, kernel: tuple[int, ...], dim: int, tucker: bool) -> dict:
    is_conv = len(kernel) == 2
    if tucker:
        down, mid = torch.empty(dim, in_features, 1, 1), torch.empty(dim, dim, *kernel)
        nn.init.kaiming_uniform_(mid, a=math.sqrt(5))
    else:
        down, mid = torch.empty(dim, in_features, *kernel), None
    nn.init.kaiming_uniform_(down, a=math.sqrt(5))
    up = torch.zeros(out_features, dim, *((1, 1) if is_conv else ()))
    tensors = {LORA_DOWN: down, LORA_UP: up}
    if mid is not None:
        tensors[LORA_MID] = mid
    return tensors


def _new_loha_factors(out_features: int, in_features: int, kernel: tuple[int, ...], dim: int, tucker: bool) -> dict:
    if tucker:
        tensors = {
            "hada_w1_a": torch.empty(dim, out_features),
            "hada_w1_b": torch.empty(dim, in_features),
            "hada_w2_a": torch.zeros(dim, out_features),
            "hada_w2_b": torch.empty(dim, in_features),
            "hada_t1": torch.empty(dim, dim, *kernel),
            "hada_t2": torch.empty(dim, dim, *kernel),
        }
        nn.init.normal_(tensors["hada_t1"], std=LOHA_INIT_STD_TUCKER)
        nn.init.normal_(tensors["hada_t2"], std=LOHA_INIT_STD_TUCKER)
    else:
        flat_in = in_features * math.prod(kernel)
        tensors = {
            "hada_w1_a": torch.empty(out_features, dim),
            "hada_w1_b": torch.empty(dim, flat_in),
            "hada_w2_a": torch.zeros(out_features, dim),
            "hada_w2_b": torch.empty(dim, flat_in),
        }
    nn.init.normal_(tensors["hada_w1_a"], std=LOHA_INIT_STD_A)
    nn.init.normal_(tensors["hada_w1_b"], std=LOHA_INIT_STD_B)
    nn.init.normal_(tensors["hada_w2_b"], std=LOHA_INIT_STD_B)
    return tensors


def _check_fits(target: Target, weights: ModuleWeights) -> None:
    """Raise, naming the module, when its tensors cannot form a delta of the target's shape (shapes only: meta)."""
    try:
        weights.to(device="meta").delta(target.shape)
    except LorakitError as error:
        raise LorakitError(f"network module {target.name}: {error}") from None
    except RuntimeError as error:  # factors whose inner sizes disagree
        message = str(error).splitlines()[0]
        raise LorakitError(f"network module {target.name}: tensors do not fit together ({message})") from None


def _conv_geometry(target: Target) -> ConvGeometry | None:
    """The host conv's geometry for a whole Conv2d target (None for Linears and folded targets)."""
    conv = target.module
    if not (target.is_wrapped_whole and isinstance(conv, nn.Conv2d)):
        return None
    if conv.groups != 1 or conv.padding_mode != "zeros":
        raise LorakitError(
            f"network module {target.name}: grouped or {conv.padding_mode}-padded convolutions are not supported"
        )
    return ConvGeometry.of(conv)


def _param_key(suffix: str) -> str:
    """ParameterDict keys cannot hold '.', which kohya suffixes ("lora_down.weight") do."""
    return suffix.replace(".", "__")


def _suffix(key: str) -> str:
    return key.replace("__", ".")
