"""Files that are not what their name says: one line naming the file and what it is, for ``info`` and every verb
that reads it (a junk ``.pt``, a folder), or read as what it is (a safetensors file named ``.bin``)."""

import hashlib
import json

import pytest
import safetensors.torch
import torch

from lorakit_ext.errors import LorakitError
from lorakit_ext.formats import safetensors_io
from lorakit_ext.formats.kohya import load_network, save_network
from tests.test_merge_checkpoint import ATTN, CONV, TEXT, TOY, lora_for, target_table
from tests.test_merge_cli import run_cli

torch.set_num_threads(1)

# What a torch.load(weights_only=True) fails on with errors other than UnpicklingError: text, nothing, a pickle's
# protocol mark followed by junk, a zip's magic followed by junk.
JUNK = {"text": b"hi", "empty": b"", "pickle_mark": b"\x80\x02junk", "zip_magic": b"PK\x03\x04" + b"\0" * 40}


@pytest.fixture()
def lora(tmp_path):
    path = tmp_path / "good.safetensors"
    save_network(path, lora_for(target_table(safetensors_io.load_tensors(TOY), TOY), [ATTN, CONV, TEXT], 4, seed=1))
    return path


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin"])
@pytest.mark.parametrize("content", JUNK.values(), ids=JUNK.keys())
def test_junk_pickle_is_not_a_readable_checkpoint(capsys, tmp_path, lora, suffix, content):
    junk = tmp_path / f"junk{suffix}"
    junk.write_bytes(content)
    with pytest.raises(LorakitError) as excinfo:
        safetensors_io.load_file(junk)
    message = str(excinfo.value)
    assert message.startswith(f"{junk}: not a readable PyTorch checkpoint (") and "\n" not in message
    out = tmp_path / "out.safetensors"
    for argv in (
        ["info", junk],
        ["resize", "--model", junk, "--new_rank", 1, "--save_to", out],
        ["merge", "--models", junk, lora, "--save_to", out],
        ["merge-into", "--checkpoint", junk, "--models", lora, "--save_to", out],
        ["extract", "--base", TOY, "--tuned", junk, "--dim", 2, "--save_to", out],
    ):
        code, _, err = run_cli(capsys, *argv)
        assert (code, err) == (2, f"error: {message}\n"), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors", junk.name]


@pytest.mark.parametrize("name", ["loras", "net.safetensors", "net.pt"])
def test_a_folder_is_not_a_file(capsys, tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    with pytest.raises(LorakitError, match=rf"^{folder}: a folder, not a file$"):
        safetensors_io.load_file(folder)
    code, _, err = run_cli(capsys, "info", folder)
    assert (code, err) == (2, f"error: {folder}: a folder, not a file\n")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_safetensors_under_a_pickle_suffix_is_read_as_safetensors(capsys, tmp_path, lora, suffix):
    """Read, hashed by ``info`` and, having no hash metadata, hashed where a merge records it, as a .safetensors."""
    renamed = tmp_path / f"good{suffix}"
    safetensors.torch.save_file(safetensors_io.load_tensors(lora), renamed)
    model_hash = safetensors_io.file_model_hash(renamed)
    tensors, metadata = safetensors_io.load_file(renamed)
    assert metadata == {} and tensors.keys() == safetensors_io.load_tensors(lora).keys()
    code, info, err = run_cli(capsys, "info", renamed)
    assert code == 0 and err == "", err
    assert info["hashes"]["model_hash"] == model_hash
    assert info["hashes"]["sha256"] == hashlib.sha256(renamed.read_bytes()).hexdigest()
    out = tmp_path / "merged.safetensors"
    code, _, _ = run_cli(capsys, "merge", "--models", renamed, "--save_to", out)
    merged_from = json.loads(load_network(out).metadata["ss_merged_from"])
    assert code == 0 and merged_from[0]["sshs_model_hash"] == model_hash
