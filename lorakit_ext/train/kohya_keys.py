"""kohya sd-scripts options that are not ``TrainConfig`` fields: mapped, accepted with a note, or refused.

A kohya ``--config_file`` TOML (or a kohya_ss GUI export) carries many options about the host process, logging or
file format that mean nothing here; they are accepted, and each gets one line saying why it has no effect. Options
that pick the network (``network_module``) are mapped onto ``network_algo``. Options that would make kohya train
something different from what lorakit trains are refused, unless they are set to kohya's default (GUI exports
write every option, mostly at its default).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorakit_ext.errors import LorakitError

# kohya option -> why it has no effect here (accepted with this note)
NO_EFFECT: dict[str, str] = {
    "xformers": "attention is chosen by the host",
    "sdpa": "attention is chosen by the host",
    "mem_eff_attn": "attention is chosen by the host",
    "lowram": "the model is loaded by the host",
    "highvram": "the model is loaded by the host",
    "max_data_loader_n_workers": "images are loaded in the training process",
    "persistent_data_loader_workers": "images are loaded in the training process",
    "vae_batch_size": "latents are encoded one batch at a time",
    "logging_dir": "progress is reported as job events and console lines, not to a tracker",
    "log_with": "progress is reported as job events and console lines, not to a tracker",
    "log_prefix": "progress is reported as job events and console lines, not to a tracker",
    "log_tracker_name": "progress is reported as job events and console lines, not to a tracker",
    "log_tracker_config": "progress is reported as job events and console lines, not to a tracker",
    "log_config": "progress is reported as job events and console lines, not to a tracker",
    "wandb_api_key": "progress is reported as job events and console lines, not to a tracker",
    "wandb_run_name": "progress is reported as job events and console lines, not to a tracker",
    "console_log_level": "lorakit prints its own progress lines",
    "console_log_file": "lorakit prints its own progress lines",
    "console_log_simple": "lorakit prints its own progress lines",
    "tokenizer_cache_dir": "the tokenizer comes with the model",
    "output_config": "use --dry-run to see the resolved options",
    "config_file": "this file is the config",
    "ddp_timeout": "the process group is set up by accelerate",
    "ddp_gradient_as_bucket_view": "the network is not DDP-wrapped; gradients are reduced as one buffer",
    "ddp_static_graph": "the network is not DDP-wrapped; gradients are reduced as one buffer",
    "save_last_n_epochs_state": "state folders are kept and deleted with their network files",
    "save_last_n_steps_state": "state folders are kept and deleted with their network files",
    "save_state_on_train_end": "save_state writes a state with every file, the final one included",
    "no_half_vae": "the VAE runs in the model's own dtype",
    "full_fp16": "the network is trained in fp32 under mixed_precision",
    "full_bf16": "the network is trained in fp32 under mixed_precision",
    "cache_text_encoder_outputs_to_disk": "text-encoder outputs are cached in memory only",
    "debug_dataset": "use --dry-run to check the dataset",
    "sample_at_first": "samples are drawn after the steps or epochs asked for",
    "huggingface_repo_id": "nothing is uploaded",
    "huggingface_token": "nothing is uploaded",
    "save_state_to_huggingface": "nothing is uploaded",
    "resume_from_huggingface": "nothing is uploaded",
    "async_upload": "nothing is uploaded",
    "no_metadata": "training metadata is always written",
    "metadata_title": "the file's title is its name",
    "metadata_author": "not written",
    "metadata_description": "not written",
    "metadata_license": "not written",
    "metadata_tags": "not written",
    "noise_offset_type": "kohya_ss GUI field; noise_offset and multires_noise_iterations choose the noise",
    "huber_c": "used only with loss_type huber or smooth_l1; the loss is l2",
    "huber_schedule": "used only with loss_type huber or smooth_l1; the loss is l2",
    "huber_scale": "used only with loss_type huber or smooth_l1; the loss is l2",
}

# kohya option -> (kohya's default values, what lorakit does instead). At a default the option is accepted silently;
# any other value would train something different from what the file asks for, so it is refused.
DIFFERENT_RESULT: dict[str, tuple[tuple[Any, ...], str]] = {
    "clip_skip": ((None, 0, 1), "lorakit conditions on the text encoder's own output layer (clip skip 1)"),
    "max_token_length": ((None, 75), "captions are encoded as one 75-token chunk"),
    "color_aug": ((False,), "colour augmentation is not implemented"),
    "random_crop": ((False,), "images are center-cropped to their bucket"),
    "face_crop_aug_range": ((None, ""), "face crop augmentation is not implemented"),
    "caption_tag_dropout_rate": ((0, None), "per-tag caption dropout is not implemented (caption_dropout_rate is)"),
    "caption_dropout_every_n_epochs": ((0, None), "only caption_dropout_rate is implemented"),
    "token_warmup_min": ((1, None), "token warmup is not implemented"),
    "token_warmup_step": ((0, None), "token warmup is not implemented"),
    "weighted_captions": ((False,), "caption weights like (word:1.2) are not parsed"),
    "keep_tokens_separator": ((None, ""), "keep_tokens counts the leading tags"),
    "secondary_separator": ((None, ""), "tags are separated by commas only"),
    "enable_wildcard": ((False,), "caption wildcards are not expanded"),
    "zero_terminal_snr": ((False,), "the model's own noise schedule is used"),
    "scale_v_pred_loss_like_noise_pred": ((False,), "the v loss is not rescaled"),
    "v_pred_like_loss": ((None, 0), "the eps loss has no v-like term"),
    "debiased_estimation_loss": ((False,), "the loss is not debiased"),
    "ip_noise_gamma": ((None, 0), "input perturbation noise is not implemented"),
    "noise_offset_random_strength": ((False,), "noise_offset is used at its full strength"),
    "adaptive_noise_scale": ((None, 0), "noise_offset is not adapted to the latents"),
    "loss_type": ((None, "l2"), "the loss is the mean squared error (l2)"),
    "vae": ((None, ""), "the model's own VAE encodes the images"),
    "network_train_text_encoder_only": ((False,), "the UNet is always trained"),
    "stop_text_encoder_training": ((None, 0), "the text encoder, when trained, is trained for the whole run"),
    "scale_weight_norms": ((None, 0), "weight norms are not rescaled"),
    "base_weights": ((None, "", []), "no other network is merged in before training"),
    "dim_from_weights": ((False,), "network_dim is taken from this config; set it to the file's rank"),
    "lr_scheduler_type": ((None, ""), "only lr_scheduler's named schedules are available"),
    "lr_scheduler_args": ((None, "", []), "the named schedules take no extra arguments"),
    "dataset_config": ((None, ""), "a separate dataset TOML is not read; put train_data_dir and the dataset "
                                   "options in this file"),
    "in_json": ((None, ""), "fine-tuning metadata files are not read; use captions beside the images"),
    "fp8_base": ((False,), "the model is trained in its own dtype"),
    "deepspeed": ((False,), "DeepSpeed is not supported; use plain accelerate launch"),
    "save_model_as": ((None, "safetensors"), "networks are written as .safetensors only"),
}

# kohya option -> TrainConfig field of the same meaning
RENAMED = {
    "caption_extention": "caption_extension",  # kohya's historic misspelling, still accepted by sd-scripts
    "alpha_mask": "masked_loss",  # the alpha channel is the mask when mask_dir is not given
}

# kohya's sample samplers; lorakit draws samples with euler or ddim (samples do not change what is trained)
KOHYA_SAMPLERS = ("pndm", "lms", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++", "dpmsingle",
                  "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")

# network_args keys lorakit reads; any other would change the network or its training (refused), except the
# LyCORIS switches below at their defaults (kohya_ss GUI exports write them all)
NETWORK_ARGS = ("algo", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout")
NETWORK_ARGS_AT_DEFAULT = {
    **{key: ("false", "0") for key in ("use_tucker", "use_cp", "use_scalar", "rank_dropout_scale", "train_norm",
                                       "bypass_mode", "dora_wd", "weight_decompose", "rescaled")},
    "preset": ("full",),
}
LYCORIS_ALGOS = {"lora": "locon", "locon": "locon", "loha": "loha"}  # LyCORIS' "lora" also trains the resnets


def translate(values: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """kohya-only options of the flattened ``values`` mapped to ``TrainConfig`` fields; returns the new values and
    one note per option accepted without effect (and set: ``xformers = false`` needs no note)."""
    values = dict(values)
    notes = []
    for key in sorted(set(values) & set(NO_EFFECT)):
        if values.pop(key) not in (None, False, 0, "", []):  # an option left off (GUI exports write them all)
            notes.append(f"{key}: ignored, {NO_EFFECT[key]}")
    for key in sorted(set(values) & set(DIFFERENT_RESULT)):
        value = values.pop(key)
        defaults, instead = DIFFERENT_RESULT[key]
        if value not in defaults:
            raise LorakitError(f"{source}: {key} = {value!r} is not supported ({instead}); remove it or set it to "
                               f"{_shown(defaults)}")
    for old, new in RENAMED.items():
        if old in values:
            values.setdefault(new, values.pop(old))
    sampler = values.get("sample_sampler")
    if sampler in KOHYA_SAMPLERS:
        values["sample_sampler"] = "euler"
        if sampler != "k_euler":
            notes.append(f"sample_sampler {sampler}: samples are drawn with euler (lorakit has euler and ddim)")
    if "network_module" in values:
        values["network_algo"] = _algo_for_module(values.pop("network_module"), values.get("network_args"), source)
    return values, notes


def _algo_for_module(module: str, network_args: Any, source: str) -> str:
    """kohya's ``network_module`` as a ``network_algo``: networks.lora is LoRA, or LoCon when ``conv_dim`` is given
    (kohya then also trains the resnet convs); lycoris.kohya is the ``algo=`` of ``network_args``."""
    args = network_args_dict(network_args or [], source)
    if module == "networks.lora":
        return "locon" if int(args.get("conv_dim", 0) or 0) > 0 else "lora"
    if module == "lycoris.kohya":
        algo = args.get("algo", "lora")
        if algo not in LYCORIS_ALGOS:
            raise LorakitError(f"{source}: network_args algo={algo} is not supported (lorakit trains lora, locon, "
                               "loha)")
        return LYCORIS_ALGOS[algo]
    raise LorakitError(f"{source}: network_module {module!r} is not supported (networks.lora or lycoris.kohya with "
                       "algo=locon/loha; or set network_algo)")


def network_args_dict(items: Any, source: str = "config") -> dict[str, str]:
    """kohya's ``network_args`` (``key=value`` strings) as a dict; keys lorakit does not read are refused."""
    pairs = {}
    for item in items if isinstance(items, (list, tuple)) else str(items).split():
        key, sep, value = str(item).partition("=")
        if not sep:
            raise LorakitError(f"{source}: network_args {item!r} is not key=value")
        key, value = key.strip(), value.strip()
        if key in NETWORK_ARGS_AT_DEFAULT and value.lower() in NETWORK_ARGS_AT_DEFAULT[key]:
            continue
        if key not in NETWORK_ARGS:
            raise LorakitError(f"{source}: network_args {key}={value} is not supported (read: "
                               f"{', '.join(NETWORK_ARGS)}); it would change the network trained")
        pairs[key] = value
    return pairs


def _shown(defaults: tuple[Any, ...]) -> str:
    return " or ".join(repr(v) for v in defaults if v not in (None, "", [])) or "empty"


def check_model_flags(flags: Mapping[str, bool | None], arch: str, prediction_type: str) -> list[str]:
    """kohya's model-family flags (``v2``, ``v_parameterization``, ``sdxl``) against the loaded model, which decides.
    A flag that contradicts the model is refused (kohya would train another model or objective); an explicit
    ``v_parameterization = false`` on a v model only gets a note (GUI exports always write it)."""
    notes = []
    v_model = prediction_type == "v_prediction"
    if flags.get("v_parameterization") and not v_model:
        raise LorakitError(f"v_parameterization = true, but the model ({arch}) predicts eps: training v on it would "
                           "break it; remove the option or load an SD2-v model")
    if flags.get("v_parameterization") is False and v_model:
        notes.append(f"v_parameterization = false, but the model ({arch}) predicts v: training v, its own objective")
    if flags.get("v2") and arch not in ("sd2", "sd2-v"):
        raise LorakitError(f"v2 = true, but the model is {arch}: load an SD2 checkpoint or remove v2")
    if flags.get("v2") is False and arch in ("sd2", "sd2-v"):
        raise LorakitError(f"v2 = false, but the model is {arch}: remove v2 (the model decides)")
    if flags.get("sdxl") and arch != "sdxl":
        raise LorakitError(f"sdxl = true, but the model is {arch}: load an SDXL checkpoint or remove sdxl")
    if flags.get("sdxl") is False and arch == "sdxl":
        raise LorakitError("sdxl = false, but the model is sdxl: remove sdxl (the model decides)")
    return notes
