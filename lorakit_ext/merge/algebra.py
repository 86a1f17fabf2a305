"""Exact merge of any number of networks with any ratios: concatenation along the rank axis.

sum_i ratio_i * ΔW_i = [c_1 U_1 | c_2 U_2 | ...] @ [V_1; V_2; ...] with c_i = ratio_i * scale_i, so one LoRA of rank
sum(R_i) holds the weighted sum exactly. Each c_i is split as sign * sqrt|c_i| on the up and sqrt|c_i| on the down
factor, which keeps both factors in fp16/bf16 range; alpha = merged rank makes every loader's scale 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence

import torch

from lorakit_ext.errors import LorakitError, first_few
from lorakit_ext.formats.kohya import all_finite, network_arch
from lorakit_ext.merge.lowrank import LowRank, guess_shape, low_rank
from lorakit_ext.networks.weights import LORA_DOWN, LORA_UP, ModuleWeights, NetworkWeights

# progress(done, total, module name): the WebUI's progress bar and the CLI both listen.
Progress = Callable[[int, int, str], None]


def low_rank_terms(
    networks: Sequence[NetworkWeights],
    ratios: Sequence[float],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    sources: Sequence[str] | None = None,
) -> dict[str, list[LowRank]]:
    """Per module name (in order of first appearance), each input's term with its ratio folded into ``scale``.

    Checked across inputs: all are for one architecture (``check_architectures``); every module's delta must have
    the same rows and columns in every input that has it (else one error listing the modules). A module's shape
    comes from ``shapes`` (a checkpoint's), else from any input that tells it, else from its name (``guess_shape``).
    """
    if len(networks) != len(ratios):
        raise LorakitError(f"--ratios: {len(ratios)} ratios for {len(networks)} networks")
    check_finite_ratios(ratios)
    if not networks:
        raise LorakitError("--models: nothing to merge")
    sources = source_names(networks, sources)
    check_architectures(networks, sources)
    terms: dict[str, list[LowRank]] = {}
    for network, ratio, source in zip(networks, ratios, sources):
        for name, module in network.modules.items():
            bad = next((suffix for suffix, t in module.tensors.items() if not all_finite(t)), None)
            if bad:
                raise LorakitError(f"{source}: module {name} has NaN/Inf values in {bad}")
            try:
                term = low_rank(module, (shapes or {}).get(name))
            except LorakitError as error:
                raise LorakitError(f"{source}: module {name}: {error}") from None
            term.scale *= float(ratio)
            terms.setdefault(name, []).append(term)
    mismatched = [
        f"{name} ({' vs '.join(f'{r}x{c}' for r, c in sorted({t.rows_and_columns for t in ts}))})"
        for name, ts in terms.items()
        if len({t.rows_and_columns for t in ts}) > 1
    ]
    if mismatched:
        shown = first_few(mismatched, 4, "; ")
        raise LorakitError(
            f"{len(mismatched)} modules differ in shape between the inputs (different architectures?): {shown}"
        )
    for name, ts in terms.items():
        shape = next((t.shape for t in ts if t.shape is not None), None) or guess_shape(name, *ts[0].rows_and_columns)
        for term in ts:
            term.shape = shape
    return terms


def check_finite_ratios(ratios: Sequence[float]) -> None:
    """Refuse NaN/Inf ratios up front: they would surface only when the result is checked, blamed on the output."""
    bad = next((ratio for ratio in ratios if not math.isfinite(ratio)), None)
    if bad is not None:
        raise LorakitError(f"--ratios: {bad} is not a finite number")


def arch_family(arch: str | None) -> str | None:
    """sd1 / sd2 / sdxl: v-prediction (sd2-v) changes no weight's shape or name, so it merges with sd2."""
    return "sd2" if arch == "sd2-v" else arch


def check_architectures(networks: Sequence[NetworkWeights], sources: Sequence[str]) -> None:
    """Refuse inputs made for different architectures (SD1 and SDXL names hardly overlap, so without this check
    their merge would be a mixed file, not a shape error). Inputs whose architecture can't be told pass."""
    archs = [arch_family(network_arch(network)) for network in networks]
    if len({arch for arch in archs if arch is not None}) > 1:
        listed = ", ".join(f"{source} is {arch or 'of unknown architecture'}" for source, arch in zip(sources, archs))
        raise LorakitError(f"--models: the inputs are for different architectures: {listed}")


def concat(terms: Sequence[LowRank], dtype: torch.dtype = torch.float32) -> LowRank:
    """One exact term for a sum of terms, the scales split evenly over both factors (scale of the result: 1).

    Each scaled factor is written straight into its slice of the result, with no temporary per input.
    """
    rows, columns = terms[0].rows_and_columns
    device = terms[0].up.device
    up = torch.empty(rows, sum(t.rank for t in terms), dtype=dtype, device=device)
    down = torch.empty(up.shape[1], columns, dtype=dtype, device=device)
    start = 0
    for term in terms:
        root = math.sqrt(abs(term.scale))
        end = start + term.rank
        # copy (an exact widening cast) then scale in place: mul(fp16, out=fp32) would round in fp16
        up[:, start:end].copy_(term.up).mul_(math.copysign(root, term.scale))
        down[start:end].copy_(term.down).mul_(root)
        start = end
    return LowRank(up, down, 1.0, terms[0].shape)


def to_module(term: LowRank) -> ModuleWeights:
    """A kohya LoRA / LoCon module holding ``term``: conv down (R, in, kh, kw), up (out, R, 1, 1); alpha set so that
    alpha / rank = the term's scale."""
    up, down, rank, shape = term.up, term.down, term.rank, term.shape
    if shape is not None and len(shape) == 4:
        down = down.reshape(rank, *shape[1:])
        up = up.reshape(*up.shape, 1, 1)
    return ModuleWeights({LORA_DOWN: down.contiguous(), LORA_UP: up.contiguous()}, alpha=float(rank) * term.scale)


def merge_networks(
    networks: Sequence[NetworkWeights],
    ratios: Sequence[float],
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    sources: Sequence[str] | None = None,
    progress: Progress | None = None,
    dtype: torch.dtype = torch.float32,
) -> NetworkWeights:
    """The exact weighted sum of ``networks`` as one LoRA (ΔW = sum ratio_i * ΔW_i to fp32 round-off).

    ``dtype`` is the factors' (pass the save precision to skip a cast pass on save: each factor is rounded once
    either way, since the scaling is computed in fp32 before it is stored).
    """
    terms = low_rank_terms(networks, ratios, shapes, sources)
    modules = {}
    for done, (name, module_terms) in enumerate(terms.items(), 1):
        modules[name] = to_module(concat(module_terms, dtype))
        if progress:
            progress(done, len(terms), name)
    return NetworkWeights(modules, merged_metadata(networks, ratios, sources))


def source_names(networks: Sequence[NetworkWeights], sources: Sequence[str] | None) -> list[str]:
    """The names messages and metadata give the inputs: ``sources`` where given, else "input 1", "input 2", ..."""
    return list(sources) if sources else [f"input {i + 1}" for i in range(len(networks))]


def merged_metadata(
    networks: Sequence[NetworkWeights], ratios: Sequence[float], sources: Sequence[str] | None
) -> dict[str, str]:
    """What a merged file records of its sources: names, ratios and model hashes (``ss_merged_from``), plus the
    fields every source agrees on that describe the base model (``ss_sd_model_name``, ``ss_v2``, ...)."""
    sources = source_names(networks, sources)
    merged_from = [network_record(n, ratio, source) for n, ratio, source in zip(networks, ratios, sources)]
    shared = {}
    for key in ("ss_sd_model_name", "ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.resolution"):
        values = {n.metadata.get(key) for n in networks}
        if len(values) == 1 and None not in values:
            shared[key] = values.pop()
    return {**shared, "ss_merged_from": json.dumps(merged_from)}


def network_record(network: NetworkWeights, ratio: float, source: str) -> dict[str, object]:
    """How a merged file names one input: its output name, file, ratio and ``sshs_model_hash`` (the hash the
    WebUI shows for a Lora; "" when the input's metadata lacks it and it was not computed on loading)."""
    return {
        "name": network.metadata.get("ss_output_name", source),
        "file": source,
        "ratio": float(ratio),
        "sshs_model_hash": network.metadata.get("sshs_model_hash", ""),
    }
