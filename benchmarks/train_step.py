"""One LoRA training step on a full-size SD1.5 UNet (ldm, random weights) on the CPU, next to its floor; one JSON line.

The floor is the frozen UNet's own forward + backward on the same batch (gradients flow to the input, as they must
through every layer above the first trained module), so ``ratio`` is what the network's modules, their gradients
and the optimizer add. The step is the trainer's objective (MSE to the noise at one timestep) and AdamW. Floor and
LoRA steps alternate, so load from other processes on a shared machine falls on both alike.

    OMP_NUM_THREADS=1 python benchmarks/train_step.py [--size 256] [--rank 16] [--steps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: run as python benchmarks/NAME.py

from lorakit_ext.models.configs import meta_ldm_unet, sd_alphas_cumprod
from lorakit_ext.models.naming import layout_from_keys
from lorakit_ext.models.targets import unet_targets
from lorakit_ext.networks.network import NetworkSpec, create_network
from lorakit_ext.train.trainer import training_target

CONTEXT = (77, 768)  # SD1's CLIP text conditioning


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def random_unet() -> torch.nn.Module:
    unet = meta_ldm_unet("sd1").to_empty(device="cpu")
    with torch.no_grad():
        for param in unet.parameters():
            param.normal_(0, 0.02)
    return unet.eval().requires_grad_(False)


def batch(size: int, alphas: torch.Tensor):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, size // 8, size // 8, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.tensor([500])
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise, t, torch.randn(1, *CONTEXT, generator=generator), latents, noise


def timed_alternately(steps: dict, count: int) -> dict[str, list[float]]:
    """Run the steps in turn ``count`` times after a warm-up round, so a machine shared with other work slows
    every kind alike; seconds per run by name."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(count + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_index:  # round 0 warms the allocator and autograd caches
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    unet = random_unet()
    model_rss = peak_rss_mib()
    alphas = sd_alphas_cumprod()
    noisy, t, context, latents, noise = batch(args.size, alphas)
    target = training_target(latents, noise, alphas[t], "epsilon")

    targets = unet_targets(unet, "sd1", layout_from_keys(name for name, _ in unet.named_modules()))
    network = create_network(targets, NetworkSpec(dim=args.rank, alpha=args.rank, components=("unet",))).attach()
    network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)

    def floor_step():  # the network attached but disabled: its wrappers pass straight through
        network.enabled = False
        x = noisy.clone().requires_grad_(True)
        F.mse_loss(unet(x, timesteps=t, context=context), target).backward()

    def lora_step():
        network.enabled = True
        F.mse_loss(unet(noisy, timesteps=t, context=context), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = timed_alternately({"floor": floor_step, "lora": lora_step}, args.steps)
    floor, lora = statistics.median(times["floor"]), statistics.median(times["lora"])
    network.detach()
    print(
        json.dumps(
            {
                "size": args.size,
                "rank": args.rank,
                "threads": args.threads,
                "lora_modules": len(network.lora_modules),
                "lora_parameters": sum(p.numel() for p in network.parameters()),
                "floor_s": round(floor, 3),
                "lora_step_s": round(lora, 3),
                "ratio": round(lora / floor, 3),
                "floor_runs_s": [round(x, 2) for x in times["floor"]],
                "lora_runs_s": [round(x, 2) for x in times["lora"]],
                "model_rss_mib": round(model_rss),
                "peak_rss_mib": round(peak_rss_mib()),
            }
        )
    )


if __name__ == "__main__":
    main()
