"""Where a job may read and write: outputs stay under the host's Lora folder, inputs must exist.

Pure functions over paths, so the tabs, the HTTP API and their tests apply the same rules.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from lorakit_ext.errors import LorakitError
from lorakit_ext.formats.safetensors_io import SAFETENSORS_SUFFIX

_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f]+')  # separators and what Windows refuses; any script's letters stay
MAX_NAME_BYTES = 200  # of UTF-8, under the 255 most file systems allow, leaving room for "-000004.safetensors"


def sanitize_name(name: str, option: str = "output_name") -> str:
    """A file stem safe on every OS: no separators, no leading dots, no reserved characters. A name with no letter
    or digit left, or too long, is refused rather than cut or blanked, since two such names would share one file."""
    if not isinstance(name, str):
        raise LorakitError(f"{option}: expected a name, got {name!r}")
    stem = unicodedata.normalize("NFC", name).strip()  # "café" typed as e + combining accent is the same file
    if stem.lower().endswith(SAFETENSORS_SUFFIX):
        stem = stem[: -len(SAFETENSORS_SUFFIX)]
    stem = _UNSAFE.sub("_", stem).strip(" .")
    if not re.search(r"[^\W_]", stem):
        raise LorakitError(f"{option}: {name!r} is not a usable file name (no letter or digit)")
    if len(stem.encode("utf-8")) > MAX_NAME_BYTES:
        raise LorakitError(f"{option}: the name is longer than {MAX_NAME_BYTES} bytes of UTF-8")
    return stem


def output_path(root: Path, name: str, folder: str | Path = "", option: str = "output_name") -> Path:
    """``root/folder/name.safetensors``, refusing any folder that leads outside ``root``."""
    root = Path(root).resolve()
    target_dir = (root / folder).resolve() if folder else root
    if target_dir != root and root not in target_dir.parents:
        raise LorakitError(f"output_dir: {folder} is outside the Lora folder {root}")
    return target_dir / f"{sanitize_name(name, option)}{SAFETENSORS_SUFFIX}"


def output_dir(root: Path, folder: str | Path, option: str = "output_dir") -> Path:
    """A folder under ``root`` (absolute or relative to it), refusing any that leads outside."""
    root = Path(root).resolve()
    target_dir = (root / folder).resolve()
    if target_dir != root and root not in target_dir.parents:
        raise LorakitError(f"{option}: {folder} is outside the Lora folder {root}")
    return target_dir


def existing_file(path: str | Path, option: str) -> Path:
    """An input file that must exist."""
    if not str(path).strip():
        raise LorakitError(f"{option}: no file given")
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise LorakitError(f"{option}: {path} does not exist")
    return resolved.resolve()


def existing_dir(path: str | Path, option: str) -> Path:
    """An input folder that must exist."""
    if not str(path).strip():
        raise LorakitError(f"{option}: no folder given")
    resolved = Path(path).expanduser()
    if not resolved.is_dir():
        raise LorakitError(f"{option}: {path} is not a folder")
    return resolved.resolve()
