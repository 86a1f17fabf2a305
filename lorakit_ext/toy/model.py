"""Build and load the toy model as a real ldm ``LatentDiffusion`` (the class the WebUI loads SD1 checkpoints into).

Everything comes from files shipped in the package: the weights (one fp16 ``.safetensors`` in ldm key layout),
the ldm ``.yaml`` beside it, and the text folder (CLIP tokenizer files + text model ``config.json``). Nothing is
downloaded and nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit_ext.errors import LorakitError
from lorakit_ext.toy.config import IMAGE_SIZE

TOY_DIR = Path(__file__).resolve().parent
TEXT_DIR = TOY_DIR / "clip"
WEIGHTS_DIR = TOY_DIR / "weights"
CHECKPOINT_NAME = "toy_sd1.safetensors"
POSITION_IDS = "embeddings.position_ids"
CHECKPOINT_PATH = WEIGHTS_DIR / CHECKPOINT_NAME
CONFIG_PATH = CHECKPOINT_PATH.with_suffix(".yaml")
DIFFUSERS_CONFIG_PATH = WEIGHTS_DIR / "toy_sd1.diffusers.json"
TOY_IMAGE_SIZE = IMAGE_SIZE
# the three weight-holding parts of a LatentDiffusion; everything else in its state dict is the noise schedule
SUBMODELS = ("model", "first_stage_model", "cond_stage_model")
# SD1 checkpoints spell text encoder keys as transformers 4 lays out CLIPTextModel; transformers 5 drops the
# "text_model." level, so keys are mapped between the file and the live module when they differ.
TEXT_PREFIX = "cond_stage_model.transformer."
TEXT_LEVEL = "text_model."


class _TextModelFromConfig:
    """Stands in for ``transformers.CLIPTextModel`` while ldm builds ``FrozenCLIPEmbedder``: the text model is
    made from the folder's ``config.json`` alone, since its weights come from the checkpoint (the WebUI does the
    same when it builds a model)."""

    @staticmethod
    def from_pretrained(version: str) -> nn.Module:
        from transformers import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig.from_pretrained(version))


def build_model(config: dict[str, Any]) -> nn.Module:
    """An untrained ``LatentDiffusion`` from an ldm config dict (``{"model": {"target", "params"}}``), on CPU."""
    import pytorch_lightning  # noqa: F401  (it installs warning filters on import; the one below must come after)

    # importing ldm's model warns of a pytorch_lightning deprecation that is ldm's, not the user's: it should not be
    # the first thing a command shows (a lasting filter for that one message: catch_warnings is not thread-safe)
    warnings.filterwarnings("ignore", message=r".*pytorch_lightning\.utilities\.distributed\.rank_zero_only")
    with contextlib.redirect_stdout(io.StringIO()):  # ldm prints a line per block it builds
        import ldm.modules.encoders.modules as ldm_encoders
        from ldm.util import instantiate_from_config

        original = ldm_encoders.CLIPTextModel
        ldm_encoders.CLIPTextModel = _TextModelFromConfig
        try:
            model = instantiate_from_config(config["model"])
        finally:
            ldm_encoders.CLIPTextModel = original
    model.cond_stage_model.device = "cpu"
    return model.eval()


def read_config(path: Path = CONFIG_PATH, text_dir: Path = TEXT_DIR) -> dict[str, Any]:
    """The shipped ldm yaml as a dict, with the text folder made absolute (the file holds it relative to itself)."""
    from omegaconf import OmegaConf

    if not path.is_file():
        raise LorakitError(f"toy model config {path} is missing (run python -m lorakit_ext.toy.pretrain)")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    config["model"]["params"]["cond_stage_config"]["params"]["version"] = str(text_dir)
    return config


def load_toy_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The shipped toy model as an ldm ``LatentDiffusion`` in eval mode; the noise schedule stays float32."""
    return load_checkpoint(CHECKPOINT_PATH, read_config(), device, dtype)


def load_checkpoint(
    path: Path, config: dict[str, Any], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    from safetensors.torch import load_file

    if not path.is_file():
        raise LorakitError(f"toy model weights {path} are missing (run python -m lorakit_ext.toy.pretrain)")
    model = build_model(config)
    state = load_file(path)
    if not hasattr(model.cond_stage_model.transformer, "text_model"):
        state = {key.replace(TEXT_PREFIX + TEXT_LEVEL, TEXT_PREFIX, 1): value for key, value in state.items()}
    # transformers before 4.31 (the WebUI 1.10's 4.30) keeps CLIP's position_ids as a saved buffer; the file, like
    # the newer library, has none: take the model's own (it is arange(77), not a weight)
    expected = model.state_dict()
    for key in expected:
        if key.endswith(POSITION_IDS) and key not in state:
            state[key] = expected[key]
    model.load_state_dict(state, strict=True)
    for name in SUBMODELS:
        getattr(model, name).to(device=device, dtype=dtype)
    model.to(device)
    model.cond_stage_model.device = device
    return model


def checkpoint_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict an SD1 checkpoint holds: weights in fp16, the noise schedule buffers in fp32 (fp16 would
    round ``alphas_cumprod`` near 1 and shift every sampler's sigmas), text encoder keys in SD1's spelling."""
    state = {}
    flat_text = not hasattr(model.cond_stage_model.transformer, "text_model")
    for key, tensor in model.state_dict().items():
        if flat_text and key.startswith(TEXT_PREFIX):
            key = TEXT_PREFIX + TEXT_LEVEL + key[len(TEXT_PREFIX) :]
        tensor = tensor.detach().cpu()
        if key.split(".", 1)[0] in SUBMODELS and tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        state[key] = tensor.contiguous()
    return state
