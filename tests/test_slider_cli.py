"""The copier / difference / slider verbs: options resolve to the slider recipe, and user errors are one line."""

from __future__ import annotations

import json

import pytest

from lorakit_ext.cli import main
from lorakit_ext.slider.demo import toy_pair_set
from lorakit_ext.slider.methods import SLIDER_DEFAULTS


@pytest.fixture
def pairs(tmp_path):
    toy_pair_set(tmp_path / "pairs")
    return tmp_path / "pairs"


def test_dry_run_shows_the_recipe_with_toml_and_flags_laid_over_it(pairs, tmp_path, capsys):
    toml = tmp_path / "slider.toml"
    toml.write_text("[training]\nmax_train_steps = 321\n[network]\nnetwork_dim = 16\nnetwork_alpha = 16\n")
    code = main(["copier", "--a", str(pairs / "A"), "--b", str(pairs / "B"), "--out", str(tmp_path / "s.safetensors"),
                 "--config", str(toml), "--learning_rate", "5e-4", "--dry-run"])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    config = plan["config"]
    assert plan["pairs"] == ["circle_black.png", "circle_gray.png", "circle_white.png"] and plan["method"] == "copier"
    assert config["max_train_steps"] == 321 and config["network_dim"] == 16 and config["learning_rate"] == 5e-4
    assert config["lr_scheduler"] == SLIDER_DEFAULTS["lr_scheduler"] and config["noise_offset"] == 0.1
    assert config["network_train_unet_only"] is True and config["resolution"] == [64, 64]
    assert plan["report"]["prompts"][0] == ""  # the recipe's empty caption: the trained prompt leads the report

    code = main(["copier", "--a", str(pairs / "A"), "--b", str(pairs / "B"), "--out", str(tmp_path / "s.safetensors"),
                 "--default_caption", "a red circle", "--dry-run"])
    assert code == 0 and json.loads(capsys.readouterr().out)["report"]["prompts"][0] == "a red circle"


def test_toml_options_at_the_engines_defaults_still_win_over_the_recipe(pairs, tmp_path, capsys):
    """A file that names ``lr_scheduler = "constant"`` (the engine's default, not the recipe's) gets it."""
    toml = tmp_path / "slider.toml"
    toml.write_text('[optimizer]\nlr_scheduler = "constant"\nlearning_rate = 1e-4\n')
    assert SLIDER_DEFAULTS["lr_scheduler"] != "constant" and SLIDER_DEFAULTS["learning_rate"] != 1e-4
    code = main(["copier", "--a", str(pairs / "A"), "--b", str(pairs / "B"), "--out", str(tmp_path / "s.safetensors"),
                 "--config", str(toml), "--dry-run"])
    assert code == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert config["lr_scheduler"] == "constant" and config["learning_rate"] == 1e-4
    assert config["noise_offset"] == SLIDER_DEFAULTS["noise_offset"]  # what the file does not name stays the recipe's

    toml.write_text("[training]\nlearning_rat = 1e-4\n")
    assert main(["copier", "--a", str(pairs / "A"), "--b", str(pairs / "B"), "--out", str(tmp_path / "s.safetensors"),
                 "--config", str(toml), "--dry-run"]) == 2
    assert str(toml) in capsys.readouterr().err  # a bad key in the file names the file


@pytest.mark.parametrize("verb", ["copier", "difference", "slider"])
def test_bad_inputs_are_one_line_errors(verb, pairs, tmp_path, capsys):
    assert main([verb, "--a", str(pairs / "A"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == "error: --a and --b go together"
    assert main([verb, "--pairs", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --pairs") and "nowhere" in err and "\n" not in err


@pytest.mark.parametrize("verb, options, message", [
    ("difference", ["--anchor", "1e-3"],
     "error: --anchor holds B near A's weights, so B must start from them: add --b-from-a"),
    ("difference", ["--b-from-a", "--anchor", "-1"], "error: --anchor must be a number 0 or above, got -1.0"),
    ("difference", ["--rank", "0"], "error: --rank must be at least 1, got 0"),
    ("copier", ["--anchor", "nan"], "error: --anchor must be a number 0 or above, got nan"),
    ("copier", ["--ensemble", "0"], "error: --ensemble must be at least 1, got 0"),
    ("copier", ["--verify-seeds", "0"], "error: --verify-seeds must be at least 1, got 0"),
    ("slider", ["--weight", "0"], "error: --weight must be a positive number, got 0.0"),
    ("slider", ["--weight", "nan"], "error: --weight must be a positive number, got nan"),
    ("copier", ["--report-steps", "0"], "error: --report-steps must be between 1 and 1000, got 0"),
    ("difference", ["--report-cfg-scale", "nan"], "error: --report-cfg-scale must be a number 0 or above, got nan"),
    ("slider", ["--report-weights", "-1", "0", "inf"], "error: --report-weights must be numbers, got [-1.0, 0.0, inf]"),
])
def test_method_options_that_cannot_work_are_refused_before_anything_runs(verb, options, message, pairs, tmp_path,
                                                                            capsys):
    out = tmp_path / "x.safetensors"
    code = main([verb, "--a", str(pairs / "A"), "--b", str(pairs / "B"), "--out", str(out), *options, "--dry-run"])
    assert code == 2 and capsys.readouterr().err.strip() == message and not out.exists()


def test_output_and_lora_a_files_that_cannot_work_are_refused_before_anything_runs(pairs, tmp_path, capsys):
    """--dry-run checks them too: a run must not train for hours and then fail to write, or lose LoRA A."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    pickle = tmp_path / "pickle.safetensors"
    pickle.write_bytes(b"\x80\x04K\x01.")
    out = tmp_path / "s.safetensors"
    cases = [
        (["--out", str(tmp_path / "s.txt")],
         f"error: --out {tmp_path / 's.txt'}: must end in .safetensors (the only format written)"),
        (["--out", str(blocker / "s.safetensors")],
         f"error: --out {blocker / 's.safetensors'}: folder {blocker} does not exist"),
        (["--out", str(out), "--keep-a", str(out)],
         "error: --keep-a s.safetensors is the slider's own file (--out): give A another name"),
        (["--out", str(out), "--keep-a", str(tmp_path / "." / "s.safetensors")],
         "error: --keep-a s.safetensors is the slider's own file (--out): give A another name"),
        (["--out", str(out), "--keep-a", str(tmp_path / "a.safetensors"), "--reuse-a", str(out)],
         "error: --keep-a: A is reused (--reuse-a), so there is no trained A to keep"),
        (["--out", str(tmp_path / "a_link.safetensors"), "--reuse-a", str(pickle)],
         "error: --reuse-a pickle.safetensors is the slider's own file (--out): write the slider to another file"),
        (["--out", str(out), "--reuse-a", str(tmp_path / "nope.safetensors")],
         f"error: --reuse-a {tmp_path / 'nope.safetensors'}: no such file"),
    ]
    (tmp_path / "a_link.safetensors").symlink_to(pickle)
    folder = tmp_path / "a_folder.safetensors"
    folder.mkdir()
    cases.append((["--out", str(folder)], f"error: --out {folder}: a folder, not a file"))
    for options, message in cases:
        code = main(["copier", "--a", str(pairs / "A"), "--b", str(pairs / "B"), *options, "--dry-run"])
        assert (code, capsys.readouterr().err.strip()) == (2, message)
    code = main(["copier", "--a", str(pairs / "A"), "--b", str(pairs / "B"), "--out", str(out), "--reuse-a",
                 str(pickle), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {pickle}") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a_file", "a_folder.safetensors", "a_link.safetensors", "pairs", "pickle.safetensors"]


def test_an_output_folder_that_cannot_be_written_is_refused_before_anything_runs(pairs, tmp_path, capsys,
                                                                                  deny_writes_in):
    deny_writes_in(tmp_path)
    out = tmp_path / "s.safetensors"
    code = main(["slider", "--a", str(pairs / "A"), "--b", str(pairs / "B"), "--out", str(out), "--dry-run"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: --out {tmp_path}: cannot write there (permission denied)"


def test_pairs_whose_b_images_equal_their_a_images_are_refused(pairs, capsys, tmp_path):
    code = main(["copier", "--a", str(pairs / "A"), "--b", str(pairs / "A"), "--out", str(tmp_path / "s.safetensors"),
                 "--dry-run"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --a {pairs / 'A'} / --b {pairs / 'A'}: every B image equals its A image: nothing for a slider to learn")
