"""Latent caching: each image is encoded by the VAE once, then read from memory (and optionally from disk).

Examples are cached under their ``key`` (image and flip, see ``dataset.Example``) and their bucket size. On disk the
latents live in a safetensors file beside the image (``photo.png`` -> ``photo.latents.safetensors``, like kohya's
``photo.npz``). A file is used only when it was made from the same image file (size and modification time) at the
same bucket size; otherwise, or when it cannot be read, the image is encoded again and the file rewritten
(atomically).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit_ext.errors import LorakitError
from lorakit_ext.formats.safetensors_io import load_tensors, read_metadata, save_tensors_atomic
from lorakit_ext.models.base import ModelAdapter
from lorakit_ext.train.dataset import LATENT_FACTOR

DISK_SUFFIX = ".latents.safetensors"


class LatentCache:
    """Latents for dataset examples, encoded on first use."""

    def __init__(self, adapter: ModelAdapter, to_disk: bool) -> None:
        self.adapter, self.to_disk = adapter, to_disk
        self.memory: dict[tuple[str, tuple[int, int]], torch.Tensor] = {}

    def latents(self, examples: list) -> torch.Tensor:
        """(B, C, H/8, W/8) float32 on the CPU, one row per example, in order."""
        keys = [(e.key, tuple(e.target_size)) for e in examples]
        missing = {key: e for e, key in zip(examples, keys) if key not in self.memory and not self._load_from_disk(e)}
        by_size: dict[tuple[int, int], list] = {}
        for (_, size), example in missing.items():
            by_size.setdefault(size, []).append(example)
        for group in by_size.values():
            pixels = torch.stack([e.pixels for e in group]).to(self.adapter.device)
            with torch.no_grad():
                encoded = self.adapter.encode_images(pixels).float().cpu()
            for example, latent in zip(group, encoded):
                self.memory[(example.key, tuple(example.target_size))] = latent
                if self.to_disk:
                    self._save_to_disk(example, latent)
        return torch.stack([self.memory[key] for key in keys])

    def disk_path(self, example) -> Path:
        """Where an example's latents are kept on disk: beside its image, as kohya keeps them."""
        image = Path(example.image_path)
        return image.with_name(image.stem + DISK_SUFFIX)

    def _load_from_disk(self, example) -> bool:
        """Fill the memory cache from a valid disk file; False when there is none for this image and size."""
        if not self.to_disk:
            return False
        path = self.disk_path(example)
        if not path.is_file():
            return False
        try:
            if read_metadata(path) != _fingerprint(example):
                return False
            tensor = load_tensors(path).get(_tensor_name(example))
        except LorakitError:
            return False
        height, width = example.target_size
        expected = (height // LATENT_FACTOR, width // LATENT_FACTOR)
        if tensor is None or tensor.dim() != 3 or tuple(tensor.shape[1:]) != expected:
            return False
        self.memory[(example.key, tuple(example.target_size))] = tensor.float()
        return True

    def _save_to_disk(self, example, latent: torch.Tensor) -> None:
        """Add this example's latents to its file (the other flip side is kept when the file is still valid)."""
        path = self.disk_path(example)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = _fingerprint(example)
        tensors = {}
        if path.is_file():
            try:
                if read_metadata(path) == metadata:
                    tensors = load_tensors(path)
            except LorakitError:
                tensors = {}
        tensors[_tensor_name(example)] = latent.contiguous()
        save_tensors_atomic(path, tensors, metadata)


def _tensor_name(example) -> str:
    return "latents_flipped" if example.flipped else "latents"


def _fingerprint(example) -> dict[str, str]:
    """What a disk file must have been made from: the image file as it is now and the bucket size."""
    stat = Path(example.image_path).stat()
    height, width = example.target_size
    return {
        "image": Path(example.image_path).name,
        "image_bytes": str(stat.st_size),
        "image_mtime_ns": str(stat.st_mtime_ns),
        "bucket": f"{width}x{height}",
    }
