"""Builders for the model tests: real ldm / diffusers / open_clip classes at tiny sizes (or full size on ``meta``).

Nothing here downloads: ldm's text embedders ask the hub for weights in ``__init__``, so they are made without
it and given their parts, as the toy model does. No tests in this file.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from lorakit_ext.models import configs, naming

_TOKENIZER_DIR = tempfile.TemporaryDirectory(prefix="lorakit-test-tokenizer-")
TINY_CONTEXT = 32
TINY_LDM_UNET = {
    "image_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [1, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 2],
    "num_heads": 2,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": TINY_CONTEXT,
    "legacy": False,
}
TINY_LDM_UNET_SD2 = {**TINY_LDM_UNET, "num_heads": -1, "num_head_channels": 16, "use_linear_in_transformer": True}
# SDXL-shaped: no attention on the first level, linear projections, a `vector` input (pooled text + 3 size pairs).
TINY_SIZE_DIM = 8
TINY_POOLED = 32
TINY_LDM_UNET_SDXL = {
    **TINY_LDM_UNET_SD2,
    "attention_resolutions": [2, 4],
    "context_dim": 2 * TINY_CONTEXT,
    "num_classes": "sequential",
    "adm_in_channels": TINY_POOLED + 6 * TINY_SIZE_DIM,
}
TINY_CLIP = {
    "vocab_size": 49408,  # CLIP's vocabulary: one tokenizer serves HF and OpenCLIP towers
    "hidden_size": TINY_CONTEXT,
    "intermediate_size": 128,  # OpenCLIP's mlp_ratio 4
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": TINY_POOLED,
}
TINY_OPEN_CLIP = {"embed_dim": TINY_POOLED, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TINY_CONTEXT, "heads": 2, "layers": 3}}
TINY_VAE = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 32,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def randomize(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Non-trivial weights everywhere (zero-initialised output convs would hide mistakes); norm scales near 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            scale = 1.0 if name.endswith("weight") and param.ndim == 1 else 0.0
            param.copy_(torch.randn(param.shape, generator=generator) * std + scale)
    return module


def ldm_unet(params: dict, device: str | None = None) -> nn.Module:
    """ldm's UNetModel; with ``num_classes="sequential"`` it gets sgm's ``label_emb`` (ldm lacks that option)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    ldm_params = {k: v for k, v in params.items() if k not in ("num_classes", "adm_in_channels")}
    with torch.device(device or "cpu"):
        unet = UNetModel(**ldm_params)
        if params.get("num_classes") == "sequential":
            width = params["model_channels"] * 4
            unet.num_classes = "sequential"
            unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(params["adm_in_channels"], width), nn.SiLU(), nn.Linear(width, width)))
    return unet


def diffusers_unet_from_ldm(unet: nn.Module, params: dict) -> nn.Module:
    """The diffusers UNet holding the same weights, through the naming converter and the config derivation."""
    from diffusers import UNet2DConditionModel

    config = configs.diffusers_unet_config(params)
    if params.get("num_classes") == "sequential":
        config["addition_time_embed_dim"] = TINY_SIZE_DIM
    converted = UNet2DConditionModel(**config)
    layout = naming.layout_from_keys(unet.state_dict())
    converted.load_state_dict(naming.convert_unet_state_dict(unet.state_dict(), layout, "diffusers"), strict=True)
    return converted.eval()


@functools.cache
def clip_tokenizer():
    """HF's CLIPTokenizer over open_clip's shipped BPE (CLIP's own vocabulary), padding with id 0 ("!") as open_clip
    does, so HF and OpenCLIP towers see the same ids for prompts without "!". Built once per test process."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(_TOKENIZER_DIR.name)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, pad_token="!")


def load_hf_text_weights(model: nn.Module, state_dict: dict) -> nn.Module:
    """Load ``text_model.*`` keys into an HF CLIP text model, whichever transformers layout it has."""
    if not hasattr(model, "text_model"):
        state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items() if k != "text_projection.weight"}
    model.load_state_dict(state_dict, strict=True)
    return model


def hf_clip(config: dict, with_projection: bool = False, device: str | None = None) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.device(device or "cpu"):
        return cls(CLIPTextConfig(**config)).eval()


def open_clip_tower(spec: dict, device: str | None = None) -> nn.Module:
    """An OpenCLIP text tower run sequence-first, as the open_clip the WebUI ships (ldm permutes to LND)."""
    from open_clip.model import _build_text_tower

    with torch.device(device or "cpu"):
        tower = _build_text_tower(spec["embed_dim"], spec["text_cfg"])
    tower.transformer.batch_first = False
    for block in tower.transformer.resblocks:
        block.attn.batch_first = False
    return tower.eval()


def frozen_clip_embedder(transformer: nn.Module, tokenizer, layer: str = "last", layer_idx: int | None = None) -> nn.Module:
    """ldm's FrozenCLIPEmbedder with its parts given instead of downloaded."""
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    embedder = FrozenCLIPEmbedder.__new__(FrozenCLIPEmbedder)
    nn.Module.__init__(embedder)
    embedder.tokenizer, embedder.transformer = tokenizer, transformer
    embedder.device, embedder.max_length, embedder.layer, embedder.layer_idx = "cpu", 77, layer, layer_idx
    return embedder


def frozen_open_clip_embedder(model: nn.Module, layer: str = "penultimate") -> nn.Module:
    """ldm's FrozenOpenCLIPEmbedder (SD2) with its OpenCLIP model given instead of downloaded."""
    from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder

    embedder = FrozenOpenCLIPEmbedder.__new__(FrozenOpenCLIPEmbedder)
    nn.Module.__init__(embedder)
    embedder.model, embedder.device, embedder.max_length = model, "cpu", 77
    embedder.layer, embedder.layer_idx = layer, {"last": 0, "penultimate": 1}[layer]
    return embedder


class StandInLatentDiffusion(nn.Module):
    """The attributes lorakit reads from ldm's LatentDiffusion, for full-size models on ``meta``."""

    def __init__(self, unet: nn.Module, cond_stage_model: nn.Module, parameterization: str = "eps"):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = unet
        self.cond_stage_model = cond_stage_model
        self.parameterization = parameterization
        self.register_buffer("alphas_cumprod", configs.sd_alphas_cumprod())


def tiny_latent_diffusion(text_encoder: nn.Module, unet_params: dict = TINY_LDM_UNET, parameterization: str = "eps"):
    """A real ldm LatentDiffusion at toy size, with ``text_encoder`` as its cond_stage_model."""
    from ldm.models.diffusion.ddpm import LatentDiffusion

    model = LatentDiffusion(
        first_stage_config={
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"embed_dim": 4, "ddconfig": TINY_VAE, "lossconfig": {"target": "torch.nn.Identity"}},
        },
        cond_stage_config="__is_unconditional__",
        force_null_conditioning=True,
        conditioning_key="crossattn",
        unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
        linear_start=0.00085,
        linear_end=0.012,
        timesteps=1000,
        image_size=8,
        channels=4,
        scale_factor=0.18215,
        parameterization=parameterization,
        use_ema=False,
    )
    model.cond_stage_model = text_encoder
    return model.eval()


class StandInFrozenOpenCLIPEmbedder2(nn.Module):
    """sgm's FrozenOpenCLIPEmbedder2 as SDXL configures it (penultimate layer, pooled output, non-legacy): sgm is not
    on PyPI, so this follows its forward step by step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.device, self.max_length = model, "cpu", 77
        self.layer, self.layer_idx, self.legacy, self.return_pooled = "penultimate", 1, False, True
        self.input_key = "txt"

    def forward(self, text):
        import open_clip

        tokens = open_clip.tokenize(text).to(self.device)
        x = (self.model.token_embedding(tokens) + self.model.positional_embedding).permute(1, 0, 2)
        outputs = {}
        blocks = self.model.transformer.resblocks
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                outputs["penultimate"] = x.permute(1, 0, 2)
            x = block(x, attn_mask=self.model.attn_mask)
        last = self.model.ln_final(x.permute(1, 0, 2))
        pooled = last[torch.arange(last.shape[0]), tokens.argmax(dim=-1)] @ self.model.text_projection
        return outputs[self.layer], pooled


class StandInSizeEmbedder(nn.Module):
    """sgm's ConcatTimestepEmbedderND: each number of a (B, n) input embedded as a timestep, concatenated."""

    def __init__(self, outdim: int, input_key: str):
        super().__init__()
        self.outdim, self.input_key = outdim, input_key

    def forward(self, x):
        from ldm.modules.diffusionmodules.util import timestep_embedding

        b, n = x.shape
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(b, n * self.outdim)


class StandInDiffusionEngine(nn.Module):
    """The attributes lorakit reads from sgm's DiffusionEngine (as the WebUI holds it, with alphas_cumprod set)."""

    def __init__(self, unet: nn.Module, embedders: list[nn.Module], first_stage_model: nn.Module | None = None):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = unet
        self.conditioner = nn.Module()
        self.conditioner.embedders = nn.ModuleList(embedders)
        self.first_stage_model = first_stage_model
        self.scale_factor = 0.13025
        self.register_buffer("alphas_cumprod", configs.sd_alphas_cumprod())
