"""Latent caching in memory and on disk: encoded once, reused across runs, re-encoded when the file is stale."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from lorakit_ext.train.dataset import DatasetConfig, TrainDataset
from lorakit_ext.train.latent_cache import LatentCache


class PoolingEncoder:
    """A deterministic stand-in for a VAE (8x average pooling plus a mean channel) that counts what it encodes."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.encoded = 0

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encoded += len(pixels)
        pooled = F.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)


def _dataset(root: Path, flip: bool = False, resolution=(64, 64)) -> TrainDataset:
    folder = root / "data" / "2_x"
    if not folder.exists():
        folder.mkdir(parents=True)
        Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "a.png")
        Image.new("RGB", (64, 64), (30, 30, 200)).save(folder / "b.png")
    return TrainDataset(DatasetConfig(str(root / "data"), resolution=resolution, flip_aug=flip), seed=0)


def test_memory_cache_encodes_each_image_once(tmp_path):
    dataset, encoder = _dataset(tmp_path), PoolingEncoder()
    cache = LatentCache(encoder, to_disk=False)
    examples = [dataset.example(0, i) for i in range(len(dataset))]  # 4 items, 2 images
    latents = cache.latents(examples)
    assert latents.shape == (4, 4, 8, 8) and encoder.encoded == 2
    assert torch.equal(latents, PoolingEncoder().encode_images(torch.stack([e.pixels for e in examples])))
    cache.latents([dataset.example(5, i) for i in range(len(dataset))])
    assert encoder.encoded == 2
    assert not list((tmp_path / "data" / "2_x").glob("*.safetensors"))


def test_disk_cache_beside_the_image_is_reused_by_a_new_run_with_both_flip_sides(tmp_path):
    dataset = _dataset(tmp_path, flip=True)
    examples = [dataset.example(epoch, i) for epoch in range(6) for i in range(len(dataset))]
    assert {e.flipped for e in examples} == {False, True}
    first = PoolingEncoder()
    expected = LatentCache(first, to_disk=True).latents(examples)
    assert first.encoded == 4  # 2 images x 2 flip sides
    files = sorted(p.name for p in (tmp_path / "data" / "2_x").glob("*.safetensors"))
    assert files == ["a.latents.safetensors", "b.latents.safetensors"]
    second = PoolingEncoder()
    fresh = [dataset.example(epoch, i) for epoch in range(6) for i in range(len(dataset))]
    assert torch.equal(LatentCache(second, to_disk=True).latents(fresh), expected)
    assert second.encoded == 0
    assert not any("_decoded" in vars(e) for e in fresh)  # cached latents: no image was decoded


def test_stale_or_broken_disk_files_are_encoded_again(tmp_path):
    dataset = _dataset(tmp_path)
    examples = [dataset.example(0, i) for i in range(len(dataset))]
    LatentCache(PoolingEncoder(), to_disk=True).latents(examples)
    image_a = tmp_path / "data" / "2_x" / "a.png"
    Image.new("RGB", (64, 64), (0, 255, 0)).save(image_a)  # the image changed since it was cached
    os.utime(image_a, ns=(1, 1))
    (tmp_path / "data" / "2_x" / "b.latents.safetensors").write_bytes(b"garbage")
    dataset = _dataset(tmp_path)
    examples = [dataset.example(0, i) for i in range(len(dataset))]
    encoder = PoolingEncoder()
    latents = LatentCache(encoder, to_disk=True).latents(examples)
    assert encoder.encoded == 2
    green = next(i for i, e in enumerate(examples) if e.image_path.endswith("a.png"))
    assert latents[green, 1].mean() > 0.9 and latents[green, 0].mean() < -0.9  # the new, green image
    again = PoolingEncoder()
    LatentCache(again, to_disk=True).latents(examples)
    assert again.encoded == 0  # the rewritten files are valid


def test_a_different_bucket_size_is_not_served_from_disk(tmp_path):
    small = _dataset(tmp_path, resolution=(64, 64))
    LatentCache(PoolingEncoder(), to_disk=True).latents([small.example(0, 0)])
    large = _dataset(tmp_path, resolution=(128, 128))
    encoder = PoolingEncoder()
    latents = LatentCache(encoder, to_disk=True).latents([large.example(0, 0)])
    assert latents.shape == (1, 4, 16, 16) and encoder.encoded == 1
