"""The zoo's diffusion models: load from the shipped weights through the core adapters, generate, follow prompts."""

import pytest
import torch
from typer.testing import CliRunner

import layerscope as ls
from layerscope.cli import app
from layerscope.world import FACTORS, prompts_for, sample_factors
from layerscope.world.oracle import read

_CACHE: dict = {}


def zoo(name):
    if name not in _CACHE:
        _CACHE[name] = ls.load(f"zoo:{name}")
    return _CACHE[name]


@pytest.mark.parametrize(
    "name,family,first",
    [("unet", "unet/shapes", "down_blocks.0.resnets.0"), ("dit", "transformer/shapes", "transformer_blocks.0")],
)
def test_diffusion_zoo_loads_maps_and_generates(name, family, first):
    gen = zoo(name)
    assert gen.family == family
    names = [e.name for e in gen.layers()]
    assert names[0] == first
    spaces = {e.name for e in gen.spaces()}
    assert {"noise", "x_t", "text_embeds", "text_eos"} <= spaces and "vae_latent" not in spaces
    if name == "unet":
        assert "h_space" in spaces and any(s.startswith("skip.") for s in spaces)
    prompts = prompts_for(sample_factors(3, 1))
    a = gen.generate(prompts, seeds=[1, 2, 3], num_inference_steps=4)
    b = gen.generate(prompts, seeds=[1, 2, 3], num_inference_steps=4)
    assert a.images.shape == (3, 3, 32, 32) and torch.equal(a.images, b.images)


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_diffusion_zoo_follows_prompts(name):
    f = sample_factors(64, 99, split="test")  # combinations never trained on
    res = zoo(name).generate(prompts_for(f), seeds=range(64), num_inference_steps=12, max_batch=64)
    agree = (read(res.images).pred == f).mean(axis=0)
    by = dict(zip(FACTORS, agree))
    for hue in ("floor_hue", "wall_hue", "object_hue"):
        assert by[hue] >= 0.9, by
    assert by["shape"] >= 0.9 and by["scale"] >= 0.7 and by["orientation"] >= 0.7, by


def test_eos_positions_use_the_world_tokenizer():
    gen = zoo("unet")
    prompts = prompts_for(sample_factors(2, 4))
    idx = gen.site_index("eos", prompts, gen.config(), ("uncond", "cond"))
    n_words = [len(p.replace(",", " ,").split()) for p in prompts]
    assert idx.tolist() == [1, 1] + [n + 1 for n in n_words]


def test_zoo_cli_list_and_errors():
    r = CliRunner().invoke(app, ["zoo", "list"])
    assert r.exit_code == 0, r.output
    for name in ("zoo:unet", "zoo:dit", "zoo:vae", "zoo:gan", "oracle"):
        assert name in r.output
    r = CliRunner().invoke(app, ["zoo", "train", "nope"])
    assert r.exit_code == 2 and "valid" in r.output
    with pytest.raises(ls.SpecError, match="valid: zoo:unet"):
        ls.load("zoo:unet3")
