"""Caption reading and the per-step caption options, in kohya's order and with kohya's meaning.

Order (as kohya sd-scripts): prefix and suffix are joined to the caption with a space, then caption dropout empties
the whole caption, otherwise the comma-separated tags after the first ``keep_tokens`` are shuffled and joined with
", ". The prefix is therefore part of the first tag, which ``keep_tokens`` counts.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lorakit_ext.errors import LorakitError

TAG_SEPARATOR = ","


@dataclass(frozen=True)
class CaptionOptions:
    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    prefix: str = ""
    suffix: str = ""


def read_caption(path: Path) -> str | None:
    """The first non-empty line of a caption file, stripped; None when the file is missing or blank."""
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise LorakitError(f"{path}: caption file is not UTF-8 text") from None
    except OSError as error:
        raise LorakitError(f"{path}: cannot read caption ({error.strerror})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else None


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(TAG_SEPARATOR) if tag.strip()]


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """How many captions carry each tag: kohya's ``ss_tag_frequency`` entry for one concept folder."""
    return dict(Counter(tag for caption in captions for tag in set(split_tags(caption))))


def training_caption(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """The caption one training step sees; ``rng`` decides dropout and shuffling."""
    caption = " ".join(part for part in (options.prefix, caption, options.suffix) if part)
    if options.dropout_rate > 0 and rng.random() < options.dropout_rate:
        return ""
    if not options.shuffle:
        return caption
    tags = split_tags(caption)
    fixed, flexible = tags[: options.keep_tokens], tags[options.keep_tokens :]
    rng.shuffle(flexible)
    return ", ".join(fixed + flexible)
