"""X/Y/Z plot axes for LoRA files and weights, added to the WebUI's built-in ``xyz_grid`` script.

The prompt rewriting is pure (``set_lora_weight`` and friends) so it is tested without a WebUI. The axes are
appended to the ``axis_options`` of the loaded ``xyz_grid`` module, found through ``modules.scripts.scripts_data``
as other extensions do, once per process. Which ``<lora:...>`` an axis changes: the one named in Settings
("lorakit_xyz_lora"), else the prompt's only one; when the prompt has none, the axis adds it.
"""

from __future__ import annotations

import re

from lorakit_ext.errors import LorakitError

AXIS_WEIGHT = "[LoRA Kit] LoRA weight"
AXIS_FILE = "[LoRA Kit] LoRA file"
AXIS_TE_UNET = "[LoRA Kit] LoRA TE/UNet weight"
LORA_OPTION = "lorakit_xyz_lora"
LEGEND_OPTION = "lorakit_xyz_legend_keys"
LORA_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>")


# --- prompt rewriting (pure) ---------------------------------------------------------------------------------------


def lora_tags(prompt: str) -> list[tuple[str, list[str]]]:
    """(name, [arguments]) of every ``<lora:name:arg:...>`` in the prompt, in order."""
    return [(m.group(1), [a for a in m.group(2).split(":")[1:]]) for m in LORA_TAG.finditer(prompt)]


def chosen_lora(prompt: str, preferred: str) -> str:
    """The Lora an axis changes: ``preferred`` when given, else the prompt's only one."""
    if preferred:
        return preferred
    names = [name for name, _ in lora_tags(prompt)]
    if len(names) != 1:
        found = "no <lora:...>" if not names else f"{len(names)} <lora:...> tags"
        raise LorakitError(f"X/Y/Z plot: the prompt has {found}; name the LoRA in Settings > LoRA Kit")
    return names[0]


def set_lora_args(prompt: str, name: str, args: list[str]) -> str:
    """The prompt with ``<lora:name:...>`` given these arguments (every occurrence), or with it added."""
    tag = "<lora:" + ":".join([name, *args]) + ">"
    if any(n == name for n, _ in lora_tags(prompt)):
        return LORA_TAG.sub(lambda m: tag if m.group(1) == name else m.group(0), prompt)
    return f"{prompt} {tag}".strip()


def set_lora_weight(prompt: str, name: str, weight: float) -> str:
    """``<lora:name:weight>``, keeping any further arguments (UNet weight, dyn) the tag had."""
    old = next((args for n, args in lora_tags(prompt) if n == name), [])
    return set_lora_args(prompt, name, [_number(weight), *old[1:]])


def set_lora_te_unet(prompt: str, name: str, value: str) -> str:
    """``<lora:name:te:unet>`` from an axis value "TE/UNet" such as "0.5/1"."""
    te, sep, unet = str(value).partition("/")
    try:
        te_weight, unet_weight = float(te), float(unet if sep else te)
    except ValueError:
        raise LorakitError(f"{AXIS_TE_UNET}: {value!r} is not TE/UNet, like 0.5/1") from None
    return set_lora_args(prompt, name, [_number(te_weight), _number(unet_weight)])


def replace_lora_file(prompt: str, preferred: str, new_name: str) -> str:
    """The chosen ``<lora:...>`` renamed to ``new_name`` (keeping its weights), or ``<lora:new_name:1>`` added."""
    names = [n for n, _ in lora_tags(prompt)]
    if not names and not preferred:
        return set_lora_args(prompt, new_name, ["1"])
    old = chosen_lora(prompt, preferred)
    args = next((a for n, a in lora_tags(prompt) if n == old), ["1"])
    without = LORA_TAG.sub(lambda m: "" if m.group(1) == old else m.group(0), prompt).strip()
    return set_lora_args(without, new_name, args)


def legend(label: str, value: object, metadata: dict[str, str], keys: list[str]) -> str:
    """An axis label with chosen ``ss_*`` fields of the file appended: "my_lora (ss_epoch 4, ss_network_dim 8)"."""
    shown = [f"{key} {metadata[key]}" for key in keys if key in metadata]
    return f"{label}: {value}" + (f" ({', '.join(shown)})" if shown else "")


def _number(value: float) -> str:
    return f"{float(value):g}"


# --- registration (WebUI) ------------------------------------------------------------------------------------------


def find_xyz_module():
    """The loaded ``scripts/xyz_grid.py`` module, or None (the script is disabled or renamed)."""
    from modules import scripts

    for data in scripts.scripts_data:
        if data.script_class.__module__ == "xyz_grid.py" and hasattr(data.module, "AxisOption"):
            return data.module
    return None


def register_axes() -> bool:
    """Add the three axes to the X/Y/Z plot once; False when the plot script is not there."""
    from modules import shared

    from lorakit_ext.webui.host import builtin_lora

    xyz = find_xyz_module()
    if xyz is None:
        return False
    if any(option.label == AXIS_WEIGHT for option in xyz.axis_options):
        return True

    def preferred() -> str:
        return getattr(shared.opts, LORA_OPTION, "") or ""

    def apply_weight(p, x, xs):
        p.prompt = set_lora_weight(p.prompt, chosen_lora(p.prompt, preferred()), x)

    def apply_te_unet(p, x, xs):
        p.prompt = set_lora_te_unet(p.prompt, chosen_lora(p.prompt, preferred()), x)

    def apply_file(p, x, xs):
        p.prompt = replace_lora_file(p.prompt, preferred(), x)

    def file_choices() -> list[str]:
        lora = builtin_lora()
        return sorted(lora.available_networks) if lora is not None else []

    def file_legend(p, opt, x):
        lora = builtin_lora()
        entry = lora.available_networks.get(x) if lora is not None else None
        keys = [k.strip() for k in (getattr(shared.opts, LEGEND_OPTION, "") or "").split(",") if k.strip()]
        return legend(opt.label, x, dict(getattr(entry, "metadata", None) or {}), keys)

    xyz.axis_options.extend(
        [
            xyz.AxisOption(AXIS_WEIGHT, float, apply_weight),
            xyz.AxisOption(AXIS_FILE, str, apply_file, format_value=file_legend, choices=file_choices),
            xyz.AxisOption(AXIS_TE_UNET, str, apply_te_unet),
        ]
    )
    return True
