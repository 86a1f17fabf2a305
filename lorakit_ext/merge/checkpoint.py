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

from lorakit_ext.errors import LorakitError, first_few
from lorakit_ext.formats import safetensors_io
from lorakit_ext.formats.kohya import STALE_KEYS, all_finite, network_arch
from lorakit_ext.merge.algebra import (
    Progress,
    arch_family,
    concat,
    low_rank_terms,
    network_record,
    source_names,
)
from lorakit_ext.merge.svd import RankRule, Report, Spectrum, compressed_network
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


def target_table(
    state: Mapping[str, Tensor], path: PathLike, arch: str | None = None
) -> dict[str, tuple[str, tuple[int, int] | None, tuple]]:
    """kohya module name -> (checkpoint key, rows or None, the shape of the weight (block) it changes); ``arch`` is
    detected from ``state`` unless the caller already knows it."""
    table = naming.checkpoint_key_table(state, arch or checkpoint_arch(state, path))
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
    and so is every other floating tensor when ``save_dtype`` is given; everything else is copied unchanged. The
    checkpoint's metadata is kept but for its hashes, which described the input's bytes; ``lorakit_merged_into``
    names the input with its hash, ``lorakit_merged_loras`` each network with its ratio and hash. ``save_to`` must
    be none of the inputs (checked here too: a caller that resolved its own paths may not have).
    """
    inputs = {"--checkpoint": [checkpoint], "--models": [network.source for network in networks if network.source]}
    safetensors_io.check_save_to(save_to, inputs)
    state, stated = safetensors_io.load_file(checkpoint)
    arch = checkpoint_arch(state, checkpoint)
    table = target_table(state, checkpoint, arch)
    sources = source_names(networks, sources)
    families = [arch_family(network_arch(network)) for network in networks]
    for network, source, family in zip(networks, sources, families):
        unmatched = sorted(set(network.modules) - set(table))
        if unmatched:
            raise LorakitError(
                f"{source} ({family or 'unknown architecture'}): {len(unmatched)} of {len(network.modules)} modules "
                f"match no weight of the {arch} checkpoint {checkpoint}: {first_few(unmatched)}"
            )
    shapes = {name: shape for name, (_, _, shape) in table.items()}
    try:
        terms = low_rank_terms(networks, ratios, shapes, sources)
    except LorakitError as error:  # names match across SD1 and SD2: a shape clash is where that shows
        foreign = [f"{source} is {family}" for source, family in zip(sources, families) if family not in (None, arch)]
        if foreign:
            raise LorakitError(f"{error} ({', '.join(foreign)}; {checkpoint} is {arch})") from None
        raise
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
    # The input's hashes describe the input's bytes, not these: dropped (the WebUI hashes the new file itself).
    metadata = {key: value for key, value in stated.items() if key not in STALE_KEYS}
    metadata["lorakit_merged_into"] = json.dumps(source_record(checkpoint, stated))
    merged = [network_record(network, ratio, source) for network, ratio, source in zip(networks, ratios, sources)]
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

    Layers that did not change are left out. Where the rule needs only the leading singular values (a fixed rank,
    or a dynamic rule capped by one, well below the layer's size) they come from a randomized SVD; otherwise
    (uncapped, or ``sv_cumulative``) from an exact eigendecomposition on the smaller side (``dense_spectrum``).
    The metadata names both checkpoints with their hashes (``ss_extracted_from``).
    """
    base_state, base_stated = safetensors_io.load_file(base)
    tuned_state, tuned_stated = safetensors_io.load_file(tuned)
    table = target_table(base_state, base)
    problems = []
    for key in sorted({key for key, _, _ in table.values()}):
        if key not in tuned_state:
            problems.append(f"{key} (missing)")
        elif tuned_state[key].shape != base_state[key].shape:
            shapes = " vs ".join("x".join(map(str, state[key].shape)) for state in (base_state, tuned_state))
            problems.append(f"{key} ({shapes})")
    if problems:
        shown = first_few(problems, 4, "; ")
        raise LorakitError(
            f"{tuned}: {len(problems)} weights missing or of another shape than in {base} (different architectures?): "
            f"{shown}"
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
        spectra[name] = dense_spectrum(diff.reshape(shape[0], -1), shape, rule.singular_values_needed(shape))
    if not spectra:
        raise LorakitError(f"{tuned}: no targeted weight differs from {base}: nothing to extract")
    extracted_from = {"base": source_record(base, base_stated), "tuned": source_record(tuned, tuned_stated)}
    metadata = {"ss_extracted_from": json.dumps(extracted_from)}
    return compressed_network(spectra, rule, metadata, clamp_quantile=clamp_quantile, bytes_per_value=bytes_per_value)


def dense_spectrum(matrix: Tensor, shape: tuple[int, ...], wanted: int | None) -> Spectrum:
    """The SVD of a dense 2-D ΔW, never a full SVD: randomized (``torch.svd_lowrank``, ``wanted`` + OVERSAMPLE
    columns, POWER_ITERATIONS passes) when only ``wanted`` values are needed from a much larger layer, else exact
    from the eigendecomposition of the Gram matrix of the smaller side (fp64; min(out, in)² values, not out x in).

    Either way the kept part is an orthogonal projection of ΔW, so errors computed from the spectrum are exact.
    """
    smallest = min(matrix.shape)
    if wanted is not None and 2 * (wanted + OVERSAMPLE) < smallest:
        u, s, v = torch.svd_lowrank(matrix, q=wanted + OVERSAMPLE, niter=POWER_ITERATIONS)
        # measured, not ||ΔW||² - sum s², which cancels catastrophically when ΔW is (nearly) of rank < q
        unseen = float((matrix - u @ (u.T @ matrix)).double().pow(2).sum())
        return Spectrum(u, s.double(), v.T, shape, unseen)
    return gram_spectrum(matrix, shape)


def gram_spectrum(matrix: Tensor, shape: tuple[int, ...]) -> Spectrum:
    """Every singular value and vector of ``matrix`` from eigh of M Mᵀ or Mᵀ M, whichever is smaller (fp64, so
    the squaring loses nothing that fp32 ΔW holds); singular vectors of the other side are M v / s."""
    wide = matrix.shape[0] <= matrix.shape[1]
    m = matrix.double() if wide else matrix.double().T
    eigenvalues, vectors = torch.linalg.eigh(m @ m.T)
    eigenvalues, vectors = eigenvalues.flip(0).clamp(min=0.0), vectors.flip(1)
    s = eigenvalues.sqrt()
    other = vectors.T @ m  # = diag(s) @ (the other side's singular vectors)ᵀ
    other = other / torch.where(s > 0, s, torch.ones_like(s))[:, None]
    left, right = (vectors, other) if wide else (other.T, vectors.T)
    dtype = matrix.dtype
    return Spectrum(left.to(dtype), s, right.to(dtype), shape)


def source_record(path: PathLike, stated: Mapping[str, str]) -> dict[str, str]:
    """A checkpoint's name and hash for a derived file's metadata: the hashes its metadata ``stated`` (sshs /
    ModelSpec), else the sha256 of the whole file (the WebUI's and Civitai's checkpoint hash), read once."""
    hashes = {key: stated[key] for key in ("sshs_model_hash", "modelspec.hash_sha256") if stated.get(key)}
    return {"name": Path(path).name, **(hashes or {"sha256": safetensors_io.file_sha256(path)})}
