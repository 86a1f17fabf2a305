"""Merge benchmark: two synthetic full-size SD1.5 LoRAs (264 modules, rank 32, alpha 16, fp16), B x 1 + A x -1.

Times (wall) and peak RSS of: reading the two files and writing a file of the merged size (the I/O floor), the
exact concat merge, re-compression to ranks 8, 16 and 48, and a dense per-layer SVD of the same deltas (what kohya's
svd_merge_lora.py does); plus the relative Frobenius error of each re-compression against the exact B - A, beside the
Eckart-Young optimum. B - A has rank 64, so every target truncates (rank 64 would be exact and prove nothing). Each
phase runs in its own process so its peak RSS is its own ("imports" is the floor: the interpreter with torch and
lorakit loaded). Prints one JSON line.

    OMP_NUM_THREADS=1 python benchmarks/merge.py [--workdir /tmp/lorakit_bench_merge]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: run as python benchmarks/NAME.py

RANK, ALPHA = 32, 16.0
TARGET_RANKS = (8, 16, 48)


def sd15_lora_shapes() -> dict[str, tuple[int, ...]]:
    """kohya name -> weight shape of kohya's default LoRA targets on SD1.5 (UNet transformers + text encoder)."""
    from lorakit_ext.models import configs, naming

    unet = configs.meta_ldm_unet("sd1").state_dict()
    keys = {naming.UNET_CHECKPOINT_PREFIX + k: tuple(v.shape) for k, v in unet.items()}
    text = configs.meta_hf_text_encoders("sd1")["te"].state_dict()
    keys.update({"cond_stage_model.transformer." + k: tuple(v.shape) for k, v in text.items()})
    table = naming.checkpoint_key_table(keys, "sd1")
    prefix = naming.PREFIXES["unet"] + "_"
    return {
        name: keys[key]
        for name, (key, _) in table.items()
        if not name.startswith(prefix) or naming.unet_block(name[len(prefix) :]) == "transformer"
    }


def make_lora(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    from lorakit_ext.formats.kohya import save_network
    from lorakit_ext.networks.weights import ModuleWeights, NetworkWeights

    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, shape in shapes.items():
        out, inp, kernel = shape[0], shape[1], tuple(shape[2:])
        down = torch.randn(RANK, inp, *kernel, generator=g) / math.sqrt(inp)
        up = torch.randn(out, RANK, *((1, 1) if kernel else ()), generator=g) * 0.01
        modules[name] = ModuleWeights({"lora_down.weight": down, "lora_up.weight": up}, alpha=ALPHA)
    save_network(path, NetworkWeights(modules), dtype=torch.float16)


def phase(name: str, workdir: Path) -> dict:
    from lorakit_ext.formats import safetensors_io
    from lorakit_ext.formats.kohya import load_network, save_network
    from lorakit_ext.merge.algebra import merge_networks
    from lorakit_ext.merge.svd import RankRule, merge_compressed

    a, b = workdir / "A.safetensors", workdir / "B.safetensors"
    started = time.perf_counter()
    result: dict = {}
    if name == "imports":  # the floor every phase stands on: python, torch and lorakit imported
        pass
    elif name == "io":
        tensors = {**safetensors_io.load_tensors(b), **{f"{k}_": v for k, v in safetensors_io.load_tensors(a).items()}}
        safetensors_io.save_tensors_atomic(workdir / "io.safetensors", tensors)
    elif name == "exact":
        networks = [load_network(b), load_network(a)]
        loaded = time.perf_counter()
        merged = merge_networks(networks, [1.0, -1.0], dtype=torch.float16)
        result["compute_s"] = time.perf_counter() - loaded
        save_network(workdir / "exact.safetensors", merged, dtype=torch.float16)
    elif name.startswith("rank"):
        rank = int(name[4:])
        networks = [load_network(b), load_network(a)]
        loaded = time.perf_counter()
        merged, report = merge_compressed(networks, [1.0, -1.0], RankRule(rank=rank))
        result["compute_s"] = time.perf_counter() - loaded
        result["reported_relative_error"] = report.relative_error
        save_network(workdir / f"{name}.safetensors", merged, dtype=torch.float16)
    elif name == "dense":
        result.update(dense_phase(workdir, load_network(b), load_network(a)))
    result["wall_s"] = time.perf_counter() - started
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (Linux; reset by exec, unlike ru_maxrss, which a child inherits from the
    parent that forked it), else ru_maxrss."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dense_phase(workdir: Path, b, a) -> dict:
    """Densify each ΔB - ΔA, full SVD (timed: kohya's way), optimum errors, and the measured errors of our files."""
    from lorakit_ext.formats.kohya import load_network

    ours = {rank: load_network(workdir / f"rank{rank}.safetensors") for rank in TARGET_RANKS}
    svd_seconds = 0.0
    total = 0.0
    optimal = {rank: 0.0 for rank in TARGET_RANKS}
    measured = {rank: 0.0 for rank in TARGET_RANKS}
    for name, module in b.modules.items():
        shape = module.shape
        started = time.perf_counter()
        delta = (module.delta(shape) - a.modules[name].delta(shape)).reshape(shape[0], -1)
        torch.linalg.svd(delta, full_matrices=False)
        svd_seconds += time.perf_counter() - started
        s = torch.linalg.svdvals(delta.double())
        total += float((s**2).sum())
        for rank in TARGET_RANKS:
            optimal[rank] += float((s[rank:] ** 2).sum())
            approx = ours[rank].modules[name].delta(shape).reshape(shape[0], -1).double()
            measured[rank] += float((delta.double() - approx).pow(2).sum())
    return {
        "dense_svd_s": svd_seconds,
        **{f"optimal_relative_error_rank{r}": math.sqrt(optimal[r] / total) for r in TARGET_RANKS},
        **{f"measured_relative_error_rank{r}": math.sqrt(measured[r] / total) for r in TARGET_RANKS},
    }


def error_summary(results: dict, rank: int) -> dict:
    """Measured (fp16 file vs exact B - A), reported and optimal errors, and measured over optimal."""
    summary = {"reported": results[f"rank{rank}"]["reported_relative_error"]}
    if "dense" in results:
        optimal = results["dense"][f"optimal_relative_error_rank{rank}"]
        measured = results["dense"][f"measured_relative_error_rank{rank}"]
        summary.update({"optimal": optimal, "measured": measured, "measured_over_optimal": measured / optimal})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip_dense", action="store_true", help="leave out the (minutes-long) dense SVD phase")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.phase:
        print(json.dumps(phase(args.phase, args.workdir)))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lorakit_bench_merge_"))
    workdir.mkdir(parents=True, exist_ok=True)
    shapes = sd15_lora_shapes()
    make_lora(workdir / "A.safetensors", shapes, seed=1)
    make_lora(workdir / "B.safetensors", shapes, seed=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    phases = ("imports", "io", "exact", *(f"rank{r}" for r in TARGET_RANKS), *(() if args.skip_dense else ("dense",)))
    for name in phases:
        command = [sys.executable, __file__, "--phase", name, "--workdir", str(workdir)]
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
    dense_s = results["dense"]["dense_svd_s"] if "dense" in results else math.nan
    summary = {
        "modules": len(shapes),
        "input_mb": round(os.path.getsize(workdir / "A.safetensors") / 2**20, 1),
        "phases": results,
        "exact_vs_io": results["exact"]["wall_s"] / results["io"]["wall_s"],
        **{f"speedup_rank{r}_vs_dense_svd": dense_s / results[f"rank{r}"]["compute_s"] for r in TARGET_RANKS},
        "relative_error": {f"rank{r}": error_summary(results, r) for r in TARGET_RANKS},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
