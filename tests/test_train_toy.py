"""The training loop end to end on the toy model (a real ldm LatentDiffusion, 64x64): overfitting, resume, stop,
NaN, bad datasets, saved files and metadata, samples, and the model left bit for bit as it was."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lorakit_ext.errors import LorakitError
from lorakit_ext.formats.kohya import load_network
from lorakit_ext.networks.network import network_from_weights
from lorakit_ext.train.config import TrainConfig
from lorakit_ext.train.job import Job, StopToken
from lorakit_ext.train.trainer import TrainHooks, train

SIZE = 64
TRIGGER = "zq"  # a word the toy model never saw in captions: what it draws for it must come from the LoRA
# the one training image: a yellow triangle on black (colour and shape that `measure` tells apart reliably)
SPEC = dict(shape="triangle", color="yellow", background="black", extent=0.7, center=(32.0, 32.0))


@pytest.fixture(scope="module")
def adapter():
    torch.set_num_threads(1)
    from lorakit_ext.models.ldm import LdmAdapter
    from lorakit_ext.toy.model import load_toy_model

    return LdmAdapter(load_toy_model())


def _model_checksum(adapter) -> str:
    """Every tensor's bits, every requires_grad and training flag, and any instance ``forward`` left behind."""
    digest = hashlib.sha256()
    for name, tensor in adapter.model.state_dict().items():
        digest.update(name.encode() + tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for name, param in adapter.model.named_parameters():
        digest.update(f"{name}{param.requires_grad}{param.grad is None}".encode())
    for name, module in adapter.model.named_modules():
        digest.update(f"{name}{module.training}{'forward' in module.__dict__}".encode())
    return digest.hexdigest()


def _dataset(root: Path, repeats: int = 10, caption: str = TRIGGER) -> Path:
    from lorakit_ext.toy.shapes import ShapeSpec, render

    folder = root / "data" / f"{repeats}_{TRIGGER}"
    folder.mkdir(parents=True)
    image, _ = render(ShapeSpec(**SPEC))
    Image.fromarray(image).save(folder / "one.png")
    (folder / "one.txt").write_text(caption)
    return root / "data"


def _config(tmp_path: Path, **options) -> TrainConfig:
    values = dict(
        train_data_dir=str(_dataset(tmp_path)),
        resolution=(SIZE, SIZE),
        output_dir=str(tmp_path / "out"),
        output_name="toy",
        network_dim=8,
        network_alpha=8,
        network_train_unet_only=True,
        learning_rate=2e-3,
        max_train_steps=6,
        save_precision="float",
        seed=3,
    )
    values.update(options)
    return TrainConfig.from_dict(values)


def _fixed_loss(adapter, weights=None) -> float:
    """Noise-prediction error on the training image at fixed noise (4 draws) and timesteps 300..900 (below 300 the
    error is mostly the unpredictable fine noise, which no network removes), with or without a network."""
    from lorakit_ext.toy.shapes import ShapeSpec, render

    image, _ = render(ShapeSpec(**SPEC))
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    network = None
    if weights is not None:
        network = network_from_weights(weights, adapter.targets(), adapter.arch)
        network.attach()
    try:
        with torch.no_grad():
            torch.manual_seed(0)  # the VAE samples its latent distribution
            t = torch.arange(300, 1000, 100).repeat(4)
            latents = adapter.encode_images(pixels).repeat(len(t), 1, 1, 1)
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
            alphas = adapter.alphas_cumprod[t].view(-1, 1, 1, 1)
            noisy = alphas.sqrt() * latents + (1 - alphas).sqrt() * noise
            cond = adapter.encode_prompts([TRIGGER] * len(t))
            return float((adapter.predict(noisy, t, cond) - noise).pow(2).mean())
    finally:
        if network is not None:
            network.detach()


@pytest.mark.slow
def test_overfitting_one_image_learns_its_colour_and_shape(adapter, tmp_path):
    from lorakit_ext.sampling import sample, to_uint8
    from lorakit_ext.toy.shapes import measure

    before = _model_checksum(adapter)
    config = _config(
        tmp_path,
        max_train_steps=80,
        train_batch_size=2,
        learning_rate=5e-3,
        max_grad_norm=0,
        network_train_unet_only=False,
    )
    result = train(config, adapter)
    assert _model_checksum(adapter) == before
    weights = load_network(result.output)
    base_loss, trained_loss = _fixed_loss(adapter), _fixed_loss(adapter, weights)
    print(f"fixed-batch loss {base_loss:.4f} -> {trained_loss:.4f} (x{base_loss / trained_loss:.2f})")
    # The per-step training loss is too noisy to compare (its first-10 vs last-10 step means went up for one seed);
    # this loss is deterministic. Measured: it falls 1.53-1.72x in 40 steps on the toy model (seeds 3-5) and levels
    # off near 1.7-1.8x by 80-160 steps; the VAE-sampling floor is ~0.0002.
    assert trained_loss <= base_loss / 1.25
    network = network_from_weights(weights, adapter.targets(), adapter.arch)
    network.attach()
    try:
        images = to_uint8(sample(adapter, [TRIGGER] * 8, 0, steps=12, cfg_scale=4.0, width=SIZE, height=SIZE))
    finally:
        network.detach()
    found = [measure(image) for image in images]
    print("samples:", [(m.color, m.shape) for m in found])
    # measured 6 of 8 for each (shape is what the toy model learns last: after 40 steps the LoRA had the colour but
    # still drew 6 circles in 8)
    assert sum(m.color == SPEC["color"] for m in found) >= 5
    assert sum(m.shape == SPEC["shape"] for m in found) >= 5
    assert _model_checksum(adapter) == before


def _final_factors(path: Path) -> dict[str, torch.Tensor]:
    weights = load_network(path)
    return {f"{name}.{key}": t for name, m in weights.modules.items() for key, t in m.tensors.items()}


def test_resume_from_a_mid_run_state_gives_the_uninterrupted_result(adapter, tmp_path):
    options = dict(max_train_steps=4, optimizer_type="AdamW", lr_scheduler="cosine", rank_dropout=0.2)
    whole = train(_config(tmp_path / "a", output_name="whole", **options), adapter)
    part = train(
        _config(tmp_path / "b", output_name="part", save_every_n_steps=2, save_state=True, **options), adapter
    )
    state = tmp_path / "b" / "out" / "part-step00000002-state"
    assert state.is_dir() and part.steps == 4
    resumed = train(_config(tmp_path / "c", output_name="resumed", resume=str(state), **options), adapter)
    assert resumed.steps == 4 and len(resumed.losses) == 2
    assert resumed.losses == pytest.approx(whole.losses[2:], rel=1e-6)
    expected, got = _final_factors(whole.output), _final_factors(resumed.output)
    assert expected.keys() == got.keys()
    for key in expected:  # same seed, same steps, same draws: equal up to float32 summation order (none on CPU)
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


def test_stop_mid_epoch_saves_a_loadable_file_and_state_and_leaves_the_model(adapter, tmp_path):
    before = _model_checksum(adapter)
    token = StopToken()

    def report(step=0, **_):
        if step == 3:
            token.stop()

    result = train(_config(tmp_path, max_train_steps=50, training_comment="stop test"), adapter, report, token)
    assert result.stopped and result.steps == 3
    assert result.output.name == "toy.safetensors" and result.state.name == "toy-state"
    metadata = load_network(result.output).metadata
    assert metadata["ss_steps"] == "3" and metadata["ss_training_comment"] == "stop test"
    assert _model_checksum(adapter) == before
    resumed = train(_config(tmp_path / "more", max_train_steps=5, resume=str(result.state)), adapter)
    assert resumed.steps == 5 and len(resumed.losses) == 2


def test_nan_loss_stops_with_the_promised_message(adapter, tmp_path):
    before = _model_checksum(adapter)

    def poisoned(run, batch):
        loss = run.diffusion_loss(batch)
        return loss * float("nan") if run.losses and len(run.losses) >= 3 else loss

    config = _config(tmp_path, max_train_steps=10, save_every_n_steps=2)
    with pytest.raises(LorakitError) as error:
        train(config, adapter, hooks=TrainHooks(batch_loss=poisoned))
    message = str(error.value)
    assert message.startswith("loss became nan at step 4 (epoch 1)")
    assert "toy-step00000002.safetensors" in message and "lower learning_rate" in message
    assert not (Path(config.output_dir) / "toy.safetensors").exists()
    assert _model_checksum(adapter) == before


def test_nan_loss_before_any_save_keeps_the_last_good_weights(adapter, tmp_path):
    def poisoned(run, batch):
        loss = run.diffusion_loss(batch)
        return loss * float("inf") if len(run.losses) >= 2 else loss

    config = _config(tmp_path, max_train_steps=10)
    with pytest.raises(LorakitError) as error:
        train(config, adapter, hooks=TrainHooks(batch_loss=poisoned))
    kept = Path(config.output_dir) / "toy-last-good-step00000002.safetensors"
    assert str(error.value).startswith(f"loss became inf at step 3 (epoch 1): training stopped, the weights after "
                                       f"step 2 are saved as {kept}; lower learning_rate (now 0.002)")
    assert load_network(kept).metadata["ss_steps"] == "2"
    clean = train(_config(tmp_path / "clean", max_train_steps=2), adapter)  # the same two steps, no poison
    expected, got = _final_factors(clean.output), _final_factors(kept)
    assert expected.keys() == got.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_save_last_n_steps_keeps_the_files_and_states_of_the_last_n_steps(adapter, tmp_path):
    config = _config(tmp_path, max_train_steps=9, save_every_n_steps=2, save_last_n_steps=4, save_state=True)
    events = []
    result = train(config, adapter, lambda **event: events.append(event))
    written = [Path(p).name for e in events for p in e.get("files", [])]
    assert written == [f"toy-step0000000{s}.safetensors" for s in (2, 4, 6, 8)] + ["toy.safetensors"]
    out = Path(config.output_dir)
    # kohya's rule: at step 8 the file of step 8 - 4 - 1 = 3, rounded down to a multiple of 2, goes
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "toy-step00000004.safetensors", "toy-step00000006.safetensors", "toy-step00000008.safetensors",
        "toy.safetensors",
    ]
    assert sorted(p.name for p in out.glob("*-state")) == [
        "toy-state", "toy-step00000004-state", "toy-step00000006-state", "toy-step00000008-state",
    ]
    assert result.steps == 9


def test_resume_refuses_a_state_saved_with_other_training_options(adapter, tmp_path):
    first = train(_config(tmp_path / "a", max_train_steps=2, save_state=True), adapter)
    for number, (change, fragment) in enumerate((
        ({"learning_rate": 1e-3}, "learning_rate 0.002 -> 0.001"),
        ({"seed": 4, "network_dim": 4}, "network_dim 8 -> 4, seed 3 -> 4"),
    )):
        with pytest.raises(LorakitError) as error:
            train(_config(tmp_path / f"b{number}", max_train_steps=4, resume=str(first.state), **change), adapter)
        message = str(error.value)
        assert message.startswith(f"resume: {first.state} was saved with other training options (")
        assert fragment in message and "\n" not in message
    more = train(_config(tmp_path / "c", max_train_steps=4, output_name="more", resume=str(first.state)), adapter)
    assert more.steps == 4 and len(more.losses) == 2  # a longer run, other folders and names: allowed


def test_bad_datasets_are_refused_before_training(adapter, tmp_path):
    empty = tmp_path / "nothing_here"
    (empty / "5_concept").mkdir(parents=True)
    with pytest.raises(LorakitError, match="nothing_here|5_concept"):
        train(_config(tmp_path / "x", train_data_dir=str(empty)), adapter)
    data = _dataset(tmp_path / "y")
    broken = data / f"10_{TRIGGER}" / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(LorakitError, match="broken.png"):
        train(_config(tmp_path / "z", train_data_dir=str(data)), adapter)
    assert not (tmp_path / "z" / "out").exists()


def test_saved_files_carry_training_metadata_and_epoch_names(adapter, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{TRIGGER} --s 3 --l 1 --d 5\n{TRIGGER} --s 3 --l 1 --d 5 --m 0\n")
    config = _config(
        tmp_path,
        max_train_epochs=3,
        train_batch_size=5,  # 10 items: 2 steps an epoch
        save_every_n_epochs=1,
        save_last_n_epochs=1,
        save_precision="fp16",
        sample_every_n_epochs=2,
        sample_prompts=str(prompts),
        min_snr_gamma=5.0,
        noise_offset=0.05,
    )
    events = []
    job = Job(lambda report, token: train(config, adapter, report, token), "train")
    job.subscribe(events.append)
    job.start()
    assert job.wait(120) and job.status == "done", job.error
    out = Path(config.output_dir)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["toy-000002.safetensors", "toy.safetensors"]
    assert [Path(p).name for e in events for p in e.files][:2] == ["toy-000001.safetensors", "toy-000002.safetensors"]
    weights = load_network(out / "toy.safetensors")
    tensor = next(iter(weights.modules.values())).tensors["lora_down.weight"]
    assert tensor.dtype == torch.float16
    meta = weights.metadata
    assert meta["ss_steps"] == "6" and meta["ss_epoch"] == "3" and meta["ss_num_epochs"] == "3"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_module"] == "networks.lora"
    assert float(meta["ss_learning_rate"]) == 2e-3 and meta["ss_min_snr_gamma"] == "5.0"
    assert meta["ss_num_train_images"] == "10" and meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW" and meta["ss_seed"] == "3"
    assert json.loads(meta["ss_dataset_dirs"]) == {f"10_{TRIGGER}": {"n_repeats": 10, "img_count": 1}}
    assert json.loads(meta["ss_tag_frequency"]) == {f"10_{TRIGGER}": {TRIGGER: 1}}
    assert "ss_training_finished_at" in meta
    assert "ss_sd_model_name" not in meta and "ss_sd_model_hash" not in meta  # this adapter has no ModelSource
    samples = sorted((out / "sample").glob("*.png"))
    assert [p.name for p in samples] == [f"toy_00000{step}_0{i}_5.png" for step in (4, 6) for i in (0, 1)]
    steps = [e.step for e in events if "loss" in e.values]
    assert steps == [1, 2, 3, 4, 5, 6] and all(math.isfinite(e.values["avg_loss"]) for e in events if e.values)


def test_sample_multiplier_zero_draws_the_base_model(adapter, tmp_path):
    from lorakit_ext.sampling import sample

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{TRIGGER} --s 3 --l 1 --d 5 --m 0\n")
    config = _config(tmp_path, max_train_steps=2, sample_every_n_steps=1, sample_prompts=str(prompts))
    train(config, adapter)
    drawn = np.asarray(Image.open(Path(config.output_dir) / "sample" / "toy_000001_00_5.png"))
    base = sample(adapter, [TRIGGER], [5], steps=3, cfg_scale=1.0, width=SIZE, height=SIZE)
    expected = (base[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.abs(drawn.astype(int) - expected.astype(int)).max() <= 1


def test_gradient_checkpointing_and_text_encoder_training(adapter, tmp_path):
    before = _model_checksum(adapter)
    plain = train(_config(tmp_path / "a", max_train_steps=2, network_train_unet_only=False), adapter)
    checkpointed = train(
        _config(tmp_path / "b", max_train_steps=2, network_train_unet_only=False, gradient_checkpointing=True), adapter
    )
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)
    a, b = _final_factors(plain.output), _final_factors(checkpointed.output)
    assert any(key.startswith("lora_te_") for key in a)
    assert any(key.startswith("lora_te_") and float(t.abs().sum()) > 0 for key, t in a.items() if "up" in key)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert _model_checksum(adapter) == before


def test_cancel_writes_nothing_and_mixed_precision_runs(adapter, tmp_path):
    before = _model_checksum(adapter)
    config = _config(tmp_path, max_train_steps=50, mixed_precision="bf16")
    job = Job(lambda report, token: train(config, adapter, report, token), "train")
    job.subscribe(lambda event: job.cancel() if event.step == 2 else None)
    job.start()
    assert job.wait(120) and job.status == "cancelled" and job.result is None
    assert [e.step for e in job.poll() if "loss" in e.values] == [1, 2]
    assert all(math.isfinite(e.values["loss"]) for e in job.poll() if "loss" in e.values)
    assert not list(Path(config.output_dir).glob("*.safetensors"))
    assert _model_checksum(adapter) == before


def test_network_b_trains_on_top_of_a_frozen_network_a(adapter, tmp_path):
    """The copier method's shape: A attached (frozen) under the B being trained; A stays as the caller left it."""
    first = train(_config(tmp_path / "a", max_train_steps=2, output_name="a"), adapter)
    network_a = network_from_weights(load_network(first.output), adapter.targets(), adapter.arch)
    network_a.attach().requires_grad_(False)
    factors_a = {k: v.clone() for k, v in network_a.state_dict().items()}
    try:
        second = train(_config(tmp_path / "b", max_train_steps=2, output_name="b", network_algo="loha"), adapter)
        assert network_a.attached
        assert all(torch.equal(v, factors_a[k]) for k, v in network_a.state_dict().items())
    finally:
        network_a.detach()
    weights_b = load_network(second.output)
    assert weights_b.metadata["ss_network_module"] != load_network(first.output).metadata["ss_network_module"]
    assert all("hada_w1_a" in m.tensors for m in weights_b.modules.values())


def test_latent_and_text_caches_and_masked_loss(adapter, tmp_path):
    """Cached latents (on disk beside the image) and text-encoder outputs train like the uncached run; a mask that
    is zero everywhere makes the loss zero."""
    plain = train(_config(tmp_path / "a", max_train_steps=3), adapter)
    cached = train(
        _config(tmp_path / "b", max_train_steps=3, cache_latents=True, cache_latents_to_disk=True, cache_text_encoder_outputs=True),
        adapter,
    )
    assert list((tmp_path / "b" / "data" / f"10_{TRIGGER}").glob("*.latents.safetensors"))
    assert cached.losses[0] == pytest.approx(plain.losses[0], rel=0.2)  # same data; the VAE sample differs
    data = _dataset(tmp_path / "c")
    image = Image.open(data / f"10_{TRIGGER}" / "one.png").convert("RGBA")
    image.putalpha(0)
    image.save(data / f"10_{TRIGGER}" / "one.png")
    masked = train(_config(tmp_path / "d", train_data_dir=str(data), max_train_steps=2, masked_loss=True), adapter)
    assert masked.losses == [0.0, 0.0]


def test_fp16_on_the_cpu_says_it_has_no_effect_and_trains(adapter, tmp_path):
    """accelerate does not autocast to fp16 on a CPU (bf16 it does): the run says so and trains in fp32."""
    events = []
    result = train(_config(tmp_path, max_train_steps=2, mixed_precision="fp16"), adapter,
                   lambda **event: events.append(event))
    messages = [e["message"] for e in events if e.get("message")]
    assert "warning: mixed_precision fp16: accelerate does not autocast to it on cpu; training runs in fp32" in messages
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)


def test_training_starts_from_network_weights_and_refuses_a_file_for_another_model(adapter, tmp_path):
    """``network_weights``: the run continues from the file's factors; a file whose modules the model lacks (an SDXL
    name on this SD1 model) is refused in one line naming the file, instead of silently loading nothing."""
    first = load_network(train(_config(tmp_path / "a", max_train_steps=2, output_name="a"), adapter).output)
    source = tmp_path / "a" / "out" / "a.safetensors"
    resumed = train(_config(tmp_path / "b", max_train_steps=1, output_name="b", learning_rate=1e-12,
                            network_weights=str(source)), adapter)
    continued = load_network(resumed.output)
    assert set(continued.modules) == set(first.modules)
    for name, module in first.modules.items():
        for key, tensor in module.tensors.items():
            assert torch.allclose(continued.modules[name].tensors[key].float(), tensor.float(), atol=1e-5), (name, key)

    tensors = load_file(source)
    unet_module = next(k for k in tensors if k.startswith("lora_unet_")).split(".")[0]
    foreign = {  # one module under a name only SDXL's UNet has (its 6th transformer block of input block 7)
        key.replace(unet_module, "lora_unet_input_blocks_7_1_transformer_blocks_5_attn1_to_q"): value
        for key, value in tensors.items()
        if key.startswith(unet_module + ".")
    }
    save_file(foreign, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(LorakitError) as error:
        train(_config(tmp_path / "c", max_train_steps=1, network_weights=str(tmp_path / "foreign.safetensors")), adapter)
    message = str(error.value)
    assert "foreign.safetensors" in message and "made for sdxl, the model is sd1" in message
    assert "1 of 1 modules match no target" in message
    assert "\n" not in message
