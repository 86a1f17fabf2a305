"""The "LoRA Kit" tab: sub-tabs "Train LoRA", "Copier/Difference" and "Merge", over any ``Host`` (gradio 3.41).

The Train tab's fields are generated from ``TrainConfig`` (label = the kohya option name, info = its help), so
the UI, the CLI and the HTTP API share one schema; a click gathers them into the same dict a TOML file holds.
Long operations run as jobs of the host's ``JobManager``; the click handler is a generator that follows the job
(progress, loss plot, samples) and ends with its result line. On the WebUI the page's own progress bar follows
the same job through ``id_task`` (javascript/lorakit.js).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

import gradio as gr

from lorakit_ext.errors import LorakitError
from lorakit_ext.train import config as train_config_module
from lorakit_ext.train.config import TrainConfig, unwrap_optional
from lorakit_ext.ui import operations
from lorakit_ext.ui.host import Host
from lorakit_ext.ui.jobs import FINISHED, JobManager, JobRecord, progress_view, result_line

POLL_SECONDS = 1.0
ALGO_LABELS = {"LoRA": "lora", "LoCon": "locon", "LoHa": "loha"}
CHOICES = {
    "optimizer_type": train_config_module.OPTIMIZERS,
    "lr_scheduler": train_config_module.SCHEDULERS,
    "mixed_precision": train_config_module.MIXED_PRECISIONS,
    "save_precision": train_config_module.SAVE_PRECISIONS,
    "sample_sampler": train_config_module.SAMPLERS,
}
# The Train tab's layout: the main options, then folded groups of advanced ones (all TrainConfig fields).
TRAIN_MAIN = ("output_name", "network_dim", "network_alpha", "learning_rate", "max_train_epochs", "max_train_steps",
              "train_batch_size", "resolution", "seed")
TRAIN_GROUPS = {
    "Dataset options": ("caption_extension", "default_caption", "enable_bucket", "min_bucket_reso",
                        "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "shuffle_caption", "keep_tokens",
                        "caption_dropout_rate", "caption_prefix", "caption_suffix", "flip_aug", "masked_loss",
                        "prior_loss_weight", "cache_latents", "cache_latents_to_disk", "cache_text_encoder_outputs"),
    "Network options": ("conv_dim", "conv_alpha", "network_args", "network_weights", "network_dropout",
                        "rank_dropout", "module_dropout", "network_train_unet_only"),
    "Optimizer": ("optimizer_type", "optimizer_args", "unet_lr", "text_encoder_lr", "lr_scheduler", "lr_warmup_steps",
                  "lr_scheduler_num_cycles", "lr_scheduler_power", "max_grad_norm"),
    "Training": ("gradient_accumulation_steps", "mixed_precision", "gradient_checkpointing", "noise_offset",
                 "multires_noise_iterations", "multires_noise_discount", "min_snr_gamma", "min_timestep",
                 "max_timestep"),
    "Saving and samples": ("output_dir", "save_precision", "save_every_n_epochs", "save_every_n_steps",
                           "save_last_n_epochs", "save_last_n_steps", "save_state", "resume", "training_comment",
                           "sample_every_n_epochs", "sample_every_n_steps", "sample_sampler"),
}
NOT_IN_UI = ("pretrained_model_name_or_path",)  # the host's loaded model is trained
SET_APART = ("network_algo", "train_data_dir", "reg_data_dir", "sample_prompts")  # their own widgets
SAMPLE_PROMPTS_FILE = "{name}_sample_prompts.txt"
STYLE_PATH = Path(__file__).resolve().parents[2] / "style.css"  # the WebUI loads it by itself; standalone passes it


# --- pure helpers (tested without gradio) --------------------------------------------------------------------------


def other_options() -> tuple[str, ...]:
    """TrainConfig fields not placed above (new ones land here until someone places them)."""
    placed = {*TRAIN_MAIN, *(n for group in TRAIN_GROUPS.values() for n in group), *NOT_IN_UI, *SET_APART}
    return tuple(f.name for f in fields(TrainConfig) if f.name not in placed)


def field_value(name: str, value: Any) -> Any:
    """A config value as its component shows it: lists as space-separated text, resolution as "W,H", None as ""."""
    if value is None:
        return ""
    if name == "resolution":
        return ",".join(str(v) for v in value)
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return value


def config_values(names: list[str], values: list[Any], algo_label: str, data_dir: str, reg_dir: str,
                  sample_prompts_file: str | None) -> dict[str, Any]:
    """The TrainConfig dict of what the Train tab shows (empty optional fields stay unset)."""
    chosen = {name: value for name, value in zip(names, values)}
    chosen.update(network_algo=ALGO_LABELS[algo_label], train_data_dir=data_dir, reg_data_dir=reg_dir or None)
    if sample_prompts_file:
        chosen["sample_prompts"] = sample_prompts_file
    return chosen


def loss_table(record: JobRecord):
    """(step, loss) of every reported step, as the LinePlot's data frame (None before the first step)."""
    import pandas as pd

    rows = [(e.step, e.values["loss"]) for e in record.job.poll(0) if "loss" in e.values]
    return pd.DataFrame(rows, columns=["step", "loss"]) if rows else None


def progress_html(fraction: float, text: str) -> str:
    """Our own progress bar (standalone); the WebUI draws its own from ``id_task``."""
    percent = round(100 * fraction)
    return (f'<div class="lorakit-progress"><div class="lorakit-progress-bar" style="width:{percent}%">'
            f'</div><span>{percent}% {_escape(text)}</span></div>')


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def notices_markdown(notices) -> str:
    icons = {"error": "⛔", "warning": "⚠️", "info": "ℹ️"}
    # escaped: Markdown takes "<lora:name:w>" for an HTML tag and drops it (seen in a real WebUI 1.10.1)
    return "\n\n".join(f"{icons[n.level]} {_escape(n.message)}" for n in notices)


# --- the tab -------------------------------------------------------------------------------------------------------


class LorakitTabs:
    """Builds the three sub-tabs inside the current gradio Blocks context and wires them to ``manager``."""

    def __init__(self, host: Host, manager: JobManager):
        self.host = host
        self.manager = manager

    def build(self) -> None:
        notices = self.host.notices()  # one look: they check the model's parameters and the host's version
        gr.Markdown(notices_markdown(notices), elem_id="lorakit_notices", visible=bool(notices))
        if any(n.blocking for n in notices):
            return
        with gr.Tabs(elem_id="lorakit_tabs"):
            with gr.Tab("Train LoRA", elem_id="lorakit_train_tab"):
                self._train_tab()
            with gr.Tab("Copier/Difference", elem_id="lorakit_slider_tab"):
                self._slider_tab()
            with gr.Tab("Merge", elem_id="lorakit_merge_tab") as merge_tab:
                self._merge_tab(merge_tab)

    # --- following a job ------------------------------------------------------------------------------------------

    def follow(self, record: JobRecord):
        """Yield (progress html, status, loss frame, sample images, result line, result details) until it ends."""
        while True:
            finished = record.job.status in FINISHED
            latest = record.job.latest
            view = progress_view(latest) if latest else None
            images = [path for event in record.job.poll(0) for path in event.images]
            fraction = 1.0 if record.job.status in ("done", "stopped") else (view.fraction if view else 0.0)
            text = view.text if view else record.operation.title
            details = record.job.result if finished else None
            if details and details.get("report_grid"):
                images.append(details["report_grid"])
            yield (self.bar(fraction, text), text, loss_table(record), images, result_line(record), details)
            if finished:
                return
            record.job.wait(POLL_SECONDS)

    def start(self, task_id: str, build_operation):
        """Submit and follow; a bad config or a busy host ends at once with its one-line error."""
        try:
            record = self.manager.submit(build_operation(), task_id=task_id or None)
        except LorakitError as error:
            yield (self.bar(0.0, ""), "", None, [], f"Error: {error}", None)
            return
        yield from self.follow(record)

    def bar(self, fraction: float, text: str) -> str:
        """Our progress bar, or nothing where the host draws its own (the WebUI's, through javascript/lorakit.js)."""
        return "" if self.host.native_progress else progress_html(fraction, text)

    def on_grid(self, task_id: str, resolution: str, seed: float, steps: float):
        """The epoch x weight grid of the newest finished training or slider job's files."""
        def build():
            finished = [r for r in self.manager.records()
                        if r.operation.kind in ("train", *operations.SLIDER_METHODS) and r.job.result]
            if not finished:
                raise LorakitError("no finished training or slider run to make a grid of")
            files = [f for f in finished[-1].job.result["files"] if f.endswith(".safetensors")]
            size = TrainConfig.from_dict({"resolution": resolution}, source="grid").resolution
            return operations.grid_operation(files, seed=int(seed), steps=max(1, int(steps)), size=size)
        yield from self.start(task_id, build)

    def lora_choices(self, rescan: bool) -> dict:
        """The Merge picker's choices: the host's Lora list, read again from disk first when ``rescan``."""
        if rescan:
            self.host.refresh_networks()
        return gr.update(choices=sorted(self.host.list_networks()))

    def stop_running(self, cancel: bool) -> str:
        record = self.manager.running()
        if record is None:
            return "Nothing is running."
        self.manager.stop(record.id, cancel=cancel)
        return "Cancelling…" if cancel else "Stopping after this step and saving…"

    def job_outputs(self, prefix: str, trains: bool = True):
        """Progress bar, status line, loss plot and samples (shown for trainings only), result line and details."""
        # The WebUI draws its bar at the top of the progress element's parent (style.css positions it there).
        with gr.Column(elem_classes="lorakit-progress-box"):
            progress = gr.HTML(self.bar(0.0, ""), elem_id=f"lorakit_{prefix}_progress")
        status = gr.Textbox(label="Progress", interactive=False, elem_id=f"lorakit_{prefix}_status")
        plot = gr.LinePlot(x="step", y="loss", title="Loss", width=480, height=220, visible=trains,
                           elem_id=f"lorakit_{prefix}_plot")
        gallery = gr.Gallery(label="Samples", columns=4, height=220, visible=trains,
                             elem_id=f"lorakit_{prefix}_gallery")
        result = gr.Textbox(label="Result", interactive=False, elem_id=f"lorakit_{prefix}_result")
        details = gr.JSON(label="Details", elem_id=f"lorakit_{prefix}_details")
        return [progress, status, plot, gallery, result, details]

    # --- Train LoRA -----------------------------------------------------------------------------------------------

    def _train_tab(self) -> None:
        defaults = TrainConfig()
        hints = get_type_hints(TrainConfig)
        docs = {f.name: f.metadata["help"] for f in fields(TrainConfig)}
        components: dict[str, gr.components.Component] = {}

        def component(name: str):
            kind, value = unwrap_optional(hints[name]), getattr(defaults, name)
            optional = type(None) in get_args(hints[name])
            common = dict(label=name, info=docs[name], elem_id=f"lorakit_train_{name}")
            if name in CHOICES:
                made = gr.Dropdown(choices=list(CHOICES[name]), value=value, allow_custom_value=True, **common)
            elif kind is bool:
                made = gr.Checkbox(value=value, **common)
            elif kind in (int, float) and not optional:
                made = gr.Number(value=value, precision=0 if kind is int else None, **common)
            else:
                made = gr.Textbox(value=field_value(name, value), **common)
            components[name] = made

        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    data_dir = gr.Textbox(label="train_data_dir", info=docs["train_data_dir"], scale=4,
                                          elem_id="lorakit_train_train_data_dir")
                    reg_dir = gr.Textbox(label="reg_data_dir", info=docs["reg_data_dir"], scale=2,
                                         elem_id="lorakit_train_reg_data_dir")
                    scan = gr.Button("Scan dataset", scale=1, elem_id="lorakit_train_scan")
                dataset_summary = gr.JSON(label="Dataset", elem_id="lorakit_train_dataset")
                algo = gr.Radio(list(ALGO_LABELS), value="LoRA", label="Network type", elem_id="lorakit_train_algo")
                with gr.Row():
                    for name in TRAIN_MAIN:
                        component(name)
                for title, names in {**TRAIN_GROUPS, "Other options": other_options()}.items():
                    with gr.Accordion(title, open=False):
                        with gr.Row():
                            for name in names:
                                component(name)
                prompts = gr.Textbox(label="Sample prompts (one a line, kohya flags --n --s --l --d --w --h --m)",
                                     lines=2, elem_id="lorakit_train_sample_prompts")
            with gr.Column(scale=2):
                with gr.Row():
                    preset = gr.Dropdown(label="Preset", choices=self._presets(), allow_custom_value=True,
                                         elem_id="lorakit_train_preset")
                    load = gr.Button("Load preset", elem_id="lorakit_train_load")
                    save = gr.Button("Save preset", elem_id="lorakit_train_save")
                preset_status = gr.Markdown("")
                with gr.Row():
                    start = gr.Button("Start", variant="primary", elem_id="lorakit_train_start")
                    stop = gr.Button("Stop & save", elem_id="lorakit_train_stop")
                    cancel = gr.Button("Cancel", elem_id="lorakit_train_cancel")
                outputs = self.job_outputs("train")
                with gr.Row():
                    make_grid = gr.Button("Epoch x weight grid of the last run (empty prompt, fixed seed)",
                                          elem_id="lorakit_train_grid", scale=3)
                    grid_steps = gr.Number(value=20, precision=0, label="grid sampling steps", scale=1,
                                           elem_id="lorakit_train_grid_steps")
        task_id = gr.Textbox(visible=False, elem_id="lorakit_train_task_id")

        names = list(components)

        def gather(algo_label, data, reg, prompt_text, *values):
            prompt_file = self._write_prompts(prompt_text, values[names.index("output_name")]) if prompt_text.strip() \
                else None
            return config_values(names, list(values), algo_label, data, reg, prompt_file)

        def on_start(task, algo_label, data, reg, prompt_text, *values):
            def build():
                chosen = gather(algo_label, data, reg, prompt_text, *values)
                return operations.train_operation(operations.train_config(chosen, self.host))
            yield from self.start(task, build)

        def on_scan(algo_label, data, reg, prompt_text, *values):
            try:
                return operations.dataset_preview(config_values(names, list(values), algo_label, data, reg, None))
            except LorakitError as error:
                return {"error": str(error)}

        def on_save(name, algo_label, data, reg, prompt_text, *values):
            try:
                chosen = config_values(names, list(values), algo_label, data, reg, None)
                path = self._preset_path(name)
                from lorakit_ext.formats.safetensors_io import write_atomic

                write_atomic(path, [TrainConfig.from_dict(chosen, source="preset").to_toml().encode()])
                return gr.update(choices=self._presets(), value=path.stem), f"Saved preset {path}"
            except LorakitError as error:
                return gr.update(), f"Error: {error}"

        def on_load(name):
            try:
                loaded = TrainConfig.load_toml(self._preset_path(name))
            except LorakitError as error:
                return [gr.update()] * (3 + len(names)) + [f"Error: {error}"]
            label = next(k for k, v in ALGO_LABELS.items() if v == loaded.network_algo_resolved())
            return ([label, loaded.train_data_dir, loaded.reg_data_dir or ""]
                    + [field_value(n, getattr(loaded, n)) for n in names] + [f"Loaded preset {name}"])

        inputs = [algo, data_dir, reg_dir, prompts, *components.values()]
        start.click(on_start, inputs=[task_id, *inputs], outputs=outputs,
                    _js="lorakit_start_train" if self.host.native_progress else None)
        stop.click(lambda: self.stop_running(cancel=False), outputs=[outputs[4]])
        cancel.click(lambda: self.stop_running(cancel=True), outputs=[outputs[4]])
        scan.click(on_scan, inputs=inputs, outputs=[dataset_summary])
        make_grid.click(self.on_grid, inputs=[task_id, components["resolution"], components["seed"], grid_steps],
                        outputs=outputs,
                        _js="lorakit_start_train" if self.host.native_progress else None)
        save.click(on_save, inputs=[preset, *inputs], outputs=[preset, preset_status])
        load.click(on_load, inputs=[preset], outputs=[algo, data_dir, reg_dir, *components.values(), preset_status])

    def _preset_dir(self) -> Path:
        return self.host.output_dir() / "presets"

    def _presets(self) -> list[str]:
        folder = self._preset_dir()
        return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []

    def _preset_path(self, name: str | None) -> Path:
        from lorakit_ext.ui.paths import sanitize_name

        folder = self._preset_dir()
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{sanitize_name(name or '', option='preset')}.toml"

    def _write_prompts(self, text: str, output_name: str) -> str:
        from lorakit_ext.formats.safetensors_io import write_atomic
        from lorakit_ext.ui.paths import sanitize_name

        folder = self.host.output_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / SAMPLE_PROMPTS_FILE.format(name=sanitize_name(str(output_name)))
        write_atomic(path, [text.encode()])
        return str(path)

    # --- Copier/Difference ----------------------------------------------------------------------------------------

    def _slider_tab(self) -> None:
        method = gr.Radio(list(operations.SLIDER_METHODS), value="copier", label="Method",
                          info="copier: B trained on top of A; difference: B x 1 + A x -1; paired: one LoRA at +w/-w",
                          elem_id="lorakit_slider_method")
        with gr.Row():
            folder_a = gr.Textbox(label="Images A (before)", elem_id="lorakit_slider_a")
            folder_b = gr.Textbox(label="Images B (after), matched to A by file name", elem_id="lorakit_slider_b")
            preview = gr.Button("Preview pairs", elem_id="lorakit_slider_preview")
        pairs = gr.Gallery(label="Pairs: A, B, |B - A|", columns=6, height=200, elem_id="lorakit_slider_pairs")
        with gr.Row():
            output_name = gr.Textbox(value="slider", label="output_name", elem_id="lorakit_slider_output_name")
            masked = gr.Checkbox(label="masked: weight the loss by the |B - A| mask", value=False,
                                 elem_id="lorakit_slider_masked")
            with_report = gr.Checkbox(label="slider report (weight x seed x prompt grid and numbers)", value=True,
                                      elem_id="lorakit_slider_report")
        with gr.Row():
            ensemble = gr.Number(value=1, precision=0, minimum=1, label="copier: ensemble (average K runs of B)",
                                 elem_id="lorakit_slider_ensemble")
            b_from_a = gr.Checkbox(label="difference: start B from A's weights", value=False,
                                   elem_id="lorakit_slider_b_from_a")
            anchor = gr.Number(value=0, minimum=0, label="anchor: hold B near its start (difference: with B from A)",
                               elem_id="lorakit_slider_anchor")
        with gr.Row():
            rank = gr.Number(value=0, precision=0, minimum=0, elem_id="lorakit_slider_rank",
                             label="difference: re-compress to this rank (0: exact, rank A + rank B)")
            shuffle = gr.Checkbox(label="difference: shuffle the rank axis (hides which half came from which image)",
                                  value=False, elem_id="lorakit_slider_shuffle")
            weight = gr.Number(value=1.0, minimum=0, label="paired: the multiplier B is trained at (A at minus it)",
                               elem_id="lorakit_slider_weight")
        with gr.Row():
            reuse_a = gr.Textbox(label="copier / difference: reuse this LoRA A (Lora list name or file) instead of"
                                       " training one", elem_id="lorakit_slider_reuse_a")
            keep_a = gr.Textbox(label="copier / difference: keep the trained LoRA A under this name",
                                elem_id="lorakit_slider_keep_a")
        with gr.Accordion("Training options of both passes (kohya names, TOML lines; the slider recipe fills the "
                          "rest)", open=False):
            options = gr.Code(value='max_train_steps = 300\nlearning_rate = 1e-3\nnetwork_dim = 4\n',
                              language=None, label="options", elem_id="lorakit_slider_options")
        start = gr.Button("Start", variant="primary", elem_id="lorakit_slider_start")
        outputs = self.job_outputs("slider")  # the report's numbers arrive in the details, its grid as a sample
        task_id = gr.Textbox(visible=False)

        def on_preview(a, b):
            from lorakit_ext.slider.pairs import difference_image, load_pairs

            try:
                found = load_pairs(a_dir=a or None, b_dir=b or None)
            except LorakitError as error:
                raise gr.Error(str(error)) from error
            return [(image, f"{pair.name} {label}") for pair in found.pairs
                    for image, label in ((pair.a, "A"), (pair.b, "B"), (difference_image(pair), "|B-A|"))]

        def on_start(task, kind, a, b, name, mask, report, runs, from_a, hold, new_rank, shuffled, multiplier, reused,
                     kept, option_text):
            def build():
                values = {**toml_options(option_text), "a": a, "b": b, "output_name": name, "masked": mask,
                          "report": report}
                lora_a = {"reuse_a": reused.strip(), "keep_a": kept.strip()}
                compressed = {"rank": int(new_rank)} if new_rank else {}
                own = {"copier": {"ensemble": runs, "anchor": hold, **lora_a},
                       "difference": {"b_from_a": from_a, "anchor": hold, "shuffle": shuffled, **compressed, **lora_a},
                       "paired": {"weight": multiplier}}
                values.update(own[kind])
                return operations.slider_operation(kind, values, self.host)
            yield from self.start(task, build)

        preview.click(on_preview, inputs=[folder_a, folder_b], outputs=[pairs])
        start.click(on_start, inputs=[task_id, method, folder_a, folder_b, output_name, masked, with_report, ensemble,
                                      b_from_a, anchor, rank, shuffle, weight, reuse_a, keep_a, options],
                    outputs=outputs, _js="lorakit_start_slider" if self.host.native_progress else None)

    # --- Merge ----------------------------------------------------------------------------------------------------

    def _merge_tab(self, opened: gr.Tab) -> None:
        with gr.Row():
            pick = gr.Dropdown(label="LoRA", choices=sorted(self.host.list_networks()), elem_id="lorakit_merge_pick")
            refresh = gr.Button("🔄", elem_id="lorakit_merge_refresh", scale=0)
            add = gr.Button("Add", elem_id="lorakit_merge_add")
            remove = gr.Button("Remove last", elem_id="lorakit_merge_remove")
        table = gr.Dataframe(headers=["LoRA", "ratio"], datatype=["str", "number"], row_count=(0, "dynamic"),
                             col_count=(2, "fixed"), label="Inputs and ratios", elem_id="lorakit_merge_table")
        describe = gr.Button("Summarize inputs", elem_id="lorakit_merge_describe")
        summary = gr.Dataframe(headers=["name", "type", "rank", "arch", "modules"], interactive=False,
                               label="Inputs", elem_id="lorakit_merge_summary")
        mode = gr.Radio(list(operations.MERGE_MODES), value="merge", label="Operation", elem_id="lorakit_merge_mode")
        with gr.Row():
            new_rank = gr.Textbox(label="new_rank (empty: exact merge)", elem_id="lorakit_merge_new_rank")
            new_conv_rank = gr.Textbox(label="new_conv_rank", elem_id="lorakit_merge_new_conv_rank")
            dynamic = gr.Textbox(label="dynamic (sv_fro:0.9, size:2MB, ...)", elem_id="lorakit_merge_dynamic")
            clamp = gr.Textbox(label="clamp_quantile", elem_id="lorakit_merge_clamp")
        with gr.Row():
            base = gr.Textbox(label="base checkpoint (extract)", elem_id="lorakit_merge_base")
            tuned = gr.Textbox(label="tuned checkpoint (extract)", elem_id="lorakit_merge_tuned")
        with gr.Row():
            precision = gr.Dropdown(list(operations.SAVE_PRECISIONS), value="fp16", label="save_precision")
            output_name = gr.Textbox(value="merged", label="output_name", elem_id="lorakit_merge_output_name")
            run = gr.Button("Run", variant="primary", elem_id="lorakit_merge_run")
        outputs = self.job_outputs("merge", trains=False)
        task_id = gr.Textbox(visible=False)

        def on_add(rows, name):
            rows = merge_rows(rows)
            return rows + [[name, 1.0]] if name else rows

        def on_describe(rows):
            try:
                described = operations.describe_inputs([r[0] for r in merge_rows(rows)], self.host.list_networks())
                return [[d["name"], d["type"], d["rank"], d["arch"], d["modules"]] for d in described]
            except LorakitError as error:
                return [[f"Error: {error}", "", "", "", ""]]

        def on_run(task, rows, chosen_mode, rank, conv_rank, dyn, quantile, base_path, tuned_path, dtype, name):
            rows = merge_rows(rows)

            def build():
                request = operations.MergeRequest(
                    mode=chosen_mode, models=[r[0] for r in rows], ratios=[float(r[1]) for r in rows] or None,
                    new_rank=optional_int(rank, "new_rank"), new_conv_rank=optional_int(conv_rank, "new_conv_rank"),
                    dynamic=dyn.strip() or None, clamp_quantile=optional_float(quantile, "clamp_quantile"),
                    base=base_path, tuned=tuned_path, save_precision=dtype, output_name=name)
                return operations.merge_operation(request, self.host)
            yield from self.start(task, build)

        # The page is built once, when the WebUI starts: opening the tab shows the files saved since (the host's list
        # is refreshed after each save); the button also rescans the folder for files put there by hand.
        opened.select(lambda: self.lora_choices(rescan=False), outputs=[pick])
        refresh.click(lambda: self.lora_choices(rescan=True), outputs=[pick])
        add.click(on_add, inputs=[table, pick], outputs=[table])
        remove.click(lambda rows: merge_rows(rows)[:-1], inputs=[table], outputs=[table])
        describe.click(on_describe, inputs=[table], outputs=[summary])
        run.click(on_run, inputs=[task_id, table, mode, new_rank, new_conv_rank, dynamic, clamp, base, tuned,
                                  precision, output_name], outputs=outputs,
                  _js="lorakit_start_merge" if self.host.native_progress else None)


def merge_rows(rows) -> list[list]:
    """The Merge table's non-empty rows as [name, ratio] (gradio hands a DataFrame or a list)."""
    values = rows.values.tolist() if hasattr(rows, "values") else list(rows or [])
    return [[str(r[0]), 1.0 if r[1] in ("", None) else float(r[1])] for r in values if r and str(r[0]).strip()]


def optional_int(text: str, option: str) -> int | None:
    try:
        return int(text) if str(text).strip() else None
    except ValueError:
        raise LorakitError(f"{option}: {text!r} is not a whole number") from None


def optional_float(text: str, option: str) -> float | None:
    try:
        return float(text) if str(text).strip() else None
    except ValueError:
        raise LorakitError(f"{option}: {text!r} is not a number") from None


def toml_options(text: str) -> dict[str, Any]:
    """Training options typed as TOML lines (``learning_rate = 1e-3``), read like a ``--config`` file."""
    from lorakit_ext.train.config import _toml

    try:
        return _toml().loads(text or "")
    except ValueError as error:
        raise LorakitError(f"training options: not valid TOML ({error})") from None


def build_blocks(host: Host, manager: JobManager) -> gr.Blocks:
    """The tab as its own Blocks (what the WebUI's ``on_ui_tabs`` returns and the standalone app serves)."""
    with gr.Blocks(analytics_enabled=False) as blocks:
        LorakitTabs(host, manager).build()
    return blocks
