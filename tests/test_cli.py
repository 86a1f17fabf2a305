"""The command line routes every public verb and turns user errors into one line and exit code 2."""

import subprocess
import sys

from lorakit_ext.cli import VERBS, main

PUBLIC_VERBS = {
    "info", "train", "copier", "difference", "slider", "merge", "merge-into", "extract", "resize", "demo", "ui",
}


def test_public_verbs_are_routed():
    assert PUBLIC_VERBS <= set(VERBS)


def test_help_lists_verbs_without_importing_them():
    result = subprocess.run([sys.executable, "-m", "lorakit_ext", "--help"], capture_output=True, text=True, check=True)
    for verb in PUBLIC_VERBS:
        assert verb in result.stdout
    probe = "import sys; from lorakit_ext.cli import build_parser_for; build_parser_for(['--help']); " \
            "print(sorted(m for m in sys.modules if m.startswith('lorakit_ext.')))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "lorakit_ext.train" not in loaded and "lorakit_ext.merge" not in loaded


def test_unknown_verb_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "lorakit_ext", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_user_error_is_one_line_and_exit_2(tmp_path, capsys):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    assert main(["info", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "broken.safetensors" in err


def test_an_unknown_option_shows_the_verbs_own_usage():
    result = subprocess.run([sys.executable, "-m", "lorakit_ext", "resize", "--model", "x.safetensors",
                             "--save_to", "y.safetensors", "--bogus"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: python -m lorakit_ext resize ")
    assert result.stderr.strip().endswith("python -m lorakit_ext resize: error: unrecognized arguments: --bogus")


def test_loading_the_toy_model_prints_nothing():
    """ldm's import-time pytorch_lightning deprecation warning is not the user's, so no command shows it."""
    code = "from lorakit_ext.toy.model import load_toy_model; load_toy_model()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (result.stdout, result.stderr) == ("", "")
