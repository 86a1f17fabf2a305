"""The shipped CLIP tokenizer files are CLIP's: same ids as open_clip's tokenizer, rebuilt identically from its BPE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit_ext.toy import build_tokenizer
from lorakit_ext.toy.config import TEXT_CONFIG
from lorakit_ext.toy.model import TEXT_DIR

PROMPTS = ["a red circle", "a large blue square on a white background", "A Small, YELLOW triangle!", ""]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TEXT_DIR))


def test_ids_match_clip(tokenizer):
    assert tokenizer("a red circle")["input_ids"] == [49406, 320, 736, 7117, 49407]
    assert len(tokenizer) == 49408
    padded = tokenizer(PROMPTS[0], padding="max_length", max_length=77)["input_ids"]
    assert len(padded) == 77 and padded[4:] == [49407] * 73  # SD1 pads with <|endoftext|>


def test_same_ids_as_open_clip(tokenizer):
    open_clip = pytest.importorskip("open_clip")
    expected = open_clip.tokenize(PROMPTS).tolist()
    for prompt, reference in zip(PROMPTS, expected):
        ids = tokenizer(prompt)["input_ids"]
        assert ids == reference[: len(ids)] and not any(reference[len(ids) :])


def test_rebuilding_from_clips_bpe_gives_the_shipped_files(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    bpe = Path(open_clip.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    build_tokenizer.write_tokenizer(bpe, tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        assert (tmp_path / name).read_bytes() == (TEXT_DIR / name).read_bytes(), name
    assert json.loads((TEXT_DIR / "config.json").read_text()) == TEXT_CONFIG


def test_unreadable_bpe_file_is_a_one_line_error(tmp_path):
    broken = tmp_path / "bpe.txt.gz"
    broken.write_bytes(b"not gzip")
    with pytest.raises(build_tokenizer.LorakitError, match="--bpe"):
        build_tokenizer.write_tokenizer(broken, tmp_path / "out")
