"""The sampler against exact answers: a model of a one-point data distribution (whose ideal denoiser is known in
closed form), and ldm's own DDIMSampler on the toy model."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit_ext import sampling
from lorakit_ext.errors import LorakitError
from lorakit_ext.models.configs import sd_alphas_cumprod

SHAPE = (4, 2, 2)


class PointAdapter:
    """The exact denoiser of data that is always one latent, ``targets[prompt]``: eps (or v) in closed form.

    Decoding returns the first 3 latent channels, so "images" are latents mapped from [-1, 1] to [0, 1].
    """

    def __init__(self, targets: dict[str, torch.Tensor], prediction_type: str = "epsilon"):
        self.targets = targets
        self.prediction_type = prediction_type
        self.alphas_cumprod = sd_alphas_cumprod()
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.predict_batches: list[int] = []

    def encode_prompts(self, prompts, sizes=None):
        return {"x0": torch.stack([self.targets[p] for p in prompts])}

    def predict(self, noisy, timesteps, cond):
        self.predict_batches.append(noisy.shape[0])
        alpha = self.alphas_cumprod[timesteps].double().sqrt().view(-1, 1, 1, 1)
        s = (1 - alpha**2).sqrt()
        x0 = cond["x0"].double()
        eps = (noisy.double() - alpha * x0) / s
        out = eps if self.prediction_type == "epsilon" else alpha * eps - s * x0
        return out.float()

    def decode_latents(self, latents):
        return latents[:, :3]


def targets() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "": torch.zeros(SHAPE),
        "a": torch.rand(SHAPE, generator=generator) - 0.5,
        "b": torch.rand(SHAPE, generator=generator) - 0.5,
    }


def images_of(latents: torch.Tensor) -> torch.Tensor:
    return ((latents[:, :3] + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_euler_lands_exactly_on_the_data_point(prediction_type, steps):
    adapter = PointAdapter(targets(), prediction_type)
    images = sampling.sample(adapter, ["a", "b"], [1, 2], steps=steps, cfg_scale=1.0, sampler="euler", width=16, height=16)
    expected = images_of(torch.stack([adapter.targets["a"], adapter.targets["b"]]))
    assert images.shape == (2, 3, 2, 2)
    assert torch.allclose(images, expected, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_stops_at_the_first_timesteps_noise_level(prediction_type):
    """For one data point the ODE keeps eps at its starting value, so DDIM ends at x0 + sigma_0 * eps."""
    adapter = PointAdapter(targets(), prediction_type)
    images = sampling.sample(adapter, ["a"], [3], steps=10, cfg_scale=1.0, sampler="ddim", width=16, height=16)
    sigmas = sampling.sigmas_of(adapter.alphas_cumprod).float()
    start, sigma0 = sigmas[sampling.schedule("ddim", 10, adapter.alphas_cumprod)[0][0]], sigmas[0]
    x_start = sampling.initial_noise([3], SHAPE)[0] * (1 + start**2).sqrt()
    eps = (x_start - adapter.targets["a"]) / start
    latent = (adapter.targets["a"] + sigma0 * eps) / math.sqrt(1 + sigma0**2)
    assert torch.allclose(images[0], images_of(latent[None])[0], atol=1e-5)
    assert not torch.allclose(images[0], images_of(adapter.targets["a"][None])[0], atol=1e-3)


def test_guidance_extrapolates_from_the_negative_prompt():
    adapter = PointAdapter(targets())
    latents_seen = []
    adapter.decode_latents = lambda latents: latents_seen.append(latents) or latents[:, :3]
    sampling.sample(adapter, ["a"], [0], negative_prompt="b", steps=12, cfg_scale=3.0, width=16, height=16)
    a, b = adapter.targets["a"], adapter.targets["b"]
    assert torch.allclose(latents_seen[0][0].float(), b + 3.0 * (a - b), atol=1e-5)
    assert set(adapter.predict_batches) == {2}  # prompt and negative in one call


def test_an_image_depends_on_its_seed_not_on_its_batch():
    adapter = PointAdapter(targets())
    settings = dict(steps=8, cfg_scale=2.0, sampler="ddim", width=16, height=16)
    together = sampling.sample(adapter, ["a", "b", "a"], [5, 6, 7], batch_size=3, **settings)
    alone = sampling.sample(adapter, ["b"], [6], **settings)
    chunked = sampling.sample(adapter, ["a", "b", "a"], [5, 6, 7], batch_size=2, **settings)
    assert torch.equal(together[1], alone[0])
    assert torch.equal(together, chunked)
    assert not torch.equal(together[0], together[2])  # same prompt, other seed
    counted = sampling.sample(adapter, ["a", "b"], 6, **settings)  # a first seed counts up
    assert torch.equal(counted[0], sampling.sample(adapter, ["a"], [6], **settings)[0])


def test_schedules():
    alphas = sd_alphas_cumprod()
    ddim_steps, ddim_ends = sampling.schedule("ddim", 20, alphas)
    assert ddim_steps == list(range(951, 0, -50))  # ldm's "uniform" DDIM timesteps
    euler_steps, euler_ends = sampling.schedule("euler", 20, alphas)
    assert euler_steps[0] == 999 and euler_steps[-1] == 0 and euler_ends[-1] == 0.0
    assert all(a > b for a, b in zip(euler_ends, euler_ends[1:]))
    assert ddim_ends[-1] == pytest.approx(float(sampling.sigmas_of(alphas)[0]))


def test_bad_requests_raise_one_line_errors():
    adapter = PointAdapter(targets())
    with pytest.raises(LorakitError, match="multiples of 8"):
        sampling.sample(adapter, ["a"], [0], width=20, height=16)
    with pytest.raises(LorakitError, match="unknown sampler"):
        sampling.sample(adapter, ["a"], [0], sampler="plms", width=16, height=16)
    with pytest.raises(LorakitError, match="1 prompts, 2 seeds"):
        sampling.sample(adapter, ["a"], [0, 1], width=16, height=16)
    with pytest.raises(LorakitError, match="steps"):
        sampling.sample(adapter, ["a"], [0], steps=0, width=16, height=16)


def test_progress_is_reported_per_step():
    seen = []
    sampling.sample(
        PointAdapter(targets()), ["a", "b", "a"], 0, steps=4, batch_size=2, width=16, height=16,
        on_step=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(i, 8) for i in range(1, 9)]


def test_grid_lays_out_rows_with_labels():
    images = torch.zeros(6, 3, 8, 8)
    images[4] = 1.0  # row 1, column 1 is white
    plain = sampling.grid(images, columns=3)
    assert plain.size == (24, 16)
    assert plain.getpixel((12, 12)) == (255, 255, 255) and plain.getpixel((4, 4)) == (0, 0, 0)
    labelled = sampling.grid(images, columns=3, row_labels=["first", "second"], scale=2)
    assert labelled.size[1] == 32 and labelled.size[0] > 48
    with pytest.raises(LorakitError, match="row labels"):
        sampling.grid(images, columns=3, row_labels=["only one"])


def test_ddim_matches_ldms_own_ddim_sampler_on_the_toy_model():
    from ldm.models.diffusion.ddim import DDIMSampler

    from lorakit_ext.models.ldm import LdmAdapter
    from lorakit_ext.toy.model import load_toy_model

    model = load_toy_model()
    prompts, seeds = ["a red circle", "a large blue square on a white background"], [11, 12]
    ours = sampling.sample(
        LdmAdapter(model), prompts, seeds, steps=20, cfg_scale=5.0, sampler="ddim", width=64, height=64
    )
    with torch.no_grad():
        latents, _ = DDIMSampler(model).sample(
            S=20, batch_size=2, shape=(4, 8, 8), conditioning=model.get_learned_conditioning(prompts),
            unconditional_guidance_scale=5.0, unconditional_conditioning=model.get_learned_conditioning(["", ""]),
            eta=0.0, x_T=sampling.initial_noise(seeds, (4, 8, 8)), verbose=False,
        )
        theirs = ((model.decode_first_stage(latents) + 1) / 2).clamp(0, 1)
    assert ours.std() > 0.1  # real pictures, not a flat field
    assert torch.allclose(ours, theirs, atol=2e-3)
