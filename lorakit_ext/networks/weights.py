"""A network as a file holds it: per kohya module name, the tensors under their kohya/LyCORIS suffixes and alpha.

The file format, the merge algebra and the trainable modules all exchange networks in this form. Which algorithm a
module is, its rank and its scale follow from the tensor names and shapes exactly as the WebUI's built-in Lora
decides them, so a number computed here is the number that host applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lorakit_ext.errors import LorakitError
from lorakit_ext.networks import functional

Algo = Literal["lora", "loha", "lokr"]

LORA_DOWN = "lora_down.weight"
LORA_UP = "lora_up.weight"
LORA_MID = "lora_mid.weight"
LOHA_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass
class ModuleWeights:
    """One module's tensors, keyed by suffix ("lora_down.weight", "hada_w1_a", "lokr_w1", ...), and its alpha.

    Shape facts (``is_conv``, ``kernel_size``, ``in_features``) are ``None`` where the stored layout cannot tell:
    LyCORIS stores non-Tucker LoHa factors and factored LoKr ``w2`` flattened to 2-D for convs and Linears alike.
    """

    tensors: dict[str, Tensor]
    alpha: float | None = None

    @property
    def algo(self) -> Algo:
        names = self.tensors
        if LORA_DOWN in names and LORA_UP in names:
            return "lora"
        if all(name in names for name in LOHA_FACTORS):
            return "loha"
        if _lokr_has_factor(names, "1") and _lokr_has_factor(names, "2"):
            return "lokr"
        raise LorakitError(f"not a LoRA, LoHa or LoKr module: it holds {', '.join(sorted(names)) or 'no tensors'}")

    @property
    def rank(self) -> int | None:
        """What alpha is divided by (the WebUI's ``dim``); ``None`` only for a LoKr with both factors stored full."""
        names = self.tensors
        algo = self.algo
        if algo == "lora":
            return names[LORA_DOWN].shape[0]
        if algo == "loha":
            return names["hada_w1_b"].shape[0]
        for factor in ("lokr_w2_b", "lokr_w1_b"):
            if factor in names:
                return names[factor].shape[0]
        return None

    @property
    def scale(self) -> float:
        """alpha / rank as the WebUI computes it; 1.0 when the file has no alpha or the module has no rank."""
        rank = self.rank
        if self.alpha is None or rank is None:
            return 1.0
        return self.alpha / rank

    @property
    def is_conv(self) -> bool | None:
        names = self.tensors
        algo = self.algo
        if algo == "lora":
            return names[LORA_DOWN].dim() == 4
        if algo == "loha":
            return True if "hada_t1" in names or names["hada_w1_b"].dim() == 4 else None
        if "lokr_t2" in names:
            return True
        if "lokr_w2" in names:
            return names["lokr_w2"].dim() == 4
        return None

    @property
    def kernel_size(self) -> tuple[int, int] | None:
        conv = self.is_conv
        if conv is None:
            return None
        if not conv:
            return (1, 1)
        names = self.tensors
        for spatial in (LORA_MID, LORA_DOWN, "hada_t1", "hada_w1_b", "lokr_t2", "lokr_w2"):
            if spatial in names:
                return tuple(names[spatial].shape[2:])
        raise AssertionError("is_conv is True only when a spatial tensor is present")

    @property
    def out_features(self) -> int:
        names = self.tensors
        algo = self.algo
        if algo == "lora":
            return names[LORA_UP].shape[0]
        if algo == "loha":
            return names["hada_w1_a"].shape[1 if "hada_t1" in names else 0]
        return _lokr_factor_size(names, "1", 0) * _lokr_factor_size(names, "2", 0)

    @property
    def in_features(self) -> int | None:
        names = self.tensors
        algo = self.algo
        if algo == "lora":
            return names[LORA_DOWN].shape[1]
        if self.is_conv is None:
            return None
        if algo == "loha":
            return names["hada_w1_b"].shape[1]
        return _lokr_factor_size(names, "1", 1) * _lokr_factor_size(names, "2", 1)

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The target weight's shape as far as the tensors tell it (``None`` when they don't)."""
        conv, in_features = self.is_conv, self.in_features
        if conv is None or in_features is None:
            return None
        return (self.out_features, in_features, *self.kernel_size) if conv else (self.out_features, in_features)

    def delta(self, shape: tuple[int, ...] | None = None) -> Tensor:
        """Dense fp32 ΔW including ``scale``, in ``shape`` (the target weight's) or the shape the tensors imply."""
        names = self.tensors
        algo = self.algo
        shape = tuple(shape) if shape is not None else self.shape
        if algo == "lora":
            delta = functional.lora_delta(names[LORA_DOWN], names[LORA_UP], self.scale, names.get(LORA_MID))
            return delta if shape is None else functional.reshape_delta(delta, shape, "LoRA")
        if shape is None:
            raise LorakitError(f"a {algo} module's delta needs the target weight's shape (its tensors don't tell it)")
        if algo == "loha":
            w1a, w1b, w2a, w2b = (names[name] for name in LOHA_FACTORS)
            t1, t2 = names.get("hada_t1"), names.get("hada_t2")
            return functional.loha_delta(w1a, w1b, w2a, w2b, self.scale, shape, t1, t2)
        return functional.lokr_delta(_lokr_rebuilt(names, "1"), _lokr_rebuilt(names, "2"), self.scale, shape)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ModuleWeights:
        return ModuleWeights({name: t.to(device=device, dtype=dtype) for name, t in self.tensors.items()}, self.alpha)


@dataclass
class NetworkWeights:
    """A whole network: kohya module name ("lora_unet_...", "lora_te_...", "lora_te1_...") -> its weights.

    ``source`` is the file it was read from, so an error found later (it does not fit the model) can name the file;
    None for a network built in memory (a merge, a trained network).
    """

    modules: dict[str, ModuleWeights]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str | None = None

    @property
    def label(self) -> str:
        """What error messages call this network: its file, else "the network"."""
        return self.source or "the network"

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> NetworkWeights:
        modules = {name: module.to(dtype=dtype, device=device) for name, module in self.modules.items()}
        return NetworkWeights(modules, dict(self.metadata), self.source)


def _lokr_has_factor(names: dict[str, Tensor], which: str) -> bool:
    return f"lokr_w{which}" in names or (f"lokr_w{which}_a" in names and f"lokr_w{which}_b" in names)


def _lokr_rebuilt(names: dict[str, Tensor], which: str) -> Tensor:
    prefix = f"lokr_w{which}"
    return functional.lokr_factor(
        full=names.get(prefix), a=names.get(f"{prefix}_a"), b=names.get(f"{prefix}_b"), t=names.get(f"lokr_t{which}")
    )


def _lokr_factor_size(names: dict[str, Tensor], which: str, axis: int) -> int:
    """Rows (axis 0) or columns (axis 1) of LoKr factor ``which`` without rebuilding it."""
    full = names.get(f"lokr_w{which}")
    if full is not None:
        return full.shape[axis]
    if f"lokr_t{which}" in names:  # Tucker: a (r, rows), b (r, cols)
        return names[f"lokr_w{which}_{'ab'[axis]}"].shape[1]
    return names[f"lokr_w{which}_a"].shape[0] if axis == 0 else math.prod(names[f"lokr_w{which}_b"].shape[1:])
