"""Before/after image pairs for slider training: finding them, checking them, and the |B - A| difference mask.

Three layouts are read: two folders matched by file name (``--a DIR --b DIR``), one folder with a suffix rule
(``img.png`` / ``img_after.png``), and side-by-side images (A left half, B right half). A pair whose two images
differ in size is refused by name; files without a partner are reported, not silently dropped.

Training reads pairs as kohya dataset folders (``write_dataset``): one concept folder per side, no caption files
(so every image trains with the empty caption, the established recipe), optionally with the difference mask as the
alpha channel for ``masked_loss``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lorakit_ext.errors import LorakitError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_SUFFIX = "_after"
# pixels whose |B - A| (mean over channels, 0..255) is at most this are "unchanged" in the difference mask
CHANGE_THRESHOLD = 8.0
# the loss weight masked_loss keeps outside the changed region, so the model still learns the whole image
MASK_FLOOR = 0.1


@dataclass(frozen=True)
class ImagePair:
    """One before (A) / after (B) pair, both (H, W, 3) uint8 of the same size, and the files' sha256."""

    name: str
    a: np.ndarray
    b: np.ndarray
    a_sha256: str
    b_sha256: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.a.shape[1], self.a.shape[0]


@dataclass(frozen=True)
class PairSet:
    """The pairs found, and the files that had no partner (by name) so the caller can report them."""

    pairs: list[ImagePair]
    unmatched: list[str]

    def sources_json(self) -> str:
        """What saved files record of their training images: names and hashes, no pixels."""
        return json.dumps([{"name": p.name, "a_sha256": p.a_sha256, "b_sha256": p.b_sha256} for p in self.pairs])


def _images_in(folder: Path, option: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise LorakitError(f"{option} {folder}: not a folder")
    return {p.name: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()}


def _read_rgb(path: Path) -> tuple[np.ndarray, str]:
    try:
        data = path.read_bytes()
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise LorakitError(f"{path}: cannot read the image ({error})") from None
    return pixels, hashlib.sha256(data).hexdigest()


def _checked(pairs: list[ImagePair], unmatched: list[str], where: str) -> PairSet:
    mismatched = [
        f"{p.name} ({p.a.shape[1]}x{p.a.shape[0]} vs {p.b.shape[1]}x{p.b.shape[0]})" for p in pairs if p.a.shape != p.b.shape
    ]
    if mismatched:
        raise LorakitError(f"{where}: A and B differ in size for {len(mismatched)} pairs: {', '.join(mismatched[:5])}")
    if not pairs:
        extra = f" (unmatched: {', '.join(unmatched[:5])})" if unmatched else ""
        raise LorakitError(f"{where}: no image pairs found{extra}")
    if all(np.array_equal(p.a, p.b) for p in pairs):
        raise LorakitError(f"{where}: every B image equals its A image: nothing for a slider to learn")
    return PairSet(pairs, unmatched)


def _pair(name: str, a_path: Path, b_path: Path) -> ImagePair:
    a, a_hash = _read_rgb(a_path)
    b, b_hash = _read_rgb(b_path)
    return ImagePair(name, a, b, a_hash, b_hash)


def pairs_from_folders(a_dir: str | Path, b_dir: str | Path) -> PairSet:
    """Images of ``a_dir`` and ``b_dir`` with the same file stem form a pair (``x.png`` may pair with ``x.jpg``)."""
    a_files = {Path(n).stem: p for n, p in _images_in(Path(a_dir), "--a").items()}
    b_files = {Path(n).stem: p for n, p in _images_in(Path(b_dir), "--b").items()}
    pairs = [_pair(a_files[stem].name, a_files[stem], b_files[stem]) for stem in sorted(a_files) if stem in b_files]
    unmatched = [f"A/{a_files[s].name}" for s in sorted(set(a_files) - set(b_files))]
    unmatched += [f"B/{b_files[s].name}" for s in sorted(set(b_files) - set(a_files))]
    return _checked(pairs, unmatched, f"--a {a_dir} / --b {b_dir}")


def pairs_from_suffix(folder: str | Path, suffix: str = DEFAULT_SUFFIX) -> PairSet:
    """In one folder, ``img.png`` (A) pairs with ``img<suffix>.png`` (B)."""
    if not suffix:
        raise LorakitError("--suffix must not be empty")
    files = {Path(n).stem: p for n, p in _images_in(Path(folder), "--pairs").items()}
    b_stems = {s for s in files if s.endswith(suffix) and s[: -len(suffix)] in files}
    pairs = [_pair(files[s[: -len(suffix)]].name, files[s[: -len(suffix)]], files[s]) for s in sorted(b_stems)]
    used = b_stems | {s[: -len(suffix)] for s in b_stems}
    unmatched = [files[s].name for s in sorted(set(files) - used)]
    return _checked(pairs, unmatched, f"--pairs {folder} (suffix {suffix!r})")


def pairs_from_side_by_side(folder: str | Path) -> PairSet:
    """Each image holds A in its left half and B in its right half (an odd width is refused by name)."""
    pairs, odd = [], []
    for name, path in _images_in(Path(folder), "--side-by-side").items():
        pixels, digest = _read_rgb(path)
        width = pixels.shape[1]
        if width % 2:
            odd.append(f"{name} (width {width})")
            continue
        pairs.append(ImagePair(name, pixels[:, : width // 2].copy(), pixels[:, width // 2 :].copy(), digest, digest))
    if odd:
        raise LorakitError(f"--side-by-side {folder}: odd-width images cannot be split in half: {', '.join(odd[:5])}")
    return _checked(pairs, [], f"--side-by-side {folder}")


def load_pairs(
    a_dir: str | Path | None = None,
    b_dir: str | Path | None = None,
    pairs_dir: str | Path | None = None,
    suffix: str = DEFAULT_SUFFIX,
    side_by_side: str | Path | None = None,
) -> PairSet:
    """The entry point the CLI and UI use: exactly one of (``a_dir`` and ``b_dir``), ``pairs_dir``, ``side_by_side``."""
    given = [a_dir is not None or b_dir is not None, pairs_dir is not None, side_by_side is not None]
    if sum(given) != 1:
        raise LorakitError("give the pairs one way: --a DIR --b DIR, --pairs DIR [--suffix S] or --side-by-side DIR")
    if given[0]:
        if a_dir is None or b_dir is None:
            raise LorakitError("--a and --b go together")
        return pairs_from_folders(a_dir, b_dir)
    if given[1]:
        return pairs_from_suffix(pairs_dir, suffix)
    return pairs_from_side_by_side(side_by_side)


def difference_mask(pair: ImagePair, threshold: float = CHANGE_THRESHOLD, grow: int = 2) -> np.ndarray:
    """(H, W) float32 in [0, 1]: 1 where B differs from A (mean |B - A| over channels above ``threshold``, grown by
    ``grow`` pixels so edges count), 0 elsewhere. The region the slider should change; everything else is collateral."""
    from scipy.ndimage import maximum_filter

    change = np.abs(pair.b.astype(np.float32) - pair.a.astype(np.float32)).mean(axis=-1)
    changed = change > threshold
    if grow:
        changed = maximum_filter(changed, size=2 * grow + 1)
    return changed.astype(np.float32)


def resized(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """``pixels`` (an image or a mask) at (width, height), Lanczos; unchanged when already that size."""
    if pixels.shape[:2] == (height, width):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.LANCZOS))


def difference_image(pair: ImagePair) -> np.ndarray:
    """|B - A| as an (H, W, 3) uint8 image, for showing the user what the pair teaches."""
    return np.abs(pair.b.astype(np.int16) - pair.a.astype(np.int16)).astype(np.uint8)


def loss_mask(pair: ImagePair, floor: float = MASK_FLOOR) -> np.ndarray:
    """The difference mask as loss weights: 1 in the changed region, ``floor`` elsewhere."""
    return np.maximum(difference_mask(pair), floor)


def write_dataset(pair_set: PairSet, side: str, root: str | Path, repeats: int = 1, masked: bool = False) -> Path:
    """Write one side ("a" or "b") as a kohya dataset: ``root/<repeats>_/<name>.png``; returns ``root``.

    No caption files are written and the concept folder's name is empty, so every image trains with the dataset's
    ``default_caption``, empty by default (kohya datasets caption an image without a caption file by its folder's
    name, which must not teach the slider a word). With ``masked`` the loss mask is stored as the PNG's alpha channel
    (what ``masked_loss`` reads).
    """
    if side not in ("a", "b"):
        raise ValueError(f"side must be 'a' or 'b', got {side!r}")
    if repeats < 1:
        raise LorakitError(f"repeats must be at least 1, got {repeats}")
    folder = Path(root) / f"{repeats}_"
    folder.mkdir(parents=True, exist_ok=True)
    for pair in pair_set.pairs:
        pixels = pair.a if side == "a" else pair.b
        if masked:
            alpha = np.round(loss_mask(pair) * 255).astype(np.uint8)
            image = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
        else:
            image = Image.fromarray(pixels, "RGB")
        image.save(folder / f"{Path(pair.name).stem}.png")
    return Path(root)
