"""Output names from the tabs and the HTTP routes become file stems that are safe and never collide by accident."""

from __future__ import annotations

import pytest

from lorakit_ext.errors import LorakitError
from lorakit_ext.ui import paths


def test_names_in_any_script_are_kept_and_unsafe_characters_replaced():
    assert paths.sanitize_name("ü名前 v2") == "ü名前 v2"
    assert paths.sanitize_name("my:lora?😀.safetensors") == "my_lora_"
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
