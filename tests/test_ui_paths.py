"""Output names from the tabs and the HTTP routes become file stems that are safe and never collide by accident."""

from __future__ import annotations

import pytest

from lorakit_ext.errors import LorakitError
from lorakit_ext.ui import paths


def test_names_in_any_script_are_kept_and_unsafe_characters_replaced():
    assert paths.sanitize_name("ü名前 v2") == "ü名前 v2"
    assert paths.sanitize_name("हिन्दी") == "हिन्दी"  # combining vowel signs are part of the letters
    assert paths.sanitize_name("cafe\u0301") == "caf\u00e9"  # one file however the accent was typed
    assert paths.sanitize_name("my:lora?*.safetensors") == "my_lora_"
    assert paths.sanitize_name("../../x") == "_.._x"


@pytest.mark.parametrize("name, problem", [
    ("😀😀", "'😀😀' is not a usable file name (no letter or digit)"),
    (" . . ", "' . . ' is not a usable file name (no letter or digit)"),
    ("名" * 70, "the name is longer than 200 bytes of UTF-8"),
    (None, "expected a name, got None"),
    (["x"], "expected a name, got ['x']"),
])
def test_names_that_would_collide_or_not_fit_are_refused(name, problem):
    with pytest.raises(LorakitError) as error:
        paths.sanitize_name(name, "output_name")
    assert str(error.value) == f"output_name: {problem}"


def test_a_folder_whose_parent_cannot_be_searched_is_one_line(tmp_path, monkeypatch):
    """Path.exists() raises PermissionError under a folder one may not enter (root may enter any, so it is made to)."""
    from pathlib import Path

    from lorakit_ext.errors import check_can_write

    locked = tmp_path / "locked"
    exists = Path.exists

    def exists_or_denied(path, *args, **kwargs):
        if locked in path.parents:
            raise PermissionError(13, "Permission denied")
        return exists(path, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", exists_or_denied)
    with pytest.raises(LorakitError) as error:
        check_can_write(locked / "runs" / "out", "output_dir")
    assert str(error.value) == f"output_dir {locked / 'runs' / 'out'}: cannot write there (permission denied)"
