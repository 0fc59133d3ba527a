"""Inside attention (issue 17): the sites below the blocks (attention modules, Q/K/V, per-head outputs, attention
maps, feed-forwards) on every tiny family; maps formed at the module's own SDPA call; per-head and per-token
interventions; processors and hooks left as they were."""

import pytest
import torch
from click.testing import CliRunner
from conftest import prompts_for, tiny
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import layerscope as ls
from layerscope.cli import command
from layerscope.layers import DETAIL_KINDS

FAMILIES = ["sd", "sdxl", "kandinsky22", "sd3", "flux", "pixart"]
ONE = dict(num_inference_steps=2, guidance_scale=4.0)


def _gen(m, **kw):
    return {**ONE, **({"guidance_scale": 1.0} if m.family.endswith("flux") else {}), **kw}


def _first_attention(m):
    """The first map of the model and the attention module it belongs to."""
    mp = next(e for e in m.layer_map().detail if e.kind == "attention_map")
    return mp, mp.name.removesuffix(".map")


def _per_head(x, heads):
    """(..., tokens, heads*dim) -> (..., heads, tokens, dim), as diffusers splits channels into heads."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads).movedim(-2, -3)


def _keyed(c, lmap, att, proj, ctx):
    """Image-stream and text-stream projections of ``att`` concatenated in the order of the map's keys."""
    own = c[f"{att}.{proj}"]
    if f"{att}.{ctx}" not in lmap:
        return own
    other = c[f"{att}.{ctx}"]
    return torch.cat([own, other] if lmap[f"{att}.map"].keys.startswith("image") else [other, own], dim=-2)


# -- the map below the blocks --------------------------------------------------------------------------------------
def test_every_family_lists_attention_sites_below_its_blocks():
    for fam in FAMILIES:
        m = tiny(fam)
        lmap = m.layer_map()
        kinds = {e.kind for e in lmap.detail}
        assert kinds <= set(DETAIL_KINDS) and {"q", "k", "v", "heads", "attention_map"} <= kinds, fam
        assert not any(e.detail for e in m.layers()) and not any(e.detail for e in lmap)  # compact by default
        assert {e.name for e in m.layers(detail=True)} == {e.name for e in lmap.layers} | {e.name for e in lmap.detail}
        den = m.denoiser
        for e in lmap.detail:  # names are the denoiser's module paths (a map or per-head site: its module's)
            path = e.name.removesuffix(".map").removesuffix(".heads")
            den.get_submodule(path)
            assert e.parent in lmap and not lmap[e.parent].detail
            if e.kind in ("q", "k", "v", "heads", "attention_map"):
                assert e.heads >= 1 and e.head_dim >= 1
            if e.kind == "attention_map":
                assert e.shape[0] == e.heads and e.dims == ("head", "query", "key")
            if e.kind in ("q", "heads"):
                assert e.shape[-1] == e.heads * e.head_dim
    sd = tiny("sd").layer_map()
    blk = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert sd[f"{blk}.attn1"].kind == "self_attention" and sd[f"{blk}.attn2"].kind == "cross_attention"
    assert sd[f"{blk}.attn2.map"].shape[-1] == sd["text_embeds"].shape[0] and sd[f"{blk}.attn2.map"].keys == "text"
    assert sd[f"{blk}.ff"].kind == "ff" and sd[f"{blk}.attn1"].parent == "down_blocks.0.attentions.0"
    assert tiny("sd3").layer_map()["transformer_blocks.0.attn"].kind == "joint_attention"
    flux = tiny("flux").layer_map()
    assert flux["single_transformer_blocks.0.attn"].kind == "joint_attention"
    assert flux["transformer_blocks.0.attn.map"].keys == "text+image"
    assert tiny("sd3").layer_map()["transformer_blocks.0.attn.map"].keys == "image+text"


def test_globs_keep_their_meaning_and_reach_below_the_blocks_when_they_must(sd):
    lmap = sd.layer_map()
    assert [e.name for e in lmap.select("*")] == [e.name for e in lmap]  # '*' is still the compact map
    attn1 = lmap.select("*.attn1")
    assert attn1 and all(e.kind == "self_attention" for e in attn1)
    assert {e.kind for e in lmap.select("*.attn2.to_v")} == {"v"}
    blk = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert {e.kind for e in lmap.select(f"{blk}.*")} >= {"self_attention", "cross_attention", "q", "ff"}
    assert len(lmap.select("down_blocks.0.*", detail=True)) > len(lmap.select("down_blocks.0.*"))
    with pytest.raises(ls.LayerNameError, match="closest valid names"):
        lmap.select("*.attn3")


def test_cli_layers_detail_lists_the_sites():
    out = CliRunner().invoke(command(), ["layers", "tiny:pixart", "--detail", "--no-spaces"])
    assert out.exit_code == 0, out.output
    assert "transformer_blocks.0.attn2.to_k" in out.output and "attention_map" in out.output
    compact = CliRunner().invoke(command(), ["layers", "tiny:pixart"])
    assert (
        compact.exit_code == 0 and "attn2.to_k" not in compact.output and "26 sites below the blocks" in compact.output
    )


# -- maps -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_maps_are_the_attention_the_module_computes(family):
    m = tiny(family)
    lmap = m.layer_map()
    mp, att = _first_attention(m)
    sites = [f"{att}.{s}" for s in ("map", "to_q", "to_k", "to_v", "heads", "add_q_proj", "add_k_proj", "add_v_proj")]
    sites = [s for s in sites if s in lmap]
    prompts = prompts_for(m, ["a red cube", "a blue ball"])
    plain = m.generate(prompts, seeds=[3, 4], **_gen(m))
    got = m.generate(prompts, seeds=[3, 4], capture=ls.Capture(sites), **_gen(m))
    assert torch.equal(plain.images, got.images)  # capturing a map leaves the generation bitwise as it was
    c = got.capture
    p = c[mp.name]
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)  # rows sum to 1 over keys
    # P V reproduces the per-head outputs the module computed (with its own normalisation or rotary embedding)
    v = _per_head(_keyed(c, lmap, att, "to_v", "add_v_proj"), mp.heads)
    pv = p @ v
    out = _per_head(c[f"{att}.heads"], mp.heads)
    n = out.shape[-2]
    pv = pv[..., -n:, :] if (mp.keys.startswith(("text", "condition")) and pv.shape[-2] != n) else pv[..., :n, :]
    assert torch.allclose(pv, out, atol=1e-5, rtol=1e-4), (pv - out).abs().max()
    if family != "flux":  # Flux rotates q and k (RoPE) inside its processor: checked by P V above
        q = _per_head(_keyed(c, lmap, att, "to_q", "add_q_proj"), mp.heads)
        k = _per_head(_keyed(c, lmap, att, "to_k", "add_k_proj"), mp.heads)
        ref = (q @ k.transpose(-1, -2) / mp.head_dim**0.5).softmax(-1)
        assert torch.allclose(ref, p, atol=1e-5), (ref - p).abs().max()


def test_map_captures_average_heads_or_queries_and_are_sized_before_running(sd):
    _, att = _first_attention(sd)
    name = att.replace("attn1", "attn2") + ".map"
    full = sd.generate(["a red cube"], capture=ls.Capture(name), **ONE).capture[name]
    mean = sd.generate(["a red cube"], capture=ls.Capture(name, heads="mean"), **ONE).capture[name]
    pooled = sd.generate(["a red cube"], capture=ls.Capture(name, heads="mean", pooled=True), **ONE)
    assert torch.allclose(mean, full.mean(3), atol=1e-6)
    assert torch.allclose(pooled.capture[name], full.mean(dim=(3, 4)), atol=1e-6)
    assert pooled.capture.dims(name) == ("sample", "step", "branch", "key")
    cap = ls.Capture(name, heads="mean")
    assert sd.capture_bytes(cap, **ONE) == mean.numel() * 4
    tokens = pooled.capture.meta[("output", name)]["key_tokens"]
    assert tokens["cond"][0][:3] == ["<|startoftext|>", "a</w>", "red</w>"] and len(tokens["cond"][0]) == full.shape[-1]
    assert tokens["uncond"][0][0] == "<|startoftext|>"
    with pytest.raises(ls.ConfigError, match="'all' or 'mean'"):
        sd.generate(["a"], capture=ls.Capture(name, heads="sum"), **ONE)


def test_map_captures_stream_to_a_store_with_their_tokens(sd, tmp_path):
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.map"
    r = sd.generate(["a red cube"], capture=ls.Capture(name, heads="mean", store=tmp_path / "m.zarr"), **ONE)
    store = ls.ActivationStore.open(tmp_path / "m.zarr")
    assert store[name].shape[-2:] == (256, 77)
    assert r.capture is not None and store._meta(name, "output")["key_tokens"]["cond"][0][2] == "red</w>"


# -- interventions --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_replacing_a_site_with_its_own_value_changes_nothing(family):
    m = tiny(family)
    mp, att = _first_attention(m)
    ff = next((e.name for e in m.layer_map().detail if e.kind == "ff"), None)
    sites = [mp.name, f"{att}.to_q", f"{att}.to_v", f"{att}.heads", att if att in m.layer_map().detail else None, ff]
    sites = [s for s in sites if s is not None and s in m.layer_map() and m.layer_map()[s].detail]
    prompts = prompts_for(m, ["a red cube"])
    base = m.generate(prompts, seeds=[5], capture=ls.Capture(sites), **_gen(m))
    ivs = [ls.replace(s, ls.Stored(base.capture)) for s in sites]
    same = m.generate(prompts, seeds=[5], interventions=ivs, **_gen(m))
    assert (same.images - base.images).abs().max() < 1e-5


def test_a_head_selective_injection_changes_only_those_heads(sd):
    att = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    heads = sd.layer_map()[f"{att}.to_v"].heads
    prompts, seeds = ["a red cube", "a blue ball", "a red cube"], [1, 2, 1]
    iv = ls.Intervention(f"{att}.to_v", "replace", ls.Row(1), targets=[2], steps=[0], heads=[1])
    cap = ls.Capture([f"{att}.to_v", f"{att}.heads"], steps=[0])
    r = sd.generate(prompts, seeds=seeds, capture=cap, interventions=[iv], **ONE)
    v = _per_head(r.capture[f"{att}.to_v"], heads)  # sample, step, branch, head, token, dim
    out = _per_head(r.capture[f"{att}.heads"], heads)
    assert torch.equal(v[2, :, :, 1], v[1, :, :, 1])  # head 1 took E's values
    others = [h for h in range(heads) if h != 1]
    # the other heads kept O's values and outputs (rows of one batch agree to float rounding, not bitwise)
    assert torch.allclose(v[2][:, :, others], v[0][:, :, others], atol=1e-5)
    assert torch.allclose(out[2][:, :, others], out[0][:, :, others], atol=1e-5)
    assert (out[2, :, :, 1] - out[0, :, :, 1]).abs().max() > 1e-4  # only head 1's output moved
    bad = ls.Intervention(f"{att}.to_v", "zero", heads=[heads])
    with pytest.raises(ls.ConfigError, match=f"has {heads} heads"):
        sd.generate(["a"], interventions=[bad], **ONE)
    with pytest.raises(ls.ConfigError, match="mixes the heads"):
        sd.generate(["a"], interventions=[ls.Intervention(att, "zero", heads=[0])], **ONE)
    with pytest.raises(ls.ConfigError, match="has none"):
        sd.generate(["a"], interventions=[ls.Intervention("mid_block", "zero", heads=[0])], **ONE)


def test_self_attention_kv_injection_and_map_edits(sd):
    att = "up_blocks.1.attentions.0.transformer_blocks.0"
    prompts, seeds = ["a red cube", "a blue ball"], [1, 2]
    plain = sd.generate(prompts, seeds=seeds, **ONE).images
    # StyleID / PnP: E's self-attention keys and values in O's generation
    kv = [ls.replace(f"{att}.attn1.to_{p}", ls.Row(1), targets=[0]) for p in ("k", "v")]
    moved = sd.generate(prompts, seeds=seeds, interventions=kv, **ONE).images
    assert (moved[0] - plain[0]).abs().max() > 1e-4 and torch.equal(moved[1], plain[1])
    # prompt-to-prompt reweighting of one word on the cond branch; a factor of one changes nothing
    amp = sd.generate(
        prompts, seeds=seeds, interventions=[ls.reweight(f"{att}.attn2.map", "cube", 4.0, targets=[0])], **ONE
    )
    assert (amp.images[0] - plain[0]).abs().max() > 1e-4 and torch.equal(amp.images[1], plain[1])  # rows untouched
    one = sd.generate(
        prompts, seeds=seeds, interventions=[ls.reweight(f"{att}.attn2.map", "cube", 1.0, targets=[0])], **ONE
    )
    assert (one.images - plain).abs().max() < 1e-5
    by_index = ls.Intervention(f"{att}.attn2.map", "scale", alpha=4.0, targets=[0], tokens=[3, 4, 5], branches=["cond"])
    same = sd.generate(prompts, seeds=seeds, interventions=[by_index], **ONE)
    assert torch.equal(same.images, amp.images)  # 'cube' is CLIP tokens 3-5 ('cu', 'b', 'e</w>')
    with pytest.raises(ls.ConfigError, match="'cube' is not in the prompt 'a blue ball' of sample 1"):
        sd.generate(prompts, seeds=seeds, interventions=[ls.reweight(f"{att}.attn2.map", "cube", 2.0)], **ONE)
    with pytest.raises(ls.ConfigError, match="keys of .* are image tokens"):
        sd.generate(prompts, interventions=[ls.reweight(f"{att}.attn1.map", "cube", 2.0)], **ONE)
    with pytest.raises(ls.ConfigError, match="outside 0..76"):
        sd.generate(prompts, interventions=[ls.reweight(f"{att}.attn2.map", [77], 2.0)], **ONE)
    with pytest.raises(ls.ConfigError, match="selects keys of an attention map"):
        sd.generate(prompts, interventions=[ls.reweight(f"{att}.attn2.to_k", "cube", 2.0)], **ONE)


# -- the fast path elsewhere, processors and hooks restored ------------------------------------------------------------
def test_processors_and_hooks_are_restored_after_map_runs():
    m = ls.load("tiny:sd")
    mods = [mod for _, mod in m.denoiser.named_modules()]
    procs = [getattr(mod, "processor", None) for mod in mods]
    before = m.generate(["a red cube"], seeds=[0], **ONE).images
    maps = [e.name for e in m.layer_map().detail if e.kind == "attention_map"]
    m.generate(["a red cube"], seeds=[0], capture=ls.Capture(maps), **ONE)
    with pytest.raises(ls.ConfigError):  # a run that fails halfway (after its maps were hooked) leaves nothing behind
        m.generate(["a red cube"], seeds=[0], capture=ls.Capture(maps),
                   interventions=[ls.reweight(maps[1], "dog", 2.0)], **ONE)  # fmt: skip
    assert [getattr(mod, "processor", None) for mod in mods] == procs
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in mods)
    assert torch.equal(m.generate(["a red cube"], seeds=[0], **ONE).images, before)


def test_a_map_behind_a_processor_without_sdpa_is_refused_in_one_sentence():
    m = ls.load("tiny:sd")
    att = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    m.denoiser.get_submodule(att).set_processor(AttnProcessor())  # diffusers' classic processor: baddbmm + softmax
    lmap = m.layer_map()
    assert f"{att}.map" not in lmap and f"{att}.to_q" in lmap
    with pytest.raises(ls.LayerNameError, match=r"processor \(AttnProcessor\) does not call torch.nn.functional"):
        m.generate(["a"], capture=ls.Capture(f"{att}.map"), **ONE)
    ok = m.generate(["a"], capture=ls.Capture("*.attn1.map"), **ONE)  # the other maps still serve
    assert ok.capture is not None and len(ok.capture.keys()) == len(lmap.select("*.attn1.map"))
    # a processor swapped after the map was traced: refused at the run, not silently empty
    m2 = ls.load("tiny:sd")
    m2.layer_map()
    m2.denoiser.get_submodule(att).set_processor(AttnProcessor())
    with pytest.raises(ls.ConfigError, match="without calling torch.nn.functional.scaled_dot_product_attention"):
        m2.generate(["a"], capture=ls.Capture(f"{att}.map"), **ONE)
    m2.denoiser.get_submodule(att).set_processor(AttnProcessor2_0())


# -- the injection study on these sites -----------------------------------------------------------------------------
def test_the_sweep_accepts_attention_sites(sd):
    r = ls.injection_sweep(sd, "a red cube", "a blue ball", layers=["*.attn1", "*.attn2.to_v"], seeds=(1, 2), **ONE)
    n = len(sd.layer_map().select("*.attn1")) + len(sd.layer_map().select("*.attn2.to_v"))
    assert len(r.injected) == n
    alone = sd.generate(["a red cube", "a blue ball", "a red cube"], seeds=[1, 2, 1], interventions=[
        ls.replace("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", ls.Row(1), targets=[2])], **ONE)  # fmt: skip
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    torch.testing.assert_close(r.injected[name], alone.images[2], atol=1e-5, rtol=0)
    assert not torch.allclose(r.injected[name], r.original, atol=1e-4)


def test_cli_sweep_on_attention_sites(tmp_path):
    out = CliRunner().invoke(
        command(),
        ["sweep", "tiny:sd", "--pair", "a red cube", "a blue ball", "--layers", "*.attn2.to_v", "--steps", "2",
         "--out", str(tmp_path / "s")],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
