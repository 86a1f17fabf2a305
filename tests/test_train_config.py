"""TrainConfig: kohya names, coercion, validation messages, dict/TOML round trips, the documented schema."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from lorakit_ext.errors import LorakitError
from lorakit_ext.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_kohya_sectioned_toml_loads_flattened(tmp_path):
    path = tmp_path / "kohya.toml"
    path.write_text(
        '[additional_network_arguments]\nnetwork_dim = 16\nnetwork_alpha = 8\nnetwork_args = ["conv_dim=4", "algo=locon"]\n'
        '[optimizer_arguments]\noptimizer_type = "Lion"\nlearning_rate = 3e-5\noptimizer_args = ["weight_decay=0.1"]\n'
        '[dataset_arguments]\nresolution = "512,768"\n'
    )
    config = TrainConfig.load_toml(path)
    assert (config.network_dim, config.network_alpha, config.optimizer_type) == (16, 8.0, "Lion")
    assert config.resolution == (512, 768)
    assert config.network_algo_resolved() == "locon"
    assert config.conv_resolved() == (4, 1.0)
    assert config.optimizer_args == ["weight_decay=0.1"]


def test_strings_from_cli_and_ui_are_coerced():
    config = TrainConfig().with_overrides(
        {"learning_rate": "1e-4", "max_train_epochs": "3", "flip_aug": "true", "resolution": "64", "conv_dim": ""}
    )
    assert config.learning_rate == 1e-4 and config.max_train_epochs == 3 and config.flip_aug is True
    assert config.resolution == (64, 64) and config.conv_dim is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"learnig_rate": 1.0}, "unknown option 'learnig_rate' (did you mean 'learning_rate'?)"),
        ({"network_dim": "four"}, "network_dim = 'four' is not a valid int"),
        ({"train_batch_size": 1.5}, "train_batch_size = 1.5 is not a valid int"),
    ],
)
def test_bad_values_are_refused_by_name(values, message):
    with pytest.raises(LorakitError, match=re.escape(message)):
        TrainConfig.from_dict(values)


@pytest.mark.parametrize(
    "option, value, fragment",
    [
        ("lr_scheduler", "cosine_warm", "lr_scheduler must be one of"),
        ("optimizer_type", "Adam", "optimizer_type must be one of"),
        ("min_timestep", 1000, "min_timestep/max_timestep"),
        ("mixed_precision", "fp8", "mixed_precision must be"),
        ("network_dropout", 1.0, "network_dropout must be in [0, 1)"),
        ("resume", "/no/such/state", "resume state folder /no/such/state not found"),
        ("sample_every_n_steps", 10, "sample_prompts is needed"),
    ],
)
def test_validate_names_the_option(tmp_path, option, value, fragment):
    (tmp_path / "1_x").mkdir()
    config = TrainConfig(train_data_dir=str(tmp_path)).with_overrides({option: value})
    with pytest.raises(LorakitError) as error:
        config.validate()
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_text_encoder_cache_needs_a_frozen_text_encoder(tmp_path):
    config = TrainConfig(train_data_dir=str(tmp_path), cache_text_encoder_outputs=True)
    with pytest.raises(LorakitError, match="cache_text_encoder_outputs needs a frozen text encoder"):
        config.validate()


def test_dict_and_toml_round_trip(tmp_path):
    config = TrainConfig(
        train_data_dir="data", resolution=(64, 96), optimizer_args=["betas=0.9,0.99"], min_snr_gamma=5.0, caption_prefix='a "b"'
    )
    assert TrainConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "round.toml"
    path.write_text(config.to_toml())
    assert TrainConfig.load_toml(path) == config


def test_multires_discount_without_iterations_warns():
    assert any("multires_noise_iterations is 0" in w for w in TrainConfig(multires_noise_discount=0.5).warnings())
    assert not TrainConfig(multires_noise_discount=0.5, multires_noise_iterations=6).warnings()
    assert not TrainConfig().warnings()


def test_docs_table_lists_every_option_with_its_default():
    from lorakit_ext.train.config import schema_markdown

    text = (ROOT / "docs" / "train-config.md").read_text()
    assert schema_markdown() in text, "docs/train-config.md is stale: regenerate the table from schema_markdown()"
    for option in fields(TrainConfig):
        assert f"`{option.name}`" in text


def test_example_configs_validate_against_the_schema():
    examples = sorted((ROOT / "examples").glob("*.toml"))
    assert examples
    for path in examples:
        config = TrainConfig.load_toml(path)
        assert config.output_name


def test_train_modules_import_without_the_cli_extras():
    """The WebUI has no diffusers/peft and an old transformers: the training core must not import them."""
    import subprocess
    import sys

    modules = ["config", "optim", "prompts", "state", "job", "trainer", "cli"]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module('lorakit_ext.train.' + name)\n"
        "extras = [m for m in ('diffusers', 'peft', 'transformers') if m in sys.modules]\n"
        "sys.exit(f'imported {extras}' if extras else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr or result.stdout
