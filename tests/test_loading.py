"""Loading through registries: user schemes and adapters, objects instead of specs, what a loader tells its adapter
(Source), and the metadata experiments decide from (capabilities, layer roles)."""

import pytest
import torch
from conftest import GEN, tiny
from diffusers import StableDiffusionPipeline
from toy_generators import make_gan

import layerscope as ls
from layerscope.models.unet import UNetPipelineGenerator


def test_a_user_scheme_loads_like_the_built_in_ones():
    seen = []

    def loader(target, spec, kwargs):
        seen.append((target, spec, kwargs))
        return ls.Source(make_gan(), defaults={"guidance_scale": 1.0}, card={"name": spec, "made": "here"})

    ls.register_scheme("toyscheme", loader, replace=True)
    model = ls.load("toyscheme:anything", latent_dim=8)
    assert seen == [("anything", "toyscheme:anything", {"latent_dim": 8})]
    assert model.spec == "toyscheme:anything" and model.card["made"] == "here"
    assert model.capabilities.conditioning == "latent" and model.capabilities.oracle is None
    assert model.generate([None, None], seeds=[0, 1]).images.shape == (2, 3, 16, 16)
    with pytest.raises(ls.ConfigError, match="already registered"):
        ls.register_scheme("toyscheme", loader)
    with pytest.raises(ls.SpecError, match="toyscheme:"):  # the error lists the registered schemes
        ls.load("nope:x")


def test_objects_load_without_a_spec():
    gan = make_gan()
    model = ls.load(gan)
    assert model.family == "latent" and model.spec == "object:ToyGAN"
    assert ls.load(model) is model
    sd = tiny("sd")
    again = ls.load(sd.pipe)
    assert again.family == "unet/sd" and again.layer_map().names() == sd.layer_map().names()
    with pytest.raises(ls.SpecError, match="cannot load a int"):
        ls.load(3)


def test_register_adapter_serves_a_new_pipeline_class():
    class MyPipeline(StableDiffusionPipeline):
        """A user's own subclass: not in the table until registered."""

    pipe = MyPipeline(**tiny("sd").pipe.components)
    with pytest.raises(ls.SpecError, match="register_adapter"):
        ls.load(pipe)
    ls.register_adapter(MyPipeline, UNetPipelineGenerator, "sd", replace=True)
    model = ls.load(pipe)
    assert model.family == "unet/sd"
    a = model.generate("a cat", seeds=0, **GEN).images
    b = tiny("sd").generate("a cat", seeds=0, **GEN).images
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(ls.ConfigError, match="PipelineGenerator subclass"):
        ls.register_adapter("Other", dict, "x")


def test_source_defaults_go_through_the_adapter_not_around_it():
    pipe = tiny("sd").pipe
    model = ls.load(ls.Source(pipe, defaults={"num_inference_steps": 3, "guidance_scale": 2.0}, oracle="shapes"))
    cfg = model.config()
    assert (cfg.num_inference_steps, cfg.guidance_scale) == (3, 2.0)
    assert model.capabilities.oracle == "shapes" and model.capabilities.default_scorer == "oracle"
    with pytest.raises(ls.ConfigError, match="unknown default generation setting"):
        ls.load(ls.Source(pipe, defaults={"steps": 3}))


def test_the_zoo_comes_with_its_defaults_card_and_oracle():
    unet = ls.load("zoo:unet")
    assert unet.capabilities.oracle == "shapes" and unet.card["name"] == "zoo:unet"
    assert unet.config().guidance_scale == unet.card["quality"]["settings"]["guidance_scale"]


@pytest.mark.parametrize(
    "family, conditioning, roles",
    [
        ("sd", "text", {"noise", "denoiser_input", "condition", "bottleneck", "skip", "latent"}),
        ("sdxl", "text", {"noise", "denoiser_input", "condition", "pooled_condition", "bottleneck", "skip", "latent"}),
        ("kandinsky22", "image_embeds", {"noise", "denoiser_input", "condition", "bottleneck", "skip", "latent"}),
        ("sd3", "text", {"noise", "denoiser_input", "condition", "pooled_condition", "latent"}),
        ("flux", "text", {"noise", "denoiser_input", "condition", "pooled_condition", "latent"}),
        ("pixart", "text", {"noise", "denoiser_input", "condition", "latent"}),
    ],
)
def test_capabilities_and_roles_of_every_family(family, conditioning, roles):
    model = tiny(family)
    caps = model.capabilities
    assert caps.conditioning == conditioning and caps.iterative and caps.forkable and caps.sampler
    assert {e.role for e in model.spaces()} == roles
    assert {e.role for e in model.layer_map().layers} == {"layer"}
    assert [e.name for e in model.spaces() if e.role == "denoiser_input"] == ["x_t"]


def test_an_unknown_role_is_refused():
    with pytest.raises(ValueError, match="unknown layer role"):
        ls.LayerInfo("x", "resnet", "encoder", ls.Site("m"), role="important")


def test_diffusers_habits_torch_dtype_and_num_images_per_prompt(tmp_path):
    """`torch_dtype=` is diffusers' name for dtype; `num_images_per_prompt=k` makes k rows per prompt, each on its
    own seed, the same images as repeating the prompt."""
    import torch

    from layerscope.experiments import injection as inj
    from layerscope.testing.pipelines import build_tiny_pipeline

    build_tiny_pipeline("sd").save_pretrained(tmp_path / "sd")
    g = ls.load(f"hf:{tmp_path / 'sd'}", torch_dtype=torch.float32)
    assert next(g.pipe.unet.parameters()).dtype == torch.float32
    with pytest.raises(ls.SpecError, match="not both"):
        ls.load(f"hf:{tmp_path / 'sd'}", torch_dtype=torch.float32, dtype=torch.float32)
    kw = dict(num_inference_steps=2)
    two = g.generate("a cat", num_images_per_prompt=2, **kw).images
    assert two.shape[0] == 2 and not torch.equal(two[0], two[1])
    torch.testing.assert_close(two, g.generate(["a cat", "a cat"], seeds=[0, 1], **kw).images)
    four = g.generate(["a cat", "a dog"], seeds=[5, 9], num_images_per_prompt=2, **kw).images
    torch.testing.assert_close(four, g.generate(["a cat", "a cat", "a dog", "a dog"], seeds=[5, 6, 9, 10], **kw).images)
    with pytest.raises(ls.ConfigError, match="one seed per prompt"):
        g.generate(["a cat", "a dog"], seeds=[5], num_images_per_prompt=2, **kw)
    with pytest.raises(ls.ConfigError, match="num_images_per_prompt is an argument of generate"):
        inj.run(g, inj.Settings(pairs=(("a cat", "a dog"),), generation={"num_images_per_prompt": 2}))


def test_flux_refuses_what_it_would_drop():
    """Flux's negative prompt and true CFG are refused in one sentence before generating, not dropped silently."""
    from conftest import tiny

    flux = tiny("flux")
    with pytest.raises(ls.ConfigError, match="drop negative_prompt"):
        flux.generate("a cat", negative_prompt="blurry", num_inference_steps=1)
    with pytest.raises(ls.ConfigError, match="true_cfg_scale=4.0"):
        flux.generate("a cat", negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=1)
    assert flux.generate("a cat", num_inference_steps=1).images.shape[0] == 1
