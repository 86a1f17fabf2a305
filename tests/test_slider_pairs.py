"""Pair inputs (two folders, suffix rule, side by side), their checks, the difference mask and the dataset folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lorakit_ext.errors import LorakitError
from lorakit_ext.slider.pairs import (
    MASK_FLOOR,
    difference_image,
    difference_mask,
    load_pairs,
    write_dataset,
)
from lorakit_ext.toy.shapes import ShapeSpec, render, with_extent

SPEC = ShapeSpec("circle", "red", "white", 0.3, (32.0, 32.0))


def _pair_images() -> tuple[np.ndarray, np.ndarray]:
    a, _ = render(SPEC)
    b, _ = render(with_extent(SPEC, 0.48))
    return a, b


def _save(path, pixels) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_two_folders_pair_by_stem_and_report_the_unmatched(tmp_path):
    a, b = _pair_images()
    _save(tmp_path / "A" / "one.png", a)
    _save(tmp_path / "B" / "one.png", b)
    _save(tmp_path / "A" / "lonely.png", a)
    _save(tmp_path / "B" / "stray.png", b)
    pair_set = load_pairs(tmp_path / "A", tmp_path / "B")
    assert [p.name for p in pair_set.pairs] == ["one.png"]
    assert np.array_equal(pair_set.pairs[0].a, a) and np.array_equal(pair_set.pairs[0].b, b)
    assert pair_set.unmatched == ["A/lonely.png", "B/stray.png"]
    sources = json.loads(pair_set.sources_json())
    assert sources[0]["name"] == "one.png" and len(sources[0]["a_sha256"]) == 64
    assert sources[0]["a_sha256"] != sources[0]["b_sha256"]


def test_size_mismatch_is_refused_by_name(tmp_path):
    a, b = _pair_images()
    _save(tmp_path / "A" / "good.png", a)
    _save(tmp_path / "B" / "good.png", b)
    _save(tmp_path / "A" / "bad.png", a)
    _save(tmp_path / "B" / "bad.png", b[:48])
    with pytest.raises(LorakitError, match=r"bad\.png \(64x64 vs 64x48\)") as error:
        load_pairs(tmp_path / "A", tmp_path / "B")
    assert "good.png" not in str(error.value) and "\n" not in str(error.value)


def test_suffix_rule_and_side_by_side(tmp_path):
    a, b = _pair_images()
    _save(tmp_path / "pairs" / "img.png", a)
    _save(tmp_path / "pairs" / "img_after.png", b)
    _save(tmp_path / "pairs" / "other.png", a)
    by_suffix = load_pairs(pairs_dir=tmp_path / "pairs")
    assert [p.name for p in by_suffix.pairs] == ["img.png"] and by_suffix.unmatched == ["other.png"]
    assert np.array_equal(by_suffix.pairs[0].b, b)

    _save(tmp_path / "sbs" / "x.png", np.concatenate([a, b], axis=1))
    side = load_pairs(side_by_side=tmp_path / "sbs")
    assert np.array_equal(side.pairs[0].a, a) and np.array_equal(side.pairs[0].b, b)

    _save(tmp_path / "odd" / "y.png", np.concatenate([a, b[:, :63]], axis=1))
    with pytest.raises(LorakitError, match=r"y\.png \(width 127\)"):
        load_pairs(side_by_side=tmp_path / "odd")


def test_bad_option_combinations_and_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorakitError, match="one way"):
        load_pairs(tmp_path, tmp_path, pairs_dir=tmp_path)
    with pytest.raises(LorakitError, match="--a and --b go together"):
        load_pairs(a_dir=tmp_path)
    with pytest.raises(LorakitError, match="no image pairs"):
        load_pairs(pairs_dir=tmp_path / "empty")
    with pytest.raises(LorakitError, match="not a folder"):
        load_pairs(tmp_path / "missing", tmp_path)


def test_difference_mask_covers_the_ring_that_changed_and_nothing_else(tmp_path):
    a, b = _pair_images()
    _save(tmp_path / "A" / "one.png", a)
    _save(tmp_path / "B" / "one.png", b)
    pair = load_pairs(tmp_path / "A", tmp_path / "B").pairs[0]
    mask = difference_mask(pair)
    _, small = render(SPEC)
    _, large = render(with_extent(SPEC, 0.48))
    ring = (large > 0.5) & (small < 0.5)
    assert mask[ring].min() == 1.0  # every pixel that turned red is in the mask
    assert mask[:4].max() == 0.0 and mask[32, 32] == 0.0  # the far background and the circle's middle are not
    assert difference_image(pair)[ring].mean() > 100


def test_written_dataset_has_one_concept_folder_no_captions_and_the_mask_as_alpha(tmp_path):
    from lorakit_ext.train.dataset import DatasetConfig, TrainDataset

    a, b = _pair_images()
    _save(tmp_path / "A" / "one.png", a)
    _save(tmp_path / "B" / "one.png", b)
    pair_set = load_pairs(tmp_path / "A", tmp_path / "B")
    root = write_dataset(pair_set, "b", tmp_path / "data", repeats=3, masked=True)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["3_/one.png"]
    written = np.asarray(Image.open(root / "3_" / "one.png"))
    assert written.shape == (64, 64, 4) and np.array_equal(written[..., :3], b)
    alpha = written[..., 3] / 255.0
    assert alpha.max() == 1.0 and alpha.min() == pytest.approx(MASK_FLOOR, abs=1 / 255)
    plain = write_dataset(pair_set, "a", tmp_path / "plain")
    assert np.array_equal(np.asarray(Image.open(plain / "1_" / "one.png")), a)

    # what training reads: the default caption, the empty one included (not a folder name such as "b")
    for folder, caption in ((root, ""), (plain, "a red circle")):
        dataset = TrainDataset(DatasetConfig(train_data_dir=str(folder), resolution=(64, 64), default_caption=caption),
                               seed=0)
        assert [dataset.example(0, index).caption for index in dataset.epoch_batches(0, 1)[0]] == [caption]
        assert dataset.summary.notes(caption) == []  # the empty caption is meant here


def test_the_toy_task_on_several_backgrounds_is_one_pair_per_background_with_the_same_circle(tmp_path):
    from lorakit_ext.slider.demo import toy_pair_set

    pair_set = toy_pair_set(tmp_path / "pairs", ("white", "gray", "black"))
    assert sorted(p.name for p in (tmp_path / "pairs" / "B").iterdir()) == [
        "circle_black.png", "circle_gray.png", "circle_white.png"]
    changed = [np.any(pair.a != pair.b, axis=-1) for pair in pair_set.pairs]
    assert len(changed) == 3 and all(np.array_equal(ring, changed[0]) for ring in changed)  # the same ring grows
    assert 0.1 < changed[0].mean() < 0.3
    assert {tuple(pair.a[0, 0]) for pair in pair_set.pairs} == {(20, 20, 20), (128, 128, 128), (245, 245, 245)}
