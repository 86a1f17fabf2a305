"""Tensor files read with checks that name the file, written atomically, and the hashes the WebUI and kohya use.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header (tensor dtypes, shapes and
byte ranges, plus string ``__metadata__``), then the raw tensor bytes. Everything here is about that layout;
what the tensors mean is ``kohya.py``'s business.

Hashes (all lowercase hex):

- *model hash* (``sshs_model_hash``): sha256 of the tensor bytes, i.e. everything after the header. The WebUI's
  built-in Lora reads it from the metadata (or computes it the same way) and shows its first 12 characters as the
  network's short hash; it does not change when only metadata changes.
- *legacy hash* (``sshs_legacy_hash``): the sd-webui-additional-networks hash, the first 8 hex characters of the
  sha256 of the 64 KiB at byte 1 MiB of a file. Because that window depends on the header length, kohya computes it
  on the tensors serialised with only the ``ss_*`` metadata, not on the file as written; ``sshs_hashes`` does the
  same so our values match kohya's for the same tensors and training metadata.
- *file hash*: sha256 of the whole file, what the WebUI uses for checkpoints (short form: first 10 characters).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import safetensors.torch
import torch

from lorakit_ext.errors import LorakitError

PathLike = str | os.PathLike
# Files that can only be read through torch.load (always weights_only=True: we never unpickle code).
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".bin"})
LENGTH_PREFIX_BYTES = 8
# The safetensors library refuses headers larger than this; so do we, before reading one.
MAX_HEADER_BYTES = 100_000_000
HEADER_ALIGNMENT = 8
LEGACY_HASH_OFFSET = 0x100000
LEGACY_HASH_LENGTH = 0x10000
HASH_CHUNK_BYTES = 1 << 20
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_MARK = 0x80


# --- reading -------------------------------------------------------------------------------------------------------


def read_header(path: PathLike) -> tuple[dict, int]:
    """The parsed JSON header and the byte offset where tensor data starts, without reading any tensor.

    Checks what a broken download or a wrong file type gets wrong: too short, a header length beyond the file,
    JSON that does not parse, and tensor byte ranges that do not exactly cover the rest of the file.
    """
    file_size = _file_size(path)
    with open(path, "rb") as file:
        prefix = file.read(LENGTH_PREFIX_BYTES)
        if len(prefix) < LENGTH_PREFIX_BYTES:
            raise LorakitError(f"{path}: not a safetensors file (only {file_size} bytes)")
        header_length = int.from_bytes(prefix, "little")
        if header_length > MAX_HEADER_BYTES or LENGTH_PREFIX_BYTES + header_length > file_size:
            raise LorakitError(f"{path}: not a safetensors file{_pickle_hint(prefix)}")
        header_bytes = file.read(header_length)
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LorakitError(f"{path}: not a safetensors file (bad header JSON: {error})") from None
    if not isinstance(header, dict):
        raise LorakitError(f"{path}: not a safetensors file (header is not a JSON object)")
    _check_metadata(header.get("__metadata__", {}), path)
    data_offset = LENGTH_PREFIX_BYTES + header_length
    _check_data_ranges(header, file_size - data_offset, path)
    return header, data_offset


def read_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (``{}`` when it has none)."""
    header, _ = read_header(path)
    return dict(header.get("__metadata__", {}))


def load_tensors(path: PathLike) -> dict[str, torch.Tensor]:
    """Every tensor in a network file, on the CPU.

    ``.safetensors`` (and any suffix not listed in ``PICKLE_SUFFIXES``) is checked by ``read_header`` first;
    ``.pt``/``.pth``/``.ckpt``/``.bin`` go through ``torch.load(weights_only=True)`` and must hold a flat mapping of
    name -> tensor (optionally under a ``state_dict`` key).
    """
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        return _load_pickled_tensors(path)
    read_header(path)
    try:
        return safetensors.torch.load_file(os.fspath(path), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError and plain ValueErrors
        raise LorakitError(f"{path}: unreadable safetensors file ({_one_line(error)})") from None


def _load_pickled_tensors(path: PathLike) -> dict[str, torch.Tensor]:
    _file_size(path)
    try:
        loaded = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise LorakitError(
            f"{path}: holds more than plain tensors and we never unpickle code ({_one_line(error)}); "
            "convert it to .safetensors with a tool you trust"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise LorakitError(f"{path}: not a readable PyTorch file ({_one_line(error)})") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise LorakitError(f"{path}: expected a mapping of names to tensors, found {type(loaded).__name__}")
    not_tensors = [str(key) for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise LorakitError(f"{path}: entries that are not tensors: {', '.join(not_tensors[:5])}")
    return {str(key): value for key, value in loaded.items()}


def _file_size(path: PathLike) -> int:
    try:
        return os.path.getsize(path)
    except OSError as error:
        raise LorakitError(f"{path}: cannot read ({error.strerror})") from None


def _pickle_hint(prefix: bytes) -> str:
    if prefix.startswith(ZIP_MAGIC) or prefix[0] == PICKLE_PROTOCOL_MARK:
        return " (it looks like a PyTorch pickle: give it a .pt/.ckpt suffix to load it as one)"
    return " (header length exceeds the file size)"


def _check_metadata(metadata: object, path: PathLike) -> None:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LorakitError(f"{path}: bad safetensors header (__metadata__ must map strings to strings)")


def _check_data_ranges(header: dict, data_bytes: int, path: PathLike) -> None:
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise LorakitError(f"{path}: bad safetensors header (tensor {name!r} has no valid data_offsets)")
        end = max(end, offsets[1])
    if end > data_bytes:
        raise LorakitError(f"{path}: truncated (header describes {end} bytes of tensor data, file has {data_bytes})")
    if end < data_bytes:
        raise LorakitError(f"{path}: {data_bytes - end} trailing bytes after the tensor data the header describes")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."


# --- writing -------------------------------------------------------------------------------------------------------


def serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A whole safetensors file in memory (tensors must be contiguous CPU tensors not sharing storage)."""
    return safetensors.torch.save(dict(tensors), dict(metadata) if metadata else None)


def replace_metadata(file_bytes: bytes, metadata: Mapping[str, str]) -> list[bytes | memoryview]:
    """The same file with other metadata: a new header followed by a view of the unchanged tensor bytes.

    Saves serialising the tensors a second time when the metadata must carry hashes of the first serialisation.
    """
    header_length = int.from_bytes(file_bytes[:LENGTH_PREFIX_BYTES], "little")
    data_offset = LENGTH_PREFIX_BYTES + header_length
    header = json.loads(file_bytes[LENGTH_PREFIX_BYTES:data_offset])
    header.pop("__metadata__", None)
    if metadata:
        header = {"__metadata__": dict(metadata), **header}
    header_json = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    header_json += b" " * (-len(header_json) % HEADER_ALIGNMENT)
    prefix = len(header_json).to_bytes(LENGTH_PREFIX_BYTES, "little") + header_json
    return [prefix, memoryview(file_bytes)[data_offset:]]


def save_tensors_atomic(
    path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file so that readers see the old file or the whole new one, never a part."""
    write_atomic(path, [serialize(tensors, metadata)])


def write_atomic(path: PathLike, chunks: Iterable[bytes | memoryview]) -> None:
    """Write ``chunks`` to a temp file beside ``path``, fsync it, then ``os.replace`` it over ``path``.

    On any failure (disk full, interrupt) the temp file is removed and an existing ``path`` is left untouched;
    OS errors become a one-line ``LorakitError`` naming the file.
    """
    target = Path(path)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        # os.open with 0o666 lets the umask decide the final permissions, as a plain open() would.
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(descriptor, "wb") as file:
            for chunk in chunks:
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, target)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise LorakitError(f"{target}: cannot write ({error.strerror or _one_line(error)})") from None
        raise
    _fsync_folder(target.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable where the OS allows it (POSIX; some network file systems refuse). Best
    effort: the new file is already in place, so a refusal here is no reason to report the save as failed."""
    if os.name != "posix":
        return
    try:
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError:
        pass


# --- hashes --------------------------------------------------------------------------------------------------------


def sshs_hashes(file_bytes: bytes) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) of an in-memory safetensors file.

    For kohya's values ``file_bytes`` must be the tensors serialised with only their ``ss_*`` metadata (see the
    module docstring for why the legacy hash depends on it); the model hash is the same for any metadata.
    """
    view = memoryview(file_bytes)
    data_offset = LENGTH_PREFIX_BYTES + int.from_bytes(view[:LENGTH_PREFIX_BYTES], "little")
    model_hash = hashlib.sha256(view[data_offset:]).hexdigest()
    legacy_hash = hashlib.sha256(view[LEGACY_HASH_OFFSET : LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


def file_model_hash(path: PathLike) -> str:
    """``sshs_model_hash`` recomputed from a file on disk (what the WebUI computes when the metadata lacks it)."""
    _, data_offset = read_header(path)
    return _sha256_of_file(path, start=data_offset)


def file_legacy_hash(path: PathLike) -> str:
    """The legacy hash of the file exactly as written (differs from ``sshs_legacy_hash`` when metadata other than
    ``ss_*`` is present, see the module docstring)."""
    with open(path, "rb") as file:
        file.seek(LEGACY_HASH_OFFSET)
        return hashlib.sha256(file.read(LEGACY_HASH_LENGTH)).hexdigest()[:8]


def file_sha256(path: PathLike) -> str:
    """sha256 of the whole file (the WebUI's checkpoint hash)."""
    return _sha256_of_file(path, start=0)


def lora_short_hash(model_hash: str) -> str:
    """The short hash the WebUI shows for a Lora and writes in ``Lora hashes:`` infotext."""
    return model_hash[:12]


def _sha256_of_file(path: PathLike, start: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        file.seek(start)
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
