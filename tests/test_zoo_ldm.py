"""zoo:ldm's training code on tiny configs: the world VAE, checkpoint / resume, the StableDiffusionPipeline folder,
and the captions that leave factors open."""

import csv
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from layerscope.world import text as wt
from layerscope.world.factors import FACTORS, SIZES, sample_factors
from layerscope.world.text import factors_from_prompt, prompts_for, tokenizer, vocabulary
from layerscope.world.training import read_json
from layerscope.world.zoo import ldm

TINY_VAE = dict(
    model=dict(block_out_channels=[8, 8, 8], norm_num_groups=4),
    train=dict(steps=6, batch=2, warmup=2, scale_samples=8, log_every=1),
)
TINY_LDM = dict(
    model=dict(
        block_out_channels=[8, 8, 8, 8],
        norm_num_groups=4,
        attention_head_dim=1,
        layers_per_block=2,
        cross_attention_dim=16,
    ),
    text=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
    train=dict(steps=3, batch=2, warmup=1, log_every=1),
)


def _weights(folder):
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def _log_steps(path):
    with path.open() as fh:
        return [int(r["step"]) for r in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ldm") / "vae"
    summary = ldm.train_vae(out, TINY_VAE, show_progress=False)
    assert summary["steps"] == 6
    return out


def test_vae_trains_checkpoints_and_stores_scaling_factor(vae_dir):
    state = ldm.load_checkpoint(vae_dir)
    assert state["step"] == 6 and set(state["model"]) == {"vae"} and len(state["ema"]) > 0
    vae = ldm.load_vae(vae_dir)
    sf = vae.config.scaling_factor
    assert sf != 0.18215 and 0 < sf < 100
    assert sf == read_json(vae_dir / "training.json")["scaling_factor"]
    assert _log_steps(vae_dir / "train_log.csv") == list(range(1, 7))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = vae.encode(x).latent_dist.mode()
    assert z.shape == (2, 4, 16, 16)  # downsampling factor 4
    assert vae.decode(z).sample.shape == (2, 3, 64, 64)
    assert not list(vae_dir.glob("**/*.tmp"))


def test_vae_kill_and_resume_is_bitwise_identical(vae_dir, tmp_path):
    out = tmp_path / "vae"
    assert ldm.train_vae(out, TINY_VAE, show_progress=False, _stop_step=4) is None  # "killed" after step 4
    assert ldm.load_checkpoint(out)["step"] == 4
    assert not (out / "diffusion_pytorch_model.safetensors").exists()
    # rows logged after the checkpoint (lost in a real kill) must not be duplicated on resume
    with (out / "train_log.csv").open("a") as fh:
        fh.write("5,0.0,9,9,9,9\n")
    summary = ldm.train_vae(out, TINY_VAE, show_progress=False)
    assert summary["resumed_at"] == 4 and summary["steps"] == 6
    a, b = _weights(vae_dir), _weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _log_steps(out / "train_log.csv") == list(range(1, 7))
    assert ldm.load_vae(out).config.scaling_factor == ldm.load_vae(vae_dir).config.scaling_factor


def test_resume_refuses_another_config(tmp_path):
    out = tmp_path / "vae"
    ldm.train_vae(out, TINY_VAE, show_progress=False, _stop_step=2)
    other = ldm._merge(TINY_VAE, {"train": {"lr": 5e-4}})
    with pytest.raises(ValueError, match="another config"):
        ldm.train_vae(out, other, show_progress=False)


def test_vae_evaluation_reports_oracle_agreement(vae_dir):
    q = ldm.evaluate_vae(vae_dir, n=20, save=False)
    assert set(q["agreement"]) == set(FACTORS) == set(q["ceiling"])
    assert q["ceiling"]["shape"] >= 0.9  # the oracle reads the original 64x64 renders
    assert q["psnr"] > 0 and q["latent_shape"] == [4, 16, 16]


def test_ldm_pipeline_folder_loads_with_diffusers_and_generates(vae_dir, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    out = tmp_path / "ldm"
    summary = ldm.train_ldm(out, dict(TINY_LDM, vae=str(vae_dir)), show_progress=False)
    assert summary["steps"] == 3 and ldm.load_checkpoint(out)["step"] == 3
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    u = pipe.unet.config
    assert tuple(u.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert tuple(u.up_block_types) == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert u.mid_block_type == "UNetMidBlock2DCrossAttn" and u.layers_per_block == 2 and u.sample_size == 16
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.vae.config.scaling_factor == ldm.load_vae(vae_dir).config.scaling_factor
    assert pipe.tokenizer.get_vocab() == tokenizer().get_vocab()
    img = pipe(
        ["a red cube", ""],
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert img.shape == (2, 3, 64, 64) and torch.isfinite(img).all()
    q = ldm.evaluate_ldm(out, n=8, num_inference_steps=2, batch=8, save=False, pipe=pipe)
    assert set(q["named_followed"]) == set(FACTORS) and q["full_prompt_samples"] == 2
    assert all(len(v["shares"]) == SIZES[k] for k, v in q["unnamed_value_shares"].items())
    # resume from the final checkpoint: nothing left to train, same weights
    again = ldm.train_ldm(out, dict(TINY_LDM, vae=str(vae_dir)), show_progress=False)
    assert again["resumed_at"] == 3


def test_ldm_kill_and_resume_is_bitwise_identical(vae_dir, tmp_path):
    cfg = dict(TINY_LDM, vae=str(vae_dir))
    a, b = tmp_path / "a", tmp_path / "b"
    ldm.train_ldm(a, cfg, show_progress=False)
    assert ldm.train_ldm(b, cfg, show_progress=False, _stop_step=1) is None
    ldm.train_ldm(b, cfg, show_progress=False)
    wa, wb = _weights(a / "unet"), _weights(b / "unet")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ta, tb = load_file(str(a / "text_encoder/model.safetensors")), load_file(str(b / "text_encoder/model.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_partial_captions_round_trip_and_leave_factors_open():
    rng = np.random.default_rng(0)
    f = sample_factors(2000, 3, split="train")
    caps, named = wt.partial_captions(f, rng)
    for c, row, m in zip(caps, f, named):
        got = wt.factors_from_partial(c)
        assert np.array_equal(got, np.where(m, row, -1)), (c, row, m)
    share = named.mean(axis=0)
    assert np.all(np.abs(share - 0.45) < 0.05), share  # 1/2 of the 90% non-empty captions
    empty = np.mean([c == "" for c in caps])
    assert 0.08 < empty < 0.14
    assert len(set(caps)) > 1000
    # the phrase order varies: captions start with each kind of phrase
    firsts = {"object": 0, "floor": 0, "wall": 0, "orientation": 0}
    for c in caps:
        if c.startswith("seen from"):
            firsts["orientation"] += 1
        elif re.match(r"^an? \w+ floor", c):
            firsts["floor"] += 1
        elif re.match(r"^an? \w+ wall", c):
            firsts["wall"] += 1
        elif c:
            firsts["object"] += 1
    assert min(firsts.values()) > 100, firsts


def test_full_prompts_parse_as_today():
    f = sample_factors(500, 5)
    for p, row in zip(prompts_for(f), f):
        assert np.array_equal(wt.factors_from_partial(p), factors_from_prompt(p))
        assert np.array_equal(wt.factors_from_partial(p), row)
        assert wt.partial_prompt(row, np.ones(6, bool)) == p  # everything named, canonical order: the full prompt


@pytest.mark.parametrize(
    "text, expect",
    [
        ("a red cube", dict(object_hue=0, shape=0)),
        ("a cube on a blue floor", dict(shape=0, floor_hue=7)),
        ("a small in front of a green wall, seen from the front", dict(scale=1, wall_hue=4, orientation=7)),
        ("seen from 30 degrees left, an orange floor", dict(orientation=0, floor_hue=1)),
        ("", {}),
    ],
)
def test_parser_reads_partial_prompts(text, expect):
    want = np.full(6, -1)
    for k, v in expect.items():
        want[FACTORS.index(k)] = v
    assert np.array_equal(wt.factors_from_partial(text), want)


def test_parser_rejects_bad_prompts():
    for bad in ("a red dog", "a red blue cube", "seen from 5 degrees left", "a cube seen from"):
        with pytest.raises(ValueError):
            wt.factors_from_partial(bad)


def test_caption_words_are_in_the_vocabulary():
    vocab = set(vocabulary())
    assert wt.caption_words() <= vocab
    rng = np.random.default_rng(1)
    caps, _ = wt.partial_captions(sample_factors(3000, 2), rng)
    tok = tokenizer()
    unk = tok.unk_token_id
    for c in caps:
        ids = tok(c).input_ids
        assert unk not in ids, c
        assert len(ids) <= 24
    words = {w for c in caps for w in wt._WORD.findall(c)}
    assert words <= wt.caption_words()


def test_zoo_ldm_loads_through_the_sd_adapter_unchanged(vae_dir, tmp_path):
    import layerscope as ls
    from layerscope.world import zoo

    out = tmp_path / "ldm"
    with pytest.raises(ls.SpecError, match="has no weights"):
        ls.load("zoo:ldm", folder=str(out))
    ldm.train_ldm(out, dict(TINY_LDM, vae=str(vae_dir)), show_progress=False)
    model = ls.load("zoo:ldm", folder=str(out))
    assert type(model).__name__ == "UNetPipelineGenerator" and model.capabilities.oracle == "shapes"
    lmap = model.layer_map()
    roles = {e.name: e.role for e in lmap.spaces}
    assert roles["vae_latent"] == "latent" and roles["h_space"] == "bottleneck" and roles["text_eos"] == "condition"
    assert lmap["vae_latent"].shape == (4, 16, 16)
    names = [e.name for e in lmap.layers]
    assert {"down_blocks.0.attentions.1", "down_blocks.3.resnets.1", "mid_block.attentions.0"} <= set(names)
    assert "up_blocks.1.resnets.1" in names and "up_blocks.3.attentions.2" in names
    res = model.generate(["a red cube", "seen from the front"], seeds=[0, 1], num_inference_steps=2, max_batch=1)
    assert res.images.shape == (2, 3, 64, 64)
    assert zoo.card("ldm", out)["resolution"] == 64
    same = ls.load(f"hf:{out}").generate(["a red cube"], seeds=[0], num_inference_steps=2, guidance_scale=3.0)
    again = model.generate(["a red cube"], seeds=[0], num_inference_steps=2, guidance_scale=3.0)
    assert torch.equal(same.images, again.images)


def test_a_further_stage_starts_from_the_shipped_weights_and_resumes_bitwise(vae_dir, tmp_path):
    cfg = dict(TINY_LDM, vae=str(vae_dir))
    more = {"train": {"steps": 4, "lr": 2e-4}}
    a, b = tmp_path / "a", tmp_path / "b"
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        ldm.train_ldm(a, cfg, show_progress=False, resume=True)
    for out in (a, b):
        ldm.train_ldm(out, cfg, show_progress=False)
    first = _weights(a / "unet")
    done = ldm.train_ldm(a, more, show_progress=False, resume=True)
    assert done["steps"] == 3 + 4 and [h["steps"] for h in done["history"]] == [3, 4]
    assert done["history"][1]["train"]["lr"] == 2e-4 and done["config"]["train"]["steps"] == 4
    assert ldm.load_checkpoint(a, stage=2)["step"] == 4 and ldm.load_checkpoint(a)["step"] == 3  # stage 1 kept
    assert not all(torch.equal(first[k], v) for k, v in _weights(a / "unet").items())  # trained on
    assert _log_steps(a / "train_log.csv") == list(range(1, 8))  # the log goes on at step 4
    # killed in the middle of the stage, then resumed: the same weights as the uninterrupted stage
    assert ldm.train_ldm(b, more, show_progress=False, resume=True, _stop_step=2) is None
    again = ldm.train_ldm(b, more, show_progress=False, resume=True)
    assert again["history"][1]["resumed_at"] == 2 and _log_steps(b / "train_log.csv") == list(range(1, 8))
    wa, wb = _weights(a / "unet"), _weights(b / "unet")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_an_unfinished_stage_exports_its_ema_and_a_further_stage_goes_on(vae_dir, tmp_path):
    cfg = dict(TINY_LDM, vae=str(vae_dir))
    out = tmp_path / "ldm"
    assert ldm.train_ldm(out, cfg, show_progress=False, _stop_step=2) is None  # a session ended at step 2 of 3
    summary = ldm.export_unfinished(out, device="cpu", threads=1)
    assert summary["steps"] == 2 and summary["planned_steps"] == 3 and summary["stopped_early"]
    state = ldm.load_checkpoint(out)
    unet = ldm.load_ldm(out).unet
    params = [p for p in unet.parameters()]
    assert all(torch.equal(p, e) for p, e in zip(params, state["ema"]))  # the EMA ships, not the raw weights
    more = ldm.train_ldm(out, {"train": {"steps": 2}}, show_progress=False, resume=True)
    assert more["steps"] == 4 and [h["steps"] for h in more["history"]] == [2, 2]
    assert more["history"][0]["stopped_early"] and _log_steps(out / "train_log.csv") == [1, 2, 3, 4]


def test_the_shipped_zoo_ldm_loads_and_its_card_tells_its_quality():
    import layerscope as ls
    from layerscope.world import zoo
    from layerscope.world.quality import verdicts

    model = ls.load("zoo:ldm")
    assert model.config().num_inference_steps == 20 and model.config().guidance_scale == 3.0  # as measured
    img = model.generate(["a red cube on a blue floor"], seeds=[0], num_inference_steps=2).images
    assert img.shape == (1, 3, 64, 64)
    c = zoo.card("ldm")
    # four stages: 12,000 + 4,000 + 4,901 + 4,500 steps
    assert c["resolution"] == 64 and c["steps"] == 25401 and 0 < c["weights_bytes"] < 20e6
    q = c["quality"]
    assert q["samples"] == 1000 and set(verdicts(q)) == {f"{f} (named)" for f in FACTORS} | {"in_distribution"}
    assert all(verdicts(q).values()), verdicts(q)  # the shipped weights meet every bar (in distribution: 91.4%)
