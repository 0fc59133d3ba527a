"""Latent-space property scorecard: sanity generators built to fail, the definitions' pieces, the zoo and open
domain paths, errors before any generation, and the CLI."""

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import layerscope as ls
from layerscope.stats import bootstrap_ci
from conftest import CountRuns, tiny
from layerscope.cli import command
from layerscope.experiments import properties as pr

SANITY = "torch:layerscope.experiments.properties:{}"


def scores_of(spec, **kw):
    scores, details, strips, record = pr.run_properties(spec, n=kw.pop("n", 32), pairs=kw.pop("pairs", 8), **kw)
    return scores.set_index("property")["score"], details, strips, record


def test_generator_that_ignores_its_latent_is_irrelevant():
    s, *_ = scores_of(SANITY.format("ignores_latent"))
    assert s["relevance"] < 0.05


def test_hash_generator_is_neither_smooth_nor_organized():
    s, *_ = scores_of(SANITY.format("hash_of_latent"))
    assert s["smoothness"] < 0.1 and s["organization"] < 0.15
    assert s["relevance"] > 0.9  # it does change with its latent, just not continuously


def test_linear_decoder_scores_all_four_high():
    s, details, strips, record = scores_of(SANITY.format("linear_decoder"))
    assert (s >= pr.FULL).all(), s
    d = details.set_index("metric")["value"]
    # the change grows with the radius, roughly in proportion (a linear map)
    assert d["change@0.1"] < d["change@0.3"] < d["change@1"]
    assert d["change@1"] / d["change@0.1"] == pytest.approx(10, rel=0.2)
    assert strips["z"].shape[0] == len(record["strip_columns"]) and strips["z"].dtype == np.uint8


def test_monotone_paths_per_factor_kind():
    from layerscope.world.factors import FACTORS

    hue, scale, shape = FACTORS.index("object_hue"), FACTORS.index("scale"), FACTORS.index("shape")
    assert pr._monotone(np.array([1, 1, 2, 3, 3]), scale) == 1
    assert pr._monotone(np.array([1, 2, 1, 3]), scale) == 0  # steps back
    assert pr._monotone(np.array([1, 5, 3]), scale) == 0  # leaves the range
    assert pr._monotone(np.array([8, 9, 0, 1]), hue) == 1  # across red on the colour circle
    assert pr._monotone(np.array([8, 7, 2, 1]), hue) == 1  # the other way round
    assert pr._monotone(np.array([8, 2, 9, 1]), hue) == 0  # back and forth
    assert pr._monotone(np.array([2, 2, 0, 0]), shape) == 1
    assert pr._monotone(np.array([2, 1, 0]), shape) == 0  # a third shape in between
    assert pr._monotone(np.array([2, 0, 2, 0]), shape) == 0  # switches back


def test_bootstrap_and_marks():
    rng = np.random.default_rng(0)
    x = rng.random(50)
    est, lo, hi = bootstrap_ci(lambda a: float(np.mean(a)), [x])
    assert lo < est < hi and est == pytest.approx(x.mean())
    est, lo, hi = bootstrap_ci(pr._density, [np.ones(20), np.r_[np.ones(10), np.zeros(10)]])
    assert est == 1.0 and lo <= 1.0
    assert [pr.mark(v) for v in (0.9, 0.67, 0.5, 0.1, float("nan"))] == ["V", "V", "~", "X", "?"]


def test_zoo_diffusion_rows_are_what_they_claim():
    """The 'a=1' image of the noise space is prompt A with sample B's noise: the same as generating it directly."""
    model = ls.load("zoo:unet")
    scores, details, strips, record = pr.run_properties(model, ["noise", "h_space"], n=4, pairs=2,
                                                        num_inference_steps=3, n_boot=200)
    assert set(scores["space"]) == {"noise", "h_space"} and set(scores["property"]) == set(pr.PROPERTIES)
    ok = scores["score"].dropna()
    assert ((ok >= 0) & (ok <= 1)).all()
    assert (scores["low"].dropna() <= scores["score"][scores["low"].notna()] + 1e-9).all()
    plan = pr.plan_properties(model, ["noise"], n=4, pairs=2, num_inference_steps=3)
    a, b = plan.pairs[0]
    direct = model.generate(plan.prompts[a], plan.seeds[b], num_inference_steps=3).images[0]
    direct = (direct.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    col = record["strip_columns"].index("a=1")
    assert np.abs(strips["noise"][col].astype(int) - direct.astype(int)).max() <= 1
    assert record["concept"] == "object_hue = red"
    d = details.pivot(index="space", columns="metric", values="value")
    assert {"concept_base", "concept_added", "change@1"} <= set(d.columns)


def test_open_domain_pipeline_with_pixels_and_a_concept_prompt():
    sd = tiny("sd")
    scores, details, strips, record = pr.run_properties(sd, ["text_eos", "mid_block", "vae_latent"], n=4, pairs=2,
                                                        num_inference_steps=2, n_boot=100)
    assert record["scorer"] == "pixel" and record["concept"] == pr.OPEN_CONCEPT
    assert set(scores["space"]) == {"text_eos", "mid_block", "vae_latent"}
    assert set(scores[scores["space"] == "mid_block"]["kind"]) == {"layer"}
    gain = details[details["metric"] == "concept_gain"]["value"]
    assert len(gain) == 3 and ((gain >= 0) & (gain <= 1)).all()


def test_errors_before_any_generation():
    model = ls.load("zoo:unet")
    gan = ls.load("zoo:gan")
    model.layer_map(), gan.layer_map()  # the (cached) shape trace is not part of the experiment
    with CountRuns(model) as runs, CountRuns(gan) as gruns:
        with pytest.raises(ls.ConfigError, match="denoiser's input"):
            pr.run_properties(model, ["x_t"])
        with pytest.raises(ls.ConfigError, match="at least 4"):
            pr.run_properties(model, n=2)
        with pytest.raises(ls.ConfigError, match="pairs must be"):
            pr.run_properties(model, n=4, pairs=9)
        with pytest.raises(ls.ConfigError, match="valid: auto, oracle, pixel"):
            pr.run_properties(model, scorer="clip")
        with pytest.raises(ls.ConfigError, match="no steps"):
            pr.run_properties(gan, steps="early")
        with pytest.raises(ls.ConfigError, match="takes no prompt"):
            pr.run_properties(gan, concept="a dog")
        with pytest.raises(ls.LayerNameError):
            pr.run_properties(model, ["nonexistent.*"])
    assert runs.calls == [] and gruns.calls == []


def test_cli_properties(tmp_path):
    runner = CliRunner()
    out = tmp_path / "p"
    res = runner.invoke(command(), ["properties", SANITY.format("linear_decoder"), "--n", "8", "--pairs", "2",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    scores = pd.read_parquet(out / pr.SCORES)
    assert set(scores["property"]) == set(pr.PROPERTIES)
    assert (out / "scorecard.png").stat().st_size > 0 and (out / "strips.png").stat().st_size > 0
    assert "latent-space properties" in res.output
    bad = runner.invoke(command(), ["properties", "zoo:gan", "--at", "early"])
    assert bad.exit_code == 2 and "no steps" in bad.output
