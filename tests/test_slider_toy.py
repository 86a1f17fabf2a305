"""The slider methods end to end on the toy model: the copier LoRA alone moves the base model from A to B
monotonically, growing its circle, and leaves the model as it was; a reused A is not retrained and a non-copying A is
warned; the difference file is exactly B - A, and B can start from A; the paired objective shares noise and
timesteps; each saved file gets a report."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit_ext.errors import LorakitError
from lorakit_ext.formats.safetensors_io import read_metadata
from lorakit_ext.slider.demo import toy_config, toy_pair_set
from lorakit_ext.slider.methods import (
    COPY_SIMILARITY_MIN,
    METADATA_METHOD,
    METADATA_SOURCES,
    PairPartners,
    _frozen_branch,
    copier,
    paired,
)
from lorakit_ext.slider.report import SweepSettings, measure_pixels, render_sweep, spearman, sweep_metrics

STEPS = 60  # per pass; the shortened version of the demo's training
SEEDS = (0, 1, 2, 3)
# margins on the effect along A -> B, measured with the 2026-12-01 toy weights and the demo's three pairs, caption and
# timesteps from 600: steps >= 0.04, span 0.48
EFFECT_STEP, EFFECT_SPAN = 0.01, 0.3


@pytest.fixture(scope="module")
def adapter():
    torch.set_num_threads(1)
    from lorakit_ext.models.ldm import LdmAdapter
    from lorakit_ext.toy.model import load_toy_model

    return LdmAdapter(load_toy_model())


def _state_digest(adapter) -> list:
    return [t.detach().clone() for t in adapter.model.state_dict().values()] + [
        sorted(name for name, module in adapter.model.named_modules() if "forward" in module.__dict__)
    ]


def test_copier_slider_alone_on_the_base_model_moves_the_training_prompt_from_a_to_b(adapter, tmp_path):
    pair_set = toy_pair_set(tmp_path / "pairs")
    config = toy_config(pair_set, max_train_steps=STEPS)
    before = _state_digest(adapter)
    result = copier(pair_set, config, adapter, tmp_path / "slider.safetensors", keep_a=tmp_path / "a.safetensors")
    after = _state_digest(adapter)
    assert all(torch.equal(x, y) for x, y in zip(before[:-1], after[:-1])) and after[-1] == before[-1] == []
    assert result.output == tmp_path / "slider.safetensors" and result.kept_a == tmp_path / "a.safetensors"
    assert 0.0 < result.copy_similarity <= 1.0
    metadata = read_metadata(result.output)
    assert metadata[METADATA_METHOD] == "copier"
    assert json.loads(metadata[METADATA_SOURCES])[0]["b_sha256"] == pair_set.pairs[0].b_sha256

    from lorakit_ext.formats.kohya import load_network

    # B alone (A detached) on the base model, on the training prompt (the pairs' caption), as users apply the slider
    settings = SweepSettings(prompts=(config.default_caption,), seeds=SEEDS, steps=10, toy_world=True)
    images = render_sweep(adapter, load_network(result.output), settings)
    metrics = sweep_metrics(images, settings, pair_set)
    runs, effect = metrics["runs"], metrics["summary"]["effect_along_ab"]
    print(json.dumps({"copy_similarity": result.copy_similarity, "areas": [r["area"] for r in runs],
                      "rho": [r["rho"] for r in runs], "effect": effect}))
    # along the A -> B pixel direction (1 = the whole change from A to B) the images move monotonically with weight,
    # and the base model's red circle grows with B's weight on every seed (measured: rho 0.9, 1.0, 1.0, 0.9; area
    # +0.20 to +0.36 of the image from -1 to +1)
    assert np.all(np.diff(effect) > EFFECT_STEP) and effect[-1] - effect[0] > EFFECT_SPAN
    assert metrics["warnings"] == []
    for seed, run in zip(SEEDS, runs):
        assert run["rho"] >= 0.9 and run["area"][-1] - run["area"][0] >= 0.1, (seed, run["area"])

    # on the model B was trained against (A applied), the training prompt draws A's circle, and B grows it: foreground
    # area rises with B's weight on every seed (measured: rho 1.0 on all four, area +0.17 to +0.20 from -1 to +1)
    lora_a = _frozen_branch(load_network(result.kept_a), adapter)  # as the copier attached it while training B
    try:
        with_a = render_sweep(adapter, load_network(result.output), settings)
    finally:
        lora_a.detach()
    areas_with_a = [[measure_pixels(image).area for image in images] for images in with_a[0]]
    print(json.dumps({"areas_with_a": areas_with_a}))
    for seed, areas in zip(SEEDS, areas_with_a):
        assert spearman(list(settings.weights), areas) >= 0.9 and areas[-1] - areas[0] >= 0.08, (seed, areas)


def test_paired_trains_b_at_plus_w_and_a_at_minus_w_on_the_same_noise_and_timesteps(adapter, tmp_path, monkeypatch):
    from lorakit_ext.train.trainer import TrainingRun

    calls = []
    diffusion_loss = TrainingRun.diffusion_loss

    def recorded(run, batch):
        calls.append((run.network.multiplier, batch.noise.clone(), batch.timesteps.clone(), batch.latents.clone()))
        return diffusion_loss(run, batch)

    monkeypatch.setattr(TrainingRun, "diffusion_loss", recorded)
    pair_set = toy_pair_set(tmp_path / "pairs")
    config = toy_config(pair_set, max_train_steps=3, train_batch_size=1)
    result = paired(pair_set, config, adapter, tmp_path / "paired.safetensors", weight=0.5)
    assert result.output.is_file() and read_metadata(result.output)[METADATA_METHOD] == "paired"
    assert len(calls) == 2 * 3
    for (b_mult, b_noise, b_t, b_latents), (a_mult, a_noise, a_t, a_latents) in zip(calls[::2], calls[1::2]):
        assert (b_mult, a_mult) == (0.5, -0.5)
        assert torch.equal(b_noise, a_noise) and torch.equal(b_t, a_t)
        assert (b_latents - a_latents).abs().mean() > 0.01  # B's image, then its A partner
    assert not torch.equal(calls[0][1], calls[2][1])  # fresh noise each step, shared only within the pair


def _zero_lora(adapter, config, path):
    """A LoRA A that changes nothing: the base model, which does not copy the red circle."""
    from lorakit_ext.formats.kohya import save_network
    from lorakit_ext.slider.methods import _new_network

    save_network(path, _new_network(config, adapter).to_weights(torch.float32), dtype=torch.float32, arch=adapter.arch)
    return path


def test_copier_reuses_a_given_a_and_warns_when_it_does_not_copy(adapter, tmp_path):
    pair_set = toy_pair_set(tmp_path / "pairs")
    config = toy_config(pair_set, max_train_steps=1)
    zero_a = _zero_lora(adapter, config, tmp_path / "zero_a.safetensors")
    messages = []
    result = copier(pair_set, config, adapter, tmp_path / "slider.safetensors", reuse_a=zero_a, verify_seeds=2,
                    report=lambda message="", **_: messages.append(message))
    assert not any(m.startswith("LoRA A:") for m in messages)  # A was loaded, not trained
    assert any(m.startswith("LoRA B on A:") for m in messages) and result.kept_a is None
    assert json.loads(read_metadata(result.output)["lorakit_slider_a"])["file"] == "zero_a.safetensors"
    # the base model draws something like A from the pairs' caption, well enough for the absolute threshold, but a
    # zero A is no nearer to A than the base model, and is warned
    assert result.base_similarity > COPY_SIMILARITY_MIN and result.copy_similarity == result.base_similarity
    assert any(w.startswith("LoRA A does not copy the A images") for w in result.warnings)
    assert any(m.startswith("warning: LoRA A does not copy") for m in messages)


def _record_difference_inputs(monkeypatch) -> dict:
    """A dict that receives the B and A networks the difference method merges ("b", "a")."""
    from lorakit_ext.slider import methods

    recorded = {}
    difference_weights = methods.difference_weights

    def recording(weights_b, weights_a, **options):
        recorded.update(b=weights_b, a=weights_a)
        return difference_weights(weights_b, weights_a, **options)

    monkeypatch.setattr(methods, "difference_weights", recording)
    return recorded


def test_difference_file_is_exactly_b_minus_a_at_rank_ra_plus_rb(adapter, tmp_path, monkeypatch):
    from lorakit_ext.formats.kohya import load_network
    from lorakit_ext.slider import methods

    recorded = _record_difference_inputs(monkeypatch)
    pair_set = toy_pair_set(tmp_path / "pairs")
    config = toy_config(pair_set, max_train_steps=3)
    out, kept_a = tmp_path / "difference.safetensors", tmp_path / "a.safetensors"
    result = methods.difference(pair_set, config, adapter, out, keep_a=kept_a)
    assert result.output == out and result.saved == [out] and result.kept_a == kept_a
    saved, lora_a, lora_b = load_network(out), load_network(kept_a), recorded["b"]
    assert saved.metadata[METADATA_METHOD] == "difference" and set(saved.modules) == set(lora_a.modules)
    differing = 0
    for name, module in saved.modules.items():
        torch.testing.assert_close(lora_a.modules[name].delta(), recorded["a"].modules[name].delta(), rtol=0, atol=0)
        assert module.rank == lora_a.modules[name].rank + lora_b.modules[name].rank == 2 * config.network_dim
        expected = lora_b.modules[name].delta() - lora_a.modules[name].delta()
        differing += float(expected.abs().max()) > 0
        torch.testing.assert_close(module.delta(), expected, rtol=1e-5, atol=1e-7)
    # A and B trained apart, in all but a few modules (the toy mid block's attn1 to_q / to_k get no gradient)
    assert differing >= 0.9 * len(saved.modules)


def _random_lora_a(config, adapter, path):
    """A LoRA A with a delta in every module (a new network's up factors are zero), saved to ``path``."""
    from lorakit_ext.formats.kohya import load_network, save_network
    from lorakit_ext.slider import methods

    network = methods._new_network(config, adapter)
    with torch.no_grad():
        for parameter in network.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    save_network(path, network.to_weights(torch.float32), dtype=torch.float32, arch=adapter.arch)
    return load_network(path)


def test_difference_can_start_b_from_a(adapter, tmp_path, monkeypatch):
    from lorakit_ext.formats.kohya import load_network
    from lorakit_ext.networks.weights import LORA_UP
    from lorakit_ext.slider import methods

    recorded = _record_difference_inputs(monkeypatch)
    pair_set = toy_pair_set(tmp_path / "pairs")
    config = toy_config(pair_set, max_train_steps=1, learning_rate=1e-5)
    a_file = tmp_path / "a.safetensors"
    lora_a = _random_lora_a(config, adapter, a_file)
    for b_from_a in (False, True):
        out = tmp_path / f"difference_{b_from_a}.safetensors"
        methods.difference(pair_set, config, adapter, out, reuse_a=a_file, b_from_a=b_from_a)
        assert load_network(out).metadata["lorakit_slider_b_from_a"] == str(b_from_a)
        name = next(n for n, m in lora_a.modules.items() if m.tensors[LORA_UP].abs().sum() > 0)
        a_delta, b_delta = lora_a.modules[name].delta(), recorded["b"].modules[name].delta()
        relative = float((b_delta - a_delta).norm() / a_delta.norm())
        # one step at lr 1e-5: B from A is still A; B from zero is still almost nothing
        assert relative < 0.01 if b_from_a else relative > 0.99, (b_from_a, relative)


def test_difference_anchor_holds_b_near_a(adapter, tmp_path, monkeypatch):
    from lorakit_ext.formats.kohya import load_network
    from lorakit_ext.slider import methods

    recorded = _record_difference_inputs(monkeypatch)
    pair_set = toy_pair_set(tmp_path / "pairs")
    config = toy_config(pair_set, max_train_steps=12)
    a_file = tmp_path / "a.safetensors"
    lora_a = _random_lora_a(config, adapter, a_file)

    def moved(anchor):
        """How far B's factors moved from A's (relative, over every module), trained from A with ``anchor``."""
        out = tmp_path / f"difference_{anchor}.safetensors"
        methods.difference(pair_set, config, adapter, out, reuse_a=a_file, b_from_a=True, anchor=anchor)
        assert load_network(out).metadata["lorakit_slider_anchor"] == str(anchor)
        pairs = [(recorded["b"].modules[name].tensors[key], tensor)
                 for name, module in lora_a.modules.items() for key, tensor in module.tensors.items()]
        moved_by = sum(float((b - a).norm() ** 2) for b, a in pairs) ** 0.5
        return moved_by / sum(float(a.norm() ** 2) for _, a in pairs) ** 0.5

    free, held = moved(0.0), moved(10.0)
    # 12 steps at the toy lr 5e-3 move B away from A; the anchor pulls each weight back once it has moved
    assert free > 0.01 and held < 0.5 * free, (free, held)

    with pytest.raises(LorakitError, match="add --b-from-a"):
        methods.difference(pair_set, config, adapter, tmp_path / "x.safetensors", reuse_a=a_file, anchor=1e-3)
    with pytest.raises(LorakitError, match="--anchor must be a number 0 or above"):
        methods.difference(pair_set, config, adapter, tmp_path / "x.safetensors", reuse_a=a_file, b_from_a=True,
                           anchor=-1.0)


def test_copier_anchor_holds_b_near_its_start(adapter, tmp_path):
    from lorakit_ext.formats.kohya import load_network
    from lorakit_ext.slider import methods

    pair_set = toy_pair_set(tmp_path / "pairs")
    config = toy_config(pair_set, max_train_steps=12)
    a_file = tmp_path / "a.safetensors"
    _random_lora_a(config, adapter, a_file)

    def delta_norm(anchor):
        """The size of B's delta (it starts at zero: a new network's up factors are zero), trained with ``anchor``."""
        out = tmp_path / f"copier_{anchor}.safetensors"
        methods.copier(pair_set, config, adapter, out, reuse_a=a_file, verify_seeds=1, anchor=anchor)
        lora_b = load_network(out)
        assert lora_b.metadata["lorakit_slider_anchor"] == str(anchor)
        return sum(float(module.delta().norm() ** 2) for module in lora_b.modules.values()) ** 0.5

    free, held = delta_norm(0.0), delta_norm(10.0)
    assert free > 0 and held < 0.5 * free, (free, held)


def test_copier_ensemble_is_the_exact_average_of_b_runs_with_successive_seeds(adapter, tmp_path, monkeypatch):
    from lorakit_ext.formats.kohya import load_network
    from lorakit_ext.merge import algebra
    from lorakit_ext.train.job import StopToken

    averaged = []
    merge_networks = algebra.merge_networks

    def recording(networks, ratios, **options):
        averaged.append((networks, ratios))
        return merge_networks(networks, ratios, **options)

    monkeypatch.setattr(algebra, "merge_networks", recording)
    pair_set = toy_pair_set(tmp_path / "pairs", ("white",))
    config = toy_config(pair_set, max_train_steps=2)
    a_file = _zero_lora(adapter, config, tmp_path / "a.safetensors")
    messages = []
    result = copier(pair_set, config, adapter, tmp_path / "ensemble.safetensors", reuse_a=a_file, verify_seeds=1,
                    ensemble=3, report=lambda message="", **_: messages.append(message))
    assert result.saved == [result.output] and not result.stopped
    assert [m.split(":")[0] for m in messages if m.endswith(": finished")] == [
        f"LoRA B {k}/3 on A" for k in (1, 2, 3)]
    (members, ratios), = averaged
    assert ratios == [1 / 3] * 3
    saved = load_network(result.output)
    assert saved.metadata["lorakit_slider_ensemble"] == "3" and saved.metadata[METADATA_METHOD] == "copier"
    name = next(iter(saved.modules))
    deltas = [member.modules[name].delta() for member in members]
    assert not torch.equal(deltas[0], deltas[1])  # the runs' seeds differ
    torch.testing.assert_close(saved.modules[name].delta(), sum(deltas) / 3, rtol=1e-5, atol=1e-7)
    assert saved.modules[name].rank == 3 * config.network_dim

    # stopped as the second run starts: the first, which finished, is saved as it is
    token = StopToken()

    def stop_in_the_second(message="", **_):
        if message == "LoRA B 1/3 on A: finished":
            token.stop()

    stopped = copier(pair_set, config, adapter, tmp_path / "stopped.safetensors", reuse_a=a_file, verify_seeds=1,
                     ensemble=3, report=stop_in_the_second, token=token)
    assert stopped.stopped and stopped.output == tmp_path / "stopped.safetensors"
    assert load_network(stopped.output).metadata["lorakit_slider_ensemble"] == "1"
    torch.testing.assert_close(load_network(stopped.output).modules[name].delta(), deltas[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["copier", "difference"])
def test_epoch_saves_of_the_ensemble_and_the_difference_are_written_beside_the_slider(
    adapter, tmp_path, monkeypatch, method
):
    """The passes' own epoch files live in a temporary folder; the slider of each epoch is written beside ``out``:
    the ensemble's average of its runs' epoch files, the difference's B at that epoch minus the final A."""
    from lorakit_ext.formats.kohya import load_network
    from lorakit_ext.merge import algebra
    from lorakit_ext.slider import methods

    merged = []
    merge_networks = algebra.merge_networks

    def recording(networks, ratios, **options):
        merged.append(([network.modules for network in networks], ratios))
        return merge_networks(networks, ratios, **options)

    monkeypatch.setattr(algebra, "merge_networks", recording)
    pair_set = toy_pair_set(tmp_path / "pairs", ("white",))  # one pair at batch size 1: 1 step an epoch
    config = toy_config(pair_set, max_train_steps=2, train_batch_size=1, save_every_n_epochs=1)
    a_file = tmp_path / "a.safetensors"
    _random_lora_a(config, adapter, a_file)
    out = tmp_path / "slider.safetensors"
    options = {"ensemble": 2, "verify_seeds": 1} if method == "copier" else {}
    result = methods.run_method(method, pair_set, config, adapter, out, reuse_a=a_file, **options)
    epoch_file = tmp_path / "slider-000001.safetensors"
    assert result.saved == [epoch_file, out] and result.output == out
    assert sorted(path.name for path in tmp_path.glob("*.safetensors")) == [
        "a.safetensors", "slider-000001.safetensors", "slider.safetensors"]
    ratios = [0.5, 0.5] if method == "copier" else [1.0, -1.0]
    assert [call[1] for call in merged] == [ratios, ratios]  # the epoch file's, then the final one's
    earlier, final = load_network(epoch_file), load_network(out)
    assert earlier.metadata["ss_epoch"] == "1" and earlier.metadata["ss_steps"] == "1"
    assert earlier.metadata["ss_output_name"] == "slider" and earlier.metadata[METADATA_METHOD] == method
    name = next(iter(final.modules))
    (epoch_sources, _), (final_sources, _) = merged
    for saved, sources in ((earlier, epoch_sources), (final, final_sources)):
        expected = sum(ratio * modules[name].delta() for ratio, modules in zip(ratios, sources))
        torch.testing.assert_close(saved.modules[name].delta(), expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(earlier.modules[name].delta(), final.modules[name].delta())


def test_run_method_reports_every_saved_epoch_and_the_final_file(adapter, tmp_path):
    from lorakit_ext.slider.methods import run_method
    from lorakit_ext.slider.report import report_paths

    pair_set = toy_pair_set(tmp_path / "pairs", ("white",))  # one pair at batch size 1: 1 step an epoch
    config = toy_config(pair_set, max_train_steps=2, train_batch_size=1, save_every_n_epochs=1)
    settings = SweepSettings(weights=(-1.0, 0.0, 1.0), prompts=("", "a blue square"), seeds=(0, 1), steps=2,
                             toy_world=True)
    files = []
    out = tmp_path / "paired.safetensors"
    result = run_method("paired", pair_set, config, adapter, out, settings,
                        report=lambda **event: files.extend(event.get("files", [])))
    epoch_file = tmp_path / "paired-000001.safetensors"
    assert result.saved == [epoch_file, out]
    for path, seeds in ((epoch_file, [0]), (out, [0, 1])):  # earlier saves: the first seed only
        grid_path, json_path = report_paths(path)
        assert str(grid_path) in files and str(json_path) in files
        metrics = json.loads(json_path.read_text())
        assert metrics["file"] == str(path) and metrics["method"] == "paired" and metrics["seeds"] == seeds
        assert len(metrics["runs"]) == 2 * len(seeds) and "monotonic_fraction" in metrics["summary"]
        width, height = Image.open(grid_path).size
        assert height == 16 + 2 * len(seeds) * 64 * 2 and width > 3 * 64 * 2
    assert result.metrics["seeds"] == [0, 1] and result.metrics["summary"] == json.loads(
        report_paths(out)[1].read_text())["summary"]


def test_pair_partner_follows_flips(tmp_path):
    pair_set = toy_pair_set(tmp_path / "pairs")
    # move the circle off centre so a flip changes the image
    pair = pair_set.pairs[0]
    shifted = type(pair_set)([type(pair)(pair.name, np.roll(pair.a, 9, 1), np.roll(pair.b, 9, 1), "a", "b")], [])
    partners = PairPartners(shifted)
    b = torch.from_numpy(shifted.pairs[0].b).permute(2, 0, 1).float() / 127.5 - 1
    a = torch.from_numpy(shifted.pairs[0].a).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(partners.pixels(SimpleNamespace(pixels=b)), a)
    assert torch.equal(partners.pixels(SimpleNamespace(pixels=b.flip(-1))), a.flip(-1))
