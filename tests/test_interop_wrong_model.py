"""A kohya file for another architecture, put on a full-size SD1.5 WebUI model (ldm, on the meta device) the way
every caller does it (``load_network`` then ``network_from_weights``): one line naming the file, both
architectures, how many modules do not match and the first of them."""

import pytest
import torch
from test_models_fixtures import StandInLatentDiffusion, frozen_clip_embedder

from lorakit_ext.errors import LorakitError
from lorakit_ext.formats import kohya
from lorakit_ext.models import configs
from lorakit_ext.models.diffusers_adapter import DiffusersAdapter
from lorakit_ext.models.ldm import LdmAdapter
from lorakit_ext.networks.network import network_from_weights
from lorakit_ext.networks.weights import ModuleWeights, NetworkWeights

SD1_DEFAULT_MODULES = 192 + 72
SDXL_DEFAULT_MODULES = 722 + 264
SD1_UNET_TRANSFORMER_MODULES = 192
CROSS_ATTENTION_KV = 2 * 16  # attn2 to_k and to_v of SD1's 16 transformer blocks take the text width


@pytest.fixture(scope="module")
def sd1_webui_model():
    text_encoder = configs.meta_hf_text_encoders("sd1")["te"]
    return LdmAdapter(StandInLatentDiffusion(configs.meta_ldm_unet("sd1"), frozen_clip_embedder(text_encoder, None)))


def default_lora_file(path, targets, components=("unet", "te", "te1", "te2")):
    """A rank-1 LoRA on the targets kohya's default trains (transformer blocks and text encoders), saved at ``path``."""
    generator = torch.Generator().manual_seed(0)
    modules = {}
    for target in targets:
        if target.block in ("transformer", "text") and target.component in components:
            out_features, in_features, *kernel = target.shape
            down = torch.randn(1, in_features, *kernel, generator=generator)
            up = torch.randn(out_features, 1, *[1] * len(kernel), generator=generator)
            modules[target.name] = ModuleWeights({"lora_down.weight": down.half(), "lora_up.weight": up.half()}, 1.0)
    kohya.save_network(path, NetworkWeights(modules))
    return path


def error_putting(path, model) -> str:
    with pytest.raises(LorakitError) as excinfo:
        network_from_weights(kohya.load_network(path), model.targets(), model.arch)
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def test_own_architecture_fits(tmp_path, sd1_webui_model):
    path = default_lora_file(tmp_path / "sd1.safetensors", sd1_webui_model.targets())
    weights = kohya.load_network(path)
    assert len(weights.modules) == SD1_DEFAULT_MODULES
    kohya.check_fits_model(weights, {t.name: t.shape for t in sd1_webui_model.targets()}, "sd1")  # no raise


def test_sdxl_file_on_sd1_model_says_which_and_how_many(tmp_path, sd1_webui_model):
    encoders = configs.meta_hf_text_encoders("sdxl")
    sdxl = DiffusersAdapter(configs.meta_diffusers_unet("sdxl"), [encoders["te1"], encoders["te2"]])
    path = default_lora_file(tmp_path / "xl.safetensors", sdxl.targets())
    message = error_putting(path, sd1_webui_model)
    assert f"{SDXL_DEFAULT_MODULES} of {SDXL_DEFAULT_MODULES} modules match no target" in message
    assert message.startswith(f"{path}: made for sdxl, the model is sd1: ")
    first = next(name for name in kohya.load_network(path).modules)
    assert first in message and first.startswith("lora_te1_")


def test_sd2_unet_file_on_sd1_model_names_the_shape_mismatch(tmp_path, sd1_webui_model):
    sd2 = DiffusersAdapter(configs.meta_diffusers_unet("sd2"), [configs.meta_hf_text_encoders("sd2")["te"]])
    path = default_lora_file(tmp_path / "sd2.safetensors", sd2.targets(), components=("unet",))
    message = error_putting(path, sd1_webui_model)
    assert "match no target" not in message  # SD2's UNet names are SD1's
    assert f"{CROSS_ATTENTION_KV} of {SD1_UNET_TRANSFORMER_MODULES} modules do not fit the model's weights" in message
    first_misfits = "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k makes a delta of (320, 1024) but the model's weight is (320, 768); also lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v, "
    assert first_misfits in message and message.endswith(", ...)")
    assert message.startswith(f"{path}: made for sd2, the model is sd1: ")


def test_sd2_file_with_text_encoder_reports_both_counts(tmp_path, sd1_webui_model):
    sd2 = DiffusersAdapter(configs.meta_diffusers_unet("sd2"), [configs.meta_hf_text_encoders("sd2")["te"]])
    path = default_lora_file(tmp_path / "sd2_te.safetensors", sd2.targets())
    message = error_putting(path, sd1_webui_model)
    # SD2's text encoder: 23 layers (kohya skips OpenCLIP's last) of width 1024; SD1 has 12 of width 768.
    total = SD1_UNET_TRANSFORMER_MODULES + 23 * 6
    assert f"{11 * 6} of {total} modules match no target of the model" in message
    assert f"{CROSS_ATTENTION_KV + 12 * 6} of {total} modules do not fit" in message
