"""The shipped toy model: an SD1 checkpoint in layout, loadable by ldm and diffusers alike, and genuinely trained
(the quality gates: VAE reconstruction, prompt-following color / shape / size, measured by pixel analysis)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lorakit_ext import sampling
from lorakit_ext.models.configs import sd_alphas_cumprod
from lorakit_ext.models.ldm import LdmAdapter
from lorakit_ext.toy import shapes
from lorakit_ext.toy.config import TEXT_CONFIG
from lorakit_ext.toy.model import CHECKPOINT_PATH, CONFIG_PATH, DIFFUSERS_CONFIG_PATH, TOY_IMAGE_SIZE, load_toy_model

GATE_STEPS = 20
GATE_CFG = 5.0
UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_toy_model()


@pytest.fixture(scope="module")
def adapter(model):
    return LdmAdapter(model)


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    with safe_open(str(CHECKPOINT_PATH), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def test_checkpoint_has_sd1_layout_fp16_weights_and_fp32_schedule(checkpoint):
    assert CHECKPOINT_PATH.stat().st_size <= 25_000_000
    prefixes = (UNET_PREFIX, "first_stage_model.", TEXT_PREFIX + "text_model.")
    weights = {k: v for k, v in checkpoint.items() if k.startswith(prefixes)}
    schedule = {k: v for k, v in checkpoint.items() if k not in weights}
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert {v.dtype for v in schedule.values()} == {torch.float32}
    schedule_keys = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "posterior_variance"}
    assert set(schedule) >= schedule_keys
    assert torch.allclose(checkpoint["alphas_cumprod"], sd_alphas_cumprod(), rtol=1e-6)
    # the SD1 names every tool keys on
    for key in (
        UNET_PREFIX + "input_blocks.1.1.proj_in.weight",
        UNET_PREFIX + "input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight",
        UNET_PREFIX + "middle_block.1.proj_out.weight",
        UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
        "first_stage_model.decoder.conv_out.weight",
        TEXT_PREFIX + "text_model.embeddings.token_embedding.weight",
        TEXT_PREFIX + "text_model.final_layer_norm.weight",
    ):
        assert key in checkpoint, key
    assert not any(k.startswith(UNET_PREFIX + "input_blocks.10.1") for k in checkpoint)  # deepest level: no attention
    assert checkpoint[TEXT_PREFIX + "text_model.embeddings.token_embedding.weight"].shape == (49408, 64)
    unet_params = sum(v.numel() for k, v in weights.items() if k.startswith(UNET_PREFIX))
    assert 3.5e6 < unet_params < 5e6


def test_yaml_and_metadata_agree_on_the_measured_scale_factor(model):
    from omegaconf import OmegaConf

    config = OmegaConf.load(CONFIG_PATH)
    with safe_open(str(CHECKPOINT_PATH), "pt") as handle:
        stored = float(handle.metadata()["scale_factor"])
    assert config.model.params.scale_factor == stored == model.scale_factor
    assert 0.5 < stored < 5
    assert config.model.params.cond_stage_config.target == "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    assert config.model.params.unet_config.params.num_res_blocks == 2


def test_loads_as_real_ldm_classes(model, adapter):
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.diffusion.ddpm import LatentDiffusion
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    assert isinstance(model, LatentDiffusion) and isinstance(model.model.diffusion_model, UNetModel)
    assert isinstance(model.first_stage_model, AutoencoderKL) and isinstance(model.cond_stage_model, FrozenCLIPEmbedder)
    assert adapter.arch == "sd1" and adapter.prediction_type == "epsilon"
    assert model.alphas_cumprod.dtype == torch.float32
    assert load_toy_model(dtype=torch.float16).model.diffusion_model.out[2].weight.dtype == torch.float16


def test_diffusers_unet_gives_the_same_output(model, checkpoint):
    from diffusers import UNet2DConditionModel

    from lorakit_ext.models.naming import SD1, convert_unet_state_dict

    configs = json.loads(DIFFUSERS_CONFIG_PATH.read_text())
    unet = UNet2DConditionModel(**configs["unet"]).eval()
    compvis = {k[len(UNET_PREFIX) :]: v.float() for k, v in checkpoint.items() if k.startswith(UNET_PREFIX)}
    unet.load_state_dict(convert_unet_state_dict(compvis, SD1), strict=True)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 500, 990])
    context = model.get_learned_conditioning(["a red circle", "a large blue square", ""])
    with torch.no_grad():
        expected = model.model.diffusion_model(latents, timesteps, context=context)
        actual = unet(latents, timesteps, encoder_hidden_states=context).sample
    assert expected.abs().mean() > 0.1  # a trained UNet, not ldm's zero-initialised output layer
    assert ((actual - expected).norm() / expected.norm()).item() <= 1e-4


def test_transformers_loads_the_text_encoder_from_the_checkpoint_keys(model, checkpoint, tmp_path):
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    save_file({k[len(TEXT_PREFIX) :]: v.float() for k, v in checkpoint.items() if k.startswith(TEXT_PREFIX)},
              str(tmp_path / "model.safetensors"), {"format": "pt"})  # transformers 4.30 needs the key
    (tmp_path / "config.json").write_text(json.dumps(TEXT_CONFIG))
    text_model = CLIPTextModel.from_pretrained(str(tmp_path)).eval()
    tokens = model.cond_stage_model.tokenizer(
        ["a small green triangle"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        expected = model.get_learned_conditioning(["a small green triangle"])
        actual = text_model(input_ids=tokens).last_hidden_state
    assert torch.allclose(actual, expected, atol=1e-5)


def test_vae_reconstructs_held_out_images_above_25_db(adapter):
    held_out = shapes.dataset(64, seed=12345)
    pixels = torch.from_numpy(np.stack([s.image for s in held_out])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = adapter.model.first_stage_model.encode(pixels).mode() * adapter.model.scale_factor
        reconstructed = adapter.decode_latents(latents).clamp(-1, 1)
    mse = torch.mean((reconstructed - pixels) ** 2).item()
    psnr = 10 * np.log10(4.0 / mse)
    assert psnr >= 25.0, f"VAE PSNR {psnr:.2f} dB"


def test_vae_keeps_every_palette_color_on_every_background(adapter):
    """Hue regression: a VAE whose GroupNorms see one channel per group decodes red as olive and green as gray."""
    specs = [
        shapes.ShapeSpec("circle", color, background, 0.5, (32.0, 32.0))
        for color in shapes.COLORS
        for background in shapes.BACKGROUNDS
        if shapes.BACKGROUNDS[background] != shapes.COLORS[color]
    ]
    pixels = torch.from_numpy(np.stack([shapes.render(s)[0] for s in specs])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = adapter.model.first_stage_model.encode(pixels).mode() * adapter.model.scale_factor
        decoded = sampling.to_uint8((adapter.decode_latents(latents) + 1) / 2)
    measured = [(s.color, s.background, shapes.measure(image).color) for s, image in zip(specs, decoded)]
    assert [m for m in measured if m[0] != m[2]] == []


def generate(adapter, prompts: list[str], seeds: list[int]) -> list[shapes.Measurement]:
    with torch.no_grad():
        images = sampling.sample(
            adapter, prompts, seeds, steps=GATE_STEPS, cfg_scale=GATE_CFG, width=TOY_IMAGE_SIZE,
            height=TOY_IMAGE_SIZE, batch_size=len(prompts),
        )
    return [shapes.measure(image) for image in sampling.to_uint8(images)]


GATE_CASES = [(color, shape, seed) for color in shapes.COLORS for shape in shapes.SHAPES for seed in range(4)]


@pytest.fixture(scope="module")
def gate_images(adapter) -> list[shapes.Measurement]:
    """`a {color} {shape}`: 6 colors x 3 shapes x 4 seeds, measured."""
    return generate(adapter, [f"a {c} {s}" for c, s, _ in GATE_CASES], [1000 + seed for *_, seed in GATE_CASES])


def test_generated_images_have_the_prompted_color(gate_images):
    color_ok = np.mean([m.color == c for m, (c, _, _) in zip(gate_images, GATE_CASES)])
    assert color_ok >= 0.9, f"color {color_ok:.0%} of {len(GATE_CASES)}"


def test_generated_images_have_the_prompted_shape(gate_images):
    right = {shape: [m.shape == shape for m, (_, s, _) in zip(gate_images, GATE_CASES) if s == shape]
             for shape in shapes.SHAPES}
    shape_ok = np.mean([ok for oks in right.values() for ok in oks])
    by_shape = ", ".join(f"{shape} {np.mean(oks):.0%}" for shape, oks in right.items())
    assert shape_ok >= 0.8, f"shape {shape_ok:.0%} of {len(GATE_CASES)} ({by_shape})"


def test_large_prompts_draw_at_least_twice_the_area_of_small_ones(adapter):
    cases = [(color, shape) for color in shapes.COLORS for shape in shapes.SHAPES]
    prompts = [f"a {size} {c} {s}" for size in ("small", "large") for c, s in cases]
    measured = generate(adapter, prompts, [2000 + i % len(cases) for i in range(len(prompts))])
    small = np.mean([m.area for m in measured[: len(cases)]])
    large = np.mean([m.area for m in measured[len(cases) :]])
    assert large / small >= 2.0, f"area large {large:.3f} / small {small:.3f}"
