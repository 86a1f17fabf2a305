"""safetensors_io: checked reads, atomic writes, and the hashes, against hashlib and the safetensors library."""

from __future__ import annotations

import argparse
import errno
import hashlib
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


def test_replace_metadata_keeps_tensor_bytes(tmp_path, tensors):
    original = sio.serialize(tensors, {"ss_a": "1"})
    path = tmp_path / "swapped.safetensors"
    sio.write_atomic(path, sio.replace_metadata(original, {"ss_a": "1", "modelspec.title": "ünïcode \"quoted\"\n"}))
    with safetensors.safe_open(path, "pt") as file:
        assert file.metadata() == {"ss_a": "1", "modelspec.title": "ünïcode \"quoted\"\n"}
    loaded = safetensors.torch.load_file(path)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    _, data_offset = sio.read_header(path)
    assert (data_offset - 8) % 8 == 0
    original_offset = 8 + int.from_bytes(original[:8], "little")
    assert path.read_bytes()[data_offset:] == original[original_offset:]


def test_hashes_against_hashlib(tmp_path, tensors):
    file_bytes = sio.serialize(tensors, {"ss_network_dim": "4"})
    model_hash, legacy_hash = sio.sshs_hashes(file_bytes)
    data_offset = 8 + int.from_bytes(file_bytes[:8], "little")
    assert model_hash == hashlib.sha256(file_bytes[data_offset:]).hexdigest()
    assert legacy_hash == hashlib.sha256(file_bytes[0x100000:0x110000]).hexdigest()[:8]
    assert len(file_bytes) > 0x110000

    path = tmp_path / "net.safetensors"
    sio.write_atomic(path, sio.replace_metadata(file_bytes, {"other": "metadata"}))
    assert sio.file_model_hash(path) == model_hash  # metadata does not change the model hash
    assert sio.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sio.file_legacy_hash(path) == hashlib.sha256(path.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    assert sio.lora_short_hash(model_hash) == model_hash[:12]


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
