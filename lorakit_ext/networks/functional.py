"""The weight math of LoRA / LoCon / LoCon-Tucker, LoHa and LoKr as pure functions.

Layouts and scale conventions are those of the files kohya sd-scripts and LyCORIS write and the WebUI's built-in
Lora reads, so a delta computed here is the delta every one of those hosts applies:

- LoRA / LoCon: ``down`` (r, in) or (r, in, kh, kw), ``up`` (out, r) or (out, r, 1, 1); ΔW = up @ down * scale.
- LoCon-Tucker: ``down`` (r, in, 1, 1), ``mid`` (r, r, kh, kw), ``up`` (out, r, 1, 1).
- LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) * scale; with Tucker cores ``t1``/``t2`` (r, r, kh, kw) the factors are
  ``wa`` (r, out), ``wb`` (r, in) and each product is ``rebuild_tucker(t, wa, wb)``.
- LoKr: ΔW = kron(w1, w2) * scale, each factor full or rebuilt by ``lokr_factor``.

Every delta is computed and returned in fp32; the bypass forwards run in the input's dtype (that is what the layer
they sit beside computes in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit_ext.errors import LorakitError


@dataclass(frozen=True)
class ConvGeometry:
    """How the host Conv2d slides its kernel; the rank-sized kernel of a LoCon bypass must slide the same way."""

    stride: tuple[int, int] | int = 1
    padding: tuple[int, int] | int | str = 0
    dilation: tuple[int, int] | int = 1

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvGeometry:
        return cls(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)


def rebuild_tucker(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """(out, in, kh, kw) from a Tucker core (r, r, kh, kw) and factors ``a`` (r, out), ``b`` (r, in), in fp32.

    This is LyCORIS' ``make_weight_cp``: W[p, q] = sum_ij core[i, j] * a[i, p] * b[j, q].
    """
    return torch.einsum("ijkl,jq,ip->pqkl", core.float(), _flat(b).float(), _flat(a).float())


def lora_delta(down: Tensor, up: Tensor, scale: float, mid: Tensor | None = None) -> Tensor:
    """Dense fp32 ΔW of a LoRA/LoCon module: (out, in) for a Linear, (out, in, kh, kw) for a conv."""
    up2d = _flat(up).float()
    if up2d.shape[1] != down.shape[0]:
        raise LorakitError(f"LoRA up {tuple(up.shape)} and down {tuple(down.shape)} have different ranks")
    up2d = up2d * scale  # scaling the rank-sized factor saves a pass over the full-size delta
    if mid is not None:
        return rebuild_tucker(mid, up2d.T, down)
    delta = up2d @ _flat(down).float()
    return delta.reshape(up.shape[0], *down.shape[1:]) if down.dim() == 4 else delta


def lora_bypass_down(x: Tensor, down: Tensor, mid: Tensor | None = None, conv: ConvGeometry | None = None) -> Tensor:
    """The rank-sized activations x -> down (-> mid) of a LoRA bypass, in ``x``'s dtype.

    For a conv host the spatial kernel (``down``'s, or ``mid``'s with Tucker) slides with the host's geometry and
    the other factors are 1x1, so the bypass output lines up with the host's output pixel for pixel.
    """
    if conv is None:
        hidden = F.linear(x, _flat(down).to(x.dtype))
        return hidden if mid is None else F.linear(hidden, _flat(mid).to(x.dtype))
    down4d = _as_conv_kernel(down).to(x.dtype)
    if mid is None:
        return F.conv2d(x, down4d, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    hidden = F.conv2d(x, down4d)
    return F.conv2d(hidden, mid.to(x.dtype), stride=conv.stride, padding=conv.padding, dilation=conv.dilation)


def lora_bypass_up(hidden: Tensor, up: Tensor, scale: float, conv: bool = False) -> Tensor:
    """The output side of a LoRA bypass: rank activations -> up, times ``scale``, in ``hidden``'s dtype."""
    if conv:
        return F.conv2d(hidden, _as_conv_kernel(up).to(hidden.dtype)) * scale
    return F.linear(hidden, _flat(up).to(hidden.dtype)) * scale


def lora_bypass(
    x: Tensor, down: Tensor, up: Tensor, scale: float, mid: Tensor | None = None, conv: ConvGeometry | None = None
) -> Tensor:
    """The extra output of a LoRA module, x -> down -> (mid) -> up, without forming ΔW (cheap: rank-sized).

    Equals ``F.linear(x, lora_delta(...))`` (or ``F.conv2d`` with the host geometry) up to round-off.
    """
    return lora_bypass_up(lora_bypass_down(x, down, mid, conv), up, scale, conv=conv is not None)


def delta_forward(x: Tensor, delta: Tensor, conv: ConvGeometry | None = None) -> Tensor:
    """The extra output of a dense ΔW (LoHa, LoKr): ``F.linear``, or ``F.conv2d`` with the host's geometry."""
    delta = delta.to(x.dtype)
    if conv is None:
        return F.linear(x, delta)
    return F.conv2d(x, delta, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)


def loha_delta(
    w1a: Tensor,
    w1b: Tensor,
    w2a: Tensor,
    w2b: Tensor,
    scale: float,
    shape: tuple[int, ...],
    t1: Tensor | None = None,
    t2: Tensor | None = None,
) -> Tensor:
    """Dense fp32 ΔW of a LoHa module, reshaped to ``shape`` (the target weight's shape)."""
    first = rebuild_tucker(t1, w1a, w1b) if t1 is not None else _flat(w1a).float() @ _flat(w1b).float()
    second = rebuild_tucker(t2, w2a, w2b) if t2 is not None else _flat(w2a).float() @ _flat(w2b).float()
    if first.shape != second.shape:
        raise LorakitError(f"LoHa factors disagree: {tuple(first.shape)} vs {tuple(second.shape)}")
    return reshape_delta(first * second, shape, "LoHa") * scale


def lokr_factor(
    full: Tensor | None = None, a: Tensor | None = None, b: Tensor | None = None, t: Tensor | None = None
) -> Tensor:
    """One Kronecker factor in fp32: ``lokr_w1``/``lokr_w2`` as stored, or rebuilt from ``_a``/``_b`` (+ ``lokr_t2``).

    Factored: a (m, r) @ b (r, n); with a Tucker core t (r, r, kh, kw): a (r, m), b (r, n) as in ``rebuild_tucker``.
    """
    if full is not None:
        return full.float()
    if a is None or b is None:
        raise LorakitError("LoKr factor needs either the full matrix or both _a and _b")
    if t is not None:
        return rebuild_tucker(t, a, b)
    return _flat(a).float() @ _flat(b).float()


def lokr_delta(w1: Tensor, w2: Tensor, scale: float, shape: tuple[int, ...]) -> Tensor:
    """Dense fp32 ΔW of a LoKr module: kron(w1, w2) reshaped to ``shape``, times ``scale``."""
    w1 = w1.float()
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    # kron's decomposition views its inputs, which a Tucker-rebuilt (permuted) factor does not allow.
    return reshape_delta(torch.kron(w1.contiguous(), w2.float().contiguous()), shape, "LoKr") * scale


def _flat(t: Tensor) -> Tensor:
    """(rows, everything else): how LoRA factors multiply whatever their stored layout."""
    return t.reshape(t.shape[0], -1)


def _as_conv_kernel(t: Tensor) -> Tensor:
    """A factor as a Conv2d kernel; a 2-D (r, in) factor is a 1x1 kernel."""
    return t if t.dim() == 4 else t.reshape(*t.shape, 1, 1)


def reshape_delta(delta: Tensor, shape: tuple[int, ...], algo: str) -> Tensor:
    """``delta`` in the target weight's layout (a 1x1-conv delta fits a Linear and back, as in the WebUI).

    Output rows must agree, not only the element count, so a transposed factor is caught rather than scrambled.
    """
    if delta.shape[0] != shape[0] or delta.numel() != torch.Size(shape).numel():
        raise LorakitError(f"{algo} delta {tuple(delta.shape)} does not fit a weight of shape {tuple(shape)}")
    return delta.reshape(shape)
