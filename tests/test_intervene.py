"""Interventions: replace / add / blend / zero from rows, stored captures and tensors; skips; determinism."""

import pytest
import torch
from conftest import GEN, CountRuns, prompts_for, tiny

import layerscope as ls

FAMILIES = ["sd", "sd2", "sdxl", "kandinsky22", "sd3", "flux", "pixart"]


def test_same_seeds_bitwise_identical(sd):
    a = sd.generate(["a cat", "a dog"], seeds=[5, 6], **GEN).images
    b = sd.generate(["a cat", "a dog"], seeds=[5, 6], **GEN).images
    assert torch.equal(a, b)
    c = sd.generate(["a cat", "a dog"], seeds=[5, 7], **GEN).images
    assert torch.equal(a[0], c[0]) or torch.allclose(a[0], c[0], atol=1e-6)
    assert not torch.allclose(a[1], c[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_injecting_own_row_changes_nothing(family):
    model = tiny(family)
    prompts = prompts_for(model, ["a red cube", "a blue ball"])
    plain = model.generate(prompts, seeds=[0, 1], **GEN).images
    ivs = [ls.replace(e.name, ls.Row(0), targets=[0]) for e in model.layer_map()]
    same = model.generate(prompts, seeds=[0, 1], interventions=ivs, **GEN).images
    assert torch.equal(plain, same)


def test_stored_source_matches_row_source(sd):
    layer = "up_blocks.1.resnets.0"
    e = sd.generate("a blue ball", seeds=1, capture=ls.Capture(layer), **GEN)
    stored = sd.generate(
        "a red cube", seeds=0, interventions=[ls.replace(layer, ls.Stored(e.capture, sample=0))], **GEN
    ).images[0]
    rows = sd.generate(
        ["a red cube", "a blue ball"], seeds=[0, 1], interventions=[ls.replace(layer, ls.Row(1), targets=[0])], **GEN
    ).images[0]
    torch.testing.assert_close(stored, rows, atol=1e-5, rtol=0)


def test_add_blend_zero(sd):
    lmap = sd.layer_map()
    plain = sd.generate("a cat", seeds=0, **GEN).images
    c = lmap["text_embeds"].shape[-1]
    zero_dir = torch.zeros(c)
    same = sd.generate("a cat", seeds=0, interventions=[ls.add("text_embeds", zero_dir)], **GEN).images
    assert torch.equal(plain, same)
    # adding a concept direction (the embedding of another prompt) changes the image
    dog = sd.generate("a dog", seeds=0, capture=ls.Capture("text_embeds", steps=[0], branches=["cond"]), **GEN)
    direction = dog.capture["text_embeds"][0, 0, 0].mean(0)
    moved = sd.generate(
        "a cat", seeds=0, interventions=[ls.add("text_embeds", direction, alpha=2.0, branches=["cond"])], **GEN
    ).images
    assert not torch.allclose(plain, moved)
    # blend alpha=0 is a no-op, alpha=1 equals replace
    rows = ["a cat", "a dog"]
    base = sd.generate(rows, seeds=[0, 1], **GEN).images
    b0 = sd.generate(rows, seeds=[0, 1], interventions=[ls.blend("mid_block", ls.Row(1), alpha=0.0)], **GEN).images
    torch.testing.assert_close(b0, base, atol=1e-6, rtol=0)
    b1 = sd.generate(rows, seeds=[0, 1], interventions=[ls.blend("mid_block", ls.Row(1), alpha=1.0)], **GEN).images
    r1 = sd.generate(rows, seeds=[0, 1], interventions=[ls.replace("mid_block", ls.Row(1))], **GEN).images
    torch.testing.assert_close(b1, r1, atol=1e-6, rtol=0)
    z = sd.generate("a cat", seeds=0, interventions=[ls.zero("mid_block")], **GEN).images
    assert not torch.allclose(z, plain)


def test_step_window_limits_intervention(sd):
    layer = "mid_block"
    rows = ["a cat", "a dog"]
    late = sd.generate(
        rows,
        seeds=[0, 1],
        capture=ls.Capture(layer, steps=[0]),
        interventions=[ls.zero(layer, steps=[2], targets=[0])],
        **GEN,
    )
    plain = sd.generate(rows, seeds=[0, 1], capture=ls.Capture(layer, steps=[0]), **GEN)
    # the capture sees the stream after interventions; at step 0 nothing was zeroed
    assert torch.equal(late.capture[layer], plain.capture[layer])
    assert not torch.allclose(late.images[0], plain.images[0])
    assert torch.equal(late.images[1], plain.images[1])


def test_skip_patch_leaves_main_stream(sd):
    """Patching a skip tensor changes the decoder but not the producer's main-stream output."""
    lmap = sd.layer_map()
    skip = next(e for e in lmap.spaces if e.kind == "skip" and "downsamplers" not in e.note and "conv_in" not in e.note)
    producer = skip.note.split(" from ")[1].split(" into ")[0]
    consumer = skip.name.removeprefix("skip.")
    rows = ["a cat", "a dog"]
    cap = ls.Capture([producer, consumer, "mid_block"], steps=[0])
    plain = sd.generate(rows, seeds=[0, 1], capture=cap, **GEN)
    patched = sd.generate(
        rows, seeds=[0, 1], capture=cap, interventions=[ls.replace(skip.name, ls.Row(1), targets=[0])], **GEN
    )
    assert torch.equal(plain.capture[producer], patched.capture[producer])
    assert torch.equal(plain.capture["mid_block"], patched.capture["mid_block"])
    assert not torch.allclose(plain.capture[consumer][0], patched.capture[consumer][0])
    # and it differs from patching the producer's output, which also moves the main stream
    main = sd.generate(
        rows, seeds=[0, 1], capture=cap, interventions=[ls.replace(producer, ls.Row(1), targets=[0])], **GEN
    )
    assert not torch.allclose(main.capture["mid_block"][0], plain.capture["mid_block"][0])


def test_shape_mismatch_fails_before_generation(sd):
    with CountRuns(sd) as runs:
        with pytest.raises(ls.ShapeError, match="does not fit"):
            sd.generate("a cat", interventions=[ls.replace("mid_block", torch.zeros(3, 2, 2))], **GEN)
        with pytest.raises(ls.ShapeError):
            sd.generate("a cat", interventions=[ls.add("mid_block", torch.zeros(7))], **GEN)
        e = sd.generate("a dog", capture=ls.Capture("mid_block", pooled=True), **GEN)
        runs.calls.clear()
        with pytest.raises(ls.ShapeError):  # a pooled capture cannot replace a full map
            sd.generate("a cat", interventions=[ls.replace("mid_block", ls.Stored(e.capture))], **GEN)
        with pytest.raises(ls.ConfigError, match="lacks steps"):
            part = sd.generate("a dog", capture=ls.Capture("mid_block", steps=[0]), **GEN)
            runs.calls.clear()
            sd.generate("a cat", interventions=[ls.replace("mid_block", ls.Stored(part.capture))], **GEN)
    assert runs.calls == []
    # a pooled capture is a fine direction to add
    sd.generate("a cat", interventions=[ls.add("mid_block", ls.Stored(e.capture), alpha=0.1)], **GEN)


def test_latent_generator_interventions():
    g = ls.load("torch:toy_generators:make_gan")
    plain = g.generate(["", ""], seeds=[1, 2]).images
    swapped = g.generate(["", ""], seeds=[1, 2], interventions=[ls.replace("z", ls.Row(1), targets=[0])]).images
    assert torch.equal(swapped[0], plain[1])
    at_layer = g.generate(["", ""], seeds=[1, 2], interventions=[ls.replace("main.1", ls.Row(1))]).images
    assert torch.equal(at_layer[0], plain[1])


def test_per_target_source_gives_each_row_its_own_value(sd):
    """PerTarget: row targets[k] gets values[k], also when the batch is split into chunks."""
    shape = sd.layer_map()["noise"].shape
    vals = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
    base = sd.generate(["a cat"] * 3, [0, 1, 2], **GEN).images
    out = sd.generate(
        ["a cat"] * 3,
        [0, 1, 2],
        max_batch=2,
        interventions=[ls.add("noise", ls.PerTarget(vals), targets=[2, 0])],
        **GEN,
    ).images
    alone0 = sd.generate("a cat", 0, interventions=[ls.add("noise", vals[1])], **GEN).images[0]
    alone2 = sd.generate("a cat", 2, interventions=[ls.add("noise", vals[0])], **GEN).images[0]
    assert torch.allclose(out[0], alone0, atol=1e-5) and torch.allclose(out[2], alone2, atol=1e-5)
    assert torch.allclose(out[1], base[1], atol=1e-5)  # not a target
    assert (out[0] - base[0]).abs().max() > 0.05
    # per-step layers too, with a channel vector per row broadcast over positions
    c = sd.layer_map()["mid_block"].shape[0]
    chan = torch.randn(2, c, generator=torch.Generator().manual_seed(1))
    both = sd.generate(["a cat"] * 2, [0, 0], interventions=[ls.add("mid_block", ls.PerTarget(chan))], **GEN).images
    one = sd.generate("a cat", 0, interventions=[ls.add("mid_block", chan[1])], **GEN).images[0]
    assert torch.allclose(both[1], one, atol=1e-5) and not torch.allclose(both[0], both[1], atol=1e-3)
    with CountRuns(sd) as runs:
        with pytest.raises(ls.ConfigError, match="one value per target"):
            sd.generate(["a cat"] * 3, interventions=[ls.add("noise", ls.PerTarget(vals))], **GEN)
        with pytest.raises(ls.ShapeError):
            sd.generate(["a cat"] * 2, interventions=[ls.add("noise", ls.PerTarget(torch.zeros(2, 5)))], **GEN)
    assert runs.calls == []
