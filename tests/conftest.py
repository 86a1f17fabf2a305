"""Fixtures shared by the test files."""

from __future__ import annotations

import tempfile
from pathlib import Path

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
