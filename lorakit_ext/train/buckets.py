"""Aspect-ratio buckets: which training size each image gets, and how it is resized and cropped to it.

The facts follow kohya sd-scripts so that a dataset trains on the same sizes in both tools:

- Predefined buckets (``enable_bucket`` without ``bucket_no_upscale``): for every width from ``min_side`` to
  ``max_side`` in ``steps``, the tallest height (a multiple of ``steps``, at most ``max_side``) whose area fits in the
  training resolution's area, both ways round, plus the largest square that fits. An image goes to the bucket whose
  aspect ratio is nearest to its own, is scaled to cover it and centre-cropped.
- ``bucket_no_upscale``: images larger than the resolution's area are shrunk (aspect kept) to that area, rounding
  whichever side keeps the aspect ratio closer to a multiple of ``steps``; smaller images keep their size. The bucket
  is the size rounded down to multiples of ``steps`` (the excess is centre-cropped, never padded).
- Without buckets every image is scaled to cover the resolution and centre-cropped to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class Placement:
    """How one image becomes a training image: resize to ``resized``, then crop ``bucket`` at ``crop_left_top``."""

    bucket: Size
    resized: Size
    crop_left_top: tuple[int, int]


def predefined_buckets(resolution: Size, min_side: int, max_side: int, steps: int) -> list[Size]:
    """kohya's bucket list for a training resolution, sorted (areas counted in ``steps``-sized squares, as kohya)."""
    max_area = (resolution[0] // steps) * (resolution[1] // steps)
    square = int(math.sqrt(max_area)) * steps
    sizes = {(square, square)}
    for width in range(min_side, max_side + 1, steps):
        height = min(max_side, (max_area // (width // steps)) * steps)
        sizes.update({(width, height), (height, width)})
    return sorted(size for size in sizes if min(size) > 0)  # a resolution far below max_side leaves 0-high widths


def nearest_bucket(image: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's (the first such one on ties, like kohya's argmin)."""
    aspect = image[0] / image[1]
    return min(buckets, key=lambda size: abs(size[0] / size[1] - aspect))


def cover_placement(image: Size, bucket: Size) -> Placement:
    """Scale ``image`` so it covers ``bucket`` along its tighter side, then centre-crop the other side."""
    width, height = image
    if width / height > bucket[0] / bucket[1]:
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    resized = (max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5)))
    return Placement(bucket, resized, _centre(resized, bucket))


def no_upscale_placement(image: Size, max_area: int, steps: int) -> Placement:
    """kohya's ``bucket_no_upscale``: shrink only when larger than ``max_area``; crop down to multiples of ``steps``."""
    width, height = image
    aspect = width / height
    if width * height > max_area:
        resized_width = math.sqrt(max_area * aspect)
        resized_height = max_area / resized_width
        by_width = _round_to_steps(resized_width, steps)
        height_for_width = _round_to_steps(by_width / aspect, steps)
        by_height = _round_to_steps(resized_height, steps)
        width_for_height = _round_to_steps(by_height * aspect, steps)
        width_error = abs(by_width / height_for_width - aspect) if height_for_width else math.inf
        height_error = abs(width_for_height / by_height - aspect) if by_height else math.inf
        if width_error < height_error:
            resized = (by_width, int(by_width / aspect + 0.5))
        else:
            resized = (int(by_height * aspect + 0.5), by_height)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    return Placement(bucket, resized, _centre(resized, bucket))


def place(image: Size, resolution: Size, buckets: list[Size] | None, no_upscale: bool, steps: int) -> Placement:
    """Where one image goes: ``buckets`` None means no bucketing (the resolution itself is the only bucket)."""
    if no_upscale:
        return no_upscale_placement(image, resolution[0] * resolution[1], steps)
    return cover_placement(image, nearest_bucket(image, buckets or [resolution]))


def _round_to_steps(value: float, steps: int) -> int:
    rounded = int(value + 0.5)
    return rounded - rounded % steps


def _centre(resized: Size, bucket: Size) -> tuple[int, int]:
    return ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)
