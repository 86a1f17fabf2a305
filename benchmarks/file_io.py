"""Load + save of a full-size SD1.5 rank-32 LoRA through lorakit vs a raw safetensors read + write of the same bytes.

    OMP_NUM_THREADS=1 python benchmarks/file_io.py [--rank 32] [--repeats 9]

Prints one JSON line: median wall times and the ratio, plus the CPU time of each round trip (this process, all
threads), which is steadier than wall time on a busy machine. lorakit's round trip does work the raw one does not:
the NaN/Inf check of every tensor on load and on save, the sha256 model hash over every tensor byte
(``sshs_model_hash``, which the WebUI reads; it runs in a thread while the bytes are written, so on a machine with
a free core it costs little wall time) and an fsync before the atomic rename. The hash and the fsync are timed on
their own too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: run as python benchmarks/NAME.py

from lorakit_ext.formats import kohya
from lorakit_ext.networks.weights import ModuleWeights, NetworkWeights

# SD1.5 transformer blocks: (kohya name prefix, channels); 16 blocks x 12 LoRA targets = 192 UNet modules.
SD15_TRANSFORMERS = (
    [(f"down_blocks_{level}_attentions_{j}", 320 * 2**level) for level in range(3) for j in range(2)]
    + [("mid_block_attentions_0", 1280)]
    + [(f"up_blocks_{level}_attentions_{j}", (1280, 640, 320)[level - 1]) for level in range(1, 4) for j in range(3)]
)
CONTEXT_WIDTH = 768
TEXT_LAYERS, TEXT_WIDTH, TEXT_MLP = 12, 768, 3072


def sd15_target_shapes() -> dict[str, tuple[int, ...]]:
    """kohya module name -> weight shape for the 264 modules a default SD1.5 LoRA trains (192 UNet + 72 TE)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for block, c in SD15_TRANSFORMERS:
        head = f"lora_unet_{block}"
        shapes[f"{head}_proj_in"] = shapes[f"{head}_proj_out"] = (c, c, 1, 1)
        for attn in ("attn1", "attn2"):
            context = c if attn == "attn1" else CONTEXT_WIDTH
            tb = f"{head}_transformer_blocks_0_{attn}"
            shapes[f"{tb}_to_q"], shapes[f"{tb}_to_out_0"] = (c, c), (c, c)
            shapes[f"{tb}_to_k"] = shapes[f"{tb}_to_v"] = (c, context)
        shapes[f"{head}_transformer_blocks_0_ff_net_0_proj"] = (8 * c, c)
        shapes[f"{head}_transformer_blocks_0_ff_net_2"] = (c, 4 * c)
    for layer in range(TEXT_LAYERS):
        head = f"lora_te_text_model_encoder_layers_{layer}"
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{head}_self_attn_{projection}"] = (TEXT_WIDTH, TEXT_WIDTH)
        shapes[f"{head}_mlp_fc1"], shapes[f"{head}_mlp_fc2"] = (TEXT_MLP, TEXT_WIDTH), (TEXT_WIDTH, TEXT_MLP)
    return shapes


def synthetic_lora(rank: int, dtype: torch.dtype) -> NetworkWeights:
    generator = torch.Generator().manual_seed(0)
    modules = {}
    for name, (out_features, in_features, *kernel) in sd15_target_shapes().items():
        down = torch.randn(rank, in_features, *kernel, generator=generator) * 0.01
        up = torch.randn(out_features, rank, *[1] * len(kernel), generator=generator) * 0.01
        modules[name] = ModuleWeights({"lora_down.weight": down.to(dtype), "lora_up.weight": up.to(dtype)}, rank / 2)
    return NetworkWeights(modules, {"ss_sd_model_name": "v1-5-pruned-emaonly.safetensors", "ss_epoch": "10"})


def timed(function, repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time (this process, every thread) of ``function()`` over ``repeats`` runs."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        function()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        source, raw_out, ours_out = (Path(folder) / f"{name}.safetensors" for name in ("source", "raw", "ours"))
        kohya.save_network(source, synthetic_lora(args.rank, torch.float16))
        metadata = safetensors_metadata(source)

        def raw_round_trip():
            safetensors.torch.save_file(safetensors.torch.load_file(source), raw_out, metadata)

        def ours_round_trip():
            kohya.save_network(ours_out, kohya.load_network(source))

        (raw_s, raw_cpu_s), (ours_s, ours_cpu_s) = timed(raw_round_trip, args.repeats), timed(ours_round_trip, args.repeats)
        loaded = kohya.load_network(source)
        load_s, _ = timed(lambda: kohya.load_network(source), args.repeats)
        save_s, _ = timed(lambda: kohya.save_network(ours_out, loaded), args.repeats)
        data = source.read_bytes()
        sha256_s, _ = timed(lambda: hashlib.sha256(data).hexdigest(), args.repeats)
        probe = Path(folder) / "fsync_probe"
        fsync_s = timed(lambda: write_file(data, probe, sync=True), args.repeats)[0] - timed(
            lambda: write_file(data, probe, sync=False), args.repeats
        )[0]
        result = {
            "benchmark": "file_io",
            "modules": len(loaded.modules),
            "rank": args.rank,
            "file_mb": round(len(data) / 2**20, 2),
            "raw_load_save_s": round(raw_s, 4),
            "lorakit_load_save_s": round(ours_s, 4),
            "ratio": round(ours_s / raw_s, 2),
            "lorakit_load_s": round(load_s, 4),
            "lorakit_save_s": round(save_s, 4),
            "raw_cpu_s": round(raw_cpu_s, 4),
            "lorakit_cpu_s": round(ours_cpu_s, 4),
            "cpu_ratio": round(ours_cpu_s / raw_cpu_s, 2),
            "sha256_s": round(sha256_s, 4),
            "fsync_s": round(fsync_s, 4),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
        }
    print(json.dumps(result))


def safetensors_metadata(path: Path) -> dict[str, str]:
    with safetensors.safe_open(path, "pt") as file:
        return file.metadata()


def write_file(data: bytes, path: Path, sync: bool) -> None:
    with open(path, "wb") as file:
        file.write(data)
        if sync:
            file.flush()
            os.fsync(file.fileno())


if __name__ == "__main__":
    main()
