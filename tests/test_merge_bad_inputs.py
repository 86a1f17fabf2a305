"""Bad input to the merge verbs is one line naming the problem, exit 2, refused before any file is read or written,
and never replaces an input: an output that is an input, a non-.safetensors output, NaN/Inf ratios, rank 0."""

import hashlib
import json
import math

import pytest
import safetensors.torch
import torch

from lorakit_ext.errors import LorakitError
from lorakit_ext.formats import safetensors_io
from lorakit_ext.formats.kohya import load_network, save_network
from lorakit_ext.merge.algebra import merge_networks
from lorakit_ext.merge.checkpoint import merge_into_checkpoint
from tests.test_merge_checkpoint import ATTN, CONV, TEXT, TOY, lora_for, target_table
from tests.test_merge_cli import run_cli

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def table():
    return target_table(safetensors.torch.load_file(TOY), TOY)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, table):
    """The toy checkpoint with one LoRA merged in."""
    path = tmp_path_factory.mktemp("tuned") / "tuned.safetensors"
    merge_into_checkpoint(TOY, [lora_for(table, [ATTN], rank=2, seed=3)], [1.0], path)
    return path


@pytest.fixture()
def folder(tmp_path, table, tuned, monkeypatch):
    """tmp_path as the working folder, holding two LoRAs, a and b, and links to two checkpoints, base and tuned."""
    monkeypatch.chdir(tmp_path)
    for seed, name in ((1, "b"), (2, "a")):
        save_network(tmp_path / f"{name}.safetensors", lora_for(table, [ATTN, CONV, TEXT], rank=4, seed=seed))
    (tmp_path / "ck.safetensors").symlink_to(TOY)
    (tmp_path / "tuned.safetensors").symlink_to(tuned)
    (tmp_path / "link_to_a.safetensors").symlink_to(tmp_path / "a.safetensors")
    return tmp_path


def snapshot(folder) -> dict[str, str]:
    """Each entry of ``folder`` with the sha256 of its bytes (through links) and where a link points; a folder's
    entries likewise."""
    return {
        p.name: sorted(snapshot(p).items()) if p.is_dir() else
        hashlib.sha256(p.read_bytes()).hexdigest() + (f" -> {p.readlink()}" if p.is_symlink() else "")
        for p in sorted(folder.iterdir())
    }


@pytest.fixture()
def no_reads(monkeypatch):
    """Fail the test if any tensor file is read: the refusals below must come before any work."""

    def refuse(path):
        raise AssertionError(f"read {path} before refusing")

    monkeypatch.setattr(safetensors_io, "load_file", refuse)


def assert_refused(capsys, folder, argv, message):
    before = snapshot(folder)
    code, _, err = run_cli(capsys, *argv)
    assert (code, err) == (2, f"error: {message}\n"), argv
    assert snapshot(folder) == before


EXTRACT = ["extract", "--base", "ck.safetensors", "--tuned", "tuned.safetensors", "--dim", 2]
MERGE_INTO = ["merge-into", "--checkpoint", "ck.safetensors", "--models", "b.safetensors"]
MERGE = ["merge", "--models", "b.safetensors", "a.safetensors"]
RESIZE = ["resize", "--model", "b.safetensors", "--new_rank", 1]


@pytest.mark.parametrize(
    ("argv", "save_to", "flag"),
    [
        (EXTRACT, "ck.safetensors", "--base"),
        (EXTRACT, "tuned.safetensors", "--tuned"),
        (MERGE_INTO, "ck.safetensors", "--checkpoint"),
        (MERGE_INTO, "b.safetensors", "--models"),
        (MERGE, "b.safetensors", "--models"),
        (MERGE, "./a.safetensors", "--models"),
        (MERGE, "link_to_a.safetensors", "--models"),
        (RESIZE, "b.safetensors", "--model"),
    ],
)
def test_save_to_an_input_is_refused_before_any_work(capsys, folder, no_reads, argv, save_to, flag):
    message = f"--save_to {save_to} is one of the inputs ({flag}); write to another file"
    assert_refused(capsys, folder, [*argv, "--save_to", save_to], message)


def test_merge_into_refuses_to_replace_an_input_itself(folder):
    """The WebUI's merge-into calls the core without the CLI's checks: the core refuses too."""
    lora = load_network(folder / "b.safetensors")
    before = snapshot(folder)
    for save_to, flag in ((folder / "ck.safetensors", "--checkpoint"), (folder / "b.safetensors", "--models")):
        with pytest.raises(LorakitError) as excinfo:
            merge_into_checkpoint(folder / "ck.safetensors", [lora], [1.0], save_to)
        assert str(excinfo.value) == f"--save_to {save_to} is one of the inputs ({flag}); write to another file"
    assert snapshot(folder) == before


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin", ".pth", ""])
def test_save_to_must_be_safetensors(capsys, folder, no_reads, suffix):
    save_to = f"l{suffix}"
    for argv in (MERGE, MERGE_INTO, EXTRACT, RESIZE):
        message = f"--save_to {save_to}: must end in .safetensors (the only format written)"
        assert_refused(capsys, folder, [*argv, "--save_to", save_to], message)


def test_save_to_in_a_missing_or_unwritable_folder_is_refused_up_front(capsys, folder, no_reads, deny_writes_in):
    for argv in (MERGE, MERGE_INTO, EXTRACT, RESIZE):
        message = "--save_to nowhere/l.safetensors: folder nowhere does not exist"
        assert_refused(capsys, folder, [*argv, "--save_to", "nowhere/l.safetensors"], message)
    (folder / "d.safetensors").mkdir()
    for argv in (MERGE, MERGE_INTO, EXTRACT, RESIZE):
        assert_refused(capsys, folder, [*argv, "--save_to", "d.safetensors"], "--save_to d.safetensors: a folder, not a file")
    (folder / "ro").mkdir()
    deny_writes_in(folder / "ro")
    for argv in (MERGE, MERGE_INTO, EXTRACT, RESIZE):
        message = "--save_to ro: cannot write there (permission denied)"
        assert_refused(capsys, folder, [*argv, "--save_to", "ro/l.safetensors"], message)


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        ([*MERGE, "--ratios", 1, "nan"], "nan"),
        ([*MERGE, "--ratios", "inf", 1, "--new_rank", 2], "inf"),
        ([*MERGE_INTO, "--ratios", "nan"], "nan"),
    ],
)
def test_non_finite_ratios_are_refused_up_front(capsys, folder, no_reads, argv, shown):
    assert_refused(capsys, folder, [*argv, "--save_to", "out.safetensors"], f"--ratios: {shown} is not a finite number")


def test_merge_core_refuses_non_finite_ratios(folder):
    """The WebUI's merge reaches the core with ratios the CLI never saw."""
    lora = load_network(folder / "b.safetensors")
    with pytest.raises(LorakitError, match=r"^--ratios: inf is not a finite number$"):
        merge_networks([lora, lora], [1.0, math.inf])


def test_rank_zero_module_is_refused_when_loaded(capsys, folder, table):
    """A module whose factors are empty cannot be merged or resized: named with its file as the file is read."""
    rows, columns = table[ATTN][2]
    tensors = safetensors.torch.load_file(folder / "b.safetensors")
    tensors[f"{ATTN}.lora_down.weight"] = torch.zeros(0, columns)
    tensors[f"{ATTN}.lora_up.weight"] = torch.zeros(rows, 0)
    safetensors.torch.save_file(tensors, folder / "rank0.safetensors")
    message = f"rank0.safetensors: module {ATTN}: lora_down.weight (0, {columns}) is empty (rank 0)"
    for argv in (
        ["info", "rank0.safetensors"],
        ["merge", "--models", "rank0.safetensors", "a.safetensors", "--save_to", "out.safetensors"],
        ["resize", "--model", "rank0.safetensors", "--new_rank", 1, "--save_to", "out.safetensors"],
        [*MERGE_INTO[:-1], "rank0.safetensors", "--save_to", "out.safetensors"],
    ):
        assert_refused(capsys, folder, argv, message)


def test_a_good_merge_still_runs(capsys, folder):
    """The checks refuse only what they should: a fresh output beside the inputs is written."""
    code, summary, _ = run_cli(capsys, *MERGE, "--save_to", "ab.safetensors")
    assert code == 0 and summary["modules"] == 3
    merged_from = json.loads(load_network(folder / "ab.safetensors").metadata["ss_merged_from"])
    assert [m["file"] for m in merged_from] == ["b.safetensors", "a.safetensors"]
