"""The ``ui`` verb refuses what gradio's launch or the first job would fail on (a port out of range or in use, a Lora
folder it cannot write, a ``--model`` that is no checkpoint) in one line, before gradio starts or a folder is made."""

from __future__ import annotations

import socket

import pytest
import torch
from safetensors.torch import save_file

from lorakit_ext.cli import main
from lorakit_ext.toy.model import CHECKPOINT_PATH
from lorakit_ext.ui import standalone


class Started(Exception):
    """Raised where the verb would build the gradio app: every check has passed."""


@pytest.fixture(autouse=True)
def no_gradio(monkeypatch):
    def refuse(host):
        raise Started

    monkeypatch.setattr(standalone, "build_app", refuse)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ui(tmp_path, *options: str) -> list[str]:
    return ["ui", "--lora-dir", str(tmp_path / "Lora"), "--port", str(free_port()), *options]


def refused(capsys, argv: list[str]) -> str:
    """The one-line message of a refused ``ui`` run (exit code 2)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_the_checks_pass_for_the_toy_model_and_make_the_lora_folder(tmp_path):
    with pytest.raises(Started):
        main(ui(tmp_path, "--model", str(CHECKPOINT_PATH)))
    assert (tmp_path / "Lora" / standalone.OUTPUT_SUBFOLDER).is_dir()


@pytest.mark.parametrize("port", ["0", "-1", "65536", "99999"])
def test_a_port_out_of_range_is_refused(tmp_path, capsys, port):
    argv = [*ui(tmp_path), "--port", port]
    assert refused(capsys, argv) == f"error: --port must be between 1 and 65535, got {port}"
    assert not (tmp_path / "Lora").exists()


def test_a_port_in_use_is_refused(tmp_path, capsys):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        argv = [*ui(tmp_path), "--port", str(port)]
        assert refused(capsys, argv) == f"error: port {port} is in use: pick another with --port"
    assert not (tmp_path / "Lora").exists()


def test_a_lora_dir_that_is_a_file_is_refused(tmp_path, capsys):
    occupied = tmp_path / "good.safetensors"
    occupied.write_bytes(b"x")
    argv = [*ui(tmp_path), "--lora-dir", str(occupied)]
    assert refused(capsys, argv) == f"error: --lora-dir {occupied}: a file, not a folder"
    argv = [*ui(tmp_path), "--lora-dir", str(occupied / "Lora")]
    assert refused(capsys, argv) == f"error: --lora-dir {occupied / 'Lora'}: {occupied} is a file, not a folder"
    assert occupied.read_bytes() == b"x" and sorted(tmp_path.iterdir()) == [occupied]


def test_a_read_only_lora_dir_is_refused(tmp_path, capsys, deny_writes_in):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    deny_writes_in(read_only)
    for lora_dir in (read_only, read_only / "Lora"):
        argv = [*ui(tmp_path), "--lora-dir", str(lora_dir)]
        assert refused(capsys, argv) == f"error: --lora-dir {lora_dir}: cannot write there (permission denied)"
    assert list(read_only.iterdir()) == []


def test_a_model_that_is_no_checkpoint_is_refused_at_start(tmp_path, capsys):
    lora = tmp_path / "good.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, lora)
    lora.with_suffix(".yaml").write_text("model: {}\n")  # a yaml beside it does not make it a checkpoint
    assert refused(capsys, ui(tmp_path, "--model", str(lora))).startswith(
        f"error: --model {lora}: not an SD1/SD2/SDXL single-file checkpoint"
    )
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(CHECKPOINT_PATH.read_bytes()[:64])
    expected = f"error: --model {pickled}: not a .safetensors checkpoint (the only kind the app loads)"
    assert refused(capsys, ui(tmp_path, "--model", str(pickled))) == expected
    lone = tmp_path / "toy.safetensors"
    lone.symlink_to(CHECKPOINT_PATH)
    expected = f"error: --model {lone}: the ldm config toy.yaml must sit beside the checkpoint"
    assert refused(capsys, ui(tmp_path, "--model", str(lone))) == expected
    assert not (tmp_path / "Lora").exists()
