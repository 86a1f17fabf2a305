"""Full-size SD1.5 / SD2.1 / SDXL on the ``meta`` device: kohya's target counts, the compvis <-> diffusers bijection
over every weight, the derived diffusers configs, and checkpoint key tables that reach every target."""

import pytest
import torch
from test_models_fixtures import (
    StandInLatentDiffusion,
    frozen_clip_embedder,
    frozen_open_clip_embedder,
    open_clip_tower,
)

from lorakit_ext.models import configs, naming
from lorakit_ext.models.diffusers_adapter import DiffusersAdapter
from lorakit_ext.models.ldm import LdmAdapter


def shapes(module: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def count(targets, *blocks) -> int:
    return sum(t.block in blocks for t in targets)


@pytest.fixture(scope="module")
def sd1():
    unet = configs.meta_ldm_unet("sd1")
    text_encoder = configs.meta_hf_text_encoders("sd1")["te"]
    ldm_adapter = LdmAdapter(StandInLatentDiffusion(unet, frozen_clip_embedder(text_encoder, tokenizer=None)))
    diffusers_adapter = DiffusersAdapter(configs.meta_diffusers_unet("sd1"), [configs.meta_hf_text_encoders("sd1")["te"]])
    return ldm_adapter, diffusers_adapter


@pytest.fixture(scope="module")
def sd2():
    tower = open_clip_tower(configs.OPEN_CLIP_TEXT["sd2"], device="meta")
    model = StandInLatentDiffusion(configs.meta_ldm_unet("sd2"), frozen_open_clip_embedder(tower), parameterization="v")
    diffusers_adapter = DiffusersAdapter(
        configs.meta_diffusers_unet("sd2"), [configs.meta_hf_text_encoders("sd2")["te"]], prediction_type="v_prediction"
    )
    return LdmAdapter(model), diffusers_adapter


@pytest.fixture(scope="module")
def sdxl():
    encoders = configs.meta_hf_text_encoders("sdxl")
    return DiffusersAdapter(configs.meta_diffusers_unet("sdxl"), [encoders["te1"], encoders["te2"]])


def test_sd15_counts_match_kohya(sd1):
    ldm_adapter, diffusers_adapter = sd1
    for adapter in sd1:
        targets = adapter.targets()
        assert count(targets, "transformer") == 192  # kohya LoRA: U-Net 192 modules
        assert count(targets, "text") == 72  # kohya LoRA: text encoder 72 modules
        assert count(targets, "transformer", "resnet", "sampler") == 278  # kohya LoCon (conv_dim): U-Net 278 modules
    assert {t.name: t.shape for t in ldm_adapter.targets()} == {t.name: t.shape for t in diffusers_adapter.targets()}


def test_sd21_targets_agree_and_skip_the_unused_text_layer(sd2):
    ldm_adapter, diffusers_adapter = sd2
    assert ldm_adapter.arch == diffusers_adapter.arch == "sd2-v"
    ldm_targets = {t.name: t.shape for t in ldm_adapter.targets()}
    assert ldm_targets == {t.name: t.shape for t in diffusers_adapter.targets()}
    assert count(ldm_adapter.targets(), "text") == 23 * 6  # SD2 reads the penultimate of 24 OpenCLIP layers
    assert count(ldm_adapter.targets(), "transformer") == 192
    assert ldm_targets["lora_unet_down_blocks_0_attentions_0_proj_in"] == (320, 320)  # linear in SD2
    assert ldm_targets["lora_te_text_model_encoder_layers_22_self_attn_k_proj"] == (1024, 1024)


def test_sdxl_counts_match_kohya(sdxl):
    targets = sdxl.targets()
    assert count(targets, "transformer") == 722  # kohya SDXL LoRA: U-Net 722 modules
    assert sum(t.component == "te1" for t in targets) == 72
    assert sum(t.component == "te2" for t in targets) == 192
    names = {t.name: t.shape for t in targets}
    assert names["lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k"] == (1280, 2048)
    assert names["lora_unet_middle_block_1_proj_out"] == (1280, 1280)
    assert names["lora_te2_text_model_encoder_layers_31_mlp_fc2"] == (1280, 5120)


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_compvis_diffusers_bijection_on_every_weight(arch):
    compvis, diffusers = shapes(configs.meta_ldm_unet(arch)), shapes(configs.meta_diffusers_unet(arch))
    layout = naming.layout_from_keys(compvis)
    assert layout == naming.LAYOUTS[arch]
    assert naming.convert_unet_state_dict(compvis, layout, "diffusers") == diffusers
    assert naming.convert_unet_state_dict(diffusers, layout, "compvis") == compvis
    modules = {k.rpartition(".")[0] for k in compvis}
    assert len({naming.compvis_to_diffusers_unet(m, layout) for m in modules}) == len(modules)


def test_sdxl_bijection_on_every_weight():
    diffusers = shapes(configs.meta_diffusers_unet("sdxl"))
    compvis = naming.convert_unet_state_dict(diffusers, naming.SDXL, "compvis")
    assert len(compvis) == len(diffusers) == 1680
    assert naming.layout_from_keys(compvis) == naming.SDXL
    assert "label_emb.0.0.weight" in compvis and "input_blocks.8.1.transformer_blocks.9.ff.net.2.weight" in compvis
    assert naming.convert_unet_state_dict(compvis, naming.SDXL, "diffusers") == diffusers


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_derived_diffusers_configs_match_the_published_ones(arch):
    derived = configs.diffusers_unet_config(configs.LDM_UNET[arch])
    published = configs.DIFFUSERS_UNET[arch]
    levels = len(published["block_out_channels"])

    def per_level(value, default):
        value = published.get(value, default) if isinstance(value, str) else value
        return [value] * levels if isinstance(value, int) else list(value)

    assert per_level(derived["attention_head_dim"], 0) == per_level("attention_head_dim", 8)
    assert per_level(derived["transformer_layers_per_block"], 0) == per_level("transformer_layers_per_block", 1)
    for key, value in derived.items():
        if key not in ("attention_head_dim", "transformer_layers_per_block"):
            assert value == published.get(key, False), key


def test_unsupported_ldm_options_are_named():
    from lorakit_ext.errors import LorakitError

    with pytest.raises(LorakitError, match="resblock_updown, use_scale_shift_norm"):
        configs.diffusers_unet_config({**configs.LDM_UNET["sd1"], "resblock_updown": True, "use_scale_shift_norm": True})


def _checkpoint_shapes(arch: str) -> dict[str, tuple]:
    """The keys and shapes of a single-file ldm-layout checkpoint, from meta models."""
    if arch == "sdxl":
        unet = naming.convert_unet_state_dict(shapes(configs.meta_diffusers_unet("sdxl")), naming.SDXL, "compvis")
    else:
        unet = shapes(configs.meta_ldm_unet(arch))
    keys = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    if arch == "sd1":
        keys.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in shapes(configs.meta_hf_text_encoders("sd1")["te"]).items()})
    elif arch == "sd2":
        keys.update({f"cond_stage_model.model.{k}": v for k, v in shapes(open_clip_tower(configs.OPEN_CLIP_TEXT["sd2"], "meta")).items()})
    else:
        te1 = shapes(configs.meta_hf_text_encoders("sdxl")["te1"])
        keys.update({f"conditioner.embedders.0.transformer.text_model.{k}": v for k, v in te1.items()})
        keys.update({f"conditioner.embedders.1.model.{k}": v for k, v in shapes(open_clip_tower(configs.OPEN_CLIP_TEXT["sdxl"], "meta")).items()})
    return keys


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_checkpoint_key_table_reaches_every_target(arch, request):
    adapter = request.getfixturevalue(arch)
    adapter = adapter[0] if isinstance(adapter, tuple) else adapter
    checkpoint = _checkpoint_shapes(arch)
    table = naming.checkpoint_key_table(checkpoint, adapter.arch)
    targets = {t.name: t for t in adapter.targets()}
    assert table.keys() == targets.keys()
    for name, (key, rows) in table.items():
        target = targets[name]
        if target.rows is not None:  # OpenCLIP adapters; the SDXL one here has HF CLIP's separate q/k/v
            assert rows == target.rows, name
        shape = checkpoint[key]
        assert ((rows[1] - rows[0],) + shape[1:] if rows else shape) == target.shape, name
    assert naming.checkpoint_key_table(list(checkpoint), adapter.arch) == table  # full-size widths from keys alone
