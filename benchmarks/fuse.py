"""Fuse + unfuse a rank-32 LoRA on a full-size SD1.5 UNet + text encoder on the CPU; print one JSON line.

The model is the diffusers SD1.5 architecture built on ``meta`` and materialised uninitialised (weights don't
change the cost; the targeted ones get random values), so nothing is downloaded. Measures the seconds of
``fuse``/``unfuse``, the process's peak resident memory over the model's, the bytes ``fuse`` keeps to restore the
originals (a copy of each targeted weight), and that ``unfuse`` restored every targeted weight bit for bit.

    OMP_NUM_THREADS=1 python benchmarks/fuse.py [--dtype float16|float32] [--threads 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: run as python benchmarks/NAME.py

from lorakit_ext.models.configs import meta_diffusers_unet, meta_hf_text_encoders
from lorakit_ext.models.diffusers_adapter import DiffusersAdapter
from lorakit_ext.networks.network import NetworkSpec, create_network


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def materialised(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    module = module.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for param in module.parameters():
            param.zero_()
    return module


def digest(tensors) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        sha.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def unique(tensors):
    return list({id(t): t for t in tensors}.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)

    unet = materialised(meta_diffusers_unet("sd1"), dtype)
    text_encoder = materialised(meta_hf_text_encoders("sd1")["te"], dtype)
    adapter = DiffusersAdapter(unet, [text_encoder], arch="sd1")
    network = create_network(adapter.targets(), NetworkSpec(algo="lora", dim=args.rank, alpha=args.rank / 2))
    modules = list(network.lora_modules.values())
    weights = [module.target.weight for module in modules]
    with torch.no_grad():
        for weight in weights:
            weight.normal_(std=0.02)
        for module in modules:
            module.factors["lora_up__weight"].normal_(std=0.01)
    network.attach()
    before_digest = digest(weights)
    rss_model = peak_rss_mib()

    start = time.perf_counter()
    network.fuse()
    fuse_s = time.perf_counter() - start
    rss_fused = peak_rss_mib()
    fused_digest = digest(weights)
    start = time.perf_counter()
    network.unfuse()
    unfuse_s = time.perf_counter() - start

    print(json.dumps({
        "model": "sd1.5 unet + clip-l text encoder (diffusers layout)",
        "host_dtype": args.dtype,
        "threads": args.threads,
        "rank": args.rank,
        "modules_unet": sum(m.target.component == "unet" for m in modules),
        "modules_te": sum(m.target.component == "te" for m in modules),
        "targeted_params": sum(w.numel() for w in weights),
        "fuse_s": round(fuse_s, 3),
        "unfuse_s": round(unfuse_s, 3),
        "peak_rss_model_mib": round(rss_model),
        "peak_rss_after_fuse_mib": round(rss_fused),
        "fuse_extra_peak_mib": round(rss_fused - rss_model),
        "originals_kept_mib": round(sum(w.numel() * w.element_size() for w in unique(weights)) / 2**20, 1),
        "fuse_changed_weights": fused_digest != before_digest,
        "bitwise_restored": digest(weights) == before_digest,
    }))


if __name__ == "__main__":
    main()
