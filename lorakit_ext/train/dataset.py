"""kohya-style training folders: scanning, epochs of same-bucket batches, and ready-to-train examples.

Layout (as kohya sd-scripts' DreamBooth-style datasets): ``train_data_dir/N_name/`` holds images, each optionally
with a caption file of the same stem (``caption_extension``); ``N`` is how often each image is seen per epoch. An
image without a caption file is captioned ``default_caption`` or, when that is empty, the folder's ``name`` (kohya's
class tokens). ``reg_data_dir`` has the same layout; as in kohya, regularization images are repeated or cut so that an
epoch holds as many of them as training images (with repeats), and their loss is weighted by ``prior_loss_weight``.

Everything random (order, flips, caption shuffle and dropout) is drawn from ``(seed, epoch, index)``, so a resumed run
sees exactly the data an uninterrupted one would. An example's pixels depend only on its ``key`` (image and flip):
there is no random crop, so cached latents are exact, flips included (each side is cached under its own key).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lorakit_ext.errors import LorakitError, check_option
from lorakit_ext.train.buckets import Placement, Size, place, predefined_buckets
from lorakit_ext.train.captions import CaptionOptions, read_caption, tag_frequency, training_caption

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CONCEPT_FOLDER = re.compile(r"^(\d+)_(.*)$")
# Latents are 1/8 of the image size in every Stable Diffusion VAE.
LATENT_FACTOR = 8
# EXIF orientations that swap width and height (rotations by 90 or 270 degrees).
TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})
EXIF_ORIENTATION = 0x0112
MAX_NAMED_FILES = 5


@dataclass
class DatasetConfig:
    """The dataset options, with kohya's names; ``TrainConfig.dataset_config()`` builds one."""

    train_data_dir: str
    reg_data_dir: str | None = None
    caption_extension: str = ".txt"
    resolution: tuple[int, int] = (512, 512)  # (width, height)
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_prefix: str = ""
    caption_suffix: str = ""
    flip_aug: bool = False
    masked_loss: bool = False
    mask_dir: str | None = None  # masks named like the images (white = trained); else the image's alpha channel
    prior_loss_weight: float = 1.0
    default_caption: str = ""  # used when an image has no caption file

    def validate(self) -> None:
        """Raise ``LorakitError`` naming the first bad option."""
        check_option(bool(self.train_data_dir), "train_data_dir", "is not set")
        check_option(Path(self.train_data_dir).is_dir(), "train_data_dir", f"{self.train_data_dir} is not a folder")
        if self.reg_data_dir:
            check_option(Path(self.reg_data_dir).is_dir(), "reg_data_dir", f"{self.reg_data_dir} is not a folder")
        if self.mask_dir:
            check_option(Path(self.mask_dir).is_dir(), "mask_dir", f"{self.mask_dir} is not a folder")
        check_option(self.caption_extension.startswith("."), "caption_extension", "must start with a dot, like .txt")
        width, height = self.resolution
        check_option(width > 0 and height > 0, "resolution", f"{width},{height} must be positive")
        check_option(
            width % LATENT_FACTOR == 0 and height % LATENT_FACTOR == 0,
            "resolution",
            f"{width},{height} must be multiples of {LATENT_FACTOR}",
        )
        steps = self.bucket_reso_steps
        check_option(steps > 0 and steps % LATENT_FACTOR == 0, "bucket_reso_steps", f"{steps} must be a multiple of 8")
        if self.enable_bucket and not self.bucket_no_upscale:
            check_option(self.min_bucket_reso > 0, "min_bucket_reso", "must be positive")
            for option in ("min_bucket_reso", "max_bucket_reso"):
                check_option(
                    getattr(self, option) % steps == 0, option, f"must be a multiple of bucket_reso_steps ({steps})"
                )
            check_option(
                self.min_bucket_reso <= min(width, height),
                "min_bucket_reso",
                f"{self.min_bucket_reso} must not exceed the resolution's shorter side ({min(width, height)})",
            )
            check_option(
                self.max_bucket_reso >= max(width, height),
                "max_bucket_reso",
                f"{self.max_bucket_reso} must not be below the resolution's longer side ({max(width, height)})",
            )
        check_option(self.keep_tokens >= 0, "keep_tokens", "must not be negative")
        check_option(0.0 <= self.caption_dropout_rate <= 1.0, "caption_dropout_rate", "must be between 0 and 1")
        check_option(self.prior_loss_weight >= 0.0, "prior_loss_weight", "must not be negative")


@dataclass(frozen=True)
class ConceptSummary:
    name: str
    path: str
    repeats: int
    images: int
    captions: int  # images that have a caption file
    is_reg: bool
    unmasked: int = 0  # with masked_loss: images with neither a mask file nor an alpha channel (trained everywhere)
    tag_frequency: dict[str, int] = field(default_factory=dict, compare=False)  # kohya's ss_tag_frequency entry


@dataclass(frozen=True)
class DatasetSummary:
    """What a dataset holds, for ``--dry-run``, the WebUI preview, the API and the ``ss_*`` metadata.

    ``images`` counts training images and ``images_with_repeats`` them times their repeats (kohya's
    ``ss_num_train_images``); ``buckets`` counts every item of an epoch, balanced regularization items included.
    """

    concepts: list[ConceptSummary]
    images: int
    images_with_repeats: int
    buckets: dict[Size, int]  # (w, h) -> items per epoch

    def notes(self, default_caption: str | None) -> list[str]:
        """What the dataset holds that is allowed but probably not meant: images without a caption file, which then
        train on their folder's name (kohya's class token), as no ``default_caption`` is set; with ``masked_loss``,
        images without a mask, which train on every pixel."""
        notes = []
        for concept in self.concepts:
            if concept.captions < concept.images and not default_caption and concept.name:
                notes.append(f"{concept.images - concept.captions} of {concept.images} images in {concept.path} have"
                             f" no caption file: they train on the folder's name {concept.name!r}")
            if concept.unmasked:
                notes.append(f"masked_loss: {concept.unmasked} of {concept.images} images in {concept.path} have no"
                             " mask (no mask_dir file, no alpha channel): they train on every pixel")
        return notes

    def to_dict(self) -> dict:
        return {
            "concepts": [asdict(concept) for concept in self.concepts],
            "images": self.images,
            "images_with_repeats": self.images_with_repeats,
            "buckets": [{"resolution": list(size), "count": count} for size, count in self.buckets.items()],
        }


@dataclass
class Example:
    """One training image, ready for the model. ``pixels`` and ``mask`` are decoded from the image file on first
    access, so an example whose latents are cached never reads its image (unless it needs its mask)."""

    caption: str  # after prefix/suffix/shuffle/dropout
    loss_weight: float  # 1.0, or prior_loss_weight for regularization images
    original_size: tuple[int, int]  # (h, w), SDXL micro-conditioning
    crop_top_left: tuple[int, int]  # (top, left)
    target_size: tuple[int, int]  # (h, w)
    key: str  # stable id of the image and its flip, for latent caches
    image_path: str
    flipped: bool
    masked: bool  # masked_loss: ``mask`` is a tensor, else None
    decode: Callable[[], tuple[torch.Tensor, torch.Tensor | None]] = field(repr=False, compare=False)

    @cached_property
    def _decoded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.decode()

    @property
    def pixels(self) -> torch.Tensor:
        """(3, H, W) float32 in [-1, 1], H, W = bucket size."""
        return self._decoded[0]

    @property
    def mask(self) -> torch.Tensor | None:
        """(1, H, W) in [0, 1] with ``masked_loss``, else None."""
        return self._decoded[1] if self.masked else None


@dataclass(frozen=True)
class ImageRecord:
    """One image file as scanned: where it goes and how it is captioned."""

    path: Path
    caption: str
    size: Size  # (w, h) after EXIF orientation
    placement: Placement
    is_reg: bool
    mask_path: Path | None


def scan_dataset(config: DatasetConfig) -> DatasetSummary:
    """Validate and summarise a dataset without decoding pixels; refuses empty folders and unreadable images."""
    return _scan(config)[0]


class TrainDataset:
    """The items of every epoch: each training image ``repeats`` times, plus the balanced regularization items."""

    def __init__(self, config: DatasetConfig, seed: int) -> None:
        self.config, self.seed = config, seed
        self.summary, self.records, self.items = _scan(config)
        self.captions = CaptionOptions(
            shuffle=config.shuffle_caption,
            keep_tokens=config.keep_tokens,
            dropout_rate=config.caption_dropout_rate,
            prefix=config.caption_prefix,
            suffix=config.caption_suffix,
        )

    def __len__(self) -> int:
        return len(self.items)

    def epoch_batches(self, epoch: int, batch_size: int) -> list[list[int]]:
        """Same-bucket batches of item indices in a shuffled order that depends only on ``(seed, epoch)``."""
        if batch_size < 1:
            raise LorakitError(f"train_batch_size {batch_size} must be at least 1")
        rng = random.Random(f"{self.seed}:{epoch}")
        by_bucket: dict[Size, list[int]] = {}
        for index, record_index in enumerate(self.items):
            by_bucket.setdefault(self.records[record_index].placement.bucket, []).append(index)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            batches += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        rng.shuffle(batches)
        return batches

    def example(self, epoch: int, index: int) -> Example:
        """Item ``index`` of ``epoch``, with flip and caption drawn from ``(seed, epoch, index)``."""
        record = self.records[self.items[index]]
        rng = random.Random(f"{self.seed}:{epoch}:{index}")
        flipped = self.config.flip_aug and rng.random() < 0.5
        caption = training_caption(record.caption, self.captions, rng)
        placement = record.placement
        left, top = placement.crop_left_top
        if flipped:
            left = placement.resized[0] - left - placement.bucket[0]
        width, height = record.size
        bucket_width, bucket_height = placement.bucket
        return Example(
            caption=caption,
            loss_weight=self.config.prior_loss_weight if record.is_reg else 1.0,
            original_size=(height, width),
            crop_top_left=(top, left),
            target_size=(bucket_height, bucket_width),
            key=f"{record.path}" + ("#flipped" if flipped else ""),
            image_path=str(record.path),
            flipped=flipped,
            masked=self.config.masked_loss,
            decode=partial(_decode, record, flipped, self.config.masked_loss),
        )


# --- scanning ----------------------------------------------------------------------------------------------------


def _scan(config: DatasetConfig) -> tuple[DatasetSummary, list[ImageRecord], list[int]]:
    """The summary, every image record, and the epoch's items (record indices, repeats and reg balance applied)."""
    config.validate()
    resolution = (int(config.resolution[0]), int(config.resolution[1]))
    buckets = None
    if config.enable_bucket and not config.bucket_no_upscale:
        steps = config.bucket_reso_steps
        buckets = predefined_buckets(resolution, config.min_bucket_reso, config.max_bucket_reso, steps)
    no_upscale = config.enable_bucket and config.bucket_no_upscale

    def placement(size: Size) -> Placement:
        return place(size, resolution, buckets, no_upscale, config.bucket_reso_steps)

    train = _scan_root(Path(config.train_data_dir), "train_data_dir", config, False, placement)
    reg = _scan_root(Path(config.reg_data_dir), "reg_data_dir", config, True, placement) if config.reg_data_dir else []
    records: list[ImageRecord] = []
    items: list[int] = []
    concepts = []
    for concept, concept_records in train:
        items += [len(records) + i for i in range(len(concept_records)) for _ in range(concept.repeats)]
        records += concept_records
        concepts.append(concept)
    train_items = len(items)
    reg_records = [(concept.repeats, record) for concept, concept_records in reg for record in concept_records]
    reg_repeats = _balanced_reg_repeats([repeats for repeats, _ in reg_records], train_items)
    for repeats, (_, record) in zip(reg_repeats, reg_records):
        items += [len(records)] * repeats
        records.append(record)
    concepts += [concept for concept, _ in reg]
    counts: dict[Size, int] = {}
    for record_index in items:
        bucket = records[record_index].placement.bucket
        counts[bucket] = counts.get(bucket, 0) + 1
    summary = DatasetSummary(
        concepts=concepts,
        images=sum(c.images for c in concepts if not c.is_reg),
        images_with_repeats=train_items,
        buckets=dict(sorted(counts.items())),
    )
    return summary, records, items


def _balanced_reg_repeats(repeats: list[int], train_items: int) -> list[int]:
    """kohya's balance: reg images are taken with their repeats in order until they match the training items, then
    (when still short) one more repeat each in turn; images past that point get 0."""
    counts = [0] * len(repeats)
    total = 0
    for index, count in enumerate(repeats):
        if total >= train_items:
            return counts
        counts[index] = count
        total += count
    while repeats and total < train_items:
        for index in range(len(repeats)):
            counts[index] += 1
            total += 1
            if total >= train_items:
                break
    return counts


def _scan_root(
    root: Path, option: str, config: DatasetConfig, is_reg: bool, placement: Callable[[Size], Placement]
) -> list[tuple[ConceptSummary, list[ImageRecord]]]:
    """Every ``N_name`` folder under ``root`` with its image records; empty folders and broken images refused."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and CONCEPT_FOLDER.match(p.name))
    if not folders:
        raise LorakitError(f"{option} {root}: no concept folders named like 10_name (N repeats, then the name)")
    concepts, broken = [], []
    for folder in folders:
        repeats_text, name = CONCEPT_FOLDER.match(folder.name).groups()
        repeats = int(repeats_text)
        if repeats < 1:
            raise LorakitError(f"{option} {folder}: the repeat count must be at least 1")
        images = sorted(
            p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not images:
            raise LorakitError(f"{option} {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        records, captioned, unmasked = [], [], 0
        for path in images:
            size, has_alpha = _image_size(path)
            if size is None:
                broken.append(path)
                continue
            caption = read_caption(path.with_suffix(config.caption_extension))
            if caption is not None:
                captioned.append(caption)
            else:
                caption = config.default_caption or name
            mask_path = _mask_path(path, config.mask_dir) if config.masked_loss else None
            if config.masked_loss and mask_path is None and not has_alpha:
                unmasked += 1
            records.append(ImageRecord(path, caption, size, placement(size), is_reg, mask_path))
        for record in records:
            if min(record.placement.bucket) < LATENT_FACTOR:
                width, height = record.size
                raise LorakitError(f"{record.path}: {width}x{height} is too small for bucket_reso_steps")
        summary = ConceptSummary(
            name, str(folder), repeats, len(images), len(captioned), is_reg, unmasked, tag_frequency(captioned)
        )
        concepts.append((summary, records))
    if broken:
        named = ", ".join(str(p) for p in broken[:MAX_NAMED_FILES])
        more = f" and {len(broken) - MAX_NAMED_FILES} more" if len(broken) > MAX_NAMED_FILES else ""
        raise LorakitError(f"{option}: unreadable images: {named}{more}")
    return concepts


def _image_size(path: Path) -> tuple[Size | None, bool]:
    """(w, h) as the image is displayed (EXIF orientation applied), None when the file is not a readable image; and
    whether it has an alpha channel (``masked_loss``'s mask when no mask file is given)."""
    try:
        with Image.open(path) as image:
            image.verify()  # checks the file's structure; the image cannot be used after it
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(EXIF_ORIENTATION)
            has_alpha = _has_alpha(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None, False
    return ((height, width) if orientation in TRANSPOSED_ORIENTATIONS else (width, height)), has_alpha


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info)


def _mask_path(image_path: Path, mask_dir: str | None) -> Path | None:
    if not mask_dir:
        return None
    matches = sorted(p for p in Path(mask_dir).glob(f"{image_path.stem}.*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not matches:
        raise LorakitError(f"mask_dir {mask_dir}: no mask for {image_path.name}")
    return matches[0]


# --- loading -----------------------------------------------------------------------------------------------------


def _load(record: ImageRecord, masked_loss: bool) -> tuple[Image.Image, Image.Image | None]:
    """The RGB image and, with ``masked_loss``, its mask (mask file, else alpha channel, else all ones)."""
    try:
        with Image.open(record.path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise LorakitError(f"{record.path}: unreadable image ({error})") from None
    has_alpha = _has_alpha(image)
    rgba = image.convert("RGBA")
    if not masked_loss:
        return rgba.convert("RGB"), None
    if record.mask_path is not None:
        with Image.open(record.mask_path) as mask_file:
            mask = ImageOps.exif_transpose(mask_file).convert("L")
        if mask.size != rgba.size:
            sizes = f"mask is {mask.size[0]}x{mask.size[1]}, image is {rgba.size[0]}x{rgba.size[1]}"
            raise LorakitError(f"{record.mask_path}: {sizes}")
    elif has_alpha:
        mask = rgba.getchannel("A")
    else:
        mask = Image.new("L", rgba.size, 255)
    return rgba.convert("RGB"), mask


def _decode(record: ImageRecord, flipped: bool, masked_loss: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An example's pixels in [-1, 1] and (with ``masked_loss``) its mask, resized, cropped and flipped."""
    image, mask = _load(record, masked_loss)
    pixels = _to_tensor(_fit(image, record.placement, flipped, Image.Resampling.LANCZOS)) * 2.0 - 1.0
    if mask is None:
        return pixels, None
    return pixels, _to_tensor(_fit(mask, record.placement, flipped, Image.Resampling.BILINEAR))


def _fit(image: Image.Image, placement: Placement, flipped: bool, resample) -> Image.Image:
    """Resize, centre-crop to the bucket, and mirror when flipped."""
    if image.size != placement.resized:
        image = image.resize(placement.resized, resample)
    left, top = placement.crop_left_top
    image = image.crop((left, top, left + placement.bucket[0], top + placement.bucket[1]))
    return ImageOps.mirror(image) if flipped else image


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """(C, H, W) float32 in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy())
