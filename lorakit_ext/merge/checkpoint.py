"""Networks into single-file checkpoints and back: merge-into (W += ratio * ΔW) and extract (tuned - base -> LoRA).

Checkpoints are ldm-layout state dicts (SD1, SD2, SDXL single files); ``naming.checkpoint_key_table`` says which
key (and which block of rows, for OpenCLIP's packed q/k/v) each kohya module changes. Reading never unpickles
(``safetensors_io.load_tensors``); writing is atomic, so a failure leaves no output file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from lorakit_ext.errors import LorakitError
from lorakit_ext.formats import safetensors_io
from lorakit_ext.formats.kohya import all_finite
from lorakit_ext.merge.algebra import Progress, concat, low_rank_terms, to_module
from lorakit_ext.merge.svd import RankRule, Report, Spectrum, file_overhead_bytes, recompress_all
from lorakit_ext.models import naming
from lorakit_ext.networks.weights import NetworkWeights

PathLike = str | os.PathLike
# Prefixes that tell a single-file checkpoint's architecture (checked in this order).
_ARCH_BY_PREFIX = (
    ("conditioner.embedders.1.model.", "sdxl"),
    ("cond_stage_model.model.", "sd2"),
    ("cond_stage_model.transformer.", "sd1"),
)
# Randomized SVD oversampling and power iterations (Halko et al.: a few of each make it near-exact).
OVERSAMPLE = 10
POWER_ITERATIONS = 2


def checkpoint_arch(keys: Sequence[str] | Mapping[str, object], path: PathLike = "checkpoint") -> str:
    """sd1 / sd2 / sdxl from a single-file checkpoint's keys (v-prediction does not change the keys)."""
    for prefix, arch in _ARCH_BY_PREFIX:
        if any(key.startswith(prefix) for key in keys):
            if not any(key.startswith(naming.UNET_CHECKPOINT_PREFIX) for key in keys):
                break
            return arch
    raise LorakitError(f"{path}: not an SD1/SD2/SDXL single-file checkpoint (no ldm-layout UNet and text encoder)")


def target_table(state: Mapping[str, Tensor], path: PathLike) -> dict[str, tuple[str, tuple[int, int] | None, tuple]]:
    """kohya module name -> (checkpoint key, rows or None, the shape of the weight (block) it changes)."""
    table = naming.checkpoint_key_table(state, checkpoint_arch(state, path))
    result = {}
    for name, (key, rows) in table.items():
        shape = tuple(state[key].shape)
        if rows is not None:
            shape = (rows[1] - rows[0], *shape[1:])
        result[name] = (key, rows, shape)
    return result


def merge_into_checkpoint(
    checkpoint: PathLike,
    networks: Sequence[NetworkWeights],
    ratios: Sequence[float],
    save_to: PathLike,
    *,
    save_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    sources: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> dict:
    """Write ``checkpoint`` with W += sum ratio_i * ΔW_i to ``save_to``; return a summary.

    Sums are accumulated in fp32 on ``device``; changed weights are saved in ``save_dtype`` (default: their own),
    and so is every other floating tensor when ``save_dtype`` is given; everything else is copied unchanged.
    """
    state = safetensors_io.load_tensors(checkpoint)
    table = target_table(state, checkpoint)
    sources = list(sources or [f"input {i + 1}" for i in range(len(networks))])
    for network, source in zip(networks, sources):
        unmatched = sorted(set(network.modules) - set(table))
        if unmatched:
            raise LorakitError(
                f"{source}: {len(unmatched)} of {len(network.modules)} modules match no weight of {checkpoint} "
                f"(another architecture?): {', '.join(unmatched[:3])}{', ...' if len(unmatched) > 3 else ''}"
            )
    shapes = {name: shape for name, (_, _, shape) in table.items()}
    terms = low_rank_terms(networks, ratios, shapes, sources)
    sums: dict[str, Tensor] = {}  # checkpoint key -> fp32 weight being summed into
    for done, (name, module_terms) in enumerate(terms.items(), 1):
        key, rows, shape = table[name]
        if key not in sums:
            sums[key] = state[key].to(device=device, dtype=torch.float32)
        term = concat(module_terms)
        delta = (term.up.to(device) @ term.down.to(device)).reshape(shape)
        target = sums[key] if rows is None else sums[key][rows[0] : rows[1]]
        target += delta
        if progress:
            progress(done, len(terms), name)
    changed = len(sums)
    for key, tensor in state.items():  # replaced in place: a checkpoint is gigabytes, one copy of it is enough
        if key in sums:
            state[key] = sums.pop(key).to(device="cpu", dtype=save_dtype or tensor.dtype).contiguous()
            if not all_finite(state[key]):
                raise LorakitError(f"{save_to}: {key} would hold NaN/Inf after the merge (ratios too large?)")
        elif save_dtype is not None and tensor.is_floating_point():
            state[key] = tensor.to(save_dtype).contiguous()
    metadata = safetensors_io.read_metadata(checkpoint) if Path(checkpoint).suffix == ".safetensors" else {}
    merged = [
        {"file": source, "ratio": float(ratio), "sshs_model_hash": network.metadata.get("sshs_model_hash", "")}
        for network, ratio, source in zip(networks, ratios, sources)
    ]
    metadata["lorakit_merged_loras"] = json.dumps(merged)
    safetensors_io.save_tensors_atomic(save_to, state, metadata)
    return {"checkpoint": str(checkpoint), "save_to": str(save_to), "modules": len(terms), "weights_changed": changed}


def extract_lora(
    base: PathLike,
    tuned: PathLike,
    rule: RankRule,
    *,
    include_kxk_convs: bool = True,
    device: str | torch.device = "cpu",
    clamp_quantile: float | None = None,
    bytes_per_value: int = 2,
    progress: Progress | None = None,
) -> tuple[NetworkWeights, Report]:
    """A LoRA approximating ``tuned - base`` (the best one of its ranks, per layer), with its error report.

    Layers that did not change are left out. A fixed rank well below the layer's size uses ``torch.svd_lowrank``
    (randomized; its reported error is still exact, as the kept part is an orthogonal projection of ΔW); dynamic
    rules need the whole spectrum and use a full SVD.
    """
    base_state = safetensors_io.load_tensors(base)
    tuned_state = safetensors_io.load_tensors(tuned)
    table = target_table(base_state, base)
    problems = [
        key
        for key, _, _ in table.values()
        if key not in tuned_state or tuned_state[key].shape != base_state[key].shape
    ]
    if problems:
        raise LorakitError(
            f"{tuned}: {len(problems)} weights missing or of another shape than in {base}: {problems[0]}"
        )
    spectra: dict[str, Spectrum] = {}
    for done, (name, (key, rows, shape)) in enumerate(table.items(), 1):
        if progress:
            progress(done, len(table), name)
        kxk = len(shape) == 4 and shape[2:] != (1, 1)
        if kxk and not include_kxk_convs:
            continue
        diff = tuned_state[key].to(device=device, dtype=torch.float32) - base_state[key].to(device, torch.float32)
        if rows is not None:
            diff = diff[rows[0] : rows[1]]
        if not all_finite(diff):
            raise LorakitError(f"{tuned}: {key} holds NaN/Inf")
        if not diff.any():
            continue
        spectra[name] = dense_spectrum(diff.reshape(shape[0], -1), shape, rule.cap(shape) if not rule.dynamic else None)
    if not spectra:
        raise LorakitError(f"{tuned}: no targeted weight differs from {base}: nothing to extract")
    metadata = {"ss_extracted_from": json.dumps({"base": Path(base).name, "tuned": Path(tuned).name})}
    terms, report = recompress_all(
        spectra,
        rule,
        clamp_quantile=clamp_quantile,
        size_overhead_bytes=file_overhead_bytes(spectra, metadata, bytes_per_value),
        bytes_per_value=bytes_per_value,
    )
    modules = {name: to_module(term) for name, term in terms.items()}
    return NetworkWeights(modules, metadata), report


def dense_spectrum(matrix: Tensor, shape: tuple[int, ...], rank: int | None) -> Spectrum:
    """The SVD of a dense 2-D ΔW, randomized when only ``rank`` values are wanted from a much larger layer."""
    smallest = min(matrix.shape)
    if rank is not None and 2 * (rank + OVERSAMPLE) < smallest:
        u, s, v = torch.svd_lowrank(matrix, q=rank + OVERSAMPLE, niter=POWER_ITERATIONS)
        # measured, not ||ΔW||² - sum s², which cancels catastrophically when ΔW is (nearly) of rank < q
        unseen = float((matrix - u @ (u.T @ matrix)).double().pow(2).sum())
        return Spectrum(u, s.double(), v.T, shape, unseen)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return Spectrum(u, s.double(), vh, shape)
