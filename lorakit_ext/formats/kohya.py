"""Network files in the kohya layout: read every variant in circulation, write what kohya and LyCORIS write.

Read: kohya / LyCORIS names (``lora_unet_...``, ``lora_te_``/``lora_te1_``/``lora_te2_``; SD1/SD2 UNet names in
either spelling), PEFT / diffusers keys (``unet.<path>.lora_A.weight``, ``text_encoder.<path>.lora_B.weight``,
optionally behind ``base_model.model.``; scaled by ``lora_alpha / r`` when PEFT's ``adapter_config.json`` is beside
the file) and the older diffusers forms (``<path>.lora.down.weight``, ``lora_linear_layer``, attention-processor
``to_q_lora``). Everything becomes a ``NetworkWeights`` under canonical kohya module names: diffusers-style UNet
names for SD1/SD2, compvis-style for SDXL, ``lora_te1_``/``lora_te2_`` for SDXL's text encoders. A module without
``alpha`` keeps ``alpha=None``, which every loader (WebUI, kohya, diffusers) applies with scale 1.0.

Write: ``<name>.lora_down.weight`` ... and ``<name>.alpha`` as a 0-d tensor in the save dtype, string metadata with
kohya's ``ss_*`` fields, ModelSpec ``modelspec.*`` fields and the ``sshs_*`` hashes of the bytes actually written.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from lorakit_ext.errors import LorakitError, first_few
from lorakit_ext.formats import safetensors_io
from lorakit_ext.models import naming
from lorakit_ext.models.base import BASE_MODEL_VERSION
from lorakit_ext.networks.weights import LORA_DOWN, LORA_MID, LORA_UP, ModuleWeights, NetworkWeights

PathLike = str | os.PathLike

ALPHA = "alpha"
# Tensor suffixes of kohya LoRA/LoCon and LyCORIS LoCon-Tucker, LoHa and LoKr, alpha aside.
KOHYA_SUFFIXES = frozenset(
    {LORA_DOWN, LORA_UP, LORA_MID}
    | {f"hada_{part}" for part in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")}
    | {f"lokr_{part}" for part in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")}
)
_KOHYA_KEY = re.compile(r"(lora_(?:unet|te1|te2|te)_[A-Za-z0-9_]+)\.(.+)")
# PEFT and older diffusers spellings: key ending -> kohya suffix. Tried in order, longest first where they overlap.
PEFT_DOWN = ".lora_A.weight"
# PEFT writes its LoraConfig here, beside adapter_model.safetensors, with LoraConfig's defaults for what it omits.
PEFT_CONFIG = "adapter_config.json"
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}
_FOREIGN_ENDINGS = (
    (PEFT_DOWN, LORA_DOWN),
    (".lora_B.weight", LORA_UP),
    (".lora_linear_layer.down.weight", LORA_DOWN),
    (".lora_linear_layer.up.weight", LORA_UP),
    (".lora.down.weight", LORA_DOWN),
    (".lora.up.weight", LORA_UP),
    ("_lora.down.weight", LORA_DOWN),  # attention processors: attn1.processor.to_q_lora.down.weight
    ("_lora.up.weight", LORA_UP),
    (".alpha", ALPHA),
)
_FOREIGN_COMPONENTS = (("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te"))
# Attention-processor projections of the old diffusers text-encoder form -> HF CLIP names.
_TEXT_PROCESSOR_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

MODELSPEC_VERSION = "1.0.0"
# ModelSpec architecture ids (kohya's library/sai_model_spec.py), the implementation kohya names for a LoRA of
# each, its default resolution and prediction type.
MODELSPEC_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}
MODELSPEC_IMPLEMENTATION = {
    "sd1": "diffusers",
    "sd2": "diffusers",
    "sd2-v": "diffusers",
    "sdxl": "https://github.com/Stability-AI/generative-models",
}
DEFAULT_RESOLUTION = {"sd1": "512x512", "sd2": "512x512", "sd2-v": "768x768", "sdxl": "1024x1024"}
PREDICTION_TYPE = {"sd1": "epsilon", "sd2": "epsilon", "sd2-v": "v", "sdxl": "epsilon"}
KOHYA_LORA_MODULE = "networks.lora"
LYCORIS_MODULE = "lycoris.kohya"
# Written from the tensors on every save, so a value carried over from an input file can never be stale.
HASH_KEYS = safetensors_io.HASH_KEYS
STALE_KEYS = HASH_KEYS + ("modelspec.hash_sha256",)
# ss_network_args entries that describe the tensors (re-derived on save); others (dropout, ...) are kept.
STRUCTURE_ARGS = frozenset({"algo", "conv_dim", "conv_alpha", "use_tucker", "use_conv_cp"})


# --- reading -------------------------------------------------------------------------------------------------------


def load_network(path: PathLike, *, layout: naming.UNetLayout | None = None) -> NetworkWeights:
    """Read a network file of any supported variant into canonical kohya names, checked.

    ``layout`` is the UNet layout used to respell compvis <-> diffusers names (default: the full-size one of the
    detected architecture); pass the model's own when it is not full-size.
    """
    tensors, metadata = safetensors_io.load_file(path)
    if not tensors:
        raise LorakitError(f"{path}: holds no tensors")
    grouped = _group_by_module({**_peft_alphas(tensors, path), **tensors}, path)
    _check_finite(grouped, path)
    arch = naming.detect_arch(_names_and_shapes(grouped))
    modules: dict[str, ModuleWeights] = {}
    for name, parts in grouped.items():
        canonical = _canonical_name(name, arch, layout, path)
        if canonical in modules:
            raise LorakitError(f"{path}: module {canonical} appears twice (as {name} and in another spelling)")
        modules[canonical] = _module_weights(canonical, parts, path)
    return NetworkWeights(modules, metadata, str(path))


def _group_by_module(tensors: Mapping[str, torch.Tensor], path: PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors by provisional kohya module name and kohya suffix; unknown keys are an error."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        parsed = _parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        name, suffix = parsed
        parts = grouped.setdefault(name, {})
        if suffix in parts:
            raise LorakitError(f"{path}: module {name} has {suffix} twice (key {key})")
        parts[suffix] = tensor
    if unknown:
        raise LorakitError(
            f"{path}: {len(unknown)} keys that are not LoRA/LoCon/LoHa/LoKr tensors: {first_few(sorted(unknown))}"
        )
    return grouped


def _peft_alphas(tensors: Mapping[str, torch.Tensor], path: PathLike) -> dict[str, torch.Tensor]:
    """``<module>.alpha`` for each PEFT ``lora_A`` module when PEFT's ``adapter_config.json`` lies beside the file.

    PEFT keeps the scale out of the tensors: it is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per module
    overridden by ``rank_pattern`` / ``alpha_pattern``. The alpha given here makes ``alpha / rank`` that scale.
    Without a config a PEFT file applies at scale 1.0, as diffusers' older files without alphas do.
    """
    downs = [key for key in tensors if key.endswith(PEFT_DOWN)]
    config_path = Path(path).with_name(PEFT_CONFIG)
    if not downs or not config_path.is_file():
        return {}
    config = _peft_config(config_path)
    alphas = {}
    for key in downs:
        module_path = key[: -len(PEFT_DOWN)]
        scale = _peft_scale(config, module_path.removeprefix("base_model.model."))
        alphas[f"{module_path}.{ALPHA}"] = torch.tensor(scale * tensors[key].shape[0], dtype=torch.float64)
    return alphas


def _peft_config(config_path: Path) -> dict:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LorakitError(f"{config_path}: not a readable PEFT adapter config ({error})") from None
    if not isinstance(config, dict):
        raise LorakitError(f"{config_path}: not a PEFT adapter config (not a JSON object)")
    if config.get("peft_type", "LORA") != "LORA":
        raise LorakitError(f"{config_path}: a {config['peft_type']} adapter; only PEFT LoRA adapters are read")
    for option in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(option) or {}
        if not isinstance(patterns, dict) or not all(_is_number(v) for v in patterns.values()):
            raise LorakitError(f"{config_path}: {option} must map module patterns to positive numbers")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise LorakitError(f"{config_path}: {option} pattern {pattern!r} is not a regex ({error})") from None
    for option, default in PEFT_DEFAULTS.items():
        if not _is_number(config.get(option, default)):
            raise LorakitError(f"{config_path}: {option} must be a positive number, got {config[option]!r}")
    return config


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _peft_scale(config: Mapping, module_path: str) -> float:
    """The scale PEFT gives the module at ``module_path`` (a path in the model, e.g. ``down_blocks.0...to_k``)."""
    rank = _peft_pattern_value(config.get("rank_pattern"), module_path, config.get("r", PEFT_DEFAULTS["r"]))
    alpha = config.get("lora_alpha", PEFT_DEFAULTS["lora_alpha"])
    alpha = _peft_pattern_value(config.get("alpha_pattern"), module_path, alpha)
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _peft_pattern_value(patterns: Mapping[str, float] | None, module_path: str, default: float) -> float:
    """PEFT's rule: the first pattern that matches the end of the module path at a dot boundary wins."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return default


def _parse_key(key: str) -> tuple[str, str] | None:
    """(provisional kohya module name, kohya suffix) of one file key, or None when the key is not understood."""
    if m := _KOHYA_KEY.fullmatch(key):
        return (m[1], m[2]) if m[2] in KOHYA_SUFFIXES or m[2] == ALPHA else None
    for ending, suffix in _FOREIGN_ENDINGS:
        if key.endswith(ending):
            name = _foreign_module_name(key[: -len(ending)], processor_form=ending.startswith("_lora"))
            return (name, suffix) if name else None
    return None


def _foreign_module_name(path: str, processor_form: bool) -> str | None:
    """A PEFT / diffusers module path -> provisional kohya name (UNet in the file's spelling, te not yet te1)."""
    path = path.removeprefix("base_model.model.")
    component = next((c for prefix, c in _FOREIGN_COMPONENTS if path.startswith(prefix)), None)
    if component:
        path = path.split(".", 1)[1]
    elif naming.unet_spelling(path):
        component = "unet"
    elif path.startswith("text_model."):
        component = "te"
    else:
        return None
    if processor_form:
        path = path.replace(".processor.", ".")
        head, _, projection = path.rpartition(".")
        if component == "unet":
            path = f"{path}.0" if projection == "to_out" else path
        elif projection in _TEXT_PROCESSOR_NAMES:
            path = f"{head}.{_TEXT_PROCESSOR_NAMES[projection]}"
    return naming.kohya_name(naming.PREFIXES[component], path)


def _names_and_shapes(grouped: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, tuple[int, ...]]:
    return {f"{name}.{suffix}": tuple(t.shape) for name, parts in grouped.items() for suffix, t in parts.items()}


def _canonical_name(name: str, arch: str | None, layout: naming.UNetLayout | None, path: PathLike) -> str:
    if arch is None:
        return name
    if arch == "sdxl" and name.startswith(naming.PREFIXES["te"] + "_"):
        name = naming.PREFIXES["te1"] + name[len(naming.PREFIXES["te"]) :]
    try:
        return naming.normalize_kohya_name(name, arch, layout)
    except LorakitError as error:
        raise LorakitError(f"{path}: module {name}: {error}") from None


def _check_finite(grouped: Mapping[str, Mapping[str, torch.Tensor]], path: PathLike) -> None:
    for name, parts in grouped.items():
        for suffix, tensor in parts.items():
            if not tensor.is_floating_point():
                raise LorakitError(f"{path}: module {name} has a non-float {suffix} ({tensor.dtype})")
            if not all_finite(tensor):
                raise LorakitError(f"{path}: module {name} has NaN/Inf values in {suffix}")


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``: min and max propagate NaN, and ``aminmax`` is ~15x faster than ``isfinite`` on
    CPU fp16, which matters when every tensor of a file is checked on load and save."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(low.item()) and math.isfinite(high.item())


def _module_weights(name: str, parts: Mapping[str, torch.Tensor], path: PathLike) -> ModuleWeights:
    tensors = {suffix: t for suffix, t in parts.items() if suffix != ALPHA}
    alpha = parts.get(ALPHA)
    if alpha is not None and alpha.numel() != 1:
        raise LorakitError(f"{path}: module {name} has an alpha of shape {tuple(alpha.shape)}, not a scalar")
    if not tensors:
        raise LorakitError(f"{path}: module {name} has an alpha but no weights")
    module = ModuleWeights(tensors, None if alpha is None else float(alpha.item()))
    try:
        algo = module.algo
        problem = _shape_problem(module, algo)
    except LorakitError as error:
        raise LorakitError(f"{path}: module {name}: {error}") from None
    if problem:
        raise LorakitError(f"{path}: module {name}: {problem}")
    return module


def _shape_problem(module: ModuleWeights, algo: str) -> str | None:
    """Why a module's tensors cannot make one weight delta, or None when they can."""
    t = {suffix: tuple(tensor.shape) for suffix, tensor in module.tensors.items()}
    empty = sorted(suffix for suffix, shape in t.items() if 0 in shape)
    if empty:  # every reader and merger of ours assumes a factor holds something
        return f"{empty[0]} {t[empty[0]]} is empty (rank 0)"
    foreign = sorted(s for s in t if not s.startswith({"lora": "lora_", "loha": "hada_", "lokr": "lokr_"}[algo]))
    if foreign:
        return f"mixes {algo} tensors with {', '.join(foreign)}"
    if algo == "lora":
        down, up, mid = t[LORA_DOWN], t[LORA_UP], t.get(LORA_MID)
        if len(down) < 2 or len(up) < 2:
            return f"lora_down {down} and lora_up {up} must be at least 2-D"
        inner = (mid[0], mid[1]) if mid else (down[0], down[0])
        if up[1] != inner[0] or down[0] != inner[1] or (mid and len(mid) != 4):
            detail = f", lora_mid {mid}" if mid else ""
            return f"ranks disagree: lora_down {down}, lora_up {up}{detail}"
        return None
    if algo == "loha":
        return _loha_problem(t)
    return _lokr_problem(t)


def _loha_problem(t: Mapping[str, tuple[int, ...]]) -> str | None:
    for which in ("1", "2"):
        a, b = t[f"hada_w{which}_a"], t[f"hada_w{which}_b"]
        if len(a) != 2 or len(b) < 2:
            return f"hada_w{which}_a {a} and hada_w{which}_b {b} must be 2-D"
        if problem := _factor_problem(t, f"hada_w{which}_a", f"hada_w{which}_b", f"hada_t{which}"):
            return problem
    if ("hada_t1" in t) != ("hada_t2" in t):
        return "has one of hada_t1/hada_t2 without the other"
    if _loha_out(t, "1") != _loha_out(t, "2") or t["hada_w1_b"][1:] != t["hada_w2_b"][1:]:
        return f"hada_w1 and hada_w2 products differ in shape ({_loha_out(t, '1')} vs {_loha_out(t, '2')} rows)"
    return None


def _loha_out(t: Mapping[str, tuple[int, ...]], which: str) -> int:
    a = t[f"hada_w{which}_a"]
    return a[1] if f"hada_t{which}" in t else a[0]


def _lokr_problem(t: Mapping[str, tuple[int, ...]]) -> str | None:
    for which in ("1", "2"):
        if f"lokr_w{which}" not in t:
            problem = _factor_problem(t, f"lokr_w{which}_a", f"lokr_w{which}_b", f"lokr_t{which}")
        elif f"lokr_w{which}_a" in t or f"lokr_w{which}_b" in t:
            problem = f"has lokr_w{which} and its factors lokr_w{which}_a/_b"
        else:
            problem = None
        if problem:
            return problem
    return None


def _factor_problem(t: Mapping[str, tuple[int, ...]], a_key: str, b_key: str, core_key: str) -> str | None:
    """Whether ``a @ b`` chains (a's last axis = b's rows), or with a Tucker core, whether core (ra, rb, kh, kw)
    joins a (ra, ...) and b (rb, ...)."""
    a, b, core = t[a_key], t[b_key], t.get(core_key)
    if (core[0] == a[0] and core[1] == b[0]) if core else a[-1] == b[0]:
        return None
    return f"ranks disagree: {a_key} {a}, {b_key} {b}" + (f", {core_key} {core}" if core else "")


# --- writing -------------------------------------------------------------------------------------------------------


def save_network(
    path: PathLike,
    weights: NetworkWeights,
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, object] | None = None,
    arch: str | None = None,
) -> dict[str, str]:
    """Write ``weights`` as a kohya-layout safetensors file, atomically; return the metadata written.

    ``dtype`` casts every tensor (alphas included) before hashing, so ``sshs_*`` describe the bytes on disk.
    ``metadata`` (training fields, ``ss_sd_model_name``, ``modelspec.title``, ...) is laid over ``weights.metadata``;
    non-string values are written as ``str()`` (dicts and lists as JSON). The fields that describe the tensors
    (``ss_network_*``, ``ss_base_model_version``, ``ss_v2``, ``modelspec.architecture``, the hashes) are always
    derived from the tensors; those that name this file (``ss_output_name``, ``modelspec.title``/``date``) come
    from ``metadata`` or default to the file's stem and now, never from an input file (the WebUI shows
    ``ss_output_name`` as the alias, and two files must not share one). ``arch`` is needed only where weights
    cannot tell it (SD2 v-prediction, say); otherwise it comes from the metadata or the tensors.
    """
    if not weights.modules:
        raise LorakitError(f"{path}: refusing to write a network with no modules")
    tensors = kohya_state_dict(weights, dtype)
    layout = safetensors_io.TensorLayout(tensors)
    layout.start_model_hash()  # in a thread, alongside the checks and the write
    bad = next((key for key, t in tensors.items() if not all_finite(t)), None)
    if bad:
        raise LorakitError(f"{path}: refusing to write NaN/Inf values ({bad}, in {dtype or 'the stored dtype'})")
    caller = {key: _metadata_string(value) for key, value in (metadata or {}).items()}
    given = {**weights.metadata, **caller}
    arch = arch or network_arch(NetworkWeights(weights.modules, given))
    written = {key: value for key, value in given.items() if key not in STALE_KEYS}
    written.update(_derived_metadata(weights, arch, Path(path), given, caller))
    kohya_fields = {key: value for key, value in written.items() if key.startswith("ss_")}
    return safetensors_io.save_hashed_atomic(path, layout, written, kohya_fields)


def kohya_state_dict(weights: NetworkWeights, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``<module>.<suffix>`` -> contiguous CPU tensor in ``dtype`` (else as stored, not copied), alphas as 0-d tensors.

    A module without alpha gets none (loaders then use scale 1.0, as they did for the file it came from).
    """
    state: dict[str, torch.Tensor] = {}
    for name, module in weights.modules.items():
        for suffix, tensor in module.tensors.items():
            state[f"{name}.{suffix}"] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        if module.alpha is not None:
            alpha_dtype = dtype or next(iter(module.tensors.values())).dtype
            state[f"{name}.{ALPHA}"] = torch.tensor(module.alpha, dtype=alpha_dtype)
    return state


def _metadata_string(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def _derived_metadata(
    weights: NetworkWeights, arch: str | None, path: Path, given: Mapping[str, str], caller: Mapping[str, str]
) -> dict[str, str]:
    """kohya ``ss_*`` and ModelSpec fields that follow from the tensors, the architecture and the file name."""
    output_name = caller.get("ss_output_name", path.stem)
    summary = _network_summary(weights)
    derived = {
        "ss_network_module": summary["module"],
        "ss_network_dim": summary["dim"],
        "ss_network_alpha": summary["alpha"],
        "ss_output_name": output_name,
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.title": caller.get("modelspec.title", output_name),
        "modelspec.date": caller.get("modelspec.date", datetime.datetime.now().replace(microsecond=0).isoformat()),
    }
    kept_args = {k: v for k, v in _json_object(given.get("ss_network_args")).items() if k not in STRUCTURE_ARGS}
    args = {**kept_args, **summary["args"]}
    if args:
        derived["ss_network_args"] = json.dumps(args)
    if arch is not None:
        derived.update(
            {
                "ss_base_model_version": BASE_MODEL_VERSION[arch],
                "ss_v2": str(arch in ("sd2", "sd2-v")),
                "modelspec.architecture": f"{MODELSPEC_ARCHITECTURE[arch]}/lora",
                "modelspec.implementation": MODELSPEC_IMPLEMENTATION[arch],
                "modelspec.resolution": given.get("modelspec.resolution", DEFAULT_RESOLUTION[arch]),
                "modelspec.prediction_type": PREDICTION_TYPE[arch],
            }
        )
    return derived


def _json_object(text: str | None) -> dict:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _network_summary(weights: NetworkWeights) -> dict:
    """``ss_network_module``/``_dim``/``_alpha``/``_args`` as kohya and LyCORIS write them for these modules.

    dim/alpha are those of the linear (and 1x1) modules, conv_dim/conv_alpha those of kxk convs; several values
    (a dynamically resized network) are written as "Dynamic", as kohya's resize script does.
    """
    kinds = Counter()
    linear_ranks, linear_alphas, conv_ranks, conv_alphas = set(), set(), set(), set()
    for name, module in weights.modules.items():
        kind = module_kind(module)
        kinds[kind] += 1
        kxk = _is_kxk_conv(name, module)
        (conv_ranks if kxk else linear_ranks).add(module.rank)
        (conv_alphas if kxk else linear_alphas).add(module.alpha if module.alpha is not None else module.rank)
    lycoris_algo = {"locon_tucker": "locon", "loha": "loha", "lokr": "lokr"}
    main_kind = max(kinds, key=lambda kind: (kind in lycoris_algo, kinds[kind]))
    args: dict[str, str] = {}
    if main_kind in lycoris_algo:
        args["algo"] = lycoris_algo[main_kind]
        if main_kind == "locon_tucker":
            args["use_tucker"] = "True"
    if conv_ranks:
        args["conv_dim"] = _single_value(conv_ranks, int)
        args["conv_alpha"] = _single_value(conv_alphas, float)
    return {
        "module": LYCORIS_MODULE if "algo" in args else KOHYA_LORA_MODULE,
        "dim": _single_value(linear_ranks or conv_ranks, int),
        "alpha": _single_value(linear_alphas or conv_alphas, float),
        "args": args,
    }


# UNet modules that are kxk convs in every SD-style UNet (ResBlock convs, samplers, conv_in/out), either spelling.
_KXK_CONV_NAME = re.compile(r"(conv[12]|in_layers_2|out_layers_3|samplers_0_conv|_op|_\d+_[12]_conv|conv_in|conv_out)$")


def _is_kxk_conv(name: str, module: ModuleWeights) -> bool:
    """Whether kohya/LyCORIS give this module conv_dim; by name where LyCORIS stored it flat (shape unknown)."""
    kind = geometry(module)
    if kind == "flat":
        return name.startswith(naming.PREFIXES["unet"] + "_") and _KXK_CONV_NAME.search(name) is not None
    return kind not in ("linear", "conv1x1")


def _single_value(values: set, kind: type) -> str:
    known = {v for v in values if v is not None}
    if len(known) != 1:
        return "Dynamic" if known else "None"
    return str(kind(known.pop()))


# --- describing ----------------------------------------------------------------------------------------------------


def module_kind(module: ModuleWeights) -> str:
    """lora (linear or 1x1), locon (kxk conv), locon_tucker (with lora_mid), loha or lokr."""
    algo = module.algo
    if algo != "lora":
        return algo
    if LORA_MID in module.tensors:
        return "locon_tucker"
    return "locon" if geometry(module) not in ("linear", "conv1x1") else "lora"


def geometry(module: ModuleWeights) -> str:
    """"linear", "conv1x1", "conv3x3" ... or "flat" where LyCORIS stored the factors flattened (shape unknown)."""
    if module.is_conv is None:
        return "flat"
    if not module.is_conv:
        return "linear"
    kh, kw = module.kernel_size
    return f"conv{kh}x{kw}"


def network_arch(weights: NetworkWeights) -> str | None:
    """The base architecture: from names and shapes, with v-prediction (invisible in weights) from the metadata."""
    detected = naming.detect_arch(_names_and_shapes({name: m.tensors for name, m in weights.modules.items()}))
    stated = _arch_from_metadata(weights.metadata)
    if detected == "sd2" and stated == "sd2-v":
        return "sd2-v"
    return detected or stated


def _arch_from_metadata(metadata: Mapping[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    for arch, written in BASE_MODEL_VERSION.items():
        if version == written:
            return arch
    architecture = metadata.get("modelspec.architecture", "").split("/")[0]
    for arch, written in MODELSPEC_ARCHITECTURE.items():
        if architecture == written:
            return arch
    if metadata.get("ss_v2") == "True":
        return "sd2-v" if metadata.get("ss_v_parameterization") == "True" else "sd2"
    return None


def component_of(name: str) -> str:
    """"unet", "te", "te1" or "te2" from a kohya module name."""
    for component, prefix in naming.PREFIXES.items():
        if name.startswith(prefix + "_"):
            return component
    raise LorakitError(f"not a kohya module name: {name}")


def describe_network(weights: NetworkWeights) -> dict:
    """What a network holds, as JSON-ready data (the ``info`` verb prints it)."""
    kinds: dict[str, Counter] = {}
    ranks: dict[str, set] = {}
    alphas: dict[str, set] = {}
    components = Counter()
    alpha_missing = 0
    for name, module in weights.modules.items():
        kind = module_kind(module)
        kinds.setdefault(kind, Counter())[geometry(module)] += 1
        ranks.setdefault(kind, set()).add(module.rank)
        if module.alpha is None:
            alpha_missing += 1
        else:
            alphas.setdefault(kind, set()).add(module.alpha)
        components[component_of(name)] += 1
    all_tensors = [t for module in weights.modules.values() for t in module.tensors.values()]
    parameters = sum(t.numel() for t in all_tensors)
    return {
        "arch": network_arch(weights),
        "modules": {"total": len(weights.modules), **dict(sorted(components.items()))},
        "algorithms": {kind: dict(sorted(counts.items())) for kind, counts in sorted(kinds.items())},
        "ranks": {kind: _sorted_values(values) for kind, values in sorted(ranks.items())},
        "alphas": {kind: _sorted_values(values) for kind, values in sorted(alphas.items())},
        "alpha_missing": alpha_missing,  # these modules apply with scale 1.0
        "parameters": parameters,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in all_tensors}),
        "hashes": {key: weights.metadata[key] for key in HASH_KEYS if key in weights.metadata},
        "metadata": dict(sorted(weights.metadata.items())),
    }


def _sorted_values(values: Iterable) -> list:
    return sorted(v for v in values if v is not None)


# --- applying to a model -------------------------------------------------------------------------------------------


def check_fits_model(
    weights: NetworkWeights, targets: Mapping[str, tuple[int, ...]], model_arch: str | None = None
) -> None:
    """Raise one line unless every module of ``weights`` has a target (kohya name -> target weight shape) its delta
    fits: naming the file, the file's architecture and the model's, how many modules have no target and how many
    do not fit, with the first few of each."""
    unmatched = [name for name in weights.modules if name not in targets]
    misfits = [
        name
        for name, module in weights.modules.items()
        if name in targets and _delta_rows_and_size(module) != (targets[name][0], math.prod(targets[name]))
    ]
    if not unmatched and not misfits:
        return
    total = len(weights.modules)
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} of {total} modules match no target of the model ({first_few(unmatched)})")
    if misfits:
        name, others = misfits[0], f"; also {first_few(misfits[1:], 2)}" if len(misfits) > 1 else ""
        problems.append(
            f"{len(misfits)} of {total} modules do not fit the model's weights ({name} makes a delta of "
            f"{_describe_delta(weights.modules[name])} but the model's weight is {tuple(targets[name])}{others})"
        )
    archs = f"made for {network_arch(weights) or 'an unknown architecture'}"
    if model_arch:
        archs += f", the model is {model_arch}"
    raise LorakitError(f"{weights.label}: {archs}: {'; '.join(problems)}")


def _delta_rows_and_size(module: ModuleWeights) -> tuple[int, int]:
    """(output rows, element count) of a module's delta, from factor shapes alone (flattened LyCORIS included)."""
    t = module.tensors
    algo = module.algo
    if algo == "lora":
        down = t[LORA_DOWN]
        columns = down.shape[1] * math.prod((t[LORA_MID] if LORA_MID in t else down).shape[2:])
        return t[LORA_UP].shape[0], t[LORA_UP].shape[0] * columns
    if algo == "loha":
        b = t["hada_w1_b"]
        columns = b.shape[1] * math.prod(t["hada_t1"].shape[2:]) if "hada_t1" in t else math.prod(b.shape[1:])
        return module.out_features, module.out_features * columns
    columns = 1
    for which in ("1", "2"):
        full, b, core = t.get(f"lokr_w{which}"), t.get(f"lokr_w{which}_b"), t.get(f"lokr_t{which}")
        if full is not None:
            columns *= math.prod(full.shape[1:])
        else:
            columns *= b.shape[1] * math.prod(core.shape[2:]) if core is not None else math.prod(b.shape[1:])
    return module.out_features, module.out_features * columns


def _describe_delta(module: ModuleWeights) -> str:
    if module.shape is not None:
        return str(tuple(module.shape))
    rows, size = _delta_rows_and_size(module)
    return f"{rows} rows x {size // rows} columns"
