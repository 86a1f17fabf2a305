"""Smoke run of the pretraining script: a few steps write a loadable SD1 checkpoint, byte-identical when rerun."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from lorakit_ext.models.ldm import LdmAdapter
from lorakit_ext.toy import pretrain, shapes
from lorakit_ext.toy.model import CHECKPOINT_NAME, TEXT_DIR, load_checkpoint, read_config


def test_quick_run_writes_a_loadable_reproducible_checkpoint(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    pretrain.main(["--quick", "--out", str(out), "--work", str(work)])
    checkpoint = out / CHECKPOINT_NAME
    first = checkpoint.read_bytes()
    stages = ("vae", "denoiser", "twins", "decoder")
    assert [len(list(work.glob(f"{stage}-*.safetensors"))) for stage in stages] == [1, 1, 1, 1]
    pretrain.pretrain(pretrain.QUICK, out, work)  # the rerun takes every stage from the cache
    assert checkpoint.read_bytes() == first
    next(work.glob("decoder-*.safetensors")).unlink()  # the decoder stage again, in this process this time
    pretrain.pretrain(pretrain.QUICK, out, work)
    assert checkpoint.read_bytes() == first

    yaml_path = checkpoint.with_suffix(".yaml")
    from omegaconf import OmegaConf

    version = OmegaConf.load(yaml_path).model.params.cond_stage_config.params.version
    assert (out / version).resolve() == TEXT_DIR
    assert (out / "toy_sd1.diffusers.json").is_file()

    model = load_checkpoint(checkpoint, read_config(yaml_path))
    adapter = LdmAdapter(model)
    with torch.no_grad():
        cond = adapter.encode_prompts(["a red circle"])
        eps = adapter.predict(torch.randn(1, 4, 8, 8), torch.tensor([500]), cond)
    assert cond["crossattn"].shape == (1, 77, 64) and eps.shape == (1, 4, 8, 8)


def test_warmup_then_cosine_schedule():
    factor = pretrain.warmup_cosine(warmup=10, total=110, floor=0.1)
    assert factor(0) == 0.1 and factor(9) == 1.0
    assert factor(60) == 0.55 and abs(factor(110) - 0.1) < 1e-12


def test_shape_twins_differ_from_their_image_in_the_shape_alone():
    rng = np.random.default_rng(0)
    specs = [shapes.random_spec(rng) for _ in range(60)]
    twins = [pretrain.shape_twin(spec, rng) for spec in specs]
    for spec, twin in zip(specs, twins):
        assert twin.shape != spec.shape and twin.shape in ("circle", "square")
        assert dataclasses.replace(twin, shape=spec.shape) == spec
    assert {t.shape for s, t in zip(specs, twins) if s.shape == "triangle"} == {"circle", "square"}
