"""kohya folders, buckets, captions, masks and epoch order: facts checked against kohya sd-scripts' behaviour."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit_ext.errors import LorakitError
from lorakit_ext.train.buckets import cover_placement, no_upscale_placement, place, predefined_buckets
from lorakit_ext.train.captions import CaptionOptions, read_caption, tag_frequency, training_caption
from lorakit_ext.train.dataset import DatasetConfig, TrainDataset, scan_dataset


def _image(path: Path, size=(64, 64), color=(255, 0, 0), mode="RGB", caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return path


def _bucketed(data: Path) -> DatasetConfig:
    """Buckets for 128x128 with sides 64..128: 64x128, 128x64 and 128x128."""
    return DatasetConfig(str(data), resolution=(128, 128), enable_bucket=True, min_bucket_reso=64, max_bucket_reso=128)


# --- buckets -------------------------------------------------------------------------------------------------------


def test_predefined_buckets_match_kohyas_list_for_512():
    # kohya: areas in 64-px units (8*8 = 64), height = min(1024, 64 // (w/64) * 64) for w = 256..1024, both ways round
    widths = {256: 1024, 320: 768, 384: 640, 448: 576, 512: 512, 576: 448, 640: 384, 704: 320, 768: 320}
    widths.update({832: 256, 896: 256, 960: 256, 1024: 256})
    expected = sorted({(w, h) for w, h in widths.items()} | {(h, w) for w, h in widths.items()})
    assert predefined_buckets((512, 512), 256, 1024, 64) == expected
    assert all(w * h <= 512 * 512 for w, h in expected)


def test_an_image_goes_to_the_nearest_aspect_bucket_and_is_centre_cropped():
    buckets = predefined_buckets((512, 512), 256, 1024, 64)
    landscape = place((1000, 600), (512, 512), buckets, False, 64)  # aspect 1.667 -> 640x384 (1.667)
    assert landscape.bucket == (640, 384) and landscape.resized == (640, 384) and landscape.crop_left_top == (0, 0)
    portrait = place((300, 500), (512, 512), buckets, False, 64)  # 0.6 -> 384x640 (0.6), upscaled to cover
    assert portrait.bucket == (384, 640) and portrait.resized == (384, 640)
    wide = cover_placement((1000, 500), (640, 384))  # scaled to height 384 -> 768 wide, 64 cropped each side
    assert wide.resized == (768, 384) and wide.crop_left_top == (64, 0)


def test_without_buckets_every_image_covers_the_resolution():
    placement = place((100, 50), (64, 64), None, False, 64)
    assert placement.bucket == (64, 64) and placement.resized == (128, 64) and placement.crop_left_top == (32, 0)


def test_no_upscale_keeps_small_images_and_shrinks_large_ones_to_the_area():
    small = no_upscale_placement((300, 200), 512 * 512, 64)
    assert small.bucket == (256, 192) and small.resized == (300, 200) and small.crop_left_top == (22, 4)
    # shrunk to 724x362 (same area); rounding the width gives 704x320 (aspect 2.2), the height 640x320 (2.0): kept
    large = no_upscale_placement((2000, 1000), 512 * 512, 64)
    assert large.resized == (640, 320) and large.bucket == (640, 320)
    assert large.bucket[0] * large.bucket[1] <= 512 * 512


# --- captions ------------------------------------------------------------------------------------------------------


def test_shuffle_keeps_the_first_tokens_and_prefix_counts_as_part_of_the_first_tag():
    options = CaptionOptions(shuffle=True, keep_tokens=1, prefix="zq")
    seen = set()
    for seed in range(30):
        caption = training_caption("girl, red hair, smile, outdoors", options, random.Random(seed))
        tags = caption.split(", ")
        assert tags[0] == "zq girl" and sorted(tags[1:]) == ["outdoors", "red hair", "smile"]
        seen.add(caption)
    assert len(seen) == 6  # every order of the 3 free tags appears


def test_caption_dropout_rate_and_suffix():
    options = CaptionOptions(dropout_rate=0.25, suffix="best")
    captions = [training_caption("a cat", options, random.Random(seed)) for seed in range(2000)]
    assert set(captions) == {"", "a cat best"}
    assert captions.count("") / len(captions) == pytest.approx(0.25, abs=0.03)
    assert training_caption("a cat", CaptionOptions(), random.Random(0)) == "a cat"


def test_caption_files_and_tag_frequency(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\n\n  red, square \nsecond line\n", encoding="utf-8")
    assert read_caption(path) == "red, square" and read_caption(tmp_path / "none.txt") is None
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(LorakitError, match="bad.txt"):
        read_caption(tmp_path / "bad.txt")
    assert tag_frequency(["red, square", "blue, square, square"]) == {"red": 1, "square": 2, "blue": 1}


# --- folders -------------------------------------------------------------------------------------------------------


def test_scan_counts_concepts_repeats_captions_and_buckets(tmp_path):
    data = tmp_path / "data"
    _image(data / "3_red" / "a.png", caption="red, square")
    _image(data / "3_red" / "b.jpg", size=(128, 64), caption="red, wide")
    _image(data / "1_blue" / "c.webp", color=(0, 0, 255))  # no caption file: the folder name is the caption
    (data / "notes").mkdir()  # not N_name: ignored, as kohya does
    (data / "3_red" / "a.latents.safetensors").write_bytes(b"x")  # not an image
    config = _bucketed(data)
    summary = scan_dataset(config)
    concepts = [(c.name, c.repeats, c.images, c.captions) for c in summary.concepts]
    assert concepts == [("blue", 1, 1, 0), ("red", 3, 2, 2)]
    assert summary.images == 3 and summary.images_with_repeats == 7
    # buckets for 128x128: 64x128, 128x64, 128x128; the 64x64 images are upscaled into the square one
    assert summary.buckets == {(128, 64): 3, (128, 128): 4}
    assert summary.concepts[1].tag_frequency == {"red": 2, "square": 1, "wide": 1}
    as_dict = summary.to_dict()
    assert as_dict["buckets"] == [{"resolution": [128, 64], "count": 3}, {"resolution": [128, 128], "count": 4}]
    assert as_dict["concepts"][0]["path"] == str(data / "1_blue")
    dataset = TrainDataset(config, seed=1)
    assert len(dataset) == 7
    captions = {dataset.example(0, i).caption for i in range(len(dataset))}
    assert captions == {"red, square", "red, wide", "blue"}


def test_regularization_images_are_balanced_to_the_training_items_and_weighted(tmp_path):
    _image(tmp_path / "data" / "5_zq" / "a.png", caption="zq")
    for name in "xyz":
        _image(tmp_path / "reg" / "1_shape" / f"{name}.png", color=(0, 255, 0))
    config = DatasetConfig(
        str(tmp_path / "data"), reg_data_dir=str(tmp_path / "reg"), resolution=(64, 64), prior_loss_weight=0.5
    )
    dataset = TrainDataset(config, seed=0)
    summary = dataset.summary
    assert summary.images_with_repeats == 5 and len(dataset) == 10  # 3 reg images repeated up to 5 items
    assert [c.is_reg for c in summary.concepts] == [False, True] and summary.buckets == {(64, 64): 10}
    weights = sorted(dataset.example(0, i).loss_weight for i in range(len(dataset)))
    assert weights == [0.5] * 5 + [1.0] * 5
    assert {dataset.example(0, i).caption for i in range(10)} == {"zq", "shape"}


def test_empty_and_broken_datasets_are_refused_by_name(tmp_path):
    (tmp_path / "empty" / "5_concept").mkdir(parents=True)
    with pytest.raises(LorakitError, match="5_concept: no images"):
        scan_dataset(DatasetConfig(str(tmp_path / "empty")))
    (tmp_path / "flat").mkdir()
    _image(tmp_path / "flat" / "a.png")
    with pytest.raises(LorakitError, match="no concept folders named like 10_name"):
        scan_dataset(DatasetConfig(str(tmp_path / "flat")))
    _image(tmp_path / "data" / "2_ok" / "good.png")
    (tmp_path / "data" / "2_ok" / "broken.png").write_bytes(b"not a png")
    truncated = _image(tmp_path / "data" / "2_ok" / "cut.png", size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(LorakitError, match=r"unreadable images: .*broken\.png, .*cut\.png$"):
        scan_dataset(DatasetConfig(str(tmp_path / "data"), resolution=(64, 64)))
    with pytest.raises(LorakitError, match="train_data_dir .*missing is not a folder"):
        scan_dataset(DatasetConfig(str(tmp_path / "missing")))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"resolution": (60, 64)}, "resolution 60,64 must be multiples of 8"),
        ({"caption_extension": "txt"}, "caption_extension must start with a dot"),
        ({"caption_dropout_rate": 1.5}, "caption_dropout_rate must be between 0 and 1"),
        ({"keep_tokens": -1}, "keep_tokens must not be negative"),
        ({"enable_bucket": True, "min_bucket_reso": 100}, "min_bucket_reso must be a multiple of bucket_reso_steps"),
        ({"enable_bucket": True, "max_bucket_reso": 256}, "max_bucket_reso 256 must not be below"),
        ({"bucket_reso_steps": 12}, "bucket_reso_steps 12 must be a multiple of 8"),
    ],
)
def test_bad_options_name_the_option(tmp_path, options, message):
    with pytest.raises(LorakitError, match=message):
        DatasetConfig(str(tmp_path), **options).validate()


# --- examples and epochs -------------------------------------------------------------------------------------------


def test_examples_are_bucket_sized_pixels_in_range_with_sdxl_sizes(tmp_path):
    image = np.zeros((50, 100, 3), dtype=np.uint8)
    image[:, :50] = (255, 0, 0)  # left half red, right half black
    (tmp_path / "d" / "1_x").mkdir(parents=True)
    Image.fromarray(image).save(tmp_path / "d" / "1_x" / "a.png")
    dataset = TrainDataset(DatasetConfig(str(tmp_path / "d"), resolution=(64, 64), flip_aug=True), seed=3)
    examples = [dataset.example(epoch, 0) for epoch in range(12)]
    assert {e.flipped for e in examples} == {False, True}  # flips are drawn per (epoch, index)
    for example in examples:
        assert example.pixels.shape == (3, 64, 64) and example.pixels.dtype == torch.float32
        assert example.original_size == (50, 100) and example.target_size == (64, 64) and example.mask is None
        # resized to 128x64, 32 px cropped from the left: the crop keeps the red half's right 32 columns
        assert example.crop_top_left == (0, 32)
        red_side = example.pixels[0, 32, 48] if example.flipped else example.pixels[0, 32, 10]
        assert red_side.item() == pytest.approx(1.0, abs=0.02)
        assert example.pixels.min() >= -1.0 and example.pixels.max() <= 1.0
        assert example.key.endswith("#flipped") == example.flipped
    again = TrainDataset(DatasetConfig(str(tmp_path / "d"), resolution=(64, 64), flip_aug=True), seed=3)
    assert all(torch.equal(again.example(e, 0).pixels, examples[e].pixels) for e in range(12))


def test_epoch_batches_are_deterministic_same_bucket_and_cover_every_item(tmp_path):
    for index in range(5):
        _image(tmp_path / "d" / "2_sq" / f"s{index}.png")
        _image(tmp_path / "d" / "2_sq" / f"w{index}.png", size=(128, 64))
    config = _bucketed(tmp_path / "d")
    dataset = TrainDataset(config, seed=7)
    batches = dataset.epoch_batches(0, 3)
    assert sorted(i for batch in batches for i in batch) == list(range(20))
    assert len(batches) == 8  # 10 items per bucket -> 4 batches each (3, 3, 3, 1)
    for batch in batches:
        assert len({dataset.records[dataset.items[i]].placement.bucket for i in batch}) == 1
    assert batches == TrainDataset(config, seed=7).epoch_batches(0, 3)
    assert batches != dataset.epoch_batches(1, 3) and batches != TrainDataset(config, seed=8).epoch_batches(0, 3)
    assert len(TrainDataset(config, seed=-1).epoch_batches(0, 4)) == 6  # any int seed; 10 per bucket -> 4, 4, 2


def test_masks_come_from_the_alpha_channel_or_the_mask_folder(tmp_path):
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:, :32, 3] = 255  # left half opaque
    (tmp_path / "d" / "1_x").mkdir(parents=True)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "d" / "1_x" / "a.png")
    _image(tmp_path / "d" / "1_x" / "b.png")
    dataset = TrainDataset(DatasetConfig(str(tmp_path / "d"), resolution=(64, 64), masked_loss=True), seed=0)
    by_name = {Path(dataset.example(0, i).image_path).name: dataset.example(0, i) for i in range(2)}
    alpha = by_name["a.png"].mask
    assert alpha.shape == (1, 64, 64) and alpha[0, :, :32].min() == 1.0 and alpha[0, :, 32:].max() == 0.0
    assert by_name["b.png"].mask.min() == 1.0  # no alpha, no mask file: everything is trained
    masks = tmp_path / "masks"
    _image(masks / "b.png", mode="L", color=0)
    _image(masks / "a.png", mode="L", color=255)
    config = DatasetConfig(str(tmp_path / "d"), resolution=(64, 64), masked_loss=True, mask_dir=str(masks))
    dataset = TrainDataset(config, seed=0)
    by_name = {Path(dataset.example(0, i).image_path).name: dataset.example(0, i) for i in range(2)}
    assert by_name["a.png"].mask.min() == 1.0 and by_name["b.png"].mask.max() == 0.0
    (masks / "b.png").unlink()
    with pytest.raises(LorakitError, match="mask_dir .*: no mask for b.png"):
        scan_dataset(config)
