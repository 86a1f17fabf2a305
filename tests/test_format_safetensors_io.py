"""safetensors_io: checked reads, atomic writes, and the hashes, against hashlib and the safetensors library."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os

import pytest
import safetensors
import safetensors.torch
import torch

from lorakit_ext.errors import LorakitError
from lorakit_ext.formats import safetensors_io as sio


def one_line_error_naming(path, excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(path) in message
    return message


@pytest.fixture
def tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(600, 512, generator=generator),  # > 1 MiB so the legacy-hash window holds data
        "a.alpha": torch.tensor(4.0),
        "c.weight": torch.randn(3, 4, generator=generator).half(),
    }


def test_read_header_and_load_match_the_library(tmp_path, tensors):
    path = tmp_path / "net.safetensors"
    safetensors.torch.save_file(tensors, path, {"ss_network_dim": "4"})
    header, data_offset = sio.read_header(path)
    raw = path.read_bytes()
    assert data_offset == 8 + int.from_bytes(raw[:8], "little")
    assert header["__metadata__"] == {"ss_network_dim": "4"}
    assert header["b.weight"]["shape"] == [600, 512]
    assert sio.read_metadata(path) == {"ss_network_dim": "4"}
    loaded = sio.load_tensors(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype


def test_not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are my notes about a LoRA, not a LoRA")
    with pytest.raises(LorakitError) as excinfo:
        sio.load_tensors(path)
    assert "not a safetensors file" in one_line_error_naming(path, excinfo)

    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(LorakitError) as excinfo:
        sio.read_header(tiny)
    assert "only 3 bytes" in one_line_error_naming(tiny, excinfo)


def test_pickle_with_safetensors_suffix_gets_a_hint(tmp_path, tensors):
    path = tmp_path / "renamed.safetensors"
    torch.save(tensors, path)
    with pytest.raises(LorakitError) as excinfo:
        sio.load_tensors(path)
    assert "PyTorch pickle" in one_line_error_naming(path, excinfo)


def test_truncated_and_trailing_bytes(tmp_path, tensors):
    good = safetensors.torch.save(tensors)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good[:-100])
    with pytest.raises(LorakitError) as excinfo:
        sio.load_tensors(truncated)
    assert "truncated" in one_line_error_naming(truncated, excinfo)

    padded = tmp_path / "padded.safetensors"
    padded.write_bytes(good + b"\0" * 7)
    with pytest.raises(LorakitError) as excinfo:
        sio.load_tensors(padded)
    assert "7 trailing bytes" in one_line_error_naming(padded, excinfo)


def test_bad_header_json(tmp_path):
    header = b'{"a": {"dtype": "F32", '
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(LorakitError) as excinfo:
        sio.read_header(path)
    assert "bad header JSON" in one_line_error_naming(path, excinfo)

    not_strings = b'{"__metadata__": {"ss_network_dim": 4}}'
    path.write_bytes(len(not_strings).to_bytes(8, "little") + not_strings)
    with pytest.raises(LorakitError) as excinfo:
        sio.read_header(path)
    assert "__metadata__" in one_line_error_naming(path, excinfo)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(LorakitError) as excinfo:
        sio.load_tensors(path)
    assert "cannot read" in one_line_error_naming(path, excinfo)


def test_pickled_tensors_load_only_without_code(tmp_path, tensors):
    plain = tmp_path / "net.pt"
    torch.save({"state_dict": tensors}, plain)
    loaded = sio.load_tensors(plain)
    assert torch.equal(loaded["b.weight"], tensors["b.weight"])

    evil = tmp_path / "evil.ckpt"
    torch.save({"weights": tensors, "args": argparse.Namespace(lr=1.0)}, evil)  # needs a class unpickled
    with pytest.raises(LorakitError) as excinfo:
        sio.load_tensors(evil)
    assert "never unpickle" in one_line_error_naming(evil, excinfo)

    not_tensors = tmp_path / "steps.pt"
    torch.save({"step": 3, "a": torch.zeros(1)}, not_tensors)
    with pytest.raises(LorakitError) as excinfo:
        sio.load_tensors(not_tensors)
    assert "step" in one_line_error_naming(not_tensors, excinfo)


ODD_METADATA = {"ss_a": "1", "modelspec.title": "ünïcode \"quoted\"\n\x01\x7f", "b": ""}


def every_dtype(generator):
    """One tensor of each dtype we write, names out of order, a scalar and an empty one among them."""
    values = torch.randn(5, 3, generator=generator)
    return {
        f"t{rank:02d}_{dtype}".replace("torch.", ""): (values * 10).to(dtype) if dtype != torch.bool else values > 0
        for rank, dtype in reversed(list(enumerate(sio.DTYPE_NAMES)))
    } | {"scalar": torch.tensor(2.5, dtype=torch.float16), "empty": torch.zeros(0, 4), "a_late": values[1:].t(), "offset": values[2:]}


def split(file_bytes: bytes) -> tuple[dict, bytes]:
    data_offset = 8 + int.from_bytes(file_bytes[:8], "little")
    return json.loads(file_bytes[8:data_offset]), file_bytes[data_offset:]


@pytest.mark.parametrize("metadata", [None, ODD_METADATA])
def test_layout_writes_what_the_library_writes(tmp_path, tensors, metadata):
    """Same bytes as safetensors.torch.save, but for the order of the metadata keys (the library's is a hash map's:
    it varies between runs), so the same header length and tensor layout, which the legacy hash depends on."""
    mixed = {**tensors, **every_dtype(torch.Generator().manual_seed(1))}
    library = safetensors.torch.save({k: v.contiguous() for k, v in mixed.items()}, metadata)
    path = tmp_path / "ours.safetensors"
    sio.save_tensors_atomic(path, mixed, metadata)
    ours = path.read_bytes()
    if metadata is None:
        assert ours == library
    (our_header, our_data), (their_header, their_data) = split(ours), split(library)
    assert len(ours) == len(library) and our_data == their_data
    assert our_header == their_header
    assert [k for k in our_header if k != "__metadata__"] == [k for k in their_header if k != "__metadata__"]
    assert list(our_header.get("__metadata__", {})) == sorted(metadata or {})


def test_layout_of_no_tensors():
    assert sio.TensorLayout({}).prefix() == safetensors.torch.save({})
    with_metadata = sio.TensorLayout({}).prefix({"a": "b"})
    assert json.loads(with_metadata[8:]) == {"__metadata__": {"a": "b"}}
    library = safetensors.torch.save({}, {"a": "b"})
    if library[8:].startswith(b"{},"):  # safetensors 0.3 (the WebUI's era) writes this case as invalid JSON
        return
    assert with_metadata == library


def test_hashes_are_kohyas_of_the_library_bytes(tmp_path, tensors):
    ss_fields = {"ss_network_dim": "4"}
    reference = safetensors.torch.save(tensors, ss_fields)  # what kohya hashes
    data_offset = 8 + int.from_bytes(reference[:8], "little")
    layout = sio.TensorLayout(tensors)
    assert len(reference) > 0x110000
    assert layout.model_hash() == hashlib.sha256(reference[data_offset:]).hexdigest()
    assert layout.legacy_hash(ss_fields) == hashlib.sha256(reference[0x100000:0x110000]).hexdigest()[:8]

    path = tmp_path / "net.safetensors"
    written = sio.save_hashed_atomic(path, layout, {**ss_fields, **ODD_METADATA}, ss_fields)
    with safetensors.safe_open(path, "pt") as file:
        assert file.metadata() == written
    assert written["sshs_model_hash"] == layout.model_hash() == sio.file_model_hash(path)
    assert written["sshs_legacy_hash"] == layout.legacy_hash(ss_fields)
    assert written["sshs_legacy_hash"] != sio.file_legacy_hash(path)  # the window moved with the longer header
    loaded = safetensors.torch.load_file(path)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    _, data_offset = sio.read_header(path)
    assert data_offset % 8 == 0
    assert sio.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sio.lora_short_hash(written["sshs_model_hash"]) == written["sshs_model_hash"][:12]


@pytest.mark.parametrize("header_bytes", [0x100000 - 1000, 0x100000 + 10])
def test_legacy_hash_window_reaching_into_a_long_header(tensors, header_bytes):
    metadata = {"ss_long": "x" * header_bytes}
    reference = safetensors.torch.save(tensors, metadata)
    expected = hashlib.sha256(reference[0x100000:0x110000]).hexdigest()[:8]
    assert sio.TensorLayout(tensors).legacy_hash(metadata) == expected


def test_short_or_failed_writes(tmp_path, tensors, monkeypatch):
    """writev may write less than asked: the rest follows; without writev (Windows) each buffer is written."""
    many = {f"m{i}": torch.randn(100 + i) for i in range(50)} | tensors
    expected = safetensors.torch.save(many, {"k": "v"})
    real_writev = sio.os.writev
    monkeypatch.setattr(sio.os, "writev", lambda fd, buffers: real_writev(fd, [bytes(buffers[0])[:777]]))
    sio.save_tensors_atomic(tmp_path / "short.safetensors", many, {"k": "v"})
    assert (tmp_path / "short.safetensors").read_bytes() == expected
    monkeypatch.setattr(sio, "_GATHER_LIMIT", 0)
    sio.save_tensors_atomic(tmp_path / "plain.safetensors", many, {"k": "v"})
    assert (tmp_path / "plain.safetensors").read_bytes() == expected


def test_unwritable_dtype_is_named(tmp_path):
    with pytest.raises(LorakitError) as excinfo:
        sio.save_tensors_atomic(tmp_path / "c.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})
    assert "tensor z: cannot write torch.complex64" in one_line_error_naming(tmp_path / "c.safetensors", excinfo)


def test_interrupted_save_leaves_old_file_and_no_temp(tmp_path, tensors, monkeypatch):
    path = tmp_path / "net.safetensors"
    sio.save_tensors_atomic(path, tensors, {"version": "old"})
    old_bytes = path.read_bytes()

    def disk_full(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sio.os, "fsync", disk_full)
    with pytest.raises(LorakitError) as excinfo:
        sio.save_tensors_atomic(path, {"x": torch.zeros(1000)}, {"version": "new"})
    assert os.strerror(errno.ENOSPC) in one_line_error_naming(path, excinfo)
    monkeypatch.undo()

    def chunks_then_interrupt():
        yield b"partial bytes"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sio.write_atomic(path, chunks_then_interrupt())

    assert path.read_bytes() == old_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.safetensors"]


def test_atomic_save_creates_readable_file_with_umask_permissions(tmp_path, tensors):
    path = tmp_path / "new.safetensors"
    sio.save_tensors_atomic(path, tensors, {"k": "v"})
    assert safetensors.torch.load_file(path).keys() == tensors.keys()
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
