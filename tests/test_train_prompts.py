"""Sample prompt lines with kohya's flags plus --m."""

from __future__ import annotations

import pytest

from lorakit_ext.errors import LorakitError
from lorakit_ext.train.prompts import SamplePrompt, parse_prompt_line, read_prompt_file


def test_kohya_flags_and_multiplier():
    prompt = parse_prompt_line("a red circle, flat --n blurry, dark --s 12 --l 4.5 --d 7 --w 64 --h 96 --m -0.5")
    assert prompt == SamplePrompt("a red circle, flat", "blurry, dark", 12, 4.5, 7, 64, 96, -0.5)
    assert parse_prompt_line("just text") == SamplePrompt("just text")


def test_bad_flags_name_the_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\n\na square --s 10\na circle --s ten\n")
    with pytest.raises(LorakitError, match=r"prompts.txt:4: --s 'ten' is not a valid int"):
        read_prompt_file(path)
    path.write_text("a circle --q 3\n")
    with pytest.raises(LorakitError, match="unknown flag --q"):
        read_prompt_file(path)
    path.write_text("# nothing\n")
    with pytest.raises(LorakitError, match="no sample prompts"):
        read_prompt_file(path)
