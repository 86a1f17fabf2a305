"""Build the toy text folder (CLIP tokenizer files from CLIP's own BPE merge list, plus the text model's config.json).

The toy text encoder is tiny but speaks real CLIP tokens, so prompts, textual-inversion tools and the WebUI's
prompt parser treat it like SD1's. The vocabulary is derived the way CLIP's ``SimpleTokenizer`` derives it from
``bpe_simple_vocab_16e6.txt.gz`` (shipped in the open_clip wheel): 256 byte symbols, the same with ``</w>``, the
first 48,894 merges, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

    python -m lorakit_ext.toy.build_tokenizer --bpe open_clip_torch-3.3.0-py3-none-any.whl --out lorakit_ext/toy/clip
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

from lorakit_ext.errors import LorakitError
from lorakit_ext.formats.safetensors_io import write_atomic
from lorakit_ext.toy.config import TEXT_CONFIG

VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MERGE_COUNT = VOCAB_SIZE - 2 * 256 - 2  # every id that is neither a byte symbol nor a special token is a merge
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"

SPECIAL_TOKENS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
TOKENIZER_CONFIG = {
    **SPECIAL_TOKENS,
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "do_lower_case": True,
    "add_prefix_space": False,
    "errors": "replace",
}


def byte_symbols() -> list[str]:
    """One printable unicode character per byte value, in CLIP's (GPT-2's) order: printable bytes stand for
    themselves, the others are shifted above 255 so no symbol is whitespace or a control character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbol_of = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in symbol_of:
            symbol_of[byte] = chr(256 + shifted)
            shifted += 1
    return [symbol_of[byte] for byte in printable] + [symbol_of[b] for b in range(256) if b not in printable]


def read_merges(bpe_path: Path) -> list[tuple[str, str]]:
    """The merge pairs CLIP uses, from the .txt.gz itself or from an open_clip wheel that contains it."""
    try:
        if bpe_path.suffix == ".whl":
            with zipfile.ZipFile(bpe_path) as wheel:
                raw = gzip.decompress(wheel.read(BPE_MEMBER))
        else:
            raw = gzip.decompress(bpe_path.read_bytes())
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        raise LorakitError(f"--bpe {bpe_path}: cannot read CLIP's BPE merges ({error})") from error
    lines = raw.decode("utf-8").split("\n")[1 : MERGE_COUNT + 1]  # line 0 is a version header
    return [tuple(line.split()) for line in lines]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [BOS, EOS]
    if len(tokens) != VOCAB_SIZE:
        raise LorakitError(f"CLIP BPE file gives {len(tokens)} tokens, expected {VOCAB_SIZE}")
    return {token: index for index, token in enumerate(tokens)}


def write_text(path: Path, text: str) -> None:
    write_atomic(path, [text.encode("utf-8")])


def write_tokenizer(bpe_path: Path, out_dir: Path) -> None:
    merges = read_merges(bpe_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "vocab.json", json.dumps(build_vocab(merges), ensure_ascii=False))
    write_text(out_dir / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    write_text(out_dir / "tokenizer_config.json", json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    write_text(out_dir / "special_tokens_map.json", json.dumps(SPECIAL_TOKENS, indent=2) + "\n")
    write_text(out_dir / "config.json", json.dumps(TEXT_CONFIG, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bpe", type=Path, required=True, help="bpe_simple_vocab_16e6.txt.gz or an open_clip wheel")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("clip"))
    args = parser.parse_args(argv)
    write_tokenizer(args.bpe, args.out)
    print(f"wrote the CLIP tokenizer files and the text model config to {args.out}")


if __name__ == "__main__":
    main()
