"""Names of everything a network can change, in every spelling the ecosystem uses; pure string functions, no torch.

Three spellings meet here:
- compvis (ldm/sgm) UNet module paths: ``input_blocks.4.1.proj_in``, ``middle_block.0.in_layers.2``;
- diffusers UNet module paths: ``down_blocks.1.attentions.0.proj_in``, ``mid_block.resnets.0.conv1``;
- HF CLIP and OpenCLIP text-encoder paths (OpenCLIP packs q, k and v into one ``in_proj_weight``).

A kohya module name is ``<prefix>_<path with dots as underscores>``. kohya writes SD1/SD2 UNet names in diffusers
style and SDXL UNet names in compvis style, text encoders always in HF CLIP style. The UNet conversion is computed
from a ``UNetLayout`` (levels, res blocks, which levels have attention), so it holds for any SD-shaped UNet.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lorakit_ext.errors import LorakitError

Spelling = Literal["compvis", "diffusers"]

# kohya prefix per component.
PREFIXES: dict[str, str] = {"unet": "lora_unet", "te": "lora_te", "te1": "lora_te1", "te2": "lora_te2"}
# The UNet spelling kohya writes for each architecture.
KOHYA_UNET_SPELLING: dict[str, Spelling] = {"sd1": "diffusers", "sd2": "diffusers", "sd2-v": "diffusers", "sdxl": "compvis"}


@dataclass(frozen=True)
class UNetLayout:
    """The shape of an SD-style UNet that decides its module paths.

    ``levels`` resolution levels, ``res_blocks`` ResBlocks per down level (up levels have one more), and
    ``attention_levels[l]`` whether down level ``l`` (and its mirror up level) has a transformer after each ResBlock.
    The middle block is always ResBlock, transformer, ResBlock.
    """

    levels: int
    res_blocks: int
    attention_levels: tuple[bool, ...]

    def __post_init__(self) -> None:
        if self.levels < 1 or self.res_blocks < 1 or len(self.attention_levels) != self.levels:
            raise LorakitError(f"invalid UNet layout {self}")

    def has_attention_up(self, up_level: int) -> bool:
        """Up level ``l`` mirrors down level ``levels - 1 - l``."""
        return self.attention_levels[self.levels - 1 - up_level]


SD1 = UNetLayout(levels=4, res_blocks=2, attention_levels=(True, True, True, False))
SD2 = SD1
SDXL = UNetLayout(levels=3, res_blocks=2, attention_levels=(False, True, True))
LAYOUTS: dict[str, UNetLayout] = {"sd1": SD1, "sd2": SD2, "sd2-v": SD2, "sdxl": SDXL}


# ---------------------------------------------------------------------------------------------------------------
# compvis <-> diffusers UNet paths
# ---------------------------------------------------------------------------------------------------------------

# Modules outside the level blocks, compvis -> diffusers (the same in every layout).
_TOP_LEVEL = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# Parts of a ResBlock that own weights, compvis -> diffusers.
_RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# The conv of a Downsample / Upsample, compvis -> diffusers.
_DOWNSAMPLER_PART = ("op", "conv")
_UPSAMPLER_PART = ("conv", "conv")


def compvis_to_diffusers_unet(path: str, layout: UNetLayout) -> str:
    """``input_blocks.1.1.proj_in`` -> ``down_blocks.0.attentions.0.proj_in`` (a module path inside the UNet)."""
    return _convert_unet_path(path, layout, "diffusers", ".")


def diffusers_to_compvis_unet(path: str, layout: UNetLayout) -> str:
    """``down_blocks.0.downsamplers.0.conv`` -> ``input_blocks.3.0.op`` (a module path inside the UNet)."""
    return _convert_unet_path(path, layout, "compvis", ".")


def unet_spelling(path: str) -> Spelling | None:
    """Which spelling a UNet module path (dotted or underscored) is in, or None when it is neither."""
    if re.match(r"(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)[._]\d", path):
        return "compvis"
    if re.match(r"(down_blocks|mid_block|up_blocks|time_embedding|add_embedding)[._]|conv_(in|out|norm_out)$", path):
        return "diffusers"
    return None


def convert_unet_state_dict(state_dict: Mapping[str, Any], layout: UNetLayout, to: Spelling = "diffusers") -> dict:
    """A UNet state dict (keys relative to the UNet) in the other layout; values are passed through untouched.

    Every UNet weight of SD-style models lives on a leaf module as ``weight``/``bias``, so converting the module
    path converts the key, and no tensor needs reshaping (attention projections are convs in both layouts for SD1
    and linears in both for SD2/SDXL).
    """
    converted = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        converted[f"{_convert_unet_path(module, layout, to, '.')}.{param}"] = value
    return converted


def _convert_unet_path(path: str, layout: UNetLayout, to: Spelling, sep: str) -> str:
    """One converter for both directions and both separators ("." for module paths, "_" for kohya names)."""
    source = "compvis" if to == "diffusers" else "diffusers"
    if unet_spelling(path) != source:
        raise LorakitError(f"not a {source} UNet module path: {path}")
    for compvis, diffusers in _TOP_LEVEL.items():
        frm, dst = (compvis, diffusers) if to == "diffusers" else (diffusers, compvis)
        if path == frm.replace(".", sep):
            return dst.replace(".", sep)
    convert_block = _compvis_block_to_diffusers if to == "diffusers" else _diffusers_block_to_compvis
    converted = convert_block(path, layout, sep)
    if converted is None:
        raise LorakitError(f"UNet module path {path} has no {to} counterpart in layout {layout}")
    return converted


def _compvis_block_to_diffusers(path: str, layout: UNetLayout, sep: str) -> str | None:
    s = re.escape(sep)
    stride = layout.res_blocks + 1
    if m := re.fullmatch(rf"input_blocks{s}(\d+){s}(\d+)(?:{s}(.+))?", path):
        index, slot, rest = int(m[1]), int(m[2]), m[3]
        level, j = divmod(index - 1, stride)
        if index < 1 or level >= layout.levels:
            return None
        head = f"down_blocks.{level}"
        if j == layout.res_blocks:
            if slot != 0 or level == layout.levels - 1:
                return None
            return _sub(f"{head}.downsamplers.0", rest, [_DOWNSAMPLER_PART], sep)
        return _block_part(head, j, slot, rest, layout.attention_levels[level], sep)
    if m := re.fullmatch(rf"middle_block{s}(\d+)(?:{s}(.+))?", path):
        slot, rest = int(m[1]), m[2]
        if slot == 1:
            return _sub("mid_block.attentions.0", rest, None, sep)
        if slot in (0, 2):
            return _sub(f"mid_block.resnets.{slot // 2}", rest, _RESNET_PARTS.items(), sep)
        return None
    if m := re.fullmatch(rf"output_blocks{s}(\d+){s}(\d+)(?:{s}(.+))?", path):
        index, slot, rest = int(m[1]), int(m[2]), m[3]
        level, j = divmod(index, stride)
        if level >= layout.levels:
            return None
        head = f"up_blocks.{level}"
        attention = layout.has_attention_up(level)
        if slot == (2 if attention else 1) and j == layout.res_blocks and level < layout.levels - 1:
            return _sub(f"{head}.upsamplers.0", rest, [_UPSAMPLER_PART], sep)
        return _block_part(head, j, slot, rest, attention, sep)
    return None


def _block_part(head: str, j: int, slot: int, rest: str | None, attention: bool, sep: str) -> str | None:
    """Slot 0 of a compvis block is its ResBlock, slot 1 its transformer (when the level has one)."""
    if slot == 0:
        return _sub(f"{head}.resnets.{j}", rest, _RESNET_PARTS.items(), sep)
    if slot == 1 and attention:
        return _sub(f"{head}.attentions.{j}", rest, None, sep)
    return None


def _diffusers_block_to_compvis(path: str, layout: UNetLayout, sep: str) -> str | None:
    s = re.escape(sep)
    stride = layout.res_blocks + 1
    resnet_parts = [(diffusers, compvis) for compvis, diffusers in _RESNET_PARTS.items()]
    kinds = "resnets|attentions|downsamplers|upsamplers"
    if m := re.fullmatch(rf"(down|up)_blocks{s}(\d+){s}({kinds}){s}(\d+)(?:{s}(.+))?", path):
        side, level, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if level >= layout.levels:
            return None
        down = side == "down"
        attention = layout.attention_levels[level] if down else layout.has_attention_up(level)
        head = "input_blocks" if down else "output_blocks"
        first = 1 + level * stride if down else level * stride
        blocks = layout.res_blocks if down else layout.res_blocks + 1
        if kind == "resnets" and j < blocks:
            return _sub(f"{head}.{first + j}.0", rest, resnet_parts, sep)
        if kind == "attentions" and attention and j < blocks:
            return _sub(f"{head}.{first + j}.1", rest, None, sep)
        if j != 0 or level == layout.levels - 1:
            return None
        if kind == "downsamplers" and down:
            return _sub(f"input_blocks.{first + layout.res_blocks}.0", rest, [_DOWNSAMPLER_PART[::-1]], sep)
        if kind == "upsamplers" and not down:
            slot = 2 if attention else 1
            return _sub(f"output_blocks.{first + layout.res_blocks}.{slot}", rest, [_UPSAMPLER_PART], sep)
        return None
    if m := re.fullmatch(rf"mid_block{s}(resnets|attentions){s}(\d+)(?:{s}(.+))?", path):
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions" and j == 0:
            return _sub("middle_block.1", rest, None, sep)
        if kind == "resnets" and j in (0, 1):
            return _sub(f"middle_block.{2 * j}", rest, resnet_parts, sep)
    return None


def _sub(head: str, rest: str | None, parts: Iterable[tuple[str, str]] | None, sep: str) -> str | None:
    """``head`` plus the translated sub-path ``rest`` (``parts`` maps it; None passes it through unchanged).

    None when ``rest`` is a sub-path with no counterpart (a ResBlock's SiLU, say).
    """
    head = head.replace(".", sep)
    if rest is None:
        return head
    if parts is None:
        return f"{head}{sep}{rest}"
    for source, target in parts:
        if rest == source.replace(".", sep):
            return f"{head}{sep}{target.replace('.', sep)}"
    return None


def layout_from_keys(keys: Iterable[str]) -> UNetLayout:
    """Infer the layout from compvis UNet state-dict keys or module names (with or without a prefix).

    Needs the level structure to be visible: the downsamplers (``input_blocks.N.0.op``) fix the number of levels
    and res blocks, the transformers (``input_blocks.N.1``) the attention levels.
    """
    blocks: dict[int, set[int]] = {}
    downsamplers: set[int] = set()
    for key in keys:
        if m := re.search(r"(?:^|[._])input_blocks[._](\d+)[._](\d+)(?:[._](op)\b)?", key):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
            if m[3]:
                downsamplers.add(int(m[1]))
    if not blocks:
        raise LorakitError("cannot infer the UNet layout: no compvis input_blocks keys")
    if downsamplers:
        res_blocks, levels = min(downsamplers) - 1, len(downsamplers) + 1
    else:
        res_blocks, levels = max(blocks), 1
    expected = {1 + level * (res_blocks + 1) + res_blocks for level in range(levels - 1)}
    if res_blocks < 1 or downsamplers != expected or max(blocks) != levels * (res_blocks + 1) - 1:
        raise LorakitError("cannot infer the UNet layout: input_blocks are not an SD-style UNet")
    attention = tuple(1 in blocks.get(1 + level * (res_blocks + 1), ()) for level in range(levels))
    return UNetLayout(levels=levels, res_blocks=res_blocks, attention_levels=attention)


# Sub-paths of the modules each kind of network may train, in either spelling (see ``unet_block``).
_TRANSFORMER_TARGET = re.compile(r"(proj_in|proj_out|attn\d[._]to_(q|k|v)|attn\d[._]to_out[._]0|ff[._]net[._]0[._]proj|ff[._]net[._]2)$")
_RESNET_TARGET = re.compile(
    r"(in_layers[._]2|emb_layers[._]1|out_layers[._]3|skip_connection|conv1|conv2|time_emb_proj|conv_shortcut)$"
)


def unet_block(path: str) -> Literal["transformer", "resnet", "sampler"] | None:
    """What kind of target a UNet module path (either spelling, dotted or underscored) is; None if not a target.

    "transformer": the Linear / 1x1-conv weights inside a spatial transformer (plain LoRA trains these);
    "resnet": a ResBlock's convs and time-embedding linear; "sampler": a Downsample/Upsample conv. Norms, the time
    embedding and conv_in/conv_out are not targets of kohya's networks.
    """
    if re.search(r"(down|up)samplers[._]0[._]conv$|input_blocks[._]\d+[._]0[._]op$|output_blocks[._]\d+[._][12][._]conv$", path):
        return "sampler"
    if re.search(r"(attentions[._]\d+|input_blocks[._]\d+[._]1|middle_block[._]1|output_blocks[._]\d+[._]1)[._]", path):
        return "transformer" if _TRANSFORMER_TARGET.search(path) else None
    if re.search(r"(resnets[._]\d+|_blocks[._]\d+[._]0|middle_block[._][02])[._]", path):
        return "resnet" if _RESNET_TARGET.search(path) else None
    return None


def unet_kohya_name(path: str, arch: str, layout: UNetLayout) -> str:
    """The kohya name of a UNet module path given in either spelling, in the spelling kohya uses for ``arch``."""
    spelling = unet_spelling(path)
    if spelling is None:
        raise LorakitError(f"not a UNet module path: {path}")
    if spelling != KOHYA_UNET_SPELLING[arch]:
        path = _convert_unet_path(path, layout, KOHYA_UNET_SPELLING[arch], ".")
    return kohya_name(PREFIXES["unet"], path)


# ---------------------------------------------------------------------------------------------------------------
# kohya names
# ---------------------------------------------------------------------------------------------------------------


def kohya_name(prefix: str, path: str) -> str:
    """``kohya_name("lora_unet", "down_blocks.0.attentions.0.proj_in")`` -> ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return f"{prefix}_{path.replace('.', '_')}"


def normalize_kohya_name(name: str, arch: str, layout: UNetLayout | None = None) -> str:
    """A kohya module name in the spelling kohya writes for ``arch`` (compvis-style SD1 / diffusers-style SDXL in).

    Names that are already canonical, text-encoder names and names that are not UNet module names come back as
    they are; a UNet name whose blocks do not exist in the layout raises ``LorakitError``.
    """
    prefix = PREFIXES["unet"] + "_"
    if not name.startswith(prefix):
        return name
    path = name[len(prefix) :]
    spelling, canonical = unet_spelling(path), KOHYA_UNET_SPELLING[arch]
    if spelling is None or spelling == canonical:
        return name
    return prefix + _convert_unet_path(path, layout or LAYOUTS[arch], canonical, "_")


# ---------------------------------------------------------------------------------------------------------------
# HF CLIP <-> OpenCLIP text encoder
# ---------------------------------------------------------------------------------------------------------------

_QKV_SLOTS = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
_OPEN_CLIP_MLP = {"fc1": "c_fc", "fc2": "c_proj"}
_HF_QKV = {slot: name for name, slot in _QKV_SLOTS.items()}
_HF_MLP = {open_clip: hf for hf, open_clip in _OPEN_CLIP_MLP.items()}
# The text-encoder targets of each layer, as HF CLIP sub-paths, in the order adapters list them.
TEXT_TARGET_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def hf_clip_to_open_clip(path: str) -> tuple[str, str, int | None]:
    """An HF CLIP text target -> (OpenCLIP module path, parameter on it, q/k/v slot of ``in_proj_weight`` or None).

    ``text_model.encoder.layers.3.self_attn.k_proj`` -> (``transformer.resblocks.3.attn``, ``in_proj_weight``, 1);
    ``...self_attn.out_proj`` -> (``...attn``, ``out_proj.weight``, None): the MultiheadAttention reads both weights
    itself, so it is the module a network wraps. ``mlp.fc1``/``fc2`` -> ``mlp.c_fc``/``c_proj`` (``weight``).
    """
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))", path)
    if m is None:
        raise LorakitError(f"not an HF CLIP text-encoder target: {path}")
    block = f"transformer.resblocks.{m[1]}"
    if m[4]:
        return f"{block}.mlp.{_OPEN_CLIP_MLP[m[4]]}", "weight", None
    if m[3] == "out_proj":
        return f"{block}.attn", "out_proj.weight", None
    return f"{block}.attn", "in_proj_weight", _QKV_SLOTS[m[3]]


def open_clip_to_hf_clip(path: str, param: str = "weight", slot: int | None = None) -> str:
    """The inverse of ``hf_clip_to_open_clip``."""
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(attn|mlp\.(c_fc|c_proj))", path)
    if m:
        block = f"text_model.encoder.layers.{m[1]}"
        if m[3] and param == "weight" and slot is None:
            return f"{block}.mlp.{_HF_MLP[m[3]]}"
        if m[2] == "attn" and param == "out_proj.weight" and slot is None:
            return f"{block}.self_attn.out_proj"
        if m[2] == "attn" and param == "in_proj_weight" and slot in _HF_QKV:
            return f"{block}.self_attn.{_HF_QKV[slot]}"
    raise LorakitError(f"not an OpenCLIP text-encoder target: {path} {param} {slot}")


# OpenCLIP text-tower weights -> HF CLIP text-model weights, outside the q/k/v split.
_OPEN_CLIP_TO_HF = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_BLOCK_TO_HF = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def convert_open_clip_text_state_dict(state_dict: Mapping[str, Any], layers: int | None = None) -> dict:
    """An OpenCLIP text tower's weights under HF ``CLIPTextModelWithProjection`` keys (drop ``text_projection.weight``
    for a plain ``CLIPTextModel``).

    ``layers`` keeps the first N resblocks (SD2's text encoder is the first 23 of 24). q/k/v are row slices of
    ``in_proj_weight``/``in_proj_bias`` and the projection is transposed: views of the same tensors.
    """
    converted = {}
    for key, value in state_dict.items():
        if key in _OPEN_CLIP_TO_HF:
            converted[_OPEN_CLIP_TO_HF[key]] = value
        elif key == "text_projection":
            converted["text_projection.weight"] = value.T
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            if layers is None or int(m[1]) < layers:
                width = value.shape[0] // 3
                for slot, name in _HF_QKV.items():
                    hf_key = f"text_model.encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"
                    converted[hf_key] = value[slot * width : (slot + 1) * width]
        elif (m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)) and m[2] in _OPEN_CLIP_BLOCK_TO_HF:
            if layers is None or int(m[1]) < layers:
                converted[f"text_model.encoder.layers.{m[1]}.{_OPEN_CLIP_BLOCK_TO_HF[m[2]]}.{m[3]}"] = value
        elif key not in ("logit_scale", "attn_mask"):
            raise LorakitError(f"unexpected OpenCLIP text key {key}")
    return converted


def text_block(path: str) -> bool:
    """True when an HF CLIP module path is a text-encoder target (q/k/v/out projections, fc1/fc2)."""
    return re.search(r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$", path) is not None


# ---------------------------------------------------------------------------------------------------------------
# Architecture of a network file
# ---------------------------------------------------------------------------------------------------------------

_CROSS_ATTENTION_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TEXT_WIDTH = {768: "sd1", 1024: "sd2"}


def detect_arch(names_and_shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The architecture a network file was made for, from its tensor names and shapes; None when it can't be seen.

    SDXL: ``lora_te1_``/``lora_te2_`` names, a cross-attention width of 2048, or transformer depths over 1; SD1 vs
    SD2: the cross-attention (attn2 ``to_k``) and text-encoder widths 768 vs 1024, else ``proj_in`` being a conv
    (SD1) or a linear (SD2). v-prediction is not visible in weights (callers read ``ss_v2`` and friends).
    """
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in names_and_shapes.items():
        module, _, suffix = key.partition(".")
        modules.setdefault(module, {})[suffix] = tuple(shape)
    if any(m.startswith(("lora_te1_", "lora_te2_")) for m in modules):
        return "sdxl"
    for module, tensors in modules.items():
        if module.startswith("lora_unet_") and re.search(r"attn2_to_[kv]$", module):
            arch = _CROSS_ATTENTION_WIDTH.get(_in_features(tensors))
            if arch:
                return arch
    if any(module.startswith("lora_unet_") and re.search(r"transformer_blocks_[1-9]", module) for module in modules):
        return "sdxl"
    for module, tensors in modules.items():
        if module.startswith("lora_te_") and re.search(r"(q_proj|k_proj|v_proj|fc1)$", module):
            arch = _TEXT_WIDTH.get(_in_features(tensors))
            if arch:
                return arch
    for module, tensors in modules.items():
        if module.startswith("lora_unet_") and module.endswith("_proj_in"):
            ndim = _weight_ndim(tensors)
            if ndim:
                return "sd1" if ndim == 4 else "sd2"
    return None


def _in_features(tensors: Mapping[str, tuple[int, ...]]) -> int | None:
    """Input width of the weight a module's tensors change (LoRA/LoCon, LoHa, LoKr, full diff)."""
    for suffix in ("lora_down.weight", "hada_w1_b", "diff"):
        if suffix in tensors and len(tensors[suffix]) >= 2:
            return tensors[suffix][1]
    w1 = tensors.get("lokr_w1") or tensors.get("lokr_w1_b")
    w2 = tensors.get("lokr_w2") or tensors.get("lokr_w2_b")
    if w1 and w2 and len(w1) >= 2 and len(w2) >= 2:
        return w1[1] * w2[1]
    return None


def _weight_ndim(tensors: Mapping[str, tuple[int, ...]]) -> int | None:
    for suffix in ("lora_down.weight", "lora_up.weight", "hada_w1_b", "diff"):
        if suffix in tensors:
            return len(tensors[suffix])
    return None


# ---------------------------------------------------------------------------------------------------------------
# Single-file (ldm layout) checkpoints
# ---------------------------------------------------------------------------------------------------------------

UNET_CHECKPOINT_PREFIX = "model.diffusion_model."
# Text encoders of single-file checkpoints: (key prefix, kohya component, "hf" or "open_clip").
_CHECKPOINT_TEXT_ENCODERS = {
    "sd1": [("cond_stage_model.transformer.", "te", "hf")],
    "sd2": [("cond_stage_model.model.", "te", "open_clip")],
    "sdxl": [("conditioner.embedders.0.transformer.", "te1", "hf"), ("conditioner.embedders.1.model.", "te2", "open_clip")],
}
# OpenCLIP text widths of the full-size models, used for in_proj rows when only keys (no shapes) are given.
_OPEN_CLIP_WIDTH = {"sd2": 1024, "sdxl": 1280}


def checkpoint_key_table(
    state_dict_keys: Iterable[str] | Mapping[str, Any], arch: str
) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """kohya module name -> (the checkpoint key of the weight it changes, block of rows or None).

    For single-file ldm-layout checkpoints. q/k/v of OpenCLIP (SD2, SDXL's te2) are row blocks of one
    ``in_proj_weight``: their width comes from the weight's shape when ``state_dict_keys`` is a mapping to tensors
    or shapes, else from the full-size architecture. SD2's last text layer is left out: the model reads the
    penultimate layer, as kohya's and diffusers' 23-layer SD2 text encoders do.
    """
    family = "sd2" if arch == "sd2-v" else arch
    if family not in _CHECKPOINT_TEXT_ENCODERS:
        raise LorakitError(f"unknown architecture {arch!r}")
    keys = list(state_dict_keys)
    unet_keys = [k[len(UNET_CHECKPOINT_PREFIX) :] for k in keys if k.startswith(UNET_CHECKPOINT_PREFIX)]
    layout = layout_from_keys(unet_keys)
    table: dict[str, tuple[str, tuple[int, int] | None]] = {}
    for key in unet_keys:
        module, _, param = key.rpartition(".")
        if param == "weight" and unet_block(module):
            table[unet_kohya_name(module, arch, layout)] = (UNET_CHECKPOINT_PREFIX + key, None)
    for prefix, component, kind in _CHECKPOINT_TEXT_ENCODERS[family]:
        text_keys = {k[len(prefix) :] for k in keys if k.startswith(prefix)}
        if kind == "hf":
            for key in text_keys:
                module, _, param = key.rpartition(".")
                if param == "weight" and text_block(module):
                    # Some old SD1 checkpoints lack the ``text_model.`` level that HF CLIP has now.
                    hf_path = module if module.startswith("text_model.") else f"text_model.{module}"
                    table[kohya_name(PREFIXES[component], hf_path)] = (prefix + key, None)
            continue
        layers = sorted({int(m[1]) for k in text_keys if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
        for layer in layers[:-1] if family == "sd2" else layers:
            for part in TEXT_TARGET_PARTS:
                hf_path = f"text_model.encoder.layers.{layer}.{part}"
                module, param, slot = hf_clip_to_open_clip(hf_path)
                if f"{module}.{param}" not in text_keys:
                    raise LorakitError(f"checkpoint has no {prefix}{module}.{param}")
                key = f"{prefix}{module}.{param}"
                rows = None
                if slot is not None:
                    width = _open_clip_width(state_dict_keys, key, family)
                    rows = (slot * width, (slot + 1) * width)
                table[kohya_name(PREFIXES[component], hf_path)] = (key, rows)
    return table


def _open_clip_width(state_dict: Iterable[str] | Mapping[str, Any], key: str, family: str) -> int:
    if isinstance(state_dict, Mapping):
        value = state_dict[key]
        shape = getattr(value, "shape", value)
        return int(shape[0]) // 3
    return _OPEN_CLIP_WIDTH[family]
