"""The slider methods end to end on the toy model: the copier LoRA grows the circle monotonically, the model is left
as it was, files carry the method and the pair hashes; the paired objective runs through the trainer's hook."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lorakit_ext.formats.safetensors_io import read_metadata
from lorakit_ext.slider.demo import toy_config, toy_pair_set
from lorakit_ext.slider.methods import METADATA_METHOD, METADATA_SOURCES, PairPartners, copier, paired
from lorakit_ext.slider.report import SweepSettings, render_sweep, sweep_metrics

STEPS = 60  # per pass; the shortened version of the demo's training


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


def test_copier_slider_grows_the_circle_monotonically_on_the_training_prompt(adapter, tmp_path):
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

    # the circle exists on the training (empty) prompt where A draws it: B over A at each weight must resize it
    settings = SweepSettings(prompts=("",), seeds=(0, 1, 2), steps=10)
    images = render_sweep(adapter, load_network(result.output), settings, base_weights=load_network(result.kept_a))
    metrics = sweep_metrics(images, settings, pair_set)
    runs, summary = metrics["runs"], metrics["summary"]
    print(json.dumps({"copy_similarity": result.copy_similarity, "areas": [r["area"] for r in runs],
                      "rho": [r["rho"] for r in runs], "effect": summary["effect_along_ab"]}))
    assert np.median([r["rho"] for r in runs]) >= 0.9
    assert summary["area_change_at_max_weight"] > 0.05 and summary["area_change_at_min_weight"] < 0
    assert np.all(np.diff(summary["effect_along_ab"]) > 0)  # monotonic along the A -> B pixel direction


def test_paired_objective_trains_through_the_hook(adapter, tmp_path):
    pair_set = toy_pair_set(tmp_path / "pairs")
    config = toy_config(pair_set, max_train_steps=2, train_batch_size=1)
    result = paired(pair_set, config, adapter, tmp_path / "paired.safetensors", weight=0.5)
    assert result.output.is_file() and read_metadata(result.output)[METADATA_METHOD] == "paired"


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
