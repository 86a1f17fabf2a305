"""One LoRA training step on a full-size SD1.5 UNet (ldm, random weights), next to its floor; one JSON line.

The floor is the frozen UNet's own forward + backward on the same batch (gradients flow to the input, as they must
through every layer above the first trained module), so ``ratio`` is what the network's modules, their gradients
and the optimizer add. The step is the trainer's objective (MSE to the noise at one timestep) and AdamW. Floor and
LoRA steps alternate, so load from other processes on a shared machine falls on both alike.

    OMP_NUM_THREADS=1 python benchmarks/train_step.py [--size 256] [--rank 16] [--steps 3] [--threads 1]

On a GPU (``--device cuda``) the defaults become 512x512, batch 4, and ``--mixed-precision fp16|bf16`` runs as the
trainer does: the frozen UNet's weights in that dtype (on the CPU they stay fp32), the network in fp32 under
autocast (fp16 with a gradient scaler); the line adds it/s and the peak VRAM (``torch.cuda.max_memory_allocated``):

    python benchmarks/train_step.py --device cuda --mixed-precision bf16 [--size 512] [--batch 4] [--steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
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


DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def random_unet(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    unet = meta_ldm_unet("sd1").to_empty(device=device)
    with torch.no_grad():
        for param in unet.parameters():
            param.normal_(0, 0.02)
    return unet.to(dtype).eval().requires_grad_(False)


def batch(size: int, count: int, alphas: torch.Tensor, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(count, 4, size // 8, size // 8, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.full((count,), 500)
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    context = torch.randn(count, *CONTEXT, generator=generator)
    return [x.to(device) for x in (noisy, t, context, latents, noise)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_alternately(steps: dict, count: int, device: torch.device) -> dict[str, list[float]]:
    """Run the steps in turn ``count`` times after a warm-up round, so a machine shared with other work slows
    every kind alike; seconds per run by name."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(count + 1):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if round_index:  # round 0 warms the allocator and autograd caches
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--size", type=int, help="image side in pixels (default 256 on cpu, 512 on cuda)")
    parser.add_argument("--batch", type=int, help="images per step (default 1 on cpu, 4 on cuda)")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    size = args.size or (512 if gpu else 256)
    count = args.batch or (4 if gpu else 1)
    dtype = DTYPES[args.mixed_precision]
    torch.set_num_threads(args.threads)

    # half weights as the WebUI loads them on a GPU; CPU autocast needs fp32 weights (its group_norm refuses others)
    unet = random_unet(device, dtype if gpu else torch.float32)
    weight_dtype = next(unet.parameters()).dtype
    model_rss = peak_rss_mib()
    alphas = sd_alphas_cumprod()
    noisy, t, context, latents, noise = batch(size, count, alphas, device)
    target = training_target(latents, noise, alphas.to(device)[t], "epsilon")

    targets = unet_targets(unet, "sd1", layout_from_keys(name for name, _ in unet.named_modules()))
    spec = NetworkSpec(dim=args.rank, alpha=args.rank, components=("unet",))
    network = create_network(targets, spec).to(device).attach()
    network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")

    def autocast():
        if args.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def loss(x):
        with autocast():
            prediction = unet(x.to(weight_dtype), timesteps=t, context=context.to(weight_dtype))
        return F.mse_loss(prediction.float(), target)

    def floor_step():  # the network attached but disabled: its wrappers pass straight through
        network.enabled = False
        x = noisy.clone().requires_grad_(True)
        scaler.scale(loss(x)).backward()

    def lora_step():
        network.enabled = True
        scaler.scale(loss(noisy)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    times = timed_alternately({"floor": floor_step, "lora": lora_step}, args.steps, device)
    floor, lora = statistics.median(times["floor"]), statistics.median(times["lora"])
    network.detach()
    result = {
        "device": str(device),
        "mixed_precision": args.mixed_precision,
        "size": size,
        "batch": count,
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
    if gpu:
        result["it_per_s"] = round(1 / lora, 3)
        result["peak_vram_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
