"""The standalone app in a real browser (Playwright + Debian's Chromium, no download, only 127.0.0.1 reachable):
every sub-tab opens, a merge runs to its result line, a toy-model training runs to 100% and lists its file.
Screenshots go to tests/browser/screenshots/ (ignored by git) for a person to look at."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch

from lorakit_ext.formats.kohya import save_network
from lorakit_ext.formats.safetensors_io import read_metadata
from tests.test_api import tiny_lora

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent / "screenshots"
pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file() or importlib.util.find_spec("playwright") is None,
    reason="needs Debian's chromium (apt-get install -y chromium) and playwright",
)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from lorakit_ext.ui.standalone import StandaloneHost, build_app, launch

    root = tmp_path_factory.mktemp("standalone")
    lora_dir = root / "Lora"
    lora_dir.mkdir()
    for seed, name in ((1, "first"), (2, "second")):
        save_network(lora_dir / f"{name}.safetensors", tiny_lora(seed), dtype=torch.float32)
    host = StandaloneHost(lora_dir)
    demo = build_app(host)
    url = launch(demo, port=_free_port())
    yield url, host, root
    demo.server.force_exit = True
    demo.close()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def page(app):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.route(re.compile(r"^(?!https?://(127\.0\.0\.1|localhost)[:/]).*"), lambda route: route.abort())
        page = context.new_page()
        page.goto(app[0])
        page.wait_for_selector("#lorakit_tabs")
        yield page
        browser.close()


def open_tab(page, name: str) -> None:
    page.locator("#lorakit_tabs .tab-nav button", has_text=name).click()


def test_every_sub_tab_opens(page):
    for name, element in (("Copier/Difference", "#lorakit_slider_method"), ("Merge", "#lorakit_merge_run"),
                          ("Train LoRA", "#lorakit_train_start")):
        open_tab(page, name)
        page.wait_for_selector(element, state="visible")
        page.screenshot(path=str(SHOTS / f"tab_{name.split('/')[0].split()[0].lower()}.png"), full_page=True)


def test_merge_runs_to_a_result_line(page, app):
    _, host, _ = app
    open_tab(page, "Merge")
    for name in ("first", "second"):
        page.locator("#lorakit_merge_pick input").fill(name)
        page.locator("#lorakit_merge_pick input").press("Enter")
        page.locator("#lorakit_merge_add").click()
        page.wait_for_function(f"document.querySelector('#lorakit_merge_table').innerText.includes('{name}')")
    page.locator("#lorakit_merge_describe").click()  # type, rank and architecture of each input
    page.wait_for_function("document.querySelector('#lorakit_merge_summary').innerText.includes('lora')")
    assert "second" in page.locator("#lorakit_merge_summary").first.inner_text()
    page.locator("#lorakit_merge_output_name textarea").fill("browser_merge")
    page.locator("#lorakit_merge_run").click()
    result = page.locator("#lorakit_merge_result textarea")
    result.wait_for()
    page.wait_for_function("document.querySelector('#lorakit_merge_result textarea').value.startsWith('Saved')",
                           timeout=60_000)
    page.screenshot(path=str(SHOTS / "merge_done.png"), full_page=True)
    assert "browser_merge.safetensors" in result.input_value()
    assert (host.output_dir() / "browser_merge.safetensors").is_file()


@pytest.mark.skipif(importlib.util.find_spec("lorakit_ext.train.dataset") is None,
                    reason="the dataset module (lorakit_ext/train/dataset.py) has not landed yet")
def test_toy_training_reaches_100_percent_and_lists_the_file(page, app):
    from lorakit_ext.toy import shapes

    _, host, root = app
    concept = root / "data" / "2_circle"
    concept.mkdir(parents=True)
    from PIL import Image

    for index, sample in enumerate(shapes.dataset(4, seed=3)):
        Image.fromarray(sample.image).save(concept / f"{index}.png")
        (concept / f"{index}.txt").write_text(sample.caption)
    open_tab(page, "Train LoRA")
    page.locator("#lorakit_train_train_data_dir textarea").fill(str(root / "data"))
    page.locator("#lorakit_train_output_name textarea").fill("browser_toy")
    for name, value in (("max_train_steps", "3"), ("resolution", "64,64")):
        field = page.locator(f"#lorakit_train_{name} textarea, #lorakit_train_{name} input").first
        field.fill(value)
    page.locator("#lorakit_train_scan").click()
    page.wait_for_function("document.querySelector('#lorakit_train_dataset').innerText.includes('images')")
    page.locator("#lorakit_train_start").click()
    page.wait_for_function("document.querySelector('#lorakit_train_result textarea').value.length > 0",
                           timeout=240_000)
    page.screenshot(path=str(SHOTS / "train_done.png"), full_page=True)
    assert "100%" in page.locator("#lorakit_train_progress").first.inner_text()
    result = page.locator("#lorakit_train_result textarea").input_value()
    assert result.startswith("Saved") and "browser_toy.safetensors" in result
    assert (host.output_dir() / "browser_toy.safetensors").is_file()
    shutil.rmtree(root / "data")


def test_preset_saves_the_cli_toml_and_loads_back(page, app):
    from lorakit_ext.train.config import TrainConfig

    _, host, _ = app
    open_tab(page, "Train LoRA")
    page.locator("#lorakit_train_output_name textarea").fill("preset_name")
    page.locator("#lorakit_train_algo label", has_text="LoHa").click()
    page.locator("#lorakit_train_preset input").fill("mine")
    page.locator("#lorakit_train_preset input").press("Enter")
    page.locator("#lorakit_train_save").click()
    preset = host.output_dir() / "presets" / "mine.toml"
    page.wait_for_function("document.body.innerText.includes('Saved preset')")
    loaded = TrainConfig.load_toml(preset)  # the same schema the CLI's --config reads
    assert loaded.output_name == "preset_name" and loaded.network_algo == "loha"
    page.locator("#lorakit_train_output_name textarea").fill("changed")
    page.locator("#lorakit_train_load").click()
    page.wait_for_function("document.querySelector('#lorakit_train_output_name textarea').value == 'preset_name'")


@pytest.mark.skipif(importlib.util.find_spec("lorakit_ext.train.dataset") is None, reason="needs the dataset module")
def test_epoch_weight_grid_after_training(page, app):
    _, host, _ = app
    if not (host.output_dir() / "browser_toy.safetensors").is_file():
        pytest.skip("runs after test_toy_training_reaches_100_percent_and_lists_the_file")
    open_tab(page, "Train LoRA")
    page.locator("#lorakit_train_grid_steps input").fill("3")
    page.locator("#lorakit_train_grid").click()
    page.wait_for_function("document.querySelector('#lorakit_train_result textarea').value.includes('epoch_grid')",
                           timeout=120_000)
    grid = host.output_dir() / "browser_toy.epoch_grid.png"
    from PIL import Image

    image = Image.open(grid)
    assert image.size[1] == 64 and image.size[0] > 5 * 64  # one row (one file), 5 weights, a label margin
    page.screenshot(path=str(SHOTS / "train_grid.png"), full_page=True)


@pytest.mark.skipif(importlib.util.find_spec("lorakit_ext.train.dataset") is None, reason="needs the dataset module")
def test_copier_previews_pairs_and_saves_a_slider(page, app):
    from lorakit_ext.slider.demo import toy_pair_set

    _, host, root = app
    toy_pair_set(root / "pairs")
    open_tab(page, "Copier/Difference")
    page.locator("#lorakit_slider_a textarea").fill(str(root / "pairs" / "A"))
    page.locator("#lorakit_slider_b textarea").fill(str(root / "pairs" / "B"))
    page.locator("#lorakit_slider_preview").click()
    page.wait_for_function("document.querySelectorAll('#lorakit_slider_pairs img').length >= 3")
    page.locator("#lorakit_slider_output_name textarea").fill("browser_copier")
    page.locator("#lorakit_slider_report input").uncheck()
    page.locator("#lorakit_slider_anchor input").fill("0.001")  # the method's own fields reach the job
    page.locator("#lorakit_slider_keep_a textarea").fill("browser_a")
    page.locator("#lorakit_slider_tab .label-wrap", has_text="Training options").click()
    page.locator("#lorakit_slider_options .cm-content").fill("max_train_steps = 2\nlearning_rate = 1e-3\n")
    page.locator("#lorakit_slider_start").click()
    page.wait_for_function("document.querySelector('#lorakit_slider_result textarea').value.length > 0",
                           timeout=180_000)
    page.screenshot(path=str(SHOTS / "copier_done.png"), full_page=True)
    result = page.locator("#lorakit_slider_result textarea").input_value()
    assert result.startswith("Saved") and "browser_copier.safetensors" in result
    assert (host.output_dir() / "browser_copier.safetensors").is_file()
    assert read_metadata(host.output_dir() / "browser_copier.safetensors")["lorakit_slider_anchor"] == "0.001"
    assert (host.output_dir() / "browser_a.safetensors").is_file()


@pytest.mark.parametrize("method, fields, metadata", [
    ("paired", [("#lorakit_slider_weight input", "2")], {"lorakit_slider_weight": "2.0"}),
    ("difference", [("#lorakit_slider_rank input", "3")], {"ss_network_dim": "3", "lorakit_slider_shuffled": "True"}),
])
def test_the_paired_and_difference_fields_reach_the_job(page, app, method, fields, metadata):
    """paired's weight, difference's re-compression rank and shuffle: the tab passes them, the file records them."""
    from lorakit_ext.slider.demo import toy_pair_set

    _, host, root = app
    toy_pair_set(root / "pairs")
    open_tab(page, "Copier/Difference")
    page.locator("#lorakit_slider_method label", has_text=method).click()
    page.locator("#lorakit_slider_a textarea").fill(str(root / "pairs" / "A"))
    page.locator("#lorakit_slider_b textarea").fill(str(root / "pairs" / "B"))
    page.locator("#lorakit_slider_output_name textarea").fill(f"browser_{method}")
    page.locator("#lorakit_slider_report input").uncheck()
    page.locator("#lorakit_slider_keep_a textarea").fill("")  # the copier test's own fields, back to the defaults
    page.locator("#lorakit_slider_anchor input").fill("0")
    for selector, value in fields:
        page.locator(selector).fill(value)
    if method == "difference":
        page.locator("#lorakit_slider_shuffle input").check()
    options = page.locator("#lorakit_slider_options .cm-content")
    if not options.is_visible():
        page.locator("#lorakit_slider_tab .label-wrap", has_text="Training options").click()
    options.fill("max_train_steps = 1\nlearning_rate = 1e-3\n")
    page.locator("#lorakit_slider_start").click()
    page.wait_for_function(f"document.querySelector('#lorakit_slider_result textarea').value.includes('browser_{method}')",
                           timeout=180_000)
    result = page.locator("#lorakit_slider_result textarea").input_value()
    assert result.startswith("Saved"), result
    saved = read_metadata(host.output_dir() / f"browser_{method}.safetensors")
    assert {key: saved.get(key) for key in metadata} == metadata
