"""The ldm and diffusers adapters on tiny real models: same kohya names and shapes, same conditioning, same outputs.

The diffusers side holds the ldm side's weights, moved by lorakit's own converters (UNet state dict, OpenCLIP text
weights) into a UNet built from ``diffusers_unet_config``; identical outputs prove converters and config alike.
"""

import copy

import pytest
import torch
from test_models_fixtures import (
    TINY_CLIP,
    TINY_LDM_UNET,
    TINY_LDM_UNET_SD2,
    TINY_LDM_UNET_SDXL,
    TINY_OPEN_CLIP,
    TINY_POOLED,
    TINY_SIZE_DIM,
    StandInDiffusionEngine,
    StandInFrozenOpenCLIPEmbedder2,
    StandInSizeEmbedder,
    clip_tokenizer,
    diffusers_unet_from_ldm,
    frozen_clip_embedder,
    frozen_open_clip_embedder,
    hf_clip,
    ldm_unet,
    load_hf_text_weights,
    open_clip_tower,
    randomize,
    tiny_latent_diffusion,
)

from lorakit_ext.errors import LorakitError
from lorakit_ext.models import configs, naming
from lorakit_ext.models.diffusers_adapter import DiffusersAdapter
from lorakit_ext.models.ldm import LdmAdapter

PROMPTS = ["a photo of a red cube", "two blue circles on grass"]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def target_table(adapter) -> dict:
    return {t.name: (t.shape, t.block, t.component) for t in adapter.targets()}


def open_clip_as_hf(tower, layers: int, with_projection: bool = False):
    hf = hf_clip({**TINY_CLIP, "num_hidden_layers": layers}, with_projection=with_projection)
    return load_hf_text_weights(hf, naming.convert_open_clip_text_state_dict(tower.state_dict(), layers=layers))


@pytest.mark.parametrize("params", [TINY_LDM_UNET, TINY_LDM_UNET_SD2, TINY_LDM_UNET_SDXL], ids=["sd1", "sd2", "sdxl"])
def test_ldm_unet_weights_give_the_same_diffusers_unet(params):
    unet = randomize(ldm_unet(params), seed=1).eval()
    converted = diffusers_unet_from_ldm(unet, params)
    layout = naming.layout_from_keys(unet.state_dict())
    back = naming.convert_unet_state_dict(converted.state_dict(), layout, "compvis")
    assert back.keys() == unet.state_dict().keys()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 801])
    context = torch.randn(2, 5, params["context_dim"])
    with torch.no_grad():
        if params.get("num_classes") == "sequential":
            text_embeds, time_ids = torch.randn(2, TINY_POOLED), torch.tensor([[64, 64, 0, 0, 64, 64], [32, 48, 4, 2, 64, 64]])
            size_embed = StandInSizeEmbedder(TINY_SIZE_DIM, "sizes")(time_ids)
            expected = unet(x, timesteps=t, context=context, y=torch.cat([text_embeds, size_embed], dim=1))
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
            actual = converted(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        else:
            expected = unet(x, timesteps=t, context=context)
            actual = converted(x, t, encoder_hidden_states=context).sample
    assert expected.abs().max() > 0.1
    assert rel_diff(actual, expected) < 1e-5


@pytest.fixture(scope="module")
def sd1_pair():
    text_encoder = randomize(hf_clip(TINY_CLIP), seed=2)
    model = tiny_latent_diffusion(frozen_clip_embedder(text_encoder, clip_tokenizer()))
    randomize(model.model.diffusion_model, seed=3)
    ldm_adapter = LdmAdapter(model)
    unet = diffusers_unet_from_ldm(model.model.diffusion_model, TINY_LDM_UNET)
    diffusers_adapter = DiffusersAdapter(unet, [copy.deepcopy(text_encoder)], [clip_tokenizer()])
    return model, ldm_adapter, diffusers_adapter


def test_sd1_adapters_list_the_same_targets(sd1_pair):
    _, ldm_adapter, diffusers_adapter = sd1_pair
    assert ldm_adapter.arch == diffusers_adapter.arch == "sd1"
    table = target_table(ldm_adapter)
    assert table == target_table(diffusers_adapter)
    # toy layout: attention on levels 0 and 1 -> 4 down, 1 mid and 6 up transformers of 10 linears + proj_in/out
    blocks = [block for _, block, _ in table.values()]
    assert blocks.count("transformer") == 11 * 12
    assert blocks.count("text") == TINY_CLIP["num_hidden_layers"] * 6
    assert blocks.count("sampler") == 4
    assert table["lora_unet_down_blocks_0_attentions_0_proj_in"] == ((32, 32, 1, 1), "transformer", "unet")
    assert table["lora_unet_up_blocks_1_upsamplers_0_conv"] == ((64, 64, 3, 3), "sampler", "unet")
    assert table["lora_te_text_model_encoder_layers_2_mlp_fc1"] == ((128, 32), "text", "te")
    names = [t.name for t in ldm_adapter.targets()]
    assert len(names) == len(set(names))
    assert names == [t.name for t in ldm_adapter.targets()]  # stable order
    assert set(ldm_adapter.components()) == set(diffusers_adapter.components()) == {"te", "unet"}


def test_sd1_adapters_condition_and_predict_alike(sd1_pair):
    model, ldm_adapter, diffusers_adapter = sd1_pair
    with torch.no_grad():
        ldm_cond = ldm_adapter.encode_prompts(PROMPTS)
        diffusers_cond = diffusers_adapter.encode_prompts(PROMPTS)
        assert ldm_cond.keys() == diffusers_cond.keys() == {"crossattn"}
        assert rel_diff(ldm_cond["crossattn"], diffusers_cond["crossattn"]) < 1e-5
        assert rel_diff(ldm_cond["crossattn"], model.get_learned_conditioning(PROMPTS)) == 0
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 990])
        expected = model.apply_model(x, t, ldm_cond["crossattn"])
        assert rel_diff(ldm_adapter.predict(x, t, ldm_cond), expected) == 0
        assert rel_diff(diffusers_adapter.predict(x, t, diffusers_cond), expected) < 1e-5
    assert ldm_adapter.prediction_type == diffusers_adapter.prediction_type == "epsilon"
    assert torch.allclose(ldm_adapter.alphas_cumprod, diffusers_adapter.alphas_cumprod, rtol=1e-6)
    assert ldm_adapter.alphas_cumprod.shape == (1000,) and ldm_adapter.alphas_cumprod.dtype == torch.float32
    assert ldm_adapter.device == torch.device("cpu") and ldm_adapter.dtype == torch.float32


def test_sd1_text_conditioning_keeps_gradients(sd1_pair):
    _, ldm_adapter, _ = sd1_pair
    q_proj = next(t for t in ldm_adapter.targets() if t.name.endswith("layers_0_self_attn_q_proj"))
    q_proj.weight.requires_grad_(True)
    try:
        ldm_adapter.encode_prompts(PROMPTS)["crossattn"].sum().backward()
        assert q_proj.weight.grad is not None and q_proj.weight.grad.abs().sum() > 0
    finally:
        q_proj.weight.requires_grad_(False)
        q_proj.weight.grad = None


def test_ldm_adapter_latents_match_ldm(sd1_pair):
    model, ldm_adapter, _ = sd1_pair
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(7)
        latents = ldm_adapter.encode_images(pixels)
        torch.manual_seed(7)
        expected = model.get_first_stage_encoding(model.encode_first_stage(pixels))
        assert latents.shape == (2, 4, 4, 4)
        assert rel_diff(latents, expected) == 0
        decoded = ldm_adapter.decode_latents(latents)
        assert decoded.shape == pixels.shape
        assert rel_diff(decoded, model.decode_first_stage(latents)) < 1e-5


def test_ldm_adapter_sees_through_webui_wrappers(sd1_pair):
    model, ldm_adapter, _ = sd1_pair

    class HijackStandIn(torch.nn.Module):  # the WebUI's FrozenCLIPEmbedderWithCustomWords keeps `.wrapped`
        def __init__(self, wrapped):
            super().__init__()
            self.wrapped = wrapped

    original = model.cond_stage_model
    model.cond_stage_model = HijackStandIn(original)
    try:
        wrapped_adapter = LdmAdapter(model)
        assert wrapped_adapter.text_encoders["te"] is original
        assert target_table(wrapped_adapter) == target_table(ldm_adapter)
    finally:
        model.cond_stage_model = original


def test_diffusers_adapter_vae_round_trip():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=[32, 32], layers_per_block=1, latent_channels=4, norm_num_groups=32,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    unet = diffusers_unet_from_ldm(ldm_unet(TINY_LDM_UNET), TINY_LDM_UNET)
    adapter = DiffusersAdapter(unet, [hf_clip(TINY_CLIP)], vae=vae)
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(0)
        latents = adapter.encode_images(pixels)
        torch.manual_seed(0)
        expected = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        assert latents.shape == (1, 4, 8, 8) and rel_diff(latents, expected) == 0
        assert adapter.decode_latents(latents).shape == pixels.shape
    with pytest.raises(LorakitError, match="tokenizers"):
        adapter.encode_prompts(PROMPTS)
    with pytest.raises(LorakitError, match="needs 1 text encoder"):
        DiffusersAdapter(unet, [hf_clip(TINY_CLIP), hf_clip(TINY_CLIP)], arch="sd1")


@pytest.fixture(scope="module")
def sd2_pair():
    tower = randomize(open_clip_tower(TINY_OPEN_CLIP), seed=4)
    model = tiny_latent_diffusion(frozen_open_clip_embedder(tower), TINY_LDM_UNET_SD2, parameterization="v")
    randomize(model.model.diffusion_model, seed=5)
    text_encoder = open_clip_as_hf(tower, TINY_OPEN_CLIP["text_cfg"]["layers"] - 1)  # the penultimate is the output
    unet = diffusers_unet_from_ldm(model.model.diffusion_model, TINY_LDM_UNET_SD2)
    diffusers_adapter = DiffusersAdapter(unet, [text_encoder], [clip_tokenizer()], prediction_type="v_prediction")
    return LdmAdapter(model), diffusers_adapter, tower, text_encoder


def test_sd2_open_clip_attention_targets_and_outputs(sd2_pair):
    ldm_adapter, diffusers_adapter, tower, text_encoder = sd2_pair
    layers_used = TINY_OPEN_CLIP["text_cfg"]["layers"] - 1
    assert ldm_adapter.arch == diffusers_adapter.arch == "sd2-v"
    assert ldm_adapter.prediction_type == "v_prediction"
    assert target_table(ldm_adapter) == target_table(diffusers_adapter)
    text = {t.name: t for t in ldm_adapter.targets() if t.component == "te"}
    assert len(text) == layers_used * 6
    width = TINY_OPEN_CLIP["text_cfg"]["width"]
    attn = tower.transformer.resblocks[1].attn
    for slot, part in enumerate(("q_proj", "k_proj", "v_proj")):
        target = text[f"lora_te_text_model_encoder_layers_1_self_attn_{part}"]
        assert (target.module, target.param, target.rows) == (attn, "in_proj_weight", (slot * width, (slot + 1) * width))
        hf_weight = getattr(text_encoder.text_model.encoder.layers[1].self_attn if hasattr(text_encoder, "text_model")
                            else text_encoder.encoder.layers[1].self_attn, part).weight
        assert torch.equal(target.weight[slice(*target.rows)], hf_weight)
        assert not target.is_wrapped_whole
    out = text["lora_te_text_model_encoder_layers_1_self_attn_out_proj"]
    assert (out.module, out.param, out.rows, out.shape) == (attn, "out_proj.weight", None, (width, width))
    assert torch.equal(out.weight, attn.out_proj.weight)
    fc1 = text["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    assert fc1.module is tower.transformer.resblocks[0].mlp.c_fc and fc1.is_wrapped_whole

    with torch.no_grad():
        ldm_cond, diffusers_cond = ldm_adapter.encode_prompts(PROMPTS), diffusers_adapter.encode_prompts(PROMPTS)
        assert rel_diff(diffusers_cond["crossattn"], ldm_cond["crossattn"]) < 1e-5
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 990])
        assert rel_diff(diffusers_adapter.predict(x, t, diffusers_cond), ldm_adapter.predict(x, t, ldm_cond)) < 1e-5


@pytest.fixture(scope="module")
def sdxl_pair():
    te1 = randomize(hf_clip(TINY_CLIP), seed=6)
    tower = randomize(open_clip_tower(TINY_OPEN_CLIP), seed=7)
    clip_embedder = frozen_clip_embedder(te1, clip_tokenizer(), layer="hidden", layer_idx=TINY_CLIP["num_hidden_layers"] - 1)
    clip_embedder.input_key = "txt"
    embedders = [clip_embedder, StandInFrozenOpenCLIPEmbedder2(tower)]
    embedders += [StandInSizeEmbedder(TINY_SIZE_DIM, key) for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
    unet = randomize(ldm_unet(TINY_LDM_UNET_SDXL), seed=8).eval()
    ldm_adapter = LdmAdapter(StandInDiffusionEngine(unet, embedders))
    te2 = open_clip_as_hf(tower, TINY_OPEN_CLIP["text_cfg"]["layers"], with_projection=True)
    diffusers_unet = diffusers_unet_from_ldm(unet, TINY_LDM_UNET_SDXL)
    diffusers_adapter = DiffusersAdapter(diffusers_unet, [copy.deepcopy(te1), te2], [clip_tokenizer(), clip_tokenizer()])
    return ldm_adapter, diffusers_adapter


def test_sdxl_adapters_list_the_same_compvis_style_targets(sdxl_pair):
    ldm_adapter, diffusers_adapter = sdxl_pair
    assert ldm_adapter.arch == diffusers_adapter.arch == "sdxl"
    table = target_table(ldm_adapter)
    assert table == target_table(diffusers_adapter)
    layers = TINY_CLIP["num_hidden_layers"]
    assert sum(c == "te1" for _, _, c in table.values()) == layers * 6
    assert sum(c == "te2" for _, _, c in table.values()) == layers * 6  # sgm runs every OpenCLIP layer
    assert table["lora_unet_input_blocks_4_1_proj_in"][1] == "transformer"
    assert table["lora_unet_output_blocks_2_2_conv"][1] == "sampler"
    assert "lora_unet_input_blocks_1_1_proj_in" not in table  # no attention on SDXL's first level
    unet_names = [n for n, (_, _, c) in table.items() if c == "unet"]
    assert all(naming.unet_spelling(n.removeprefix("lora_unet_")) == "compvis" for n in unet_names)
    assert set(ldm_adapter.components()) == {"te1", "te2", "unet"}


def test_sdxl_adapters_condition_and_predict_alike(sdxl_pair):
    ldm_adapter, diffusers_adapter = sdxl_pair
    sizes = [(64, 64, 0, 0, 64, 64), (96, 80, 8, 4, 64, 64)]
    with torch.no_grad():
        ldm_cond = ldm_adapter.encode_prompts(PROMPTS, sizes)
        diffusers_cond = diffusers_adapter.encode_prompts(PROMPTS, sizes)
        assert ldm_cond["crossattn"].shape == (2, 77, 2 * TINY_CLIP["hidden_size"])
        assert ldm_cond["vector"].shape == (2, TINY_POOLED + 6 * TINY_SIZE_DIM)
        assert rel_diff(diffusers_cond["crossattn"], ldm_cond["crossattn"]) < 1e-5
        assert rel_diff(diffusers_cond["text_embeds"], ldm_cond["vector"][:, :TINY_POOLED]) < 1e-5
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 990])
        expected = ldm_adapter.predict(x, t, ldm_cond)
        assert rel_diff(diffusers_adapter.predict(x, t, diffusers_cond), expected) < 1e-5
        other_sizes = ldm_adapter.predict(x, t, ldm_adapter.encode_prompts(PROMPTS))
        assert rel_diff(other_sizes, expected) > 1e-3  # the size conditioning reaches the UNet
    with pytest.raises(LorakitError, match="sizes"):
        ldm_adapter.encode_prompts(PROMPTS, sizes[:1])


def test_sgm_schedule_from_denoiser_sigmas():
    unet = ldm_unet(TINY_LDM_UNET_SDXL)
    engine = StandInDiffusionEngine(unet, [])
    alphas = configs.sd_alphas_cumprod()
    del engine.alphas_cumprod
    engine.denoiser = torch.nn.Module()
    engine.denoiser.register_buffer("sigmas", ((1 - alphas) / alphas) ** 0.5)
    engine.conditioner.embedders = torch.nn.ModuleList([torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)])
    for embedder in engine.conditioner.embedders:
        embedder.input_key = "txt"
    assert torch.allclose(LdmAdapter(engine).alphas_cumprod, alphas, rtol=1e-5)


@pytest.mark.parametrize("pair", ["sd1_pair", "sd2_pair", "sdxl_pair"])
def test_one_network_changes_both_adapters_alike(pair, request):
    from lorakit_ext.networks.network import NetworkSpec, create_network, network_from_weights

    built = request.getfixturevalue(pair)
    ldm_adapter = next(x for x in built if isinstance(x, LdmAdapter))
    diffusers_adapter = next(x for x in built if isinstance(x, DiffusersAdapter))
    network = create_network(ldm_adapter.targets(), NetworkSpec(algo="locon", dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0))
    randomize(network, seed=9, std=0.2)
    weights = network.to_weights()
    twin = network_from_weights(weights, diffusers_adapter.targets(), diffusers_adapter.arch)
    assert len(twin.lora_modules) == len(network.lora_modules) == len(ldm_adapter.targets())
    sizes = [(64, 64, 0, 0, 64, 64), (96, 80, 8, 4, 64, 64)]
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 990])
    with torch.no_grad():
        plain_cond = ldm_adapter.encode_prompts(PROMPTS, sizes)
        plain = ldm_adapter.predict(x, t, plain_cond)
        network.attach()
        twin.attach()
        try:
            for multiplier in (1.0, 0.5):
                network.multiplier = twin.multiplier = multiplier
                ldm_cond = ldm_adapter.encode_prompts(PROMPTS, sizes)
                diffusers_cond = diffusers_adapter.encode_prompts(PROMPTS, sizes)
                assert rel_diff(diffusers_cond["crossattn"], ldm_cond["crossattn"]) < 1e-4
                assert rel_diff(ldm_cond["crossattn"], plain_cond["crossattn"]) > 1e-3
                expected = ldm_adapter.predict(x, t, ldm_cond)
                assert rel_diff(expected, plain) > 1e-2  # the network does change the output
                assert rel_diff(diffusers_adapter.predict(x, t, diffusers_cond), expected) < 1e-4
        finally:
            network.detach()
            twin.detach()
        assert rel_diff(ldm_adapter.predict(x, t, ldm_adapter.encode_prompts(PROMPTS, sizes)), plain) == 0
