"""arch: specs (the published architectures at full size on the meta device) and the literature's recipes."""

import functools
import subprocess
import sys

import pytest
import torch

import layerscope as ls
from layerscope.arch import ARCHS

# per architecture: entries of its map and their real per-step shapes at the native resolution (hand-checked
# against the published configs: channels x latent side / 2^downsamplings; token counts of the text encoders)
EXPECT = {
    "sd14": (512, {"mid_block": (1280, 8, 8), "text_embeds": (77, 768), "up_blocks.3": (320, 64, 64)}),
    "sd21": (768, {"mid_block": (1280, 12, 12), "text_embeds": (77, 1024), "vae_latent": (4, 96, 96)}),
    "sdxl": (1024, {"mid_block": (1280, 32, 32), "text_embeds": (77, 2048), "text_pooled": (1280,)}),
    "kandinsky22": (512, {"h_space": (1536, 8, 8), "image_embeds": (1280,), "down_blocks.0.resnets.2": (384, 64, 64)}),
    "sd35-medium": (1024, {"transformer_blocks.23": (4096, 1536), "text_embeds": (333, 4096)}),
    "sd35-large": (1024, {"transformer_blocks.37": (4096, 2432), "text_pooled": (2048,)}),
    "flux-schnell": (1024, {"single_transformer_blocks.37": (4096, 3072), "text_embeds": (512, 4096)}),
    "flux-dev": (1024, {"transformer_blocks.18": (4096, 3072), "noise": (16, 128, 128)}),
    "pixart-alpha": (1024, {"transformer_blocks.27": (4096, 1152), "text_embeds": (120, 4096)}),
}
COUNTS = {  # (layers, spaces): U-Nets list resnets, attentions, samplers and blocks; transformers their blocks
    "sd14": (53, 18),
    "sd21": (53, 18),
    "sdxl": (39, 16),
    "kandinsky22": (67, 21),
    "sd35-medium": (24, 6),
    "sd35-large": (38, 6),
    "flux-schnell": (57, 6),
    "flux-dev": (57, 6),
    "pixart-alpha": (28, 5),
}


arch = functools.cache(ls.load)  # one build per spec in this module (layer maps are cached by the model)


def test_every_arch_is_checked():
    assert set(EXPECT) == set(ARCHS) == set(COUNTS)


@pytest.mark.parametrize("name", list(ARCHS))
def test_arch_maps_at_full_size_without_weights(name):
    model = arch(f"arch:{name}")
    assert not model.has_weights
    assert all(p.is_meta for p in model.denoiser.parameters())
    side, shapes = EXPECT[name]
    cfg = model.config()
    assert (cfg.height, cfg.width) == (side, side)
    lmap = model.layer_map()
    assert (len(lmap.layers), len(lmap.spaces)) == COUNTS[name]
    for entry, shape in shapes.items():
        assert lmap[entry].shape == shape, entry
    # a byte estimate at full size: one step of mid-stack output, one sample, float32
    layer = lmap.layers[len(lmap.layers) // 2]
    n = model.capture_bytes(ls.Capture(layers=[layer.name], steps=[0]), n_samples=1)
    branches = len(model.branch_labels(cfg))
    assert n == 4 * branches * int(torch.tensor(layer.shape).prod())
    # the scheduler came back unpatched, the modules without hooks
    assert "set_timesteps" not in vars(model.pipe.scheduler)
    assert not model.denoiser._forward_pre_hooks


def test_arch_memory_stays_small():
    """The largest map (FLUX.1-dev: a 12 B transformer and T5-XXL, about 67 GB of float32 weights if real) in a fresh
    process: its peak resident memory stays under 2 GB (the issue's bound), imports included."""
    code = (
        "import resource, layerscope as ls; ls.load('arch:flux-dev').layer_map(); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_mb = int(out.stdout.split()[-1]) / 1024
    assert peak_mb < 2048


def test_arch_refuses_to_generate_and_names_typos():
    model = arch("arch:sd14")
    with pytest.raises(ls.ConfigError, match="without weights"):
        model.generate("a cat", num_inference_steps=2)
    with pytest.raises(ls.SpecError, match="did you mean arch:sdxl"):
        ls.load("arch:sdx")
    with pytest.raises(ls.SpecError, match="unknown dtype"):
        ls.load("arch:sd14", dtype="float17")


def test_arch_dtype_follows_into_byte_estimates():
    model = ls.load("arch:sd14", torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.layer_map()["mid_block"].shape == (1280, 8, 8)


@pytest.mark.parametrize("name", list(ls.recipes.RECIPES))
def test_recipes_resolve_on_their_models(name):
    recipe = ls.recipes.get(name)
    model = arch(recipe.model)
    names = ls.recipes.resolve(name, model)
    lmap = model.layer_map()
    assert names and all(n in lmap for n in names)
    for layer, stage, kind in recipe.layers:
        assert (lmap[layer].stage, lmap[layer].kind) == (stage, kind)
    if recipe.skips_from:
        assert all(lmap[n].role == "skip" and lmap[n].source.startswith(recipe.skips_from) for n in names)


def test_recipe_errors():
    with pytest.raises(ls.LayerNameError, match="the recipe is for arch:sdxl"):
        ls.recipes.resolve("sdxl-style", arch("tiny:sd"))
    with pytest.raises(ls.LayerNameError, match="closest: sdxl-style"):
        ls.recipes.get("sdxl-styel")
