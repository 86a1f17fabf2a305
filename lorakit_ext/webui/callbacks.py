"""The WebUI callbacks lorakit registers (called once from ``scripts/lorakit.py``).

``on_ui_tabs``: the "LoRA Kit" tab. ``on_ui_settings``: the output subfolder and the X/Y/Z options.
``on_app_started``: the ``/lorakit/v1`` routes (with ``--api``). ``on_before_ui``: the X/Y/Z axes. One
``JobManager`` serves the tab and the API, so a job started from either is seen by both and never runs beside
another.
"""

from __future__ import annotations

from lorakit_ext.webui import xyz
from lorakit_ext.webui.host import DEFAULT_OUTPUT_SUBFOLDER, OUTPUT_SUBFOLDER_OPTION, WebUIHost

SETTINGS_SECTION = ("lorakit", "LoRA Kit")
_manager = None


def manager():
    """The process's job manager (created on first use, after the WebUI's modules are loaded)."""
    global _manager
    if _manager is None:
        from lorakit_ext.ui.jobs import JobManager

        _manager = JobManager(WebUIHost())
    return _manager


def on_ui_tabs():
    from lorakit_ext.ui.tabs import build_blocks

    return [(build_blocks(manager().host, manager()), "LoRA Kit", "lorakit")]


def on_ui_settings():
    from modules import shared

    options = {
        OUTPUT_SUBFOLDER_OPTION: shared.OptionInfo(
            DEFAULT_OUTPUT_SUBFOLDER, "Folder for new LoRA files, inside the Lora folder (empty: the Lora folder)"
        ),
        xyz.LORA_OPTION: shared.OptionInfo(
            "", "X/Y/Z plot: the LoRA the [LoRA Kit] axes change (empty: the prompt's only <lora:...>)"
        ),
        xyz.LEGEND_OPTION: shared.OptionInfo(
            "ss_output_name,ss_epoch", "X/Y/Z plot: metadata fields shown in [LoRA Kit] LoRA file labels (comma-separated)"
        ),
    }
    for key, info in shared.options_section(SETTINGS_SECTION, options).items():
        shared.opts.add_option(key, info)


def on_app_started(demo, app):
    """The routes, where the WebUI serves ``/sdapi/v1``: only with ``--api`` (or ``--nowebui``), behind the same
    ``--api-auth`` users. The tab does not use them (its buttons are gradio events)."""
    from modules import shared

    from lorakit_ext import api

    flags = shared.cmd_opts
    if not (flags.api or flags.nowebui):
        return
    api.mount(app, manager(), api.parse_credentials(flags.api_auth) if flags.api_auth else None)


def on_before_ui():
    xyz.register_axes()


def register() -> None:
    """Hook everything into the WebUI (the WebUI re-imports scripts on "Reload UI"; callbacks are re-registered
    with them, and each callback is idempotent)."""
    from modules import script_callbacks

    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_app_started(on_app_started)
    script_callbacks.on_before_ui(on_before_ui)
