"""kohya names, compvis <-> diffusers UNet paths, HF CLIP <-> OpenCLIP names and architecture detection (no models)."""

import pytest

from lorakit_ext.errors import LorakitError
from lorakit_ext.models import naming
from lorakit_ext.models.naming import SD1, SDXL, UNetLayout

SD1_PAIRS = [
    ("input_blocks.0.0", "conv_in"),
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
    ("input_blocks.1.1.proj_in", "down_blocks.0.attentions.0.proj_in"),
    ("input_blocks.2.1.transformer_blocks.0.attn2.to_k", "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k"),
    ("input_blocks.1.0.in_layers.0", "down_blocks.0.resnets.0.norm1"),
    ("input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
    ("input_blocks.1.0.emb_layers.1", "down_blocks.0.resnets.0.time_emb_proj"),
    ("input_blocks.1.0.out_layers.0", "down_blocks.0.resnets.0.norm2"),
    ("input_blocks.1.0.out_layers.3", "down_blocks.0.resnets.0.conv2"),
    ("input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
    ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
    ("input_blocks.9.0.op", "down_blocks.2.downsamplers.0.conv"),
    ("input_blocks.11.0.in_layers.2", "down_blocks.3.resnets.1.conv1"),
    ("middle_block.0.in_layers.2", "mid_block.resnets.0.conv1"),
    ("middle_block.1.proj_out", "mid_block.attentions.0.proj_out"),
    ("middle_block.2.skip_connection", "mid_block.resnets.1.conv_shortcut"),
    ("output_blocks.0.0.in_layers.2", "up_blocks.0.resnets.0.conv1"),
    ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks.3.1.proj_in", "up_blocks.1.attentions.0.proj_in"),
    ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
    ("output_blocks.8.2.conv", "up_blocks.2.upsamplers.0.conv"),
    ("output_blocks.11.1.transformer_blocks.0.ff.net.2", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"),
    ("input_blocks.1.0", "down_blocks.0.resnets.0"),
]

SDXL_PAIRS = [
    ("input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
    ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
    ("input_blocks.4.1.transformer_blocks.1.attn1.to_q", "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"),
    ("input_blocks.8.1.proj_in", "down_blocks.2.attentions.1.proj_in"),
    ("label_emb.0.0", "add_embedding.linear_1"),
    ("label_emb.0.2", "add_embedding.linear_2"),
    ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
    ("output_blocks.8.0.skip_connection", "up_blocks.2.resnets.2.conv_shortcut"),
]


@pytest.mark.parametrize("layout,pairs", [(SD1, SD1_PAIRS), (SDXL, SDXL_PAIRS)], ids=["sd1", "sdxl"])
def test_unet_paths_convert_both_ways(layout, pairs):
    for compvis, diffusers in pairs:
        assert naming.compvis_to_diffusers_unet(compvis, layout) == diffusers
        assert naming.diffusers_to_compvis_unet(diffusers, layout) == compvis


@pytest.mark.parametrize(
    "path,layout",
    [
        ("input_blocks.12.0.in_layers.2", SD1),  # past the last level
        ("input_blocks.10.1.proj_in", SD1),  # the deepest SD1 level has no attention
        ("input_blocks.1.1.proj_in", SDXL),  # nor has SDXL's first
        ("output_blocks.11.2.conv", SD1),  # no upsampler after the last up level
        ("middle_block.3.in_layers.2", SD1),
        ("input_blocks.1.0.in_layers.1", SD1),  # a SiLU: no weights, no diffusers module
        ("down_blocks.3.downsamplers.0.conv", SD1),
        ("up_blocks.0.attentions.0.proj_in", SD1),
    ],
)
def test_paths_outside_the_layout_raise(path, layout):
    convert = naming.compvis_to_diffusers_unet if naming.unet_spelling(path) == "compvis" else naming.diffusers_to_compvis_unet
    with pytest.raises(LorakitError, match="no .* counterpart"):
        convert(path, layout)


def test_a_path_in_the_wrong_spelling_raises():
    with pytest.raises(LorakitError, match="not a compvis"):
        naming.compvis_to_diffusers_unet("down_blocks.0.resnets.0.conv1", SD1)


def test_unet_block_kinds():
    assert naming.unet_block("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0") == "transformer"
    assert naming.unet_block("input_blocks.4.1.proj_in") == "transformer"
    assert naming.unet_block("input_blocks.4.1.norm") is None
    assert naming.unet_block("middle_block.1.transformer_blocks.0.norm2") is None
    assert naming.unet_block("output_blocks.2.1.conv") == "sampler"  # SD1: slot 1 is the upsampler, not attention
    assert naming.unet_block("up_blocks.1.upsamplers.0.conv") == "sampler"
    assert naming.unet_block("input_blocks.3.0.op") == "sampler"
    assert naming.unet_block("middle_block.2.emb_layers.1") == "resnet"
    assert naming.unet_block("up_blocks.0.resnets.2.conv_shortcut") == "resnet"
    assert naming.unet_block("input_blocks.1.0.in_layers.0") is None
    assert naming.unet_block("input_blocks.0.0") is None
    assert naming.unet_block("time_embedding.linear_1") is None
    assert naming.unet_block("lora_unet_down_blocks_0_attentions_0_proj_in") == "transformer"


def test_kohya_names():
    assert naming.kohya_name("lora_unet", "down_blocks.0.attentions.0.proj_in") == "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert naming.unet_kohya_name("input_blocks.1.1.proj_in", "sd1", SD1) == "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert naming.unet_kohya_name("down_blocks.1.attentions.0.proj_in", "sdxl", SDXL) == "lora_unet_input_blocks_4_1_proj_in"
    assert naming.unet_kohya_name("input_blocks.4.1.proj_in", "sdxl", SDXL) == "lora_unet_input_blocks_4_1_proj_in"


def test_normalize_kohya_name():
    sd1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert naming.normalize_kohya_name("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", "sd1") == sd1
    assert naming.normalize_kohya_name(sd1, "sd1") == sd1
    assert naming.normalize_kohya_name("lora_unet_output_blocks_2_1_conv", "sd2") == "lora_unet_up_blocks_0_upsamplers_0_conv"
    assert naming.normalize_kohya_name("lora_unet_middle_block_0_in_layers_2", "sd1") == "lora_unet_mid_block_resnets_0_conv1"
    sdxl = "lora_unet_input_blocks_7_1_transformer_blocks_9_ff_net_0_proj"
    assert naming.normalize_kohya_name("lora_unet_down_blocks_2_attentions_0_transformer_blocks_9_ff_net_0_proj", "sdxl") == sdxl
    assert naming.normalize_kohya_name(sdxl, "sdxl") == sdxl
    assert naming.normalize_kohya_name("lora_unet_up_blocks_2_resnets_2_conv_shortcut", "sdxl") == "lora_unet_output_blocks_8_0_skip_connection"
    te = "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    assert naming.normalize_kohya_name(te, "sdxl") == te
    assert naming.normalize_kohya_name("lora_unet_something_else", "sd1") == "lora_unet_something_else"
    # a toy-sized layout: 3 levels, attention on the first two
    toy = UNetLayout(levels=3, res_blocks=2, attention_levels=(True, True, False))
    assert naming.normalize_kohya_name("lora_unet_output_blocks_5_2_conv", "sd1", toy) == "lora_unet_up_blocks_1_upsamplers_0_conv"
    with pytest.raises(LorakitError):
        naming.normalize_kohya_name("lora_unet_input_blocks_7_1_proj_in", "sd1", toy)


def test_layout_from_keys():
    toy = UNetLayout(levels=3, res_blocks=2, attention_levels=(True, True, False))
    keys = ["input_blocks.0.0.weight"]
    for level in range(3):
        for j in range(2):
            index = 1 + level * 3 + j
            keys.append(f"model.diffusion_model.input_blocks.{index}.0.in_layers.2.weight")
            if toy.attention_levels[level]:
                keys.append(f"model.diffusion_model.input_blocks.{index}.1.proj_in.weight")
        if level < 2:
            keys.append(f"model.diffusion_model.input_blocks.{level * 3 + 3}.0.op.weight")
    assert naming.layout_from_keys(keys) == toy
    with pytest.raises(LorakitError, match="no compvis input_blocks"):
        naming.layout_from_keys(["down_blocks.0.resnets.0.conv1.weight"])
    with pytest.raises(LorakitError, match="not an SD-style UNet"):
        naming.layout_from_keys([k for k in keys if "input_blocks.3.0.op" not in k])


def test_hf_clip_and_open_clip_names_round_trip():
    for layer in (0, 23):
        for part in naming.TEXT_TARGET_PARTS:
            hf = f"text_model.encoder.layers.{layer}.{part}"
            assert naming.open_clip_to_hf_clip(*naming.hf_clip_to_open_clip(hf)) == hf
    assert naming.hf_clip_to_open_clip("text_model.encoder.layers.3.self_attn.v_proj") == ("transformer.resblocks.3.attn", "in_proj_weight", 2)
    assert naming.hf_clip_to_open_clip("text_model.encoder.layers.3.self_attn.out_proj") == ("transformer.resblocks.3.attn", "out_proj.weight", None)
    assert naming.hf_clip_to_open_clip("text_model.encoder.layers.3.mlp.fc2") == ("transformer.resblocks.3.mlp.c_proj", "weight", None)
    with pytest.raises(LorakitError):
        naming.hf_clip_to_open_clip("text_model.encoder.layers.3.layer_norm1")
    with pytest.raises(LorakitError):
        naming.open_clip_to_hf_clip("transformer.resblocks.3.attn", "in_proj_weight", 3)


def _lora(name, in_features, out_features=320, rank=4, conv=False):
    tail = (1, 1) if conv else ()
    return {f"{name}.lora_down.weight": (rank, in_features, *tail), f"{name}.lora_up.weight": (out_features, rank, *tail), f"{name}.alpha": ()}


def test_detect_arch():
    attn2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert naming.detect_arch(_lora(attn2, 768)) == "sd1"
    assert naming.detect_arch(_lora(attn2, 1024)) == "sd2"
    assert naming.detect_arch(_lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 2048)) == "sdxl"
    assert naming.detect_arch(_lora("lora_te1_text_model_encoder_layers_0_mlp_fc1", 768)) == "sdxl"
    assert naming.detect_arch(_lora("lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q", 1280)) == "sdxl"
    assert naming.detect_arch(_lora("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1024)) == "sd2"
    assert naming.detect_arch(_lora("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768)) == "sd1"
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert naming.detect_arch(_lora(proj_in, 320, conv=True)) == "sd1"
    assert naming.detect_arch(_lora(proj_in, 320)) == "sd2"
    loha = {f"{attn2}.hada_w1_a": (320, 8), f"{attn2}.hada_w1_b": (8, 1024), f"{attn2}.hada_w2_a": (320, 8), f"{attn2}.hada_w2_b": (8, 1024)}
    assert naming.detect_arch(loha) == "sd2"
    lokr = {f"{attn2}.lokr_w1": (4, 8), f"{attn2}.lokr_w2": (80, 96)}
    assert naming.detect_arch(lokr) == "sd1"
    assert naming.detect_arch(_lora("lora_unet_down_blocks_0_resnets_0_conv1", 320)) is None
    assert naming.detect_arch({}) is None
