"""Sample prompt lines as kohya writes them: ``a red circle --n blurry --s 20 --l 7 --d 42 --w 512 --h 512``.

kohya's flags: ``--n`` negative prompt, ``--s`` steps, ``--l`` CFG scale, ``--d`` seed, ``--w``/``--h`` size; ours
adds ``--m``, the network multiplier for that prompt (so one sample file can show 0, 0.5 and 1). Lines that are
empty or start with ``#`` are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lorakit_ext.errors import LorakitError

FLAG = re.compile(r"\s--([a-z])\s")


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int | None = None  # None: the training seed plus the prompt's line number
    width: int | None = None  # None: the training resolution
    height: int | None = None
    multiplier: float = 1.0


_FIELDS = {
    "n": ("negative_prompt", str),
    "s": ("steps", int),
    "l": ("cfg_scale", float),
    "d": ("seed", int),
    "w": ("width", int),
    "h": ("height", int),
    "m": ("multiplier", float),
}


def parse_prompt_line(line: str, where: str = "prompt") -> SamplePrompt:
    """One prompt line -> ``SamplePrompt``; a bad flag value raises naming ``where`` (file and line)."""
    parts = FLAG.split(f" {line.strip()} ")
    values: dict[str, object] = {"prompt": parts[0].strip()}
    for letter, text in zip(parts[1::2], parts[2::2]):
        if letter not in _FIELDS:
            raise LorakitError(f"{where}: unknown flag --{letter} (use --n --s --l --d --w --h --m)")
        name, kind = _FIELDS[letter]
        try:
            values[name] = kind(text.strip())
        except ValueError:
            raise LorakitError(f"{where}: --{letter} {text.strip()!r} is not a valid {kind.__name__}") from None
    if not values["prompt"]:
        raise LorakitError(f"{where}: the prompt is empty")
    return SamplePrompt(**values)


def read_prompt_file(path: str | Path) -> list[SamplePrompt]:
    """Every prompt in a kohya prompt file (``.txt``; one prompt a line)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise LorakitError(f"{path}: cannot read the sample prompts ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise LorakitError(f"{path}: the sample prompts are not UTF-8 text (byte {error.start})") from None
    prompts = [
        parse_prompt_line(line, f"{path}:{number}")
        for number, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise LorakitError(f"{path}: no sample prompts in the file")
    return prompts
