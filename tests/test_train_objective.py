"""The trainer's pure pieces: noise, min-SNR weights, v targets, step arithmetic, file names."""

from __future__ import annotations

import pytest
import torch

from lorakit_ext.models.configs import sd_alphas_cumprod
from lorakit_ext.train.config import TrainConfig
from lorakit_ext.train.trainer import (
    min_snr_weights,
    multires_noise,
    resolved_steps,
    saved_name,
    step_seed,
    training_target,
    warmup_steps,
)


def test_multires_noise_is_unit_variance_and_spatially_correlated():
    generator = torch.Generator().manual_seed(0)
    white = torch.randn(4, 4, 32, 32, generator=generator)
    pyramid = multires_noise((4, 4, 32, 32), iterations=6, discount=0.8, generator=generator)
    assert pyramid.shape == white.shape
    assert pyramid.std().item() == pytest.approx(1.0, abs=1e-5)

    def neighbour_correlation(x):
        return torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1].item()

    assert abs(neighbour_correlation(white)) < 0.05
    assert neighbour_correlation(pyramid) > 0.3


def test_min_snr_weights_for_eps_and_v():
    alphas = sd_alphas_cumprod()
    t = torch.tensor([0, 500, 999])
    snr = alphas[t] / (1 - alphas[t])
    eps = min_snr_weights(alphas, t, 5.0, v_prediction=False)
    v = min_snr_weights(alphas, t, 5.0, v_prediction=True)
    assert eps[0] == pytest.approx(5.0 / snr[0].item())  # low noise: SNR far above gamma, weight below 1
    assert eps[2] == pytest.approx(1.0)  # high noise: SNR below gamma, weight 1
    assert v.tolist() == pytest.approx((torch.clamp(snr, max=5.0) / (snr + 1)).tolist())


def test_v_target_matches_its_definition():
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    alphas = torch.tensor([0.9, 0.1])
    v = training_target(latents, noise, alphas, "v_prediction")
    expected = alphas.sqrt()[:, None, None, None] * noise - (1 - alphas).sqrt()[:, None, None, None] * latents
    assert torch.allclose(v, expected)
    assert training_target(latents, noise, alphas, "epsilon") is noise


def test_step_arithmetic_like_kohya():
    config = TrainConfig(train_batch_size=2, gradient_accumulation_steps=3, max_train_steps=100)
    assert resolved_steps(config, batches_per_epoch=10) == (4, 100, 25)
    epochs = TrainConfig(gradient_accumulation_steps=3, max_train_epochs=5)
    assert resolved_steps(epochs, batches_per_epoch=10) == (4, 20, 5)
    assert resolved_steps(epochs, batches_per_epoch=10, processes=2) == (2, 10, 5)
    assert warmup_steps(TrainConfig(lr_warmup_steps=0.1), 200) == 20
    assert warmup_steps(TrainConfig(lr_warmup_steps=7), 200) == 7


def test_names_and_seeds():
    assert saved_name("x") == "x.safetensors"
    assert saved_name("x", epoch=4) == "x-000004.safetensors"
    assert saved_name("x", step=500) == "x-step00000500.safetensors"
    seeds = {step_seed(42, s, p) for s in range(50) for p in range(2)}
    assert len(seeds) == 100 and step_seed(42, 3) == step_seed(42, 3)
