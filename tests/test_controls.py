"""Untrained controls: ls.untrained(model) and the untrained: scheme re-initialise every learned parameter,
deterministically from a seed, keep the text encoders when asked, and otherwise behave as their model."""

import pytest
import torch
from conftest import tiny
from torch import nn

import layerscope as ls
from layerscope.controls import fallback_init

STEPS = dict(num_inference_steps=2)


def _params(model: ls.Generator) -> dict[str, torch.Tensor]:
    """Every parameter of the model, named by its component (``unet.conv_in.weight``)."""
    from layerscope.controls import _components

    return {f"{c}.{n}": p for c, comp in _components(model) for n, p in comp.named_parameters()}


def _same_map(control: ls.Generator, model: ls.Generator) -> bool:
    """The same layer map (entries, shapes, roles, detail sites), each naming its own model."""
    a, b = control.layer_map(), model.layer_map()
    assert (a.model, b.model) == (control.spec, model.spec)
    return (a.entries, a.detail, a.unavailable) == (b.entries, b.detail, b.unavailable)


def _constant(t: torch.Tensor) -> bool:
    return bool((t == t.flatten()[0]).all())


def test_every_reinitialised_parameter_differs_and_the_text_encoder_is_kept():
    model = ls.load("zoo:unet")  # trained weights: no parameter sits at its initial value
    before = {k: v.clone() for k, v in _params(model).items()}
    control = ls.untrained(model)
    assert control.control["kept"] == ["text_encoder"]
    old, new = _params(model), _params(control)
    assert old.keys() == new.keys()
    kept = [k for k in new if k.startswith("text_encoder.")]
    assert kept and all(torch.equal(old[k], new[k]) for k in kept)
    changed = [k for k in new if not k.startswith("text_encoder.")]
    assert len(changed) > 100 and not [k for k in changed if torch.equal(old[k], new[k])]
    assert all(new[k].data_ptr() != old[k].data_ptr() for k in new)  # a copy, sharing no storage
    # the original is untouched
    assert all(torch.equal(before[k], old[k]) for k in old)
    assert model.spec == "zoo:unet" and model.control is None and "control" not in model.card


def test_reinit_text_encoder_too_and_the_denoiser_does_not_depend_on_it():
    model = ls.load("zoo:unet")
    keep, reinit = ls.untrained(model), ls.untrained(model, text_encoder="reinit")
    old, a, b = _params(model), _params(keep), _params(reinit)
    text = [k for k in old if k.startswith("text_encoder.")]
    assert not [k for k in text if torch.equal(old[k], b[k])]  # transformers' own _init_weights touched them all
    assert reinit.control["kept"] == [] and reinit.control["fallback_init"] == []
    # each component draws from its own seed: the U-Net is the same whether the text encoder is kept or not
    assert all(torch.equal(a[k], b[k]) for k in old if k.startswith("unet."))


def test_tiny_pipeline_parameters_change_except_those_at_a_constant_init():
    """tiny:sd's weights are themselves an initialisation: norms at ones and zeros stay so, all else moves."""
    model = tiny("sd")
    control = ls.untrained(model, text_encoder="reinit")
    old, new = _params(model), _params(control)
    same = [k for k in old if torch.equal(old[k], new[k])]
    assert len(same) < len(old) / 2
    assert all(_constant(old[k]) for k in same)


def test_same_seed_same_weights_other_seed_other_weights():
    model = ls.load("zoo:gan")
    rng = torch.random.get_rng_state()
    a, b, c = ls.untrained(model, seed=1), ls.untrained(model, seed=1), ls.untrained(model, seed=2)
    assert torch.equal(rng, torch.random.get_rng_state())  # the global RNG is left as it was
    pa, pb, pc = _params(a), _params(b), _params(c)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not [k for k in pa if torch.equal(pa[k], pc[k]) and not _constant(pa[k])]
    # BatchNorm's running statistics (learned from data) are reset with their module
    norm = next(m for m in a.net.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))


def test_weights_do_not_depend_on_the_dtype():
    """The draws are made in float32 on the CPU, then cast: a half-precision control is the float32 one, rounded."""
    half = ls.untrained(ls.load("tiny:sd", dtype="float16"))
    full = ls.untrained(tiny("sd"))
    ph, pf = _params(half), _params(full)
    assert all(ph[k].dtype == torch.float16 for k in ph)
    assert all(torch.equal(ph[k], pf[k].half()) for k in pf)


def test_scheme_equals_the_function_weight_for_weight():
    by_spec = ls.load("untrained:zoo:gan")
    by_call = ls.untrained(ls.load("zoo:gan"))
    a, b = _params(by_spec), _params(by_call)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert by_spec.spec == by_call.spec == "untrained:zoo:gan"
    assert by_spec.control == by_call.control
    other = ls.load("untrained:tiny:sd@2+text")
    assert other.spec == "untrained:tiny:sd@2+text"
    assert other.control["seed"] == 2 and other.control["text_encoder"] == "reinit"
    assert ls.load("untrained:zoo:gan+text@2").spec == "untrained:zoo:gan@2+text"  # either order of suffixes


def test_spec_card_record_and_load_call():
    model = ls.load("zoo:unet")
    control = ls.untrained(model, seed=3)
    assert control.spec == "untrained:zoo:unet@3"
    assert ls.untrained(model).spec == "untrained:zoo:unet"
    assert ls.untrained(model, seed=3, text_encoder="reinit").spec == "untrained:zoo:unet@3+text"
    record = {"kind": "untrained", "of": "zoo:unet", "seed": 3, "text_encoder": "keep", "kept": ["text_encoder"]}
    assert control.control == {**record, "fallback_init": []}
    card = control.card
    assert card["control"] == control.control and card["name"] == control.spec
    assert "untrained control of zoo:unet" in card["description"]
    assert "quality" not in card and "steps" not in card  # measured on the trained weights, not on these
    assert card["parameters"] == model.card["parameters"]
    # a Ray worker rebuilds the same control
    assert control.load_call == ("untrained:zoo:unet@3", {})
    assert ls.load("untrained:zoo:gan@1").load_call == ("untrained:zoo:gan@1", {})
    toy = ls.load("torch:toy_generators:make_gan", output_range=(-1, 1))  # keywords go to the inner load
    assert ls.untrained(toy).load_call == ("untrained:torch:toy_generators:make_gan", {"output_range": (-1, 1)})
    assert ls.load("untrained:torch:toy_generators:make_gan", output_range=(-1, 1)).output_range == (-1, 1)
    # everything else is the original's
    assert control.capabilities == model.capabilities
    assert control.default_config == model.default_config
    assert control.oracle == model.oracle == "shapes"


def test_fallback_for_parameters_without_reset_parameters():
    dit = ls.untrained(ls.load("zoo:dit"))
    fb = dit.control["fallback_init"]
    assert fb and all(name.endswith("scale_shift_table") for name in fb)
    table = dit.pipe.transformer.transformer_blocks[0].scale_shift_table
    assert (
        table.shape == (6, 64) and 0.05 < float(table.detach().std()) < 0.2
    )  # normal(0, 1/sqrt(64)), as diffusers makes it

    class Scaled(nn.Module):
        latent_dim = 4

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3 * 4 * 4)
            self.gain = nn.Parameter(torch.full((3,), 5.0))
            self.offset = nn.Parameter(torch.full((3,), 5.0))
            self.pos = nn.Parameter(torch.full((3, 4, 4), 5.0))

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            x = self.fc(z).view(-1, 3, 4, 4) + self.pos
            return torch.tanh(x * self.gain.view(1, 3, 1, 1) + self.offset.view(1, 3, 1, 1))

    control = ls.untrained(ls.load(Scaled()))
    assert control.load_call is None  # built in this process: a worker has no ls.load call to repeat
    assert control.control["fallback_init"] == ["net.gain", "net.offset", "net.pos"]
    net = control.net
    assert torch.equal(net.gain, torch.ones(3)) and torch.equal(net.offset, torch.zeros(3))
    assert float(net.pos.detach().abs().max()) < 0.2
    assert torch.isfinite(control.generate(["", ""], seeds=[0, 1]).images).all()
    p = torch.empty(2, 8)
    fallback_init(p, "block.scale_shift_table")
    assert p.shape == (2, 8)


def test_torch_generator_control_generates_and_keeps_its_layer_map():
    model = ls.load("torch:toy_generators:make_gan")
    control = ls.untrained(model)
    assert control.spec == "untrained:torch:toy_generators:make_gan"
    assert control.load_call == ("untrained:torch:toy_generators:make_gan", {})
    assert _same_map(control, model)
    traced = ls.untrained(model)  # copied after the trace: the copy keeps the map, named for the control
    assert _same_map(traced, model)
    a, b = model.generate(["", ""], seeds=[0, 1]).images, control.generate(["", ""], seeds=[0, 1]).images
    assert torch.isfinite(b).all() and not torch.equal(a, b)


def test_tiny_sd_control_generates_with_the_same_layer_map():
    model = ls.load("tiny:sd")
    control = ls.untrained(model)  # before any trace: each computes its own layer map
    assert _same_map(control, model)
    assert [e.name for e in control.layers()] == [e.name for e in model.layers()]
    a = model.generate("a red cube", seeds=0, **STEPS).images
    b = control.generate("a red cube", seeds=0, **STEPS).images
    assert b.shape == a.shape and torch.isfinite(b).all() and not torch.equal(a, b)
    again = model.generate("a red cube", seeds=0, **STEPS).images
    assert torch.equal(a, again)  # the original still generates as before


def test_untrained_unet_activations_are_not_the_trained_ones():
    """Same noise, same (kept) text embeddings: the denoiser's own activations are what changes."""
    model = ls.load("zoo:unet")
    control = ls.untrained(model)
    cap = ls.Capture(["x_t", "text_embeds", "down_blocks.0", "mid_block"], steps=[0])
    a = model.generate(["a red cube"], seeds=[0], capture=cap, **STEPS).capture
    b = control.generate(["a red cube"], seeds=[0], capture=cap, **STEPS).capture
    assert torch.equal(a["x_t"], b["x_t"]) and torch.equal(a["text_embeds"], b["text_embeds"])
    for layer in ("down_blocks.0", "mid_block"):
        assert a[layer].shape == b[layer].shape
        assert not torch.allclose(a[layer], b[layer], rtol=0.05, atol=1e-3)
        assert abs(float(a[layer].std()) - float(b[layer].std())) > 1e-3 * float(a[layer].std())


def test_an_open_capture_block_stays_with_the_original():
    model = tiny("sd")
    with model.capture("mid_block") as handle:
        control = ls.untrained(model)
        control.generate("a cat", **STEPS)
        assert handle.result is None
        model.generate("a cat", **STEPS)
    assert handle["mid_block"] is not None


def test_refusals_say_what_is_wrong():
    with pytest.raises(ls.ConfigError, match="no weights"):
        ls.untrained(ls.load("arch:sd14"))
    with pytest.raises(ls.ConfigError, match="no weights"):
        ls.load("untrained:arch:sd14")
    gan = ls.load("zoo:gan")
    with pytest.raises(ls.ConfigError, match=r"text_encoder must be 'keep'.*'reinit'.*did you mean 'reinit'"):
        ls.untrained(gan, text_encoder="re-init")
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ls.ConfigError, match="seed must be an integer"):
            ls.untrained(gan, seed=bad)
    with pytest.raises(ls.ConfigError, match="already a control"):
        ls.untrained(ls.untrained(gan))
    with pytest.raises(ls.ConfigError, match="loaded model"):
        ls.untrained(nn.Linear(2, 2))
    with pytest.raises(ls.SpecError, match="names no model spec"):
        ls.load("untrained:unet")
    with pytest.raises(ls.SpecError, match=r"ends in '\+txt'.*@<seed>.*\+text"):
        ls.load("untrained:zoo:gan+txt")
    with pytest.raises(ls.SpecError, match="two seeds"):
        ls.load("untrained:zoo:gan@1@2")
    with pytest.raises(ls.SpecError, match="unknown model scheme"):
        ls.load("untrained:nope:gan")


def test_fixed_fourier_features_are_left_alone():
    from diffusers.models.embeddings import GaussianFourierProjection

    class Fourier(nn.Module):
        latent_dim = 4

        def __init__(self) -> None:
            super().__init__()
            self.features = GaussianFourierProjection(8, scale=16.0)
            self.fc = nn.Linear(16, 3 * 2 * 2)

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.fc(self.features(z[:, 0])).view(-1, 3, 2, 2))

    model = ls.load(Fourier())
    control = ls.untrained(model)
    assert torch.equal(control.net.features.weight, model.net.features.weight)  # fixed by construction
    assert not torch.equal(control.net.fc.weight, model.net.fc.weight)
    assert control.control["fallback_init"] == []


def test_docs_python_block_runs():
    import re
    from pathlib import Path

    doc = Path(__file__).parents[1] / "docs" / "controls.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "docs/controls.md", "exec"), namespace)
    assert namespace["control"].spec == "untrained:zoo:gan@1" and namespace["images"].shape[0] == 2
