"""The toy model's architecture: SD1's layout at toy width, as the ldm yaml dict and the diffusers configs.

Everything that makes it SD1 is kept (4 UNet levels, 2 ResBlocks each, cross-attention on every level but the
deepest, 8x VAE downsampling to 4 latent channels, a CLIP text model with CLIP's 49408-token vocabulary and 77
positions, SD1's noise schedule, eps prediction), so every SD1 code path (WebUI Lora names, kohya conversion,
diffusers) runs on it unchanged. Only the widths are small: UNet 4.2 M, VAE 4.1 M, text encoder 3.3 M parameters
(3.2 M of them CLIP's token embedding).
"""

from __future__ import annotations

from typing import Any

IMAGE_SIZE = 64  # pixels; latents are 8x8
LATENT_CHANNELS = 4
NUM_TIMESTEPS = 1000
LINEAR_START, LINEAR_END = 0.00085, 0.012  # SD1's "scaled linear" schedule

TEXT_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 256,
    "projection_dim": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "pad_token_id": 49407,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}

UNET_PARAMS: dict[str, Any] = {
    "image_size": IMAGE_SIZE // 8,  # unused by ldm, kept for readers
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "model_channels": 32,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 2, 3],
    "num_heads": 4,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": TEXT_CONFIG["hidden_size"],
    "use_checkpoint": False,
    "legacy": False,
}

VAE_DDCONFIG: dict[str, Any] = {
    "double_z": True,
    "z_channels": LATENT_CHANNELS,
    "resolution": IMAGE_SIZE,
    "in_channels": 3,
    "out_ch": 3,
    # 64 channels at full resolution: ldm's Normalize is GroupNorm(32 groups), so at 32 channels every norm is an
    # InstanceNorm that wipes each channel's mean over the image, and with it a flat shape's absolute color
    "ch": 64,
    "ch_mult": [1, 1, 2, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def ldm_config(scale_factor: float, text_dir: str) -> dict[str, Any]:
    """The ldm model config (what a WebUI ``.yaml`` holds), in v1-inference.yaml's shape.

    ``text_dir`` is the folder with the tokenizer files and the text model's ``config.json`` that
    ``FrozenCLIPEmbedder(version=...)`` reads.
    """
    return {
        "model": {
            "base_learning_rate": 1.0e-04,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": LINEAR_START,
                "linear_end": LINEAR_END,
                "num_timesteps_cond": 1,
                "log_every_t": 200,
                "timesteps": NUM_TIMESTEPS,
                "first_stage_key": "jpg",
                "cond_stage_key": "txt",
                "image_size": IMAGE_SIZE // 8,
                "channels": LATENT_CHANNELS,
                "cond_stage_trainable": False,
                "conditioning_key": "crossattn",
                "monitor": "val/loss_simple_ema",
                "scale_factor": float(scale_factor),
                "use_ema": False,
                "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": UNET_PARAMS},
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {
                        "embed_dim": LATENT_CHANNELS,
                        "monitor": "val/rec_loss",
                        "ddconfig": VAE_DDCONFIG,
                        "lossconfig": {"target": "torch.nn.Identity"},
                    },
                },
                "cond_stage_config": {
                    "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                    "params": {"version": text_dir},
                },
            },
        }
    }


def diffusers_configs(scale_factor: float) -> dict[str, dict[str, Any]]:
    """``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel`` and scheduler configs holding the same weights."""
    from lorakit_ext.models.configs import diffusers_unet_config

    vae_channels = [VAE_DDCONFIG["ch"] * m for m in VAE_DDCONFIG["ch_mult"]]
    return {
        "unet": {**diffusers_unet_config(UNET_PARAMS, sample_size=IMAGE_SIZE // 8)},
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": LATENT_CHANNELS,
            "block_out_channels": vae_channels,
            "down_block_types": ["DownEncoderBlock2D"] * len(vae_channels),
            "up_block_types": ["UpDecoderBlock2D"] * len(vae_channels),
            "layers_per_block": VAE_DDCONFIG["num_res_blocks"],
            "norm_num_groups": 32,
            "act_fn": "silu",
            "sample_size": IMAGE_SIZE,
            "scaling_factor": float(scale_factor),
        },
        "text_encoder": dict(TEXT_CONFIG),
        "scheduler": {
            "num_train_timesteps": NUM_TIMESTEPS,
            "beta_start": LINEAR_START,
            "beta_end": LINEAR_END,
            "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon",
            "clip_sample": False,
            "set_alpha_to_one": False,
            "steps_offset": 1,
        },
    }
