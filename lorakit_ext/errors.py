"""One exception type for everything a user can get wrong, so every front end can show it as one line, and the
checks every front end shares."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class LorakitError(Exception):
    """A problem with the user's input or environment, worded for the user (names the file or option)."""


def check_option(ok: bool, option: str, problem: str) -> None:
    """Raise ``LorakitError("<option> <problem>")`` unless ``ok``: the one-line shape of every option check."""
    if not ok:
        raise LorakitError(f"{option} {problem}")


def clipped(text: str, limit: int = 40) -> str:
    """``text`` cut to ``limit`` characters: an error line names what was given, it does not echo a request."""
    return text if len(text) <= limit else text[:limit] + "..."


def first_few(names: list[str], shown: int = 3, separator: str = ", ") -> str:
    """The first ``shown`` of ``names`` for a one-line message, with "..." when there are more."""
    return separator.join(names[:shown]) + (f"{separator}..." if len(names) > shown else "")


def check_can_write(folder: str | os.PathLike, option: str) -> None:
    """Refuse ``folder`` (created later when missing, so its nearest existing parent is tried) when a file is in the
    way or it cannot be written, in one line naming ``option``: checked before work starts, so that a long run does
    not end in a traceback at its first save."""
    folder = Path(folder)

    def cannot_write(error: OSError) -> LorakitError:
        return LorakitError(f"{option} {folder}: cannot write there ({(error.strerror or str(error)).lower()})")

    try:  # exists() raises where a parent cannot be searched, which is itself a folder one cannot write into
        existing = next(path for path in (folder.absolute(), *folder.absolute().parents) if path.exists())
    except OSError as error:
        raise cannot_write(error) from None
    if not existing.is_dir():
        what = "a file" if existing == folder.absolute() else f"{existing} is a file"
        raise LorakitError(f"{option} {folder}: {what}, not a folder")
    try:  # a real write: permissions, a read-only mount and a full quota all show here (root ignores chmod)
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".lorakit-check-"):
            pass
    except OSError as error:
        raise cannot_write(error) from None


def writable_folder(folder: str | os.PathLike, option: str) -> Path:
    """Create ``folder`` (and its parents) for a verb's output, or refuse in one line before any slow work."""
    folder = Path(folder)
    check_can_write(folder, option)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # what the check cannot see: a race
        raise LorakitError(f"{option} {folder}: cannot create it ({(error.strerror or str(error)).lower()})") from None
    return folder
