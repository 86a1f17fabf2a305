"""The same trainer on a diffusers SDXL-shaped model (tiny, random): two text encoders, size conditioning from the
buckets, v-prediction, diffusers' own gradient checkpointing, and the model left as it was."""

from __future__ import annotations

import hashlib

import pytest
import torch
from PIL import Image
from test_models_adapters import open_clip_as_hf
from test_models_fixtures import (
    TINY_CLIP,
    TINY_LDM_UNET_SDXL,
    TINY_OPEN_CLIP,
    clip_tokenizer,
    diffusers_unet_from_ldm,
    hf_clip,
    ldm_unet,
    open_clip_tower,
    randomize,
)

from lorakit_ext.formats.kohya import load_network
from lorakit_ext.models.diffusers_adapter import DiffusersAdapter
from lorakit_ext.train.config import TrainConfig
from lorakit_ext.train.trainer import TrainHooks, train


@pytest.fixture(scope="module")
def sdxl_v():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 32], layers_per_block=1, latent_channels=4, norm_num_groups=32,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    te1 = randomize(hf_clip(TINY_CLIP), seed=6)
    te2 = open_clip_as_hf(randomize(open_clip_tower(TINY_OPEN_CLIP), seed=7), TINY_OPEN_CLIP["text_cfg"]["layers"],
                          with_projection=True)
    unet = diffusers_unet_from_ldm(randomize(ldm_unet(TINY_LDM_UNET_SDXL), seed=8), TINY_LDM_UNET_SDXL)
    return DiffusersAdapter(unet, [te1, te2], [clip_tokenizer(), clip_tokenizer()], vae, prediction_type="v_prediction")


def _checksum(adapter) -> str:
    digest = hashlib.sha256()
    for name, root in adapter.components().items():
        for key, tensor in root.state_dict().items():
            digest.update(f"{name}.{key}".encode() + tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
        for key, module in root.named_modules():
            digest.update(f"{key}{module.training}{'forward' in module.__dict__}".encode())
        digest.update(str([p.requires_grad for p in root.parameters()]).encode())
    return digest.hexdigest()


def test_sdxl_v_prediction_with_buckets_and_checkpointing(sdxl_v, tmp_path):
    folder = tmp_path / "data" / "2_thing"
    folder.mkdir(parents=True)
    Image.new("RGB", (48, 32), "red").save(folder / "wide.png")
    Image.new("RGB", (32, 48), "blue").save(folder / "tall.png")
    config = TrainConfig.from_dict(dict(
        train_data_dir=str(tmp_path / "data"), resolution=40, enable_bucket=True, min_bucket_reso=16,
        max_bucket_reso=64, bucket_reso_steps=8, default_caption="a thing", max_train_steps=4, train_batch_size=2,
        gradient_checkpointing=True, multires_noise_iterations=3, min_snr_gamma=5.0, output_dir=str(tmp_path / "out"),
        output_name="xl", save_precision="bf16",
    ))
    seen = []

    def checking_loss(run, batch):
        seen.append((batch.cond["time_ids"].tolist(), [e.target_size for e in batch.examples]))
        return run.diffusion_loss(batch)

    before = _checksum(sdxl_v)
    result = train(config, sdxl_v, hooks=TrainHooks(batch_loss=checking_loss))
    assert _checksum(sdxl_v) == before
    assert not sdxl_v.unet.is_gradient_checkpointing
    assert all(torch.isfinite(torch.tensor(result.losses)))
    for time_ids, targets in seen:  # each batch is one bucket, and its size reached the UNet's time_ids
        assert len(set(targets)) == 1
        for row, (height, width) in zip(time_ids, targets):
            assert row[4:] == [height, width] and row[2:4] == [0, 0]
    assert {tuple(t[0]) for _, t in seen} == {(32, 48), (48, 32)}
    weights = load_network(result.output)
    prefixes = {name.split("_")[1] for name in weights.modules}
    assert prefixes == {"te1", "te2", "unet"}
    assert weights.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert next(iter(weights.modules.values())).tensors["lora_down.weight"].dtype == torch.bfloat16
