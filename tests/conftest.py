"""Fixtures shared by the test files."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest


@pytest.fixture
def deny_writes_in(monkeypatch):
    """``deny_writes_in(folder)`` makes lorakit's write check (a temporary file in the folder) fail there with
    "Permission denied", as on a read-only folder: these tests run as root, which writes through chmod."""
    real, denied = tempfile.NamedTemporaryFile, set()

    def named_temporary_file(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).absolute() in denied:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", named_temporary_file)
    return lambda folder: denied.add(Path(folder).absolute())


@pytest.fixture
def unwritable_outputs(tmp_path, deny_writes_in):
    """Output folders lorakit's write check refuses, as ``refusals(child)``: {folder: the problem it names} for a
    file, a path under the file, a read-only folder and a path under it; ``untouched()`` says nothing was written
    to any of them or beside them in ``tmp_path``."""
    occupied = tmp_path / "good.safetensors"
    occupied.write_bytes(b"x")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    deny_writes_in(read_only)

    def refusals(child: str) -> dict[Path, str]:
        return {
            occupied: "a file, not a folder",
            occupied / child: f"{occupied} is a file, not a folder",
            read_only: "cannot write there (permission denied)",
            read_only / child: "cannot write there (permission denied)",
        }

    def untouched() -> bool:
        return occupied.read_bytes() == b"x" and not any(read_only.iterdir()) and sorted(tmp_path.iterdir()) == [
            occupied, read_only]

    return SimpleNamespace(refusals=refusals, untouched=untouched)
