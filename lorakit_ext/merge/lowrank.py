"""Every network module as exact low-rank factors ΔW = scale * up @ down, without ever forming ΔW.

``up`` is (out, R) and ``down`` is (R, in*kh*kw) (fp32; a plain LoRA's as stored), the columns in the order of a
flattened conv kernel, so
LoRA, LoCon, LoCon-Tucker, LoHa and LoKr all meet in one form that concatenates (exact merge) and re-compresses
(factor SVD) at the cost of their rank, not of the layer:

- LoRA / LoCon: the factors themselves; a Tucker ``lora_mid`` is folded into ``down``.
- LoHa: (A1 B1) ⊙ (A2 B2) = (A1 ⊙row A2) (B1 ⊙col B2), the row-wise Khatri-Rao product, rank r1*r2.
- LoKr: kron(U1 V1, U2 V2) = kron(U1, U2) kron(V1, V2), rank r1*r2 (a factor stored full is its own U with V = I,
  or the other way round, whichever is smaller).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from lorakit_ext.errors import LorakitError
from lorakit_ext.models import naming
from lorakit_ext.networks.weights import LOHA_FACTORS, LORA_DOWN, LORA_MID, LORA_UP, ModuleWeights

# The kxk convs of SD-style UNets (ResBlock convs, Down/Upsample convs) are all 3x3.
SD_CONV_KERNEL = (3, 3)
_RESNET_KXK = re.compile(r"(conv[12]|in_layers_2|out_layers_3)$")


@dataclass
class LowRank:
    """ΔW = scale * up @ down, reshaped to ``shape`` (the target weight's; ``None`` where nothing tells it)."""

    up: Tensor
    down: Tensor
    scale: float
    shape: tuple[int, ...] | None

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    @property
    def rows_and_columns(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    def dense(self) -> Tensor:
        """The dense fp32 ΔW (for tests, checkpoints and small layers; the merge never needs it)."""
        delta = (self.up.float() * self.scale) @ self.down.float()
        return delta if self.shape is None else delta.reshape(self.shape)


def low_rank(module: ModuleWeights, shape: tuple[int, ...] | None = None) -> LowRank:
    """The exact low-rank form of one module (scale = the module's alpha / rank, not folded into the factors)."""
    algo = module.algo
    shape = tuple(shape) if shape is not None else module.shape
    # A plain LoRA keeps its stored dtype (the merge casts while it copies); products are formed in fp32.
    t = {suffix: tensor if algo == "lora" and LORA_MID not in module.tensors else tensor.float()
         for suffix, tensor in module.tensors.items()}
    if algo == "lora":
        up, down = _flat(t[LORA_UP]), t[LORA_DOWN]
        if LORA_MID in t:
            down = torch.einsum("ijkl,jq->iqkl", t[LORA_MID], _flat(down))
        factors = (up, _flat(down))
    elif algo == "loha":
        w1a, w1b, w2a, w2b = (t[name] for name in LOHA_FACTORS)
        up1, down1 = _product_factors(w1a, w1b, t.get("hada_t1"))
        up2, down2 = _product_factors(w2a, w2b, t.get("hada_t2"))
        factors = (khatri_rao_rows(up1, up2), khatri_rao_rows(down1.T, down2.T).T)
    else:
        up1, down1 = _kron_factor(t, "1")
        up2, down2 = _kron_factor(t, "2")
        factors = (torch.kron(up1, up2), torch.kron(down1, down2))
    result = LowRank(factors[0], factors[1], module.scale, shape)
    rows, columns = result.rows_and_columns
    if shape is not None and (shape[0] != rows or torch.Size(shape).numel() != rows * columns):
        raise LorakitError(f"{algo} module makes a {rows} x {columns} delta, which does not fit a weight {shape}")
    return result


def khatri_rao_rows(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Khatri-Rao product: (n, p) and (n, q) -> (n, p*q), row i = kron(a[i], b[i])."""
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)


def guess_shape(name: str, rows: int, columns: int) -> tuple[int, ...]:
    """The target weight's shape of a module stored flat (LyCORIS LoHa / LoKr on a conv), from its kohya name.

    The kxk convs of SD-style UNets are all 3x3 (ResBlock convs, samplers); everything else is a Linear or 1x1.
    """
    prefix = naming.PREFIXES["unet"] + "_"
    path = name[len(prefix) :] if name.startswith(prefix) else ""
    block = naming.unet_block(path) if path else None
    kernel_area = SD_CONV_KERNEL[0] * SD_CONV_KERNEL[1]
    if (block == "sampler" or (block == "resnet" and _RESNET_KXK.search(path))) and columns % kernel_area == 0:
        return (rows, columns // kernel_area, *SD_CONV_KERNEL)
    return (rows, columns)


def _product_factors(a: Tensor, b: Tensor, core: Tensor | None) -> tuple[Tensor, Tensor]:
    """(U, V) with U @ V = a @ b, or with a Tucker core = ``functional.rebuild_tucker(core, a, b)`` flattened."""
    if core is None:
        return _flat(a), _flat(b)
    return a.T.contiguous(), _flat(torch.einsum("ijkl,jq->iqkl", core, _flat(b))).contiguous()


def _kron_factor(t: dict[str, Tensor], which: str) -> tuple[Tensor, Tensor]:
    full = t.get(f"lokr_w{which}")
    if full is None:
        return _product_factors(t[f"lokr_w{which}_a"], t[f"lokr_w{which}_b"], t.get(f"lokr_t{which}"))
    full = _flat(full)
    rows, columns = full.shape
    if rows <= columns:
        return torch.eye(rows, dtype=full.dtype, device=full.device), full
    return full, torch.eye(columns, dtype=full.dtype, device=full.device)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)
