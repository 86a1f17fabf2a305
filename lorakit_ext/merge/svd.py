"""Optimal re-compression of a low-rank term from its factors: QR of each side, SVD of the small R x R core.

With up = Qu Ru and downᵀ = Qd Rd, ΔW = Qu (scale Ru Rdᵀ) Qdᵀ, so the SVD of the R x R core gives the exact singular
values and vectors of ΔW; keeping the k largest is the Eckart-Young optimum, and its error is known exactly:
||ΔW - ΔW_k||_F² = sum of the dropped s². The cost is O((out + in) R²), never O(out * in * min(out, in)).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lorakit_ext.errors import LorakitError
from lorakit_ext.merge.algebra import Progress, concat, low_rank_terms, merged_metadata, to_module
from lorakit_ext.merge.lowrank import LowRank
from lorakit_ext.networks.weights import NetworkWeights

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative", "size")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "k": 1 << 10, "mb": 1 << 20, "m": 1 << 20, "gb": 1 << 30, "g": 1 << 30}


@dataclass(frozen=True)
class RankRule:
    """How many singular values to keep: a fixed ``rank`` (``conv_rank`` for kxk convs), or a ``dynamic`` rule
    capped by those ranks when given.

    sv_ratio:X keeps s >= s_max / X; sv_fro:X the fewest giving ||ΔW_k||_F >= X ||ΔW||_F (a fraction of the
    Frobenius norm, not of its square, as in kohya's resize_lora.py); sv_cumulative:X the
    fewest with sum(s_k) >= X sum(s); size:N (bytes, or with KB/MB/GB) spends a whole-network budget of N bytes of
    factors where it removes the most squared error per byte.
    """

    rank: int | None = None
    conv_rank: int | None = None
    dynamic: str | None = None
    value: float | None = None

    def cap(self, shape: tuple[int, ...] | None) -> int | None:
        kxk = shape is not None and len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        return (self.conv_rank or self.rank) if kxk else self.rank

    def singular_values_needed(self, shape: tuple[int, ...] | None) -> int | None:
        """How many leading singular values decide this rule for a layer of ``shape``; None: all of them
        (no cap, or ``sv_cumulative``, whose denominator is the sum of every singular value)."""
        return None if self.dynamic == "sv_cumulative" else self.cap(shape)

    def keep(self, singular_values: Tensor, shape: tuple[int, ...] | None, energy: float | None = None) -> int:
        """How many of ``singular_values`` (descending) to keep under every rule but ``size``; at least one.

        ``energy`` is ||ΔW||_F² when ``singular_values`` are only the leading ones (a randomized SVD); sv_fro
        then still compares against the whole norm, as kohya's does (sqrt of the cumulative sum of s² over the
        sqrt of the total).
        """
        s = singular_values.double()
        available = int(s.numel())
        cap = self.cap(shape) or available
        if self.dynamic is None or self.dynamic == "size" or available == 0 or s[0] <= 0:
            return max(1, min(cap, available))
        if self.dynamic == "sv_ratio":
            kept = int((s >= s[0] / self.value).sum())
        elif self.dynamic == "sv_fro":
            fraction = torch.cumsum(s**2, 0) / (energy if energy is not None else float((s**2).sum()))
            kept = int(torch.searchsorted(fraction, torch.tensor(self.value**2, dtype=s.dtype) - 1e-12)) + 1
        else:
            fraction = torch.cumsum(s, 0) / s.sum()
            kept = int(torch.searchsorted(fraction, torch.tensor(self.value, dtype=s.dtype) - 1e-12)) + 1
        return max(1, min(kept, cap, available))


def parse_dynamic(spec: str) -> tuple[str, float]:
    """``"sv_fro:0.99"`` -> ("sv_fro", 0.99); ``"size:20MB"`` -> ("size", 20971520.0)."""
    method, _, text = spec.partition(":")
    method = method.strip().lower()
    if method not in DYNAMIC_METHODS or not text:
        raise LorakitError(f"--dynamic {spec!r}: expected one of {', '.join(m + ':X' for m in DYNAMIC_METHODS)}")
    text = text.strip().lower()
    try:
        if method == "size":
            number = text.rstrip("kmgb")
            value = float(number) * _SIZE_UNITS[text[len(number) :]]
        else:
            value = float(text)
    except (KeyError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise LorakitError(f"--dynamic {spec!r}: {text!r} is not a finite number")
    fraction = method in ("sv_fro", "sv_cumulative")
    if (fraction and not 0.0 < value <= 1.0) or (not fraction and value < 1.0):
        raise LorakitError(f"--dynamic {spec!r}: {method} must be {'in (0, 1]' if fraction else 'at least 1'}")
    return method, value


@dataclass
class Spectrum:
    """The (leading part of the) SVD of ΔW = left @ diag(s) @ right + rest: left (out, K), s (K,) in fp64, right
    (K, columns); ``unseen`` = ||rest||_F², nonzero only for a partial (randomized) SVD."""

    left: Tensor
    s: Tensor
    right: Tensor
    shape: tuple[int, ...] | None
    unseen: float = 0.0

    @property
    def energy(self) -> float:
        """||ΔW||_F²."""
        return float((self.s.double() ** 2).sum()) + self.unseen


def spectrum(term: LowRank) -> Spectrum:
    """The exact SVD of ``term``'s ΔW computed from its factors (fp32 QR, the small core's SVD in fp64)."""
    qu, ru = torch.linalg.qr(term.up.float())
    qd, rd = torch.linalg.qr(term.down.float().T)
    core = (ru.double() * term.scale) @ rd.double().T
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return Spectrum(qu @ u.to(qu.dtype), s, vh.to(qd.dtype) @ qd.T, term.shape)


@dataclass
class Truncated:
    term: LowRank
    rank: int
    retained: float  # fraction of ||ΔW||_F² kept
    relative_error: float  # ||ΔW - ΔW_k||_F / ||ΔW||_F


def truncate(spec: Spectrum, rank: int, clamp_quantile: float | None = None) -> Truncated:
    """The best rank-``rank`` term (balanced: sqrt(s) on each factor), its retained energy and relative error.

    ``clamp_quantile`` clamps both factors at that quantile of their absolute values, as kohya's scripts do; the
    error is then measured against the spectrum's reconstruction (plus what a partial spectrum left out).
    """
    rank = max(1, min(rank, spec.s.numel()))
    root = spec.s[:rank].sqrt().to(spec.left.dtype)
    up, down = spec.left[:, :rank] * root, root[:, None] * spec.right[:rank]
    total = spec.energy
    if clamp_quantile is None:
        lost = float((spec.s[rank:].double() ** 2).sum()) + spec.unseen
    else:
        up, down = _clamped(up, down, clamp_quantile)
        reconstructed = (spec.left.double() * spec.s.double()) @ spec.right.double()
        lost = float((reconstructed - up.double() @ down.double()).pow(2).sum()) + spec.unseen
    lost = max(0.0, lost)
    retained = 1.0 - lost / total if total > 0 else 1.0
    error = math.sqrt(lost / total) if total > 0 else 0.0
    return Truncated(LowRank(up, down, 1.0, spec.shape), rank, retained, error)


def _clamped(up: Tensor, down: Tensor, quantile: float) -> tuple[Tensor, Tensor]:
    values = torch.cat([up.flatten(), down.flatten()]).abs().double()
    # torch.quantile refuses inputs over 16M elements; kthvalue is the same order statistic without that limit.
    index = max(1, min(values.numel(), math.ceil(quantile * values.numel())))
    limit = float(torch.kthvalue(values, index).values)
    return up.clamp(-limit, limit), down.clamp(-limit, limit)


def size_budget_ranks(
    spectra: Mapping[str, Spectrum], rule: RankRule, overhead_bytes: float, bytes_per_value: int
) -> dict[str, int]:
    """Ranks per module that fit a file of ``rule.value`` bytes (``overhead_bytes`` of it not factors) while
    dropping the least squared error: singular values taken by s² per byte, largest first; each module keeps >= 1.

    Within a module s² per byte falls as the rank grows, so taking them in that order keeps each module's prefix.
    """
    cost = {name: (spec.left.shape[0] + spec.right.shape[1]) * bytes_per_value for name, spec in spectra.items()}
    ranks = {name: 1 for name in spectra}
    budget_bytes = rule.value - overhead_bytes
    spent = sum(cost.values())
    if spent > budget_bytes:
        needed = math.ceil(spent + overhead_bytes)
        raise LorakitError(f"--dynamic size:{int(rule.value)}: too small, rank 1 everywhere takes ~{needed} bytes")
    candidates = []
    for name, spec in spectra.items():
        cap = min(rule.cap(spec.shape) or spec.s.numel(), spec.s.numel())
        s2 = (spec.s[1:cap].double() ** 2 / cost[name]).tolist()
        candidates.extend((value, name) for value in s2)
    candidates.sort(key=lambda item: -item[0])
    for _, name in candidates:
        if spent + cost[name] > budget_bytes:
            continue
        spent += cost[name]
        ranks[name] += 1
    return ranks


@dataclass
class Report:
    """Per module (rank, retained energy, relative Frobenius error) and the network's totals.

    Retained energy = 1 - ||ΔW - ΔW_k||_F² / ||ΔW||_F² (for a plain truncation, ||ΔW_k||_F² / ||ΔW||_F²); the
    retained Frobenius fraction is its square root, the quantity ``--dynamic sv_fro`` and kohya's "fro retained"
    speak of.
    """

    modules: dict[str, tuple[int, float, float]]
    retained: float
    relative_error: float

    def summary(self, per_module: bool = False) -> dict:
        """Totals and the spread of ranks (plus, when ``per_module``, each module's labelled figures)."""
        ranks = [rank for rank, _, _ in self.modules.values()]
        summary = {
            "retained_frobenius": round(math.sqrt(self.retained), 6),
            "retained_energy": round(self.retained, 6),
            "relative_error": round(self.relative_error, 6),
            "rank_min": min(ranks),
            "rank_max": max(ranks),
        }
        if per_module:
            summary["per_module"] = {
                name: {
                    "rank": rank,
                    "retained_frobenius": round(math.sqrt(kept), 6),
                    "retained_energy": round(kept, 6),
                    "relative_error": round(error, 6),
                }
                for name, (rank, kept, error) in self.modules.items()
            }
        return summary


def recompress_all(
    spectra: Mapping[str, Spectrum],
    rule: RankRule,
    *,
    clamp_quantile: float | None = None,
    size_overhead_bytes: float = 0.0,
    bytes_per_value: int = 2,
) -> tuple[dict[str, LowRank], Report]:
    """Each spectrum truncated under ``rule``; the totals are over the whole network (sum of squared errors over
    sum of squared norms)."""
    if rule.dynamic == "size":
        ranks = size_budget_ranks(spectra, rule, size_overhead_bytes, bytes_per_value)
    else:
        ranks = {name: rule.keep(spec.s, spec.shape, spec.energy) for name, spec in spectra.items()}
    terms, rows = {}, {}
    total = lost = 0.0
    for name, spec in spectra.items():
        result = truncate(spec, ranks[name], clamp_quantile)
        terms[name] = result.term
        rows[name] = (result.rank, result.retained, result.relative_error)
        total += spec.energy
        lost += spec.energy * result.relative_error**2
    retained = 1.0 - lost / total if total > 0 else 1.0
    return terms, Report(rows, retained, math.sqrt(lost / total) if total > 0 else 0.0)


# A safetensors header entry beyond its key: {"dtype":"F16","shape":[1280,64],"data_offsets":[12345678,23456789]},
HEADER_ENTRY_BYTES = 80
# What save_network adds to the metadata it is given (ss_network_*, modelspec.*, sshs_* hashes), generously.
DERIVED_METADATA_BYTES = 2048


def file_overhead_bytes(names: Iterable[str], metadata: Mapping[str, str], bytes_per_value: int) -> int:
    """Bytes of a saved LoRA besides its factors: header entries of down, up and alpha, alpha values, metadata."""
    entries = sum(3 * (len(name) + HEADER_ENTRY_BYTES) + 40 + bytes_per_value for name in names)
    return 8 + entries + len(json.dumps(metadata)) + DERIVED_METADATA_BYTES


def merge_compressed(
    networks: Sequence[NetworkWeights],
    ratios: Sequence[float],
    rule: RankRule,
    *,
    clamp_quantile: float | None = None,
    bytes_per_value: int = 2,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    sources: Sequence[str] | None = None,
    progress: Progress | None = None,
    metadata: Mapping[str, str] | None = None,
) -> tuple[NetworkWeights, Report]:
    """The weighted sum of ``networks`` re-compressed under ``rule`` (resize = one network, ratio 1).

    ``metadata`` is carried into the result (a resize keeps its source's training fields); ``bytes_per_value`` is
    the save precision's. Both count against a ``size:`` budget.
    """
    terms = low_rank_terms(networks, ratios, shapes, sources)
    spectra = {}
    for done, (name, module_terms) in enumerate(terms.items(), 1):
        spectra[name] = spectrum(concat(module_terms))
        if progress:
            progress(done, len(terms), name)
    metadata = {**(metadata or {}), **merged_metadata(networks, ratios, sources)}
    return compressed_network(spectra, rule, metadata, clamp_quantile=clamp_quantile, bytes_per_value=bytes_per_value)


def compressed_network(
    spectra: Mapping[str, Spectrum],
    rule: RankRule,
    metadata: Mapping[str, str],
    *,
    clamp_quantile: float | None = None,
    bytes_per_value: int = 2,
) -> tuple[NetworkWeights, Report]:
    """The network file ``spectra`` truncated under ``rule`` make, with ``metadata`` (counted against a ``size:``
    budget along with the header)."""
    terms, report = recompress_all(
        spectra,
        rule,
        clamp_quantile=clamp_quantile,
        size_overhead_bytes=file_overhead_bytes(spectra, metadata, bytes_per_value),
        bytes_per_value=bytes_per_value,
    )
    return NetworkWeights({name: to_module(term) for name, term in terms.items()}, dict(metadata)), report
