"""Procedural toy images: one flat shape on a plain background, with its caption and foreground mask.

Every attribute a prompt can name (shape, color, size, background) is drawn from a seed, so datasets, slider
pairs and quality checks are reproducible without any files. Size is continuous underneath (``extent``: the
shape's width as a fraction of the image) and only its coarse bin is named in the caption. The same module
measures generated images (dominant foreground color, best-matching silhouette, area), so the quality gates need
no external model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
# extent ranges per size word: the shape's bounding-box width as a fraction of the image width
SIZES: dict[str, tuple[float, float]] = {"small": (0.26, 0.36), "medium": (0.42, 0.54), "large": (0.62, 0.80)}
# caption templates and how often each is used: short prompts like "a red circle" must work too
CAPTION_TEMPLATES: tuple[tuple[str, float], ...] = (
    ("a {size} {color} {shape} on a {background} background", 0.35),
    ("a {color} {shape} on a {background} background", 0.15),
    ("a {size} {color} {shape}", 0.2),
    ("a {color} {shape}", 0.3),
)
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background beyond which a pixel is foreground
SUPERSAMPLE = 4  # shapes are drawn this many times larger, then box-filtered: antialiased edges and a soft mask


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows; ``center`` is in pixels of the final image."""

    shape: str
    color: str
    background: str
    extent: float
    center: tuple[float, float]
    image_size: int = 64

    @property
    def size(self) -> str:
        """The size word whose range holds ``extent`` (the nearest one between ranges)."""
        return min(SIZES, key=lambda name: max(SIZES[name][0] - self.extent, self.extent - SIZES[name][1], 0.0))


@dataclass(frozen=True)
class ShapeSample:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) float32 coverage of the shape in [0, 1]
    caption: str
    spec: ShapeSpec


def random_spec(rng: np.random.Generator, image_size: int = 64, size: str | None = None) -> ShapeSpec:
    """A uniformly drawn shape, color, size bin and position; the background never equals the shape's color."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    backgrounds = [name for name in BACKGROUNDS if BACKGROUNDS[name] != COLORS[color]]
    background = backgrounds[rng.integers(len(backgrounds))]
    low, high = SIZES[size if size is not None else list(SIZES)[rng.integers(len(SIZES))]]
    extent = float(rng.uniform(low, high))
    half = extent * image_size / 2
    center = (float(rng.uniform(half, image_size - half)), float(rng.uniform(half, image_size - half)))
    return ShapeSpec(shape, color, background, extent, center, image_size)


def caption(spec: ShapeSpec, rng: np.random.Generator) -> str:
    templates, weights = zip(*CAPTION_TEMPLATES)
    template = templates[rng.choice(len(templates), p=np.asarray(weights) / sum(weights))]
    return template.format(size=spec.size, color=spec.color, shape=spec.shape, background=spec.background)


def render_mask(spec: ShapeSpec) -> np.ndarray:
    """Coverage of the shape per pixel, (H, W) float32 in [0, 1]."""
    big = spec.image_size * SUPERSAMPLE
    half = spec.extent * big / 2
    cx, cy = spec.center[0] * SUPERSAMPLE, spec.center[1] * SUPERSAMPLE
    box = (cx - half, cy - half, cx + half, cy + half)
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    if spec.shape == "circle":
        draw.ellipse(box, fill=255)
    elif spec.shape == "square":
        draw.rectangle(box, fill=255)
    elif spec.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=255)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}")
    small = canvas.resize((spec.image_size, spec.image_size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(spec: ShapeSpec) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, mask (H, W) float32): the shape's color blended over the background by coverage."""
    mask = render_mask(spec)
    foreground = np.asarray(COLORS[spec.color], dtype=np.float32)
    background = np.asarray(BACKGROUNDS[spec.background], dtype=np.float32)
    image = background + mask[..., None] * (foreground - background)
    return np.round(image).astype(np.uint8), mask


def sample(rng: np.random.Generator, image_size: int = 64) -> ShapeSample:
    spec = random_spec(rng, image_size)
    image, mask = render(spec)
    return ShapeSample(image, mask, caption(spec, rng), spec)


def dataset(count: int, seed: int, image_size: int = 64) -> list[ShapeSample]:
    """``count`` samples, the same for the same seed."""
    rng = np.random.default_rng(seed)
    return [sample(rng, image_size) for _ in range(count)]


def with_extent(spec: ShapeSpec, extent: float) -> ShapeSpec:
    """The same shape at another size, kept inside the image (for size sliders and their checks)."""
    half = extent * spec.image_size / 2
    center = tuple(float(np.clip(c, half, spec.image_size - half)) for c in spec.center)
    return replace(spec, extent=extent, center=center)


# ---------------------------------------------------------------------------------------------------------------
# Measuring images (generated or rendered) by plain pixel analysis
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    color: str | None  # palette color nearest the mean foreground color; None when no foreground was found
    shape: str | None  # shape whose silhouette, drawn in the largest region's bounding box, overlaps it best (IoU)
    area: float  # foreground pixels as a fraction of the image
    fill_ratio: float  # the largest region's pixels / its bounding-box pixels


def border_color(image: np.ndarray) -> np.ndarray:
    """The median color of the image's outermost pixels: the background, wherever the shape leaves most of the
    border free."""
    pixels = image.astype(np.float32)
    return np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]), axis=0)


def foreground_mask(
    image: np.ndarray, threshold: float = FOREGROUND_DISTANCE, background: np.ndarray | None = None
) -> np.ndarray:
    """Pixels far (RGB distance) from the background color: ``background`` where given, else the image's border
    color."""
    reference = border_color(image) if background is None else background
    return np.linalg.norm(image.astype(np.float32) - reference, axis=-1) > threshold


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of ``mask``: the shape itself. Decoded images carry the odd stray pixel far
    from the shape; one such speck in a corner would stretch the bounding box over the whole image."""
    from scipy import ndimage

    regions, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count <= 1:
        return mask
    return regions == 1 + int(np.argmax(ndimage.sum_labels(mask, regions, index=np.arange(1, count + 1))))


def measure(image: np.ndarray) -> Measurement:
    """Color and area of the foreground of ``image`` ((H, W, 3) uint8); shape and fill ratio of its largest
    region."""
    mask = foreground_mask(image)
    if not mask.any():
        return Measurement(None, None, 0.0, 0.0)
    mean_color = image[mask].astype(np.float32).mean(axis=0)
    color = min(COLORS, key=lambda name: float(np.linalg.norm(mean_color - np.asarray(COLORS[name]))))
    shape = largest_region(mask)
    rows, cols = np.nonzero(shape)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    fill = float(shape.sum() / ((bottom - top) * (right - left)))
    return Measurement(color, nearest_silhouette(shape, (top, bottom, left, right)), float(mask.mean()), fill)


def nearest_silhouette(mask: np.ndarray, box: tuple[int, int, int, int]) -> str:
    """The shape whose silhouette, drawn to fill ``box`` (top, bottom, left, right), has the highest IoU with
    ``mask``. It compares whole outlines, so a soft-cornered square stays a square and an upright triangle is told
    by where its area lies, which a fill ratio alone (a rounded square's is close to a circle's) cannot do."""
    top, bottom, left, right = box
    center = ((left + right) / 2, (top + bottom) / 2)
    extent = ((bottom - top) + (right - left)) / 2 / mask.shape[0]

    def iou(shape: str) -> float:
        silhouette = render_mask(ShapeSpec(shape, "white", "black", extent, center, mask.shape[0])) > 0.5
        return float((silhouette & mask).sum() / (silhouette | mask).sum())

    return max(SHAPES, key=iou)
