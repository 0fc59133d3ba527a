"""Torch generators as users bring them: factories that fail, modules that return no images, generators wrapped in
their own classes, in-place modules, and the injection sweep defined for a generator of one latent."""

import click.testing
import pytest
import torch
from typer.testing import CliRunner

import layerscope as ls
from layerscope.cli import app, command
from layerscope.experiments import injection as inj

runner = CliRunner()


@pytest.mark.parametrize(
    "spec, said",
    [
        ("torch:toy_generators:make_raises", "raised RuntimeError: weights file missing"),
        ("torch:toy_generators:make_needs", "must be callable without arguments"),
        ("torch:toy_broken_module:make", "importing module 'toy_broken_module'"),
        ("torch:toy_no_such_module:make", "cannot import module 'toy_no_such_module'"),
    ],
)
def test_factories_that_fail_are_one_sentence(spec, said):
    with pytest.raises(ls.SpecError, match=said):
        ls.load(spec)
    res = runner.invoke(app, ["layers", spec])
    assert res.exit_code == 2 and said in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(
    "factory, said",
    [
        ("make_flat", r"shape \(2, 12\) for 2 samples"),
        ("make_nan", "NaN or infinite pixels in 1 of 2"),
        ("make_inf", "NaN or infinite pixels in 1 of 2"),
    ],
)
def test_outputs_that_are_not_images_are_refused_where_they_appear(factory, said):
    g = ls.load(f"torch:toy_generators:{factory}", output_range=(-1, 1))
    with pytest.raises(ls.GenerationError, match=said):
        g.generate(["", ""], seeds=[0, 1])


def test_a_nan_intervention_tensor_is_refused_before_generating():
    g = ls.load("torch:toy_generators:make_gan")
    bad = torch.zeros(g.layer_map()["fc"].shape)
    bad[3] = float("nan")
    with pytest.raises(ls.ConfigError, match="1 NaN or infinite value"):
        g.generate([""], interventions=[ls.Intervention("fc", source=bad)])


def test_a_wrapped_generator_opens_to_its_parts_and_depth_goes_further():
    default = ls.load("torch:toy_generators:make_wrapped").layer_map().names()
    assert default == ["net.fc", "net.block", "net.to_rgb", "z"]  # not the one layer "net"
    assert ls.load("torch:toy_generators:make_wrapped", depth=2).layer_map().names() == default
    three = ls.load("torch:toy_generators:make_wrapped", depth=3).layer_map().names()
    assert three == ["net.fc", "net.block.conv", "net.block.act", "net.to_rgb", "z"]
    assert ls.load("torch:toy_generators:make_wrapped", depth="leaves").layer_map().names() == three
    one = ls.load("torch:toy_generators:make_wrapped", depth=1).layer_map().names()
    assert one == ["net", "z"]  # asked for: the top level only
    # the GAN in nn.Sequential keeps its names
    assert ls.load("torch:toy_generators:make_gan").layer_map().names()[:3] == ["fc", "main.0", "main.1"]
    with pytest.raises(ls.ConfigError, match="depth must be"):
        ls.load("torch:toy_generators:make_wrapped", depth=0)
    # the nested layers are real sites: capture one, and injecting it whole gives E
    g = ls.load("torch:toy_generators:make_wrapped", depth=3)
    res = g.generate(["", ""], seeds=[0, 1], capture=ls.Capture("net.block.conv"))
    assert res.capture["net.block.conv"].shape[0] == 2


def test_update_at_an_in_place_module_is_output_minus_input():
    g = ls.load("torch:toy_generators:make_inplace")
    pre = g.generate(["", ""], seeds=[0, 1], capture=ls.Capture("0")).capture["0"]
    res = g.generate(["", ""], seeds=[0, 1], capture=ls.Capture("1", update=True))
    out, upd = res.capture["1"], res.capture.update["1"]
    assert torch.allclose(out, torch.relu(pre)) and torch.allclose(upd, torch.relu(pre) - pre)
    assert (upd != 0).any()  # the negative pre-activations: not the zeros an overwritten input gives


def test_update_at_an_undeclared_in_place_module_is_refused():
    g = ls.load("torch:toy_generators:make_sneaky")
    with pytest.raises(ls.ConfigError, match="wrote into its input"):
        g.generate([""], capture=ls.Capture("1", update=True))
    res = g.generate([""], capture=ls.Capture("1"))  # its output alone is fine
    assert res.capture["1"].abs().sum() > 0


def test_the_sweep_of_a_latent_generator_draws_o_and_e_from_seeds(tmp_path):
    gan = ls.load("zoo:gan")
    with pytest.raises(ls.ConfigError, match="conditioned on its latent, not on text"):
        inj.run(gan, inj.Settings(pairs=(("a red cube", "a blue ball"),)))
    with pytest.raises(ls.ConfigError, match="one pair repeated"):
        inj.run(gan, inj.Settings(random_pairs=3))
    with pytest.raises(ls.ConfigError, match="O == E"):
        inj.run(gan, inj.Settings(seeds=(4,), e_seeds=(4,)))
    res = inj.run(gan, inj.Settings(random_pairs=3, seed_per_pair=True, layers=["z", "net.0"], sanity=True))
    table = res.tables["injection"]
    assert sorted(set(zip(table["pair"], table["seed"], table["e_seed"]))) == [(0, 0, 1000), (1, 1, 1001), (2, 2, 1002)]
    assert res.record["sanity"]["O_vs_E"] > 0.1 and res.record["sanity"]["every_layer_vs_E"] < 1e-5
    transfer = res.tables["summary"].query("level == 'group' and metric == 'transfer'")
    assert (transfer["estimate"] > 0.9).all()  # whole-layer injections give E, as the note says they must
    assert any("by construction" in n for n in res.notes)
    cli = click.testing.CliRunner().invoke(
        command(), ["sweep", "zoo:gan", "--pair", "a red cube", "a blue ball", "--out", str(tmp_path)]
    )
    assert cli.exit_code == 2 and "conditioned on its latent" in cli.output
