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
        # what JSON and TOML can send: non-finite numbers, booleans, lists and unclosed literals are no values
        ({"max_train_steps": float("inf")}, "max_train_steps = inf is not a valid int"),
        ({"max_train_steps": "1e400"}, "max_train_steps = '1e400' is not a valid int"),
        ({"resolution": float("inf")}, "resolution = inf is not a valid tuple"),
        ({"network_alpha": float("inf")}, "network_alpha = inf is not a valid float"),
        ({"learning_rate": float("nan")}, "learning_rate = nan is not a valid float"),
        ({"max_train_steps": True}, "max_train_steps = True is not a valid int"),
        ({"cache_latents": 5}, "cache_latents = 5 is not a valid bool"),
        ({"output_name": ["x"]}, "output_name = ['x'] is not a valid str"),
        ({"network_args": "["}, "network_args = '[' is not a valid list"),
        ({"network_args": "[" * 100000}, "network_args = '" + "[" * 39 + "... is not a valid list"),
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
        ("network_dim", 10**9, "network_dim must be between 1 and 4096"),
        ("conv_dim", 5000, "conv_dim must be between 0 and 4096"),
        ("seed", 10**30, "seed must be between 0 and 4294967295"),
        ("optimizer_type", "this.Optimizer", "optimizer_type this.Optimizer: a dotted class must come from torch,"),
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
    from lorakit_ext.train.kohya_keys import DIFFERENT_RESULT, NO_EFFECT

    for key in [*NO_EFFECT, *DIFFERENT_RESULT]:  # the kohya options accepted or refused are listed too
        assert f"`{key}`" in text, key


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


# A kohya_ss GUI / sd-scripts `--config_file` export for a LyCORIS LoCon run, keys as kohya documents them.
KOHYA_TOML = """
[model_arguments]
pretrained_model_name_or_path = "{model}"
v2 = false
v_parameterization = false

[additional_network_arguments]
network_module = "lycoris.kohya"
network_dim = 16
network_alpha = 8
network_args = ["algo=locon", "conv_dim=8", "conv_alpha=4", "use_tucker=False", "preset=full", "module_dropout=0.1"]
network_train_unet_only = true
unet_lr = 1e-4
text_encoder_lr = 5e-5

[optimizer_arguments]
optimizer_type = "AdamW"
learning_rate = 1e-4
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 3
lr_warmup_steps = 100
max_grad_norm = 1.0

[dataset_arguments]
train_data_dir = "{data}"
resolution = "512,512"
caption_extension = ".txt"
cache_latents = true
cache_latents_to_disk = true
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
bucket_reso_steps = 64
shuffle_caption = true
keep_tokens = 1
color_aug = false
random_crop = false
max_token_length = 75
max_data_loader_n_workers = 0
persistent_data_loader_workers = true

[training_arguments]
output_dir = "{out}"
output_name = "my_locon"
save_model_as = "safetensors"
save_precision = "fp16"
save_every_n_epochs = 1
train_batch_size = 2
max_train_epochs = 10
mixed_precision = "bf16"
xformers = true
sdpa = false
mem_eff_attn = false
gradient_checkpointing = true
clip_skip = 1
seed = 1234
sample_sampler = "euler_a"
noise_offset = 0.05
min_snr_gamma = 5
logging_dir = "{out}/logs"
log_with = "tensorboard"
lowram = false
"""


def _kohya_file(tmp_path, text=KOHYA_TOML):
    (tmp_path / "data" / "10_subject").mkdir(parents=True)
    path = tmp_path / "kohya.toml"
    path.write_text(text.format(model=tmp_path / "model.safetensors", data=tmp_path / "data", out=tmp_path / "out"))
    return path


def test_a_kohya_gui_toml_loads_mapped_with_one_note_per_ignored_key(tmp_path):
    config = TrainConfig.load_toml(_kohya_file(tmp_path))
    assert config.network_algo == "locon" and config.network_algo_resolved() == "locon"
    assert config.conv_resolved() == (8, 4.0) and config.dropouts_resolved() == (0.0, 0.0, 0.1)
    assert (config.network_dim, config.network_alpha, config.lr_scheduler_num_cycles) == (16, 8.0, 3)
    assert config.output_name == "my_locon" and config.output_dir == str(tmp_path / "out")
    assert config.pretrained_model_name_or_path == str(tmp_path / "model.safetensors")
    assert (config.v2, config.v_parameterization, config.sdxl) == (False, False, None)
    notes = config.warnings()
    ignored = ["log_with", "logging_dir", "persistent_data_loader_workers", "xformers"]  # the ones set (not false/0)
    assert sorted(n.split(":")[0] for n in notes if ": ignored, " in n) == ignored
    assert "xformers: ignored, attention is chosen by the host" in notes
    assert config.sample_sampler == "euler"
    assert "sample_sampler euler_a: samples are drawn with euler (lorakit has euler and ddim)" in notes
    assert all("\n" not in n for n in notes)
    config.with_overrides({"learning_rate": 2e-4}).validate()  # the notes survive overrides; the config validates
    assert config.with_overrides({"learning_rate": 2e-4}).warnings() == notes


@pytest.mark.parametrize(
    "module, args, algo",
    [
        ("networks.lora", [], "lora"),
        ("networks.lora", ["conv_dim=4", "conv_alpha=1"], "locon"),  # kohya's LoRA-C3Lier trains the resnets too
        ("lycoris.kohya", ["algo=loha"], "loha"),
        ("lycoris.kohya", [], "locon"),  # LyCORIS' default "lora" covers the resnets
    ],
)
def test_network_module_maps_to_network_algo(module, args, algo):
    config = TrainConfig.from_dict({"network_module": module, "network_args": args})
    assert config.network_algo_resolved() == algo


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"clip_skip": 2}, "clip_skip = 2 is not supported (lorakit conditions on the text encoder's own output"),
        ({"max_token_length": 225}, "max_token_length = 225 is not supported"),
        ({"zero_terminal_snr": True}, "zero_terminal_snr = True is not supported"),
        ({"network_module": "networks.dylora"}, "network_module 'networks.dylora' is not supported"),
        ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr"]}, "network_args algo=lokr"),
        ({"network_args": ["block_dims=2,4,8"]}, "network_args block_dims=2,4,8 is not supported"),
        ({"save_model_as": "ckpt"}, "save_model_as = 'ckpt' is not supported (networks are written as .safetensors"),
    ],
)
def test_kohya_options_that_would_train_something_else_are_refused(values, fragment):
    with pytest.raises(LorakitError) as error:
        TrainConfig.from_dict(values, source="run.toml").validate()
    assert fragment in str(error.value) and str(error.value).startswith("run.toml") and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "flags, arch, prediction, fragment",
    [
        ({"v_parameterization": True}, "sd1", "epsilon", "v_parameterization = true, but the model (sd1) predicts eps"),
        ({"v2": True}, "sdxl", "epsilon", "v2 = true, but the model is sdxl"),
        ({"sdxl": True}, "sd2-v", "v_prediction", "sdxl = true, but the model is sd2-v"),
    ],
)
def test_model_flags_that_contradict_the_model_are_refused(flags, arch, prediction, fragment):
    from lorakit_ext.train.kohya_keys import check_model_flags

    with pytest.raises(LorakitError, match=re.escape(fragment)):
        check_model_flags(flags, arch, prediction)


def test_model_flags_that_agree_pass_and_a_false_v_flag_on_a_v_model_is_noted():
    from lorakit_ext.train.kohya_keys import check_model_flags

    assert check_model_flags({"v2": True, "v_parameterization": True}, "sd2-v", "v_prediction") == []
    assert check_model_flags({"v2": False, "sdxl": True}, "sdxl", "epsilon") == []
    (note,) = check_model_flags({"v2": True, "v_parameterization": False}, "sd2-v", "v_prediction")
    assert note.startswith("v_parameterization = false, but the model (sd2-v) predicts v")


def test_cached_latents_with_flips_get_no_false_warning():
    """The latent cache keeps each flip side under its own key, so flip_aug works with cache_latents (kohya's
    caveat does not apply): no warning says otherwise."""
    notes = TrainConfig(cache_latents=True, flip_aug=True).warnings()
    assert not [n for n in notes if "flip" in n]


def test_a_dotted_optimizer_outside_the_known_packages_is_refused_without_importing_it(tmp_path):
    """Importing a module runs its code, and the name can come over HTTP."""
    import subprocess
    import sys

    code = (f"from lorakit_ext.train.config import TrainConfig; import sys\n"
            f"(__import__('pathlib').Path({str(tmp_path)!r}) / '1_x').mkdir()\n"
            f"try: TrainConfig(train_data_dir={str(tmp_path)!r}, optimizer_type='this.X').validate()\n"
            "except Exception as error: print(type(error).__name__, 'this' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "LorakitError False"
