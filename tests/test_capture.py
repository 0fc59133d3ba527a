"""Capture: shapes, step and branch selection and labels, pooling, block updates, context manager."""

import pytest
import torch
from conftest import GEN

import layerscope as ls


def test_capture_shapes_and_branch_labels(sd):
    cap = ls.Capture(["down_blocks.0.resnets.0", "mid_block", "x_t", "text_embeds", "noise"], steps=[0, 2])
    res = sd.generate(["a red cube", "a blue ball"], seeds=[1, 2], capture=cap, **GEN)
    c = res.capture
    lmap = sd.layer_map()
    x = c["down_blocks.0.resnets.0"]
    assert x.shape == (2, 2, 2) + lmap["down_blocks.0.resnets.0"].shape
    assert c.dims("mid_block") == ("sample", "step", "branch", "channel", "h", "w")
    assert c.branches_of("mid_block") == ["uncond", "cond"]
    assert c.steps_of("mid_block") == [0, 2]
    # the noise is drawn once per generation, without CFG halves
    assert c["noise"].shape == (2, 1, 1) + lmap["noise"].shape
    assert c.steps_of("noise") == [None] and c.branches_of("noise") == ["none"]
    # both CFG halves see the same noisy latent, but different text embeddings (uncond = empty prompt)
    assert torch.equal(c["x_t"][:, :, 0], c["x_t"][:, :, 1])
    assert not torch.allclose(c["text_embeds"][:, :, 0], c["text_embeds"][:, :, 1])
    # the uncond text embedding is the same for both samples, the cond one is not
    torch.testing.assert_close(c["text_embeds"][0, :, 0], c["text_embeds"][1, :, 0], atol=1e-5, rtol=0)
    assert not torch.equal(c["text_embeds"][0, :, 1], c["text_embeds"][1, :, 1])
    # the captured noise is the seeded noise, the same a plain run would draw
    g = torch.Generator().manual_seed(1)
    assert torch.equal(c["noise"][0, 0, 0], torch.randn(lmap["noise"].shape, generator=g))
    assert len(c.timesteps) == GEN["num_inference_steps"]


def test_capture_branch_subset_pooled_and_update(sd):
    lmap = sd.layer_map()
    name = "mid_block.resnets.0"
    full = sd.generate("a cat", seeds=0, capture=ls.Capture(name, update=True), **GEN).capture
    pooled = sd.generate(
        "a cat", seeds=0, capture=ls.Capture(name, branches=["cond"], pooled=True, update=True), **GEN
    ).capture
    assert pooled[name].shape == (1, GEN["num_inference_steps"], 1, lmap[name].shape[0])
    assert pooled.branches_of(name) == ["cond"]
    # pooled = spatial mean of the full capture's cond branch
    torch.testing.assert_close(pooled[name][:, :, 0], full[name][:, :, 1].mean(dim=(-1, -2)))
    # update = output - input; input is the previous layer's output (down path's last block)
    upd = full.update[name]
    assert upd.shape == full[name].shape
    assert not torch.allclose(upd, full[name])


def test_update_needs_equal_shapes(sd):
    with pytest.raises(ls.ConfigError, match="update"):
        sd.generate("a cat", capture=ls.Capture("down_blocks.0.downsamplers.0", update=True), **GEN)


def test_context_manager_capture_and_intervene(sd):
    with sd.capture("mid_block", steps="late", pooled=True) as cap:
        sd.generate(["a cat", "a dog"], seeds=[0, 1], **GEN)
    assert cap["mid_block"].shape[:3] == (2, 1, 2)  # late third of 3 steps = step 2
    assert cap.result.steps_of("mid_block") == [2]
    base = sd.generate(["a cat", "a dog"], seeds=[0, 1], **GEN).images
    with sd.intervene(ls.zero("mid_block", steps="early")):
        zeroed = sd.generate(["a cat", "a dog"], seeds=[0, 1], **GEN).images
    assert not torch.allclose(base, zeroed)
    again = sd.generate(["a cat", "a dog"], seeds=[0, 1], **GEN).images
    assert torch.equal(base, again)  # the block ended, nothing left installed


def test_no_cfg_has_single_branch(sd):
    res = sd.generate("a cat", capture=ls.Capture("mid_block"), num_inference_steps=2, guidance_scale=1.0)
    assert res.capture.branches_of("mid_block") == ["cond"]
    with pytest.raises(ls.ConfigError, match="uncond"):
        sd.generate(
            "a cat", capture=ls.Capture("mid_block", branches=["uncond"]), num_inference_steps=2, guidance_scale=1.0
        )


def test_latent_generator_capture():
    g = ls.load("torch:toy_generators:make_gan")
    res = g.generate(["", ""], seeds=[3, 4], capture=ls.Capture("*"))
    assert res.images.shape == (2, 3, 16, 16)
    assert res.capture["main.0"].shape == (2, 1, 1, 8, 8, 8)
    assert res.capture["z"].shape == (2, 1, 1, 8)
    assert float(res.images.min()) >= 0 and float(res.images.max()) <= 1


@pytest.mark.parametrize("family", ["sd", "sd3", "flux", "pixart"])
def test_text_eos_is_the_end_of_sentence_token(family):
    from conftest import tiny

    model = tiny(family)
    texts = ["a cat", "a red cube on a floor"]
    res = model.generate(texts, seeds=[0, 1], capture=ls.Capture(["text_embeds", "text_eos"], steps=[0]), **GEN)
    c = res.capture
    full, eos = c["text_embeds"], c["text_eos"]
    assert eos.shape == full.shape[:3] + (full.shape[-1],)
    branches = c.branches_of("text_eos")
    for b, label in enumerate(branches):
        pos = model.site_index("eos", texts, model.config(**GEN), [label])
        assert pos[0] != pos[1] or label == "uncond"
        for i in range(2):
            assert torch.equal(eos[i, 0, b], full[i, 0, b, int(pos[i])])
    # patching only the end-of-sentence token moves the image
    plain = model.generate(texts, seeds=[0, 1], **GEN).images[0]
    only_eos = model.generate(
        texts, seeds=[0, 1], interventions=[ls.replace("text_eos", ls.Row(1), targets=[0])], **GEN
    ).images[0]
    assert not torch.equal(only_eos, plain)


def test_pooled_capture_keeps_unpooled_layers_whole(sd):
    cap = ls.Capture(["mid_block", "x_t"], steps=[1], branches=["cond"], pooled=True, unpooled="x_t")
    res = sd.generate(["a red cube", "a blue ball"], seeds=[0, 1], capture=cap, **GEN)
    info = sd.layer_map()
    assert res.capture["mid_block"].shape == (2, 1, 1, info["mid_block"].shape[0])
    assert res.capture["x_t"].shape == (2, 1, 1) + info["x_t"].shape
    whole = sd.generate(
        ["a red cube", "a blue ball"], seeds=[0, 1], **GEN, capture=ls.Capture(["x_t"], steps=[1], branches=["cond"])
    )
    torch.testing.assert_close(res.capture["x_t"], whole.capture["x_t"])
    assert not cap.pools("x_t") and cap.pools("mid_block")
