"""The procedural shapes: reproducible, captions that match the pixels, masks of the right area, and the pixel
measurements the quality gates rely on."""

from __future__ import annotations

import numpy as np
import pytest

from lorakit_ext.toy import shapes


def test_same_seed_same_dataset_other_seed_other_dataset():
    first, again, other = shapes.dataset(12, seed=7), shapes.dataset(12, seed=7), shapes.dataset(12, seed=8)
    assert all(np.array_equal(a.image, b.image) and a.caption == b.caption for a, b in zip(first, again))
    assert not all(np.array_equal(a.image, b.image) for a, b in zip(first, other))
    assert first[0].image.shape == (64, 64, 3) and first[0].image.dtype == np.uint8
    assert first[0].mask.shape == (64, 64) and first[0].mask.dtype == np.float32


def test_captions_name_what_is_drawn():
    samples = shapes.dataset(300, seed=1)
    for s in samples:
        words = s.caption.split()
        assert s.spec.color in words and s.spec.shape in words
        assert not any(size in words for size in shapes.SIZES if size != s.spec.size)
        assert "background" not in words or s.spec.background in words
        assert shapes.BACKGROUNDS[s.spec.background] != shapes.COLORS[s.spec.color]
    captions = {s.caption for s in samples}
    assert "a red circle" in captions or any(c.count(" ") == 2 for c in captions)  # short prompts occur
    assert any("background" in c for c in captions) and any("large" in c for c in captions)


@pytest.mark.parametrize("shape, area_of_box", [("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5)])
def test_mask_covers_the_shapes_area(shape, area_of_box):
    spec = shapes.ShapeSpec(shape, "red", "white", extent=0.5, center=(32.0, 32.0))
    image, mask = shapes.render(spec)
    box_pixels = (0.5 * 64) ** 2
    assert mask.sum() == pytest.approx(area_of_box * box_pixels, rel=0.02)
    assert tuple(image[32, 32]) == shapes.COLORS["red"] and tuple(image[0, 0]) == shapes.BACKGROUNDS["white"]


def test_sizes_are_continuous_within_their_bins_and_shapes_stay_inside():
    rng = np.random.default_rng(0)
    for size, (low, high) in shapes.SIZES.items():
        specs = [shapes.random_spec(rng, size=size) for _ in range(50)]
        extents = [s.extent for s in specs]
        assert low <= min(extents) and max(extents) <= high and len(set(extents)) == 50
        assert all(s.size == size for s in specs)
        for s in specs:  # nothing is cut off at the image border: the mask holds the shape's whole area
            fill = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[s.shape]
            assert shapes.render_mask(s).sum() == pytest.approx(fill * (s.extent * 64) ** 2, rel=0.06)
    grown = shapes.with_extent(shapes.ShapeSpec("square", "blue", "gray", 0.3, (10.0, 54.0)), 0.7)
    assert grown.extent == 0.7 and grown.center == (22.4, 41.6)


def test_measure_reads_color_shape_and_area_of_rendered_images():
    samples = shapes.dataset(90, seed=3)
    measured = [shapes.measure(s.image) for s in samples]
    assert all(m.color == s.spec.color for m, s in zip(measured, samples))
    assert all(m.shape == s.spec.shape for m, s in zip(measured, samples))
    for m, s in zip(measured, samples):
        assert m.area == pytest.approx(float(s.mask.mean()), rel=0.25)  # edge pixels count whole
    blank = np.full((64, 64, 3), 128, dtype=np.uint8)
    assert shapes.measure(blank) == shapes.Measurement(None, None, 0.0, 0.0)


def test_a_stray_pixel_far_from_the_shape_does_not_change_what_is_measured():
    sample = shapes.sample(np.random.default_rng(11))
    speckled = sample.image.copy()
    corner = (1, 62) if sample.mask[:8, -8:].max() == 0 else (62, 1)
    speckled[corner] = shapes.COLORS[sample.spec.color]
    clean, measured = shapes.measure(sample.image), shapes.measure(speckled)
    assert (measured.shape, measured.fill_ratio, measured.color) == (clean.shape, clean.fill_ratio, clean.color)
    assert measured.shape == sample.spec.shape
    assert measured.area == clean.area + 1 / 64**2  # the speck is foreground, just not part of the shape
