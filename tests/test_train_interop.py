"""A file the trainer wrote on the toy model loads in diffusers (``load_lora_weights`` into a StableDiffusionPipeline
built from the toy model's own diffusers configs and converted weights) and changes the UNet and the text encoder
exactly as lorakit's own attached network does at multiplier 1."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from test_interop_diffusers import rel_diff
from test_models_fixtures import clip_tokenizer
from test_train_toy import _config

from lorakit_ext.formats.kohya import load_network
from lorakit_ext.networks.network import network_from_weights
from lorakit_ext.train.trainer import train

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."
PROMPTS = ["zq", "a large blue square"]


def _toy_pipeline():
    """The toy checkpoint as a diffusers StableDiffusionPipeline: UNet and text encoder converted from its keys (the
    VAE is left at its initialisation, nothing here decodes)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorakit_ext.models.naming import SD1, convert_unet_state_dict
    from lorakit_ext.toy.model import CHECKPOINT_PATH, DIFFUSERS_CONFIG_PATH

    configs = json.loads(DIFFUSERS_CONFIG_PATH.read_text())
    with safe_open(str(CHECKPOINT_PATH), "pt") as handle:
        checkpoint = {key: handle.get_tensor(key).float() for key in handle.keys()}
    unet = UNet2DConditionModel(**configs["unet"])
    compvis = {k[len(UNET_PREFIX) :]: v for k, v in checkpoint.items() if k.startswith(UNET_PREFIX)}
    unet.load_state_dict(convert_unet_state_dict(compvis, SD1), strict=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    own = set(text_encoder.state_dict())
    prefix = TEXT_PREFIX if any(k.startswith("text_model.") for k in own) else TEXT_PREFIX + "text_model."
    text = {k[len(prefix) :]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    result = text_encoder.load_state_dict({k: v for k, v in text.items() if k in own}, strict=False)
    assert set(result.missing_keys) <= {"embeddings.position_ids", "text_model.embeddings.position_ids"}, result
    assert len(text) - len(own & set(text)) <= 1  # at most position_ids, kept as a buffer by some versions
    vae = AutoencoderKL(**configs["vae"])
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def test_a_trained_file_loads_in_diffusers_and_matches_lorakit(tmp_path):
    from lorakit_ext.models.ldm import LdmAdapter
    from lorakit_ext.toy.model import load_toy_model

    torch.set_num_threads(1)
    adapter = LdmAdapter(load_toy_model())
    config = _config(tmp_path, max_train_steps=3, learning_rate=1e-2, network_train_unet_only=False)
    path = train(config, adapter).output
    tokens = adapter.model.cond_stage_model.tokenizer(
        PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300, 800])
    with torch.no_grad():
        cond = adapter.encode_prompts(PROMPTS)  # the UNet is compared on one fixed conditioning
        plain = adapter.predict(x, t, cond)
        network = network_from_weights(load_network(path), adapter.targets(), adapter.arch).attach()
        try:
            expected_text, expected_unet = adapter.encode_prompts(PROMPTS)["crossattn"], adapter.predict(x, t, cond)
        finally:
            network.detach()

        pipe = _toy_pipeline()
        plain_text = pipe.text_encoder(input_ids=tokens).last_hidden_state
        assert rel_diff(plain_text, cond["crossattn"]) <= 1e-4  # the converted pipeline is the toy model
        pipe.load_lora_weights(str(path), adapter_name="lorakit")
        pipe.set_adapters(["lorakit"], adapter_weights=[1.0])
        text = pipe.text_encoder(input_ids=tokens).last_hidden_state
        unet_out = pipe.unet(x, t, encoder_hidden_states=cond["crossattn"]).sample
    print(f"LoRA effect: text {rel_diff(expected_text, plain_text):.3g}, unet {rel_diff(expected_unet, plain):.3g}")
    assert rel_diff(expected_text, plain_text) > 1e-3 and rel_diff(expected_unet, plain) > 1e-3  # the file does act
    assert rel_diff(text, expected_text) <= 1e-4
    assert rel_diff(unet_out, expected_unet) <= 1e-4
