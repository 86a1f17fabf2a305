"""kohya.py: every file variant read into canonical names, the writer's bytes, metadata and hashes, and the checks."""

from __future__ import annotations

import hashlib
import json

import pytest
import safetensors
import safetensors.torch
import torch

from lorakit_ext.errors import LorakitError
from lorakit_ext.formats import kohya
from lorakit_ext.networks.weights import ModuleWeights, NetworkWeights

SD1_ATTN2_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
SD1_PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"
SD1_UP_Q = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
SD1_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
SDXL_ATTN2_K = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"


def randn(*shape, seed=[0]):
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]))


def lora(out_features, in_features, rank, alpha=None, kernel=None):
    if kernel is None:
        tensors = {"lora_down.weight": randn(rank, in_features), "lora_up.weight": randn(out_features, rank)}
    else:
        tensors = {"lora_down.weight": randn(rank, in_features, *kernel), "lora_up.weight": randn(out_features, rank, 1, 1)}
    return ModuleWeights(tensors, alpha)


def sd1_network(metadata=None) -> NetworkWeights:
    return NetworkWeights(
        {
            SD1_ATTN2_K: lora(320, 768, 4, 2.0),
            SD1_PROJ_IN: lora(320, 320, 4, 2.0, kernel=(1, 1)),
            SD1_CONV: lora(320, 320, 8, 1.0, kernel=(3, 3)),
            TE_Q: lora(768, 768, 4, None),
        },
        dict(metadata or {}),
    )


def assert_same_network(loaded: NetworkWeights, expected: NetworkWeights, dtype=None):
    assert loaded.modules.keys() == expected.modules.keys()
    for name, module in expected.modules.items():
        got = loaded.modules[name]
        assert got.tensors.keys() == module.tensors.keys(), name
        for suffix, tensor in module.tensors.items():
            assert torch.equal(got.tensors[suffix], tensor.to(dtype or tensor.dtype)), (name, suffix)
        assert got.alpha == module.alpha, name


def one_line_error_naming(path, excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# --- round trip ----------------------------------------------------------------------------------------------------


def test_round_trip_tensors_alpha_metadata_and_hashes(tmp_path):
    path = tmp_path / "my_lora.safetensors"
    weights = sd1_network({"ss_tag_frequency": '{"a": {"cat": 3}}'})
    weights.modules["lora_te_text_model_encoder_layers_0_mlp_fc2"] = lora(768, 3072, 128, 64.0)  # > 1.1 MB in all
    written = kohya.save_network(path, weights, metadata={"ss_epoch": 3, "ss_sd_model_name": "base.ckpt"})

    loaded = kohya.load_network(path)
    assert_same_network(loaded, weights)
    assert loaded.metadata == written
    assert written["ss_epoch"] == "3" and written["ss_sd_model_name"] == "base.ckpt"
    assert written["ss_tag_frequency"] == '{"a": {"cat": 3}}'

    raw = path.read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    assert written["sshs_model_hash"] == hashlib.sha256(raw[8 + header_length :]).hexdigest()
    # kohya's legacy hash: the tensors serialised with only the ss_* metadata, 64 KiB at 1 MiB.
    plain = safetensors.torch.load_file(path)
    ss_only = {k: v for k, v in written.items() if k.startswith("ss_")}
    kohya_bytes = safetensors.torch.save(plain, ss_only)
    assert written["sshs_legacy_hash"] == hashlib.sha256(kohya_bytes[0x100000:0x110000]).hexdigest()[:8]
    assert len(kohya_bytes) > 0x110000

    assert set(plain) == {f"{n}.{s}" for n, m in weights.modules.items() for s in m.tensors} | {
        f"{n}.alpha" for n, m in weights.modules.items() if m.alpha is not None
    }
    assert plain[f"{SD1_CONV}.alpha"].shape == ()


def test_save_dtype_casts_before_hashing(tmp_path):
    path = tmp_path / "half.safetensors"
    weights = sd1_network()
    written = kohya.save_network(path, weights, dtype=torch.float16)
    plain = safetensors.torch.load_file(path)
    assert {t.dtype for t in plain.values()} == {torch.float16}
    assert plain[f"{SD1_ATTN2_K}.alpha"].dtype == torch.float16 and plain[f"{SD1_ATTN2_K}.alpha"].dim() == 0
    assert_same_network(kohya.load_network(path), weights, dtype=torch.float16)
    raw = path.read_bytes()
    assert written["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest()
    fp32_hash = kohya.save_network(tmp_path / "full.safetensors", weights)["sshs_model_hash"]
    assert fp32_hash != written["sshs_model_hash"]


def test_kohya_and_modelspec_metadata(tmp_path):
    written = kohya.save_network(tmp_path / "out.safetensors", sd1_network())
    assert written["ss_network_module"] == "networks.lora"
    assert written["ss_network_dim"] == "4"
    assert written["ss_network_alpha"] == "Dynamic"  # 2.0 on UNet linears, none (scale 1, i.e. 4) on the text encoder
    assert json.loads(written["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "1.0"}
    assert written["ss_base_model_version"] == "sd_v1" and written["ss_v2"] == "False"
    assert written["ss_output_name"] == "out" and written["modelspec.title"] == "out"
    assert written["modelspec.sai_model_spec"] == "1.0.0"
    assert written["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert written["modelspec.implementation"] == "diffusers"
    assert written["modelspec.resolution"] == "512x512"
    assert all(isinstance(value, str) for value in written.values())

    v_prediction = kohya.save_network(
        tmp_path / "v.safetensors",
        NetworkWeights({SD1_ATTN2_K: lora(320, 1024, 4, 4.0)}),  # cross-attention width 1024: SD2
        arch="sd2-v",
    )
    assert v_prediction["ss_base_model_version"] == "sd_v2_v" and v_prediction["ss_v2"] == "True"
    assert v_prediction["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert v_prediction["modelspec.prediction_type"] == "v"
    assert kohya.load_network(tmp_path / "v.safetensors").metadata["ss_network_alpha"] == "4.0"
    assert kohya.network_arch(kohya.load_network(tmp_path / "v.safetensors")) == "sd2-v"


def test_lycoris_metadata_and_stale_hashes_replaced(tmp_path):
    loha = NetworkWeights(
        {
            SD1_ATTN2_K: ModuleWeights(
                {"hada_w1_a": randn(320, 4), "hada_w1_b": randn(4, 768), "hada_w2_a": randn(320, 4), "hada_w2_b": randn(4, 768)},
                4.0,
            ),
            SD1_CONV: ModuleWeights(
                {"hada_w1_a": randn(320, 8), "hada_w1_b": randn(8, 320 * 9), "hada_w2_a": randn(320, 8), "hada_w2_b": randn(8, 320 * 9)},
                4.0,
            ),
        },
        {
            "sshs_model_hash": "stale",
            "ss_output_name": "input_file",
            "modelspec.title": "input file",
            "ss_network_args": '{"dropout": "0.1", "algo": "lokr", "conv_dim": "2"}',
        },
    )
    written = kohya.save_network(tmp_path / "loha.safetensors", loha)
    assert written["ss_network_module"] == "lycoris.kohya"
    assert json.loads(written["ss_network_args"]) == {"dropout": "0.1", "algo": "loha", "conv_dim": "8", "conv_alpha": "4.0"}
    assert written["ss_network_dim"] == "4" and written["ss_network_alpha"] == "4.0"
    assert written["sshs_model_hash"] != "stale"
    assert written["ss_output_name"] == "loha" and written["modelspec.title"] == "loha"

    as_lora = kohya.save_network(tmp_path / "lora.safetensors", sd1_network(written), metadata={"ss_output_name": "mine"})
    assert as_lora["ss_network_module"] == "networks.lora"
    assert json.loads(as_lora["ss_network_args"]) == {"dropout": "0.1", "conv_dim": "8", "conv_alpha": "1.0"}
    assert as_lora["ss_output_name"] == "mine" and as_lora["modelspec.title"] == "mine"


def test_sdxl_metadata(tmp_path):
    weights = NetworkWeights(
        {
            SDXL_ATTN2_K: lora(640, 2048, 4, 1.0),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": lora(768, 768, 4, 1.0),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": lora(1280, 1280, 4, 1.0),
        }
    )
    written = kohya.save_network(tmp_path / "xl.safetensors", weights)
    assert written["ss_base_model_version"] == "sdxl_base_v1-0"
    assert written["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert written["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert written["modelspec.resolution"] == "1024x1024"


# --- every variant read --------------------------------------------------------------------------------------------


def save_raw(path, tensors, metadata=None):
    safetensors.torch.save_file(tensors, path, metadata)
    return path


def test_peft_keys_with_and_without_base_model_prefix(tmp_path):
    down_k, up_k, down_q, up_q = randn(4, 768), randn(320, 4), randn(4, 768), randn(768, 4)
    for prefix in ("", "base_model.model."):
        path = save_raw(
            tmp_path / f"peft{len(prefix)}.safetensors",
            {
                f"{prefix}unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": down_k,
                f"{prefix}unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": up_k,
                f"{prefix}text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": down_q,
                f"{prefix}text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": up_q,
            },
        )
        loaded = kohya.load_network(path)
        assert set(loaded.modules) == {SD1_ATTN2_K, TE_Q}
        assert torch.equal(loaded.modules[SD1_ATTN2_K].tensors["lora_down.weight"], down_k)
        assert torch.equal(loaded.modules[TE_Q].tensors["lora_up.weight"], up_q)
        assert loaded.modules[TE_Q].alpha is None and loaded.modules[TE_Q].scale == 1.0


def test_peft_unet_only_adapter_without_component_prefix(tmp_path):
    path = save_raw(
        tmp_path / "adapter_model.safetensors",
        {
            "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": randn(4, 768),
            "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": randn(320, 4),
        },
    )
    assert set(kohya.load_network(path).modules) == {SD1_ATTN2_K}


def peft_folder(folder, config):
    """A PEFT adapter folder: ``adapter_model.safetensors`` with a rank-4 to_k LoRA, ``config`` as its JSON config."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    key = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    return save_raw(folder / "adapter_model.safetensors", {f"{key}.lora_A.weight": randn(4, 768), f"{key}.lora_B.weight": randn(320, 4)})


def test_peft_config_beside_the_file_gives_the_scale(tmp_path):
    assert kohya.load_network(peft_folder(tmp_path / "a", {"r": 4, "lora_alpha": 16})).modules[SD1_ATTN2_K].scale == 4.0
    # LoraConfig's defaults (r = lora_alpha = 8) for what the config omits: scale 1 at any stored rank
    assert kohya.load_network(peft_folder(tmp_path / "b", {"peft_type": "LORA"})).modules[SD1_ATTN2_K].scale == 1.0
    kohya_file = tmp_path / "a" / "kohya.safetensors"  # a kohya file in the same folder keeps its own alpha
    kohya.save_network(kohya_file, NetworkWeights({SD1_ATTN2_K: lora(320, 768, 4, 1.0)}))
    assert kohya.load_network(kohya_file).modules[SD1_ATTN2_K].scale == 0.25


@pytest.mark.parametrize(
    "config, problem",
    [
        ("{not json", "not a readable PEFT adapter config"),
        ({"peft_type": "LOHA"}, "a LOHA adapter; only PEFT LoRA adapters are read"),
        ({"r": "four"}, "r must be a positive number, got 'four'"),
        ({"lora_alpha": 0}, "lora_alpha must be a positive number, got 0"),
        ({"alpha_pattern": {"to_k(": 2}}, "alpha_pattern pattern 'to_k(' is not a regex"),
    ],
)
def test_bad_peft_config_is_named(tmp_path, config, problem):
    path = peft_folder(tmp_path / "adapter", config)
    with pytest.raises(LorakitError) as excinfo:
        kohya.load_network(path)
    assert problem in one_line_error_naming(tmp_path / "adapter" / "adapter_config.json", excinfo)


def test_older_diffusers_forms(tmp_path):
    tensors = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": randn(4, 768),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight": randn(320, 4),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.alpha": torch.tensor(2.0),
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": randn(4, 1280),
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": randn(1280, 4),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": randn(4, 768),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": randn(768, 4),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": randn(4, 768),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": randn(3072, 4),
    }
    loaded = kohya.load_network(save_raw(tmp_path / "old.safetensors", tensors))
    assert set(loaded.modules) == {
        SD1_ATTN2_K,
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0",
        TE_Q,
        "lora_te_text_model_encoder_layers_0_mlp_fc1",
    }
    assert loaded.modules[SD1_ATTN2_K].alpha == 2.0
    assert loaded.modules["lora_te_text_model_encoder_layers_0_mlp_fc1"].out_features == 3072


def test_compvis_sd1_names_become_diffusers_style(tmp_path):
    tensors = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": randn(4, 768),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight": randn(320, 4),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(4.0),
        "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight": randn(4, 1280),
        "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_up.weight": randn(1280, 4),
        "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": randn(8, 320, 3, 3),
        "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": randn(320, 8, 1, 1),
    }
    loaded = kohya.load_network(save_raw(tmp_path / "compvis.safetensors", tensors))
    assert set(loaded.modules) == {SD1_ATTN2_K, SD1_UP_Q, SD1_CONV}
    assert loaded.modules[SD1_ATTN2_K].alpha == 4.0
    assert torch.equal(
        loaded.modules[SD1_CONV].tensors["lora_down.weight"], tensors["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"]
    )


def test_sdxl_diffusers_names_become_compvis_and_te1_te2(tmp_path):
    tensors = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": randn(4, 2048),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": randn(640, 4),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": randn(4, 768),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": randn(768, 4),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": randn(4, 1280),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": randn(1280, 4),
    }
    loaded = kohya.load_network(save_raw(tmp_path / "xl.safetensors", tensors))
    assert set(loaded.modules) == {
        SDXL_ATTN2_K,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
    }
    assert kohya.describe_network(loaded)["arch"] == "sdxl"


def lycoris_modules():
    return {
        # LoHa on a linear, LoHa with Tucker cores on a 3x3 conv
        SD1_ATTN2_K: {"hada_w1_a": randn(320, 4), "hada_w1_b": randn(4, 768), "hada_w2_a": randn(320, 4), "hada_w2_b": randn(4, 768), "alpha": torch.tensor(2.0)},
        SD1_CONV: {
            "hada_w1_a": randn(4, 320), "hada_w1_b": randn(4, 320), "hada_t1": randn(4, 4, 3, 3),
            "hada_w2_a": randn(4, 320), "hada_w2_b": randn(4, 320), "hada_t2": randn(4, 4, 3, 3),
            "alpha": torch.tensor(4.0),
        },
        # LoKr: full w1, factored w2; and factored w1 with a Tucker w2 on a conv
        SD1_UP_Q: {"lokr_w1": randn(8, 8), "lokr_w2_a": randn(160, 4), "lokr_w2_b": randn(4, 160), "alpha": torch.tensor(4.0)},
        "lora_unet_down_blocks_0_resnets_0_conv2": {
            "lokr_w1_a": randn(8, 2), "lokr_w1_b": randn(2, 8),
            "lokr_w2_a": randn(2, 40), "lokr_w2_b": randn(2, 40), "lokr_t2": randn(2, 2, 3, 3),
            "alpha": torch.tensor(1.0),
        },
        # LoCon with a Tucker middle
        "lora_unet_down_blocks_0_resnets_1_conv1": {
            "lora_down.weight": randn(4, 320, 1, 1), "lora_mid.weight": randn(4, 4, 3, 3), "lora_up.weight": randn(320, 4, 1, 1),
            "alpha": torch.tensor(2.0),
        },
    }  # fmt: skip


def test_lycoris_variants_round_trip_and_describe(tmp_path):
    modules = lycoris_modules()
    flat = {f"{name}.{suffix}": tensor for name, parts in modules.items() for suffix, tensor in parts.items()}
    flat[f"{SD1_PROJ_IN}.lora_down.weight"] = randn(4, 320, 1, 1)
    flat[f"{SD1_PROJ_IN}.lora_up.weight"] = randn(320, 4, 1, 1)
    path = save_raw(tmp_path / "lycoris.safetensors", flat)
    loaded = kohya.load_network(path)
    assert set(loaded.modules) == set(modules) | {SD1_PROJ_IN}
    for name, parts in modules.items():
        assert loaded.modules[name].alpha == parts["alpha"].item()
        for suffix, tensor in parts.items():
            if suffix != "alpha":
                assert torch.equal(loaded.modules[name].tensors[suffix], tensor)
    assert loaded.modules[SD1_PROJ_IN].alpha is None

    description = kohya.describe_network(loaded)
    assert description["arch"] == "sd1"
    assert description["modules"] == {"total": 6, "unet": 6}
    assert description["algorithms"] == {
        "lora": {"conv1x1": 1},
        "locon_tucker": {"conv3x3": 1},
        "loha": {"conv3x3": 1, "flat": 1},
        "lokr": {"conv3x3": 1, "flat": 1},
    }
    assert description["ranks"]["loha"] == [4] and description["ranks"]["locon_tucker"] == [4]
    assert description["alphas"]["loha"] == [2.0, 4.0]
    assert description["alpha_missing"] == 1

    written = kohya.save_network(tmp_path / "again.safetensors", loaded)
    assert written["ss_network_module"] == "lycoris.kohya"
    assert_same_network(kohya.load_network(tmp_path / "again.safetensors"), loaded)


# --- bad input -----------------------------------------------------------------------------------------------------


def test_nan_names_the_module(tmp_path):
    down = randn(4, 768)
    down[1, 2] = float("nan")
    path = save_raw(tmp_path / "nan.safetensors", {f"{SD1_ATTN2_K}.lora_down.weight": down, f"{SD1_ATTN2_K}.lora_up.weight": randn(320, 4)})
    with pytest.raises(LorakitError) as excinfo:
        kohya.load_network(path)
    message = one_line_error_naming(path, excinfo)
    assert SD1_ATTN2_K in message and "NaN/Inf" in message and "lora_down.weight" in message


def test_unknown_keys(tmp_path):
    path = save_raw(
        tmp_path / "dora.safetensors",
        {
            f"{SD1_ATTN2_K}.lora_down.weight": randn(4, 768),
            f"{SD1_ATTN2_K}.lora_up.weight": randn(320, 4),
            f"{SD1_ATTN2_K}.dora_scale": randn(320, 1),
            "model.diffusion_model.out.2.weight": randn(4, 4),
        },
    )
    with pytest.raises(LorakitError) as excinfo:
        kohya.load_network(path)
    message = one_line_error_naming(path, excinfo)
    assert "2 keys" in message and "dora_scale" in message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"  # written by hand: safetensors 0.3 writes this header as invalid JSON
    header = json.dumps({"__metadata__": {"ss_network_dim": "4"}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(LorakitError) as excinfo:
        kohya.load_network(path)
    assert "no tensors" in one_line_error_naming(path, excinfo)


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        ({"lora_down.weight": (4, 768), "lora_up.weight": (320, 8)}, "ranks disagree"),
        ({"lora_down.weight": (4, 768)}, "not a LoRA, LoHa or LoKr module"),
        ({"lora_down.weight": (4, 768), "lora_up.weight": (320, 4), "hada_w1_a": (320, 4)}, "mixes lora tensors"),
        ({"hada_w1_a": (320, 4), "hada_w1_b": (4, 768), "hada_w2_a": (320, 2), "hada_w2_b": (4, 768)}, "ranks disagree"),
        ({"lokr_w1": (8, 8), "lokr_w2_a": (40, 4), "lokr_w2_b": (2, 96)}, "ranks disagree"),
        ({"lora_down.weight": (4, 768), "lora_up.weight": (320, 4), "alpha": (2,)}, "not a scalar"),
    ],
)
def test_inconsistent_module_shapes(tmp_path, tensors, expected):
    path = save_raw(tmp_path / "bad.safetensors", {f"{SD1_ATTN2_K}.{suffix}": randn(*shape) for suffix, shape in tensors.items()})
    with pytest.raises(LorakitError) as excinfo:
        kohya.load_network(path)
    message = one_line_error_naming(path, excinfo)
    assert expected in message and SD1_ATTN2_K in message


def test_same_module_in_two_spellings(tmp_path):
    tensors = {}
    for name in (SD1_ATTN2_K, "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"):
        tensors |= {f"{name}.lora_down.weight": randn(4, 768), f"{name}.lora_up.weight": randn(320, 4)}
    path = save_raw(tmp_path / "twice.safetensors", tensors)
    with pytest.raises(LorakitError) as excinfo:
        kohya.load_network(path)
    assert "appears twice" in one_line_error_naming(path, excinfo)


def test_refuses_to_write_nan(tmp_path):
    weights = sd1_network()
    weights.modules[TE_Q].tensors["lora_up.weight"][0, 0] = float("inf")
    path = tmp_path / "inf.safetensors"
    with pytest.raises(LorakitError) as excinfo:
        kohya.save_network(path, weights)
    assert TE_Q in one_line_error_naming(path, excinfo)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_shared_storage_is_written(tmp_path):
    shared = randn(4, 768)
    weights = NetworkWeights(
        {
            SD1_ATTN2_K: ModuleWeights({"lora_down.weight": shared, "lora_up.weight": randn(320, 4)}, 1.0),
            TE_Q: ModuleWeights({"lora_down.weight": shared, "lora_up.weight": randn(768, 8)[:, :4]}, 1.0),
        }
    )
    kohya.save_network(tmp_path / "shared.safetensors", weights)
    assert_same_network(kohya.load_network(tmp_path / "shared.safetensors"), weights)


# --- applying to a model -------------------------------------------------------------------------------------------


def test_check_fits_model():
    weights = NetworkWeights(sd1_network().modules, source="net.safetensors")
    targets = {
        SD1_ATTN2_K: (320, 768),
        SD1_PROJ_IN: (320, 320),  # a 1x1-conv LoRA fits a Linear (the WebUI reshapes it)
        SD1_CONV: (320, 320, 3, 3),
        TE_Q: (768, 768),
        SD1_UP_Q: (1280, 1280),
    }
    kohya.check_fits_model(weights, targets, "sd1")  # no raise

    with pytest.raises(LorakitError) as excinfo:
        kohya.check_fits_model(weights, {**targets, SD1_CONV: (320, 320, 1, 1)}, "sd1")
    message = one_line_error_naming("net.safetensors", excinfo)
    assert f"1 of {len(weights.modules)} modules do not fit" in message and SD1_CONV in message
    assert "(320, 320, 3, 3)" in message and "(320, 320, 1, 1)" in message and "made for sd1, the model is sd1" in message

    sdxl = NetworkWeights({SDXL_ATTN2_K: lora(640, 2048, 4, 1.0), "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": lora(768, 768, 4)}, source="xl.safetensors")
    with pytest.raises(LorakitError) as excinfo:
        kohya.check_fits_model(sdxl, targets, model_arch="sd1")
    message = one_line_error_naming("xl.safetensors", excinfo)
    assert "2 of 2 modules match no target" in message and "made for sdxl, the model is sd1" in message
    assert SDXL_ATTN2_K in message


def test_misfit_of_a_network_built_in_memory_says_so():
    with pytest.raises(LorakitError, match=r"^the network: made for sd1: 1 of 1 modules match no target"):
        kohya.check_fits_model(NetworkWeights({SD1_ATTN2_K: lora(320, 768, 4)}), {})


def test_loaded_network_knows_its_file(tmp_path):
    path = tmp_path / "net.safetensors"
    kohya.save_network(path, sd1_network())
    assert kohya.load_network(path).source == str(path)
    assert kohya.load_network(path).to(torch.float16).source == str(path)


def test_match_flattened_loha_by_size(tmp_path):
    loha = NetworkWeights(
        {SD1_CONV: ModuleWeights({"hada_w1_a": randn(320, 8), "hada_w1_b": randn(8, 2880), "hada_w2_a": randn(320, 8), "hada_w2_b": randn(8, 2880)}, 1.0)}
    )
    kohya.check_fits_model(loha, {SD1_CONV: (320, 320, 3, 3)})  # no raise
    with pytest.raises(LorakitError, match="320 rows x 2880 columns"):
        kohya.check_fits_model(loha, {SD1_CONV: (320, 640, 3, 3)})
