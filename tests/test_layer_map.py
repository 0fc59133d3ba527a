"""Layer maps of every supported family: names in diffusers terms, kinds, stages, shapes, spaces, selection."""

import pytest
from conftest import tiny

import layerscope as ls

FAMILIES = ["sd", "sd2", "sdxl", "kandinsky22", "sd3", "flux", "pixart"]


def test_sd_layer_map_names_kinds_shapes(sd):
    lmap = sd.layer_map()
    unet = sd.pipe.unet
    names = lmap.names()
    for name in [
        "down_blocks.0.resnets.0",
        "down_blocks.0.attentions.0",
        "mid_block.attentions.0",
        "mid_block",
        "up_blocks.1.resnets.0",
        "down_blocks.0.downsamplers.0",
        "up_blocks.0.upsamplers.0",
    ]:
        assert name in names
        assert sd.module(lmap[name].site.module) is unet.get_submodule(name)
    assert lmap["down_blocks.0.resnets.0"].kind == "resnet"
    assert lmap["mid_block.attentions.0"].kind == "attention"
    assert lmap["mid_block"].kind == "block"
    assert lmap["down_blocks.0.resnets.0"].stage == "encoder"
    assert lmap["mid_block.resnets.0"].stage == "bottleneck"
    assert lmap["up_blocks.1.resnets.0"].stage == "decoder"
    # shapes: channels from the config, spatial size halves per downsampler
    h = sd.config().height // sd.pipe.vae_scale_factor
    c0, c1 = unet.config.block_out_channels[:2]
    assert lmap["down_blocks.0.resnets.0"].shape == (c0, h, h)
    assert lmap["down_blocks.0.downsamplers.0"].shape == (c0, h // 2, h // 2)
    assert lmap["mid_block"].shape == (unet.config.block_out_channels[-1], h // 2, h // 2)
    assert lmap["mid_block"].dims == ("channel", "h", "w")
    # order follows the forward pass
    assert names.index("down_blocks.0.resnets.0") < names.index("mid_block") < names.index("up_blocks.0.resnets.0")


def test_sd_spaces(sd):
    lmap = sd.layer_map()
    spaces = {e.name: e for e in lmap.spaces}
    for name in ["noise", "x_t", "text_embeds", "h_space", "vae_latent"]:
        assert name in spaces
    assert spaces["noise"].per_step is False and spaces["noise"].branched is False
    assert spaces["h_space"].shape == lmap["mid_block"].shape
    n_up_resnets = sum(len(b.resnets) for b in sd.pipe.unet.up_blocks)
    skips = [e for e in lmap.spaces if e.kind == "skip"]
    assert len(skips) == n_up_resnets
    # each skip has the shape of its producer
    for e in skips:
        producer = e.note.split(" from ")[1].split(" into ")[0]
        if producer != "conv_in":
            assert e.shape == lmap[producer].shape, e.name
    text = spaces["text_embeds"]
    assert text.dims == ("token", "channel")
    assert text.shape[-1] == sd.pipe.text_encoder.config.hidden_size


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_a_traced_map(family):
    model = tiny(family)
    lmap = model.layer_map()
    assert len(lmap.layers) >= 2
    assert all(e.shape for e in lmap), [e.name for e in lmap if not e.shape]
    names = lmap.names()
    assert "noise" in names and "vae_latent" in names and "x_t" in names
    if family in ("sd3", "flux", "pixart"):
        assert "transformer_blocks.0" in names
        assert lmap["transformer_blocks.0"].kind == "transformer_block"
        assert lmap["transformer_blocks.0"].dims == ("token", "channel")
        assert lmap["transformer_blocks.0"].stage.startswith("depth 0/")
    else:
        assert "mid_block" in names and "h_space" in names
    if family == "flux":
        assert "single_transformer_blocks.0" in names
    if family in ("sdxl", "sd3", "flux"):
        assert "text_pooled" in names
    if family == "kandinsky22":
        assert "image_embeds" in names and "text_embeds" not in names
    else:
        assert "text_embeds" in names


def test_glob_selection_and_close_matches(sd):
    sel = sd.layers("up_blocks.*.resnets.*")
    assert sel and all(e.name.startswith("up_blocks.") and ".resnets." in e.name for e in sel)
    assert [e.name for e in sd.layers(["mid_block", "noise"])] == ["mid_block", "noise"]
    assert all(not e.is_space for e in sd.layers())
    with pytest.raises(ls.LayerNameError) as exc:
        sd.layers("up_block.1.resnets.0")
    assert "up_blocks.1.resnets.0" in str(exc.value)
    with pytest.raises(ls.LayerNameError, match="closest valid names"):
        sd.layers("mid_blok")


def test_latent_generator_map():
    g = ls.load("torch:toy_generators:make_gan")
    lmap = g.layer_map()
    assert lmap.names() == ["fc", "main.0", "main.1", "main.2", "main.3", "z"]
    assert lmap["z"].shape == (8,)
    assert lmap["main.2"].shape == (3, 16, 16)
    assert lmap["main.0"].kind == "convtranspose2d"


def test_sdxl_with_only_its_second_text_encoder_has_text_eos():
    """A refiner-style SDXL folder (tokenizer_2 / text_encoder_2 only) still offers text_eos, at the positions of
    its own tokenizer: the captured EOS state is the text embedding at the prompt's last token."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from layerscope.testing.pipelines import build_tiny_pipeline

    full = build_tiny_pipeline("sdxl")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**full.unet.config, "cross_attention_dim": 32})
    parts = dict(vae=full.vae, unet=unet, scheduler=full.scheduler)
    pipe = StableDiffusionXLPipeline(
        text_encoder=None, tokenizer=None, text_encoder_2=full.text_encoder_2, tokenizer_2=full.tokenizer_2, **parts
    )
    g = ls.load(pipe)
    assert "text_eos" in [s.name for s in g.spaces()]
    cap = g.generate("a red cube", capture=ls.Capture(["text_eos", "text_embeds"]), num_inference_steps=1).capture
    last = len(full.tokenizer_2("a red cube")["input_ids"]) - 1
    torch.testing.assert_close(cap["text_eos"][0, 0, -1], cap["text_embeds"][0, 0, -1, last])
