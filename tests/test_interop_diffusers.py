"""A network file written by lorakit loads unchanged in diffusers (``pipe.load_lora_weights``, through peft) and
changes the UNet and text encoders exactly as lorakit's own attached network does, at multipliers 1 and 0.5."""

import pytest
import torch
from test_models_fixtures import (
    TINY_CLIP,
    TINY_LDM_UNET,
    TINY_LDM_UNET_SDXL,
    TINY_SIZE_DIM,
    clip_tokenizer,
    hf_clip,
    randomize,
)

from lorakit_ext.formats.kohya import save_network
from lorakit_ext.models import configs
from lorakit_ext.models.diffusers_adapter import DiffusersAdapter
from lorakit_ext.networks.network import NetworkSpec, create_network

PROMPTS = ["a photo of a red cube", "two blue circles on grass"]
SIZES = [(64, 64, 0, 0, 64, 64), (96, 80, 8, 4, 64, 64)]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny_pipeline(arch: str):
    """A StableDiffusion(XL)Pipeline from tiny configs, no downloads."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    unet_config = configs.diffusers_unet_config(TINY_LDM_UNET_SDXL if arch == "sdxl" else TINY_LDM_UNET)
    if arch == "sdxl":
        unet_config["addition_time_embed_dim"] = TINY_SIZE_DIM
    unet = randomize(UNet2DConditionModel(**unet_config), seed=1)
    vae = AutoencoderKL(block_out_channels=[32, 32], layers_per_block=1, latent_channels=4, norm_num_groups=32,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    text_encoder = randomize(hf_clip(TINY_CLIP), seed=2)
    if arch == "sdxl":
        text_encoder_2 = randomize(hf_clip(TINY_CLIP, with_projection=True), seed=3)
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=clip_tokenizer(),
                                         tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("arch,algo", [("sd1", "lora"), ("sd1", "locon"), ("sdxl", "lora")])
def test_diffusers_loads_lorakit_files_and_agrees(arch, algo, tmp_path):
    pipe = tiny_pipeline(arch)
    adapter = DiffusersAdapter.from_pipeline(pipe)
    assert adapter.arch == arch
    network = create_network(adapter.targets(), NetworkSpec(algo=algo, dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0))
    randomize(network, seed=4, std=0.2)  # non-zero up weights
    path = tmp_path / f"{arch}-{algo}.safetensors"
    save_network(path, network.to_weights(), arch=arch)

    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 990])
    with torch.no_grad():
        fixed_cond = adapter.encode_prompts(PROMPTS, SIZES)  # the UNet is compared on one conditioning
        plain_text, plain_unet = fixed_cond["crossattn"], adapter.predict(x, t, fixed_cond)
        expected = {}
        network.attach()
        for multiplier in (1.0, 0.5):
            network.multiplier = multiplier
            expected[multiplier] = adapter.encode_prompts(PROMPTS, SIZES)["crossattn"], adapter.predict(x, t, fixed_cond)
        network.detach()

        pipe.load_lora_weights(str(path), adapter_name="lorakit")
        for multiplier in (1.0, 0.5):
            pipe.set_adapters(["lorakit"], adapter_weights=[multiplier])
            text = adapter.encode_prompts(PROMPTS, SIZES)["crossattn"]
            unet_out = adapter.predict(x, t, fixed_cond)
            assert rel_diff(text, plain_text) > 1e-2 and rel_diff(unet_out, plain_unet) > 1e-2  # the file took effect
            assert rel_diff(text, expected[multiplier][0]) <= 1e-4
            assert rel_diff(unet_out, expected[multiplier][1]) <= 1e-4
