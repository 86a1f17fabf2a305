"""Helpers for the training tests that compare runs batched differently (accumulation, data-parallel processes),
and the script each process runs under ``accelerate launch`` (``python tests/train_worker.py CONFIG.json OUT``).

``fixed_draws_loss`` makes each example's latent sample, noise and timestep a function of the example alone, so a
batch of 2, two accumulated micro-batches of 1 and two processes with a batch of 1 each see the same draws and must
give the same gradient.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import torch

SHAPES = (("triangle", "yellow"), ("circle", "blue"))


def two_image_dataset(root: Path) -> Path:
    """Two different toy images in one concept folder, one repeat each."""
    from PIL import Image

    from lorakit_ext.toy.shapes import ShapeSpec, render

    folder = root / "data" / "1_zq"
    folder.mkdir(parents=True, exist_ok=True)
    for shape, color in SHAPES:
        image, _ = render(ShapeSpec(shape=shape, color=color, background="black", extent=0.7, center=(32.0, 32.0)))
        Image.fromarray(image).save(folder / f"{shape}.png")
        (folder / f"{shape}.txt").write_text(f"zq {color} {shape}")
    return root / "data"


def fixed_draws_loss(run, batch):
    """``run.diffusion_loss`` on per-example draws (latent sample, noise, timestep seeded by the image's file name,
    so runs in different folders draw alike)."""
    from lorakit_ext.train.trainer import Batch

    latents, noises, steps = [], [], []
    for example in batch.examples:
        seed = zlib.crc32(f"{Path(example.image_path).name}:{example.flipped}".encode())
        torch.manual_seed(seed)  # the VAE samples its latent distribution from the global RNG
        with torch.no_grad():
            latent = run.adapter.encode_images(example.pixels[None].to(run.adapter.device)).float()
        generator = torch.Generator().manual_seed(seed)
        latents.append(latent)
        noises.append(torch.randn(latent.shape, generator=generator))
        steps.append(int(torch.randint(200, 900, (1,), generator=generator)))
    fixed = Batch(
        batch.examples,
        torch.cat(latents),
        batch.cond,
        torch.cat(noises).to(run.adapter.device),
        torch.tensor(steps, device=run.adapter.device),
        batch.loss_weights,
        batch.mask,
    )
    return run.diffusion_loss(fixed)


def factors(network) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": t.detach().clone() for name, module in network.lora_modules.items()
            for key, t in module.weights().tensors.items()}


def main(configs_path: str, out: str) -> None:
    """One process of data-parallel runs: for each config of the JSON list, train, then write this process's final
    factors to ``<i>-rank<N>.safetensors`` and its losses to ``<i>-rank<N>.json``."""
    from safetensors.torch import save_file

    from lorakit_ext.models.ldm import LdmAdapter
    from lorakit_ext.toy.model import load_toy_model
    from lorakit_ext.train.config import TrainConfig
    from lorakit_ext.train.trainer import TrainHooks, build_network, process_state, train

    torch.set_num_threads(1)
    state = process_state()
    adapter = LdmAdapter(load_toy_model())
    for number, values in enumerate(json.loads(Path(configs_path).read_text())):
        config = TrainConfig.from_dict(values)
        torch.manual_seed(config.seed)  # the same initial factors on every process
        network, _ = build_network(config, adapter)
        result = train(config, adapter, hooks=TrainHooks(network=network, batch_loss=fixed_draws_loss))
        name = f"{number}-rank{state.process_index}"
        save_file(factors(network), str(Path(out) / f"{name}.safetensors"))
        summary = {"processes": state.num_processes, "losses": result.losses, "steps": result.steps}
        (Path(out) / f"{name}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(*sys.argv[1:3])
