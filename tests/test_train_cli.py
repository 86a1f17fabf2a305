"""``python -m lorakit_ext train``: TOML + flag overrides, --dry-run's plan, one-line errors."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lorakit_ext.cli import main


@pytest.fixture
def dataset(tmp_path):
    for concept, count in (("3_red", 2), ("1_blue", 1)):
        folder = tmp_path / "data" / concept
        folder.mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", (64, 64), concept.split("_")[1]).save(folder / f"{index}.png")
            (folder / f"{index}.txt").write_text(f"a {concept.split('_')[1]} square")
    return tmp_path / "data"


def test_dry_run_prints_the_resolved_plan(tmp_path, dataset, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        f'[dataset_arguments]\ntrain_data_dir = "{dataset}"\nresolution = 64\n'
        "[training_arguments]\nmax_train_epochs = 4\ntrain_batch_size = 2\n"
    )
    code = main(["train", "--config", str(config), "--dry-run", "--network_dim", "8", "--network_algo", "locon",
                 "--conv_dim", "4", "--gradient_accumulation_steps", "1", "--flip_aug"])
    out = capsys.readouterr().out
    assert code == 0, out
    plan = json.loads(out)
    assert plan["dataset"]["images_with_repeats"] == 7
    assert plan["max_train_steps"] == plan["epochs"] * plan["steps_per_epoch"] and plan["epochs"] == 4
    assert plan["modules"]["unet"] > 0 and plan["modules"].get("te", 0) > 0
    assert plan["parameters"] > 0 and plan["network_bytes"] == plan["parameters"] * 2


def test_bad_options_fail_with_one_line(tmp_path, dataset, capsys):
    code = main(["train", "--train_data_dir", str(dataset), "--resolution", "64", "--lr_scheduler", "cosine_warm", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: lr_scheduler must be one of") and err.count("\n") == 1
    code = main(["train", "--train_data_dir", str(dataset), "--network_dim", "x", "--dry-run"])
    assert code == 2 and "network_dim = 'x' is not a valid int" in capsys.readouterr().err
    code = main(["train", "--config", str(tmp_path / "missing.toml")])
    assert code == 2 and "missing.toml: cannot read" in capsys.readouterr().err


def test_model_flag_loads_an_ldm_checkpoint_with_its_yaml(tmp_path, dataset, capsys):
    from lorakit_ext.toy.export import export_checkpoint

    checkpoint = export_checkpoint(tmp_path / "models")
    base = ["train", "--train_data_dir", str(dataset), "--resolution", "64", "--dry-run"]
    assert main(base + ["--model", str(checkpoint)]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main(base) == 0
    assert from_file == json.loads(capsys.readouterr().out)
    checkpoint.with_suffix(".yaml").unlink()
    assert main(base + ["--model", str(checkpoint)]) == 2
    assert "toy_sd1.yaml must sit beside the checkpoint" in capsys.readouterr().err


def test_trained_file_names_and_hashes_the_model_it_was_trained_on(tmp_path, dataset, capsys):
    import hashlib

    from lorakit_ext.formats.kohya import load_network
    from lorakit_ext.toy.export import export_checkpoint

    checkpoint = export_checkpoint(tmp_path / "models")
    out = tmp_path / "out"
    code = main(["train", "--train_data_dir", str(dataset), "--resolution", "64", "--max_train_steps", "1",
                 "--network_train_unet_only", "--output_dir", str(out), "--model", str(checkpoint)])
    assert code == 0, capsys.readouterr().err
    metadata = load_network(out / "lora.safetensors").metadata
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert metadata["ss_sd_model_name"] == checkpoint.name
    assert metadata["ss_sd_model_hash"] == sha256[:10]  # the WebUI's "Model hash" of the checkpoint
    assert metadata["ss_new_sd_model_hash"] == sha256


def test_model_source_prefers_the_hosts_hash_and_a_folder_has_none(tmp_path):
    from lorakit_ext.train.model_source import ModelSource

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"x" * 100)
    assert ModelSource(checkpoint, known_hash="abcdef0123").metadata() == {
        "ss_sd_model_name": "model.safetensors", "ss_sd_model_hash": "abcdef0123"}  # the file is not hashed
    assert ModelSource(tmp_path).metadata() == {"ss_sd_model_name": tmp_path.name}  # a diffusers folder


def test_a_kohya_v_parameterization_flag_on_the_eps_toy_model_is_refused(dataset, capsys):
    code = main(["train", "--train_data_dir", str(dataset), "--resolution", "64", "--v_parameterization", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: v_parameterization = true, but the model (sd1) predicts eps")
    assert err.count("\n") == 1


def test_files_that_would_fail_later_are_refused_by_the_dry_run(tmp_path, dataset, capsys):
    """An output folder that is a file, a prompt file that is not UTF-8 or has a bad option: a run would find these
    only after training, or at its first sample."""
    base = ["train", "--train_data_dir", str(dataset), "--resolution", "64", "--dry-run"]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main([*base, "--output_dir", str(blocker / "sub")]) == 2
    assert capsys.readouterr().err.strip() == f"error: output_dir {blocker / 'sub'}: {blocker} is a file, not a folder"
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"a red square\n\xff\xfe\n")
    assert main([*base, "--sample_prompts", str(binary), "--sample_every_n_steps", "1"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {binary}: the sample prompts are not UTF-8 text (byte 13)"
    binary.write_text("a red square --w abc\n")
    assert main([*base, "--sample_prompts", str(binary), "--sample_every_n_steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {binary}:1") and "\n" not in err


def test_images_without_a_caption_file_are_named_in_the_warnings(tmp_path, dataset, capsys):
    (dataset / "3_red" / "1.txt").unlink()
    code = main(["train", "--train_data_dir", str(dataset), "--resolution", "64", "--dry-run"])
    assert code == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert warnings == [
        f"1 of 2 images in {dataset / '3_red'} have no caption file: they train on the folder's name 'red'"]
    code = main(["train", "--train_data_dir", str(dataset), "--resolution", "64", "--default_caption", "x", "--dry-run"])
    assert code == 0 and json.loads(capsys.readouterr().out)["warnings"] == []  # a default caption is meant


def test_a_resume_folder_that_holds_no_state_is_refused_by_the_dry_run(tmp_path, dataset, capsys):
    empty = tmp_path / "state"
    empty.mkdir()
    code = main(["train", "--train_data_dir", str(dataset), "--resolution", "64", "--resume", str(empty), "--dry-run"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: resume: {empty} is not a state folder (no state.json)"


def test_masked_loss_on_images_without_a_mask_is_named_in_the_warnings(tmp_path, dataset, capsys):
    Image.new("RGBA", (64, 64), (0, 0, 255, 128)).save(dataset / "1_blue" / "0.png")  # its alpha is its mask
    code = main(["train", "--train_data_dir", str(dataset), "--resolution", "64", "--masked_loss", "--dry-run"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == [
        f"masked_loss: 2 of 2 images in {dataset / '3_red'} have no mask (no mask_dir file, no alpha channel):"
        " they train on every pixel"]
