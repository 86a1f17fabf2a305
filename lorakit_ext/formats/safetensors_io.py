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
  on the tensors serialised with only the ``ss_*`` metadata, not on the file as written; ``TensorLayout.legacy_hash``
  does the same so our values match kohya's for the same tensors and training metadata.
- *file hash*: sha256 of the whole file, what the WebUI uses for checkpoints (short form: first 10 characters).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch

from lorakit_ext.errors import LorakitError, check_can_write

PathLike = str | os.PathLike
# Files that can only be read through torch.load (always weights_only=True: we never unpickle code).
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".bin"})
SAFETENSORS_SUFFIX = ".safetensors"
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
    """Every tensor in a network file, on the CPU (``load_file`` without the metadata)."""
    return load_file(path)[0]


def load_file(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor in a network file, on the CPU, and its string metadata, from one read of the header.

    A safetensors file, whatever its suffix (``is_safetensors``), is checked by ``read_header`` first; other
    ``.pt``/``.pth``/``.ckpt``/``.bin`` files go through ``torch.load(weights_only=True)``, must hold a flat mapping of
    name -> tensor (optionally under a ``state_dict`` key) and have no metadata.
    """
    if Path(path).suffix.lower() in PICKLE_SUFFIXES and not is_safetensors(path):
        return _load_pickled_tensors(path), {}
    header, _ = read_header(path)
    try:
        tensors = safetensors.torch.load_file(os.fspath(path), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError and plain ValueErrors
        raise LorakitError(f"{path}: unreadable safetensors file ({_one_line(error)})") from None
    return tensors, dict(header.get("__metadata__", {}))


def is_safetensors(path: PathLike) -> bool:
    """Whether the file starts as a safetensors file does (a header length within the file, then a JSON object),
    so that one saved under a ``.bin``/``.pt`` name is read as what it is; ``read_header`` checks the rest."""
    file_size = _file_size(path)
    try:
        with open(path, "rb") as file:
            start = file.read(LENGTH_PREFIX_BYTES + 1)
    except OSError as error:
        raise LorakitError(f"{path}: cannot read ({error.strerror})") from None
    header_length = int.from_bytes(start[:LENGTH_PREFIX_BYTES], "little")
    fits = len(start) > LENGTH_PREFIX_BYTES and LENGTH_PREFIX_BYTES + header_length <= file_size
    return fits and header_length <= MAX_HEADER_BYTES and start[LENGTH_PREFIX_BYTES:] == b"{"


def _load_pickled_tensors(path: PathLike) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise LorakitError(
            f"{path}: not a readable PyTorch checkpoint: it holds more than plain tensors and we never unpickle code "
            f"({_one_line(error)}); convert it to .safetensors with a tool you trust"
        ) from None
    except Exception as error:  # on junk bytes torch's safe unpickler raises anything: KeyError, ValueError, ...
        reason = f"{type(error).__name__}: {_one_line(error)}"
        raise LorakitError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise LorakitError(f"{path}: expected a mapping of names to tensors, found {type(loaded).__name__}")
    not_tensors = [str(key) for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise LorakitError(f"{path}: entries that are not tensors: {', '.join(not_tensors[:5])}")
    return {str(key): value for key, value in loaded.items()}


def _file_size(path: PathLike) -> int:
    if os.path.isdir(path):
        raise LorakitError(f"{path}: a folder, not a file")
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

# safetensors' dtype names, in the order it lays tensors out (wider elements first, then by name): the legacy hash
# reads a window of the data, so our layout is safetensors' own, byte for byte.
DTYPE_NAMES = {
    torch.int64: "I64",
    torch.float64: "F64",
    torch.float32: "F32",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_LAYOUT_RANK = {dtype: rank for rank, dtype in enumerate(DTYPE_NAMES)}
# POSIX's floor for how many buffers one writev takes.
MIN_IOV_MAX = 16
MODEL_HASH_KEY, LEGACY_HASH_KEY = HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
SHA256_HEX_DIGITS = 64


class TensorLayout:
    """Tensors placed as safetensors places them, each one's bytes a view of the tensor (nothing is copied).

    Everything a writer needs: the header for any metadata, the hashes of the data, the data itself. The model hash
    can run in a background thread (``start_model_hash``; hashlib releases the GIL) while other work goes on.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.entries: dict[str, dict] = {}
        self.buffers: list[memoryview] = []
        offset = 0
        for name in sorted(tensors, key=lambda key: (_layout_rank(key, tensors[key]), key)):
            tensor = tensors[name].detach().to("cpu").contiguous()
            buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            end = offset + buffer.nbytes
            self.entries[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, end]}
            self.buffers.append(buffer)
            offset = end
        self.data_bytes = offset
        self._entries_json = _compact_json(self.entries)  # encoded once: a save builds several headers
        self._digest = hashlib.sha256()
        self._hasher: threading.Thread | None = None

    def prefix(self, metadata: Mapping[str, str] | None = None) -> bytes:
        """The 8-byte length and the JSON header (metadata keys sorted, padded to 8 bytes), as safetensors writes."""
        header = self._entries_json
        if metadata:
            tensors = "," + header[1:] if self.entries else "}"
            header = '{"__metadata__":' + _compact_json(dict(sorted(metadata.items()))) + tensors
        header_bytes = header.encode("utf-8")
        header_bytes += b" " * (-len(header_bytes) % HEADER_ALIGNMENT)
        return len(header_bytes).to_bytes(LENGTH_PREFIX_BYTES, "little") + header_bytes

    def start_model_hash(self) -> None:
        """Start hashing the data in a background thread (once)."""
        if self._hasher is None:
            self._hasher = threading.Thread(target=_update_digest, args=(self._digest, self.buffers), daemon=True)
            self._hasher.start()

    def model_hash(self) -> str:
        """``sshs_model_hash``: sha256 of the data, i.e. of everything after the header."""
        self.start_model_hash()
        self._hasher.join()
        return self._digest.hexdigest()

    def legacy_hash(self, metadata: Mapping[str, str] | None) -> str:
        """The legacy hash of these tensors written with ``metadata`` (kohya: with only the ``ss_*`` fields)."""
        prefix = self.prefix(metadata)
        start, end = LEGACY_HASH_OFFSET, LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH
        window = prefix[start:end] + self._data(max(start - len(prefix), 0), end - len(prefix))
        return hashlib.sha256(window).hexdigest()[:8]

    def _data(self, start: int, end: int) -> bytes:
        """Bytes ``start:end`` of the data (clipped to it), gathered from the tensors they fall in."""
        pieces = []
        for entry, buffer in zip(self.entries.values(), self.buffers):
            first, last = entry["data_offsets"]
            if last > start and first < end:
                pieces.append(buffer[max(start - first, 0) : min(end, last) - first])
        return b"".join(pieces)


def _layout_rank(name: str, tensor: torch.Tensor) -> int:
    if tensor.dtype not in _LAYOUT_RANK:
        raise LorakitError(f"tensor {name}: cannot write {tensor.dtype} to safetensors")
    return _LAYOUT_RANK[tensor.dtype]


def _gather_limit() -> int:
    """How many buffers one ``writev`` takes: many small tensors go out in few system calls (0: no ``writev``)."""
    if not hasattr(os, "writev"):
        return 0
    try:
        return max(os.sysconf("SC_IOV_MAX"), MIN_IOV_MAX)
    except (ValueError, OSError):
        return MIN_IOV_MAX


_GATHER_LIMIT = _gather_limit()


def _compact_json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _update_digest(digest, buffers: Iterable[memoryview]) -> None:
    for buffer in buffers:
        digest.update(buffer)


def check_save_to(
    save_to: PathLike, inputs: Mapping[str, Iterable[PathLike]] | None = None, option: str = "--save_to"
) -> None:
    """Refuse, before any work, an output that is not ``.safetensors`` (the only format written: under a ``.pt``
    name no loader, ours included, would read it) or that is one of ``inputs`` (their name -> paths; the same file by
    any spelling or link), which the atomic write would replace, losing it. ``option`` names the output."""
    if Path(save_to).suffix.lower() != SAFETENSORS_SUFFIX:
        raise LorakitError(f"{option} {save_to}: must end in {SAFETENSORS_SUFFIX} (the only format written)")
    if not os.path.exists(save_to):
        return
    for name, paths in (inputs or {}).items():
        if any(os.path.exists(path) and os.path.samefile(save_to, path) for path in paths):
            raise LorakitError(f"{option} {save_to} is one of the inputs ({name}); write to another file")


def check_output_file(
    path: PathLike, option: str = "--save_to", inputs: Mapping[str, Iterable[PathLike]] | None = None
) -> None:
    """``check_save_to``, and the file's folder exists and can be written, and the file is no folder: all a save
    needs, checked before the work that leads to it."""
    check_save_to(path, inputs, option)
    if os.path.isdir(path):
        raise LorakitError(f"{option} {path}: a folder, not a file")
    folder = Path(path).parent
    if not folder.is_dir():
        raise LorakitError(f"{option} {path}: folder {folder} does not exist")
    check_can_write(folder, option)


def save_tensors_atomic(
    path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file so that readers see the old file or the whole new one, never a part."""
    try:
        layout = TensorLayout(tensors)
    except LorakitError as error:
        raise LorakitError(f"{path}: {error}") from None
    with _atomic_file(path) as file:
        file.write(layout.prefix(metadata))
        _write_buffers(file, layout.buffers)


def save_hashed_atomic(
    path: PathLike, layout: TensorLayout, metadata: Mapping[str, str], legacy_metadata: Mapping[str, str]
) -> dict[str, str]:
    """Write ``layout`` atomically with ``metadata`` plus ``sshs_model_hash`` and ``sshs_legacy_hash`` (of the tensors
    written with ``legacy_metadata``, kohya's ``ss_*`` fields); return the metadata written.

    The tensor bytes are written once, and synced to disk, while the model hash runs in its thread (started here
    unless the caller started it sooner), under a placeholder hash of the same width; the header is rewritten once
    the hash is known, so the final sync has one page left to write.
    """
    layout.start_model_hash()
    written = {**metadata, MODEL_HASH_KEY: "0" * SHA256_HEX_DIGITS, LEGACY_HASH_KEY: layout.legacy_hash(legacy_metadata)}
    with _atomic_file(path) as file:
        placeholder = layout.prefix(written)
        file.write(placeholder)
        _write_buffers(file, layout.buffers)
        file.flush()
        os.fsync(file.fileno())
        written[MODEL_HASH_KEY] = layout.model_hash()
        final = layout.prefix(written)
        assert len(final) == len(placeholder), "a hash changed the header length"
        file.seek(0)
        file.write(final)
    return dict(sorted(written.items()))


def _write_buffers(file: BinaryIO, buffers: list[memoryview]) -> None:
    """Every byte of ``buffers`` in order: gathered into few ``writev`` calls where the OS has it (not Windows), else
    one write each. ``writev`` may write less than asked (a signal; a disk filling up, when the next call raises),
    so the rest is written again."""
    if not _GATHER_LIMIT:
        for buffer in buffers:
            file.write(buffer)
        return
    file.flush()
    descriptor = file.fileno()
    pending = [buffer for buffer in buffers if buffer.nbytes]
    index = 0
    while index < len(pending):
        written = os.writev(descriptor, pending[index : index + _GATHER_LIMIT])
        while written and written >= pending[index].nbytes:
            written -= pending[index].nbytes
            index += 1
        if written:
            pending[index] = pending[index][written:]


def write_atomic(path: PathLike, chunks: Iterable[bytes | memoryview]) -> None:
    """Write ``chunks`` to a file atomically (see ``_atomic_file``)."""
    with _atomic_file(path) as file:
        for chunk in chunks:
            file.write(chunk)


@contextlib.contextmanager
def _atomic_file(path: PathLike) -> Iterator[BinaryIO]:
    """A new temp file beside ``path`` to write into; on leaving, fsync it and ``os.replace`` it over ``path``.

    On any failure (disk full, interrupt) the temp file is removed and an existing ``path`` is left untouched;
    OS errors become a one-line ``LorakitError`` naming the file.
    """
    target = Path(path)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        # os.open with 0o666 lets the umask decide the final permissions, as a plain open() would.
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(descriptor, "wb") as file:
            yield file
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
