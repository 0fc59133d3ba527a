"""Latent-space property scorecard: sanity generators built to fail, the definitions' pieces, the zoo and open
domain paths, errors before any generation, the Result's round trip, the main job's settings, and the CLI."""

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import CountRuns, tiny

import layerscope as ls
from layerscope.cli import command
from layerscope.experiments import properties as pr
from layerscope.experiments.base import Result
from layerscope.stats import bootstrap_ci

SANITY = "torch:layerscope.testing.sanity:{}"


def scores_of(spec, **kw):
    result = pr.run(ls.load(spec), pr.Settings(n=kw.pop("n", 32), pairs=kw.pop("pairs", 8), **kw))
    return (
        result[pr.SCORES].set_index("property")["score"],
        result[pr.DETAILS],
        result.artifacts[pr.STRIPS],
        result.record,
    )


def test_generator_that_ignores_its_latent_is_irrelevant():
    s, *_ = scores_of(SANITY.format("ignores_latent"))
    assert s["relevance"] < 0.05


def test_hash_generator_is_neither_smooth_nor_organized():
    s, *_ = scores_of(SANITY.format("hash_of_latent"))
    assert s["smoothness"] < 0.1 and s["organization"] < 0.15
    assert s["relevance"] > 0.9  # it does change with its latent, just not continuously


def test_linear_decoder_scores_all_four_high():
    s, details, strips, record = scores_of(SANITY.format("linear_decoder"))
    assert (s >= pr.FULL_SCORE).all(), s
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
    result = pr.run(model, pr.Settings(spaces=("noise", "h_space"), n=4, pairs=2, steps=3, n_boot=200))
    scores, details, strips, record = (
        result[pr.SCORES],
        result[pr.DETAILS],
        result.artifacts[pr.STRIPS],
        result.record,
    )
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
    result = pr.run(sd, pr.Settings(spaces=("text_eos", "mid_block", "vae_latent"), n=4, pairs=2, steps=2, n_boot=100))
    scores, details, record = result[pr.SCORES], result[pr.DETAILS], result.record
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
            pr.run(model, pr.Settings(spaces=("x_t",)))
        with pytest.raises(ls.ConfigError, match="at least 4"):
            pr.run(model, pr.Settings(n=2))
        with pytest.raises(ls.ConfigError, match="pairs must be"):
            pr.run(model, pr.Settings(n=4, pairs=9))
        with pytest.raises(ls.ConfigError, match="valid: auto, oracle, pixel"):
            pr.run(model, pr.Settings(scorer="clip"))
        with pytest.raises(ls.ConfigError, match="no steps"):
            pr.run(gan, pr.Settings(at="early"))
        with pytest.raises(ls.ConfigError, match="takes no prompt"):
            pr.run(gan, pr.Settings(concept="a dog"))
        with pytest.raises(ls.ConfigError, match="n_boot"):
            pr.run(model, pr.Settings(n_boot=0))
        with pytest.raises(ls.LayerNameError):
            pr.run(model, pr.Settings(spaces=("nonexistent.*",)))
    assert runs.calls == [] and gruns.calls == []


def test_cli_properties(tmp_path):
    runner = CliRunner()
    out = tmp_path / "p"
    res = runner.invoke(
        command(), ["properties", SANITY.format("linear_decoder"), "--n", "8", "--pairs", "2", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    scores = pd.read_parquet(out / f"{pr.SCORES}.parquet")
    assert scores.equals(Result.load(out)[pr.SCORES])
    assert set(scores["property"]) == set(pr.PROPERTIES)
    assert (out / "scorecard.png").stat().st_size > 0 and (out / "strips.png").stat().st_size > 0
    assert "latent-space properties" in res.output
    bad = runner.invoke(command(), ["properties", "zoo:gan", "--at", "early"])
    assert bad.exit_code == 2 and "no steps" in bad.output


def test_result_round_trips_through_save_and_load(tmp_path):
    """Result.save writes properties.parquet, properties_details.parquet and strips.npz; load gives them back."""
    model = ls.load(SANITY.format("linear_decoder"))
    settings = pr.Settings(n=8, pairs=2, n_boot=50)
    result = pr.run(model, settings)
    assert result.experiment == pr.NAME and set(result.tables) == {pr.SCORES, pr.DETAILS}
    assert result.record["model"] == model.spec and result.record["settings"]["n"] == 8
    assert {"spaces", "strip_columns", "concept", "scorer"} <= set(result.record)
    result.save(tmp_path)
    assert {"properties.parquet", "properties_details.parquet", "strips.npz", "result.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    back = Result.load(tmp_path)
    for name in (pr.SCORES, pr.DETAILS):
        pd.testing.assert_frame_equal(back[name], result[name])
    assert back.artifacts[pr.STRIPS].keys() == result.artifacts[pr.STRIPS].keys()
    for key, arr in result.artifacts[pr.STRIPS].items():
        assert back.artifacts[pr.STRIPS][key].dtype == arr.dtype and np.array_equal(back.artifacts[pr.STRIPS][key], arr)
    assert back.record["strip_columns"] == result.record["strip_columns"]


def test_strip_keys_with_dots_survive_the_round_trip(tmp_path):
    """Space names such as ``down_blocks.0`` are escaped in the npz (reversibly: "." as "%2E")."""
    strips = {"down_blocks.0.resnets.1": np.zeros((2, 3, 4, 4), np.uint8), "noise": np.ones((2, 3, 4, 4), np.uint8)}
    Result(pr.NAME, {}, {}, {pr.STRIPS: strips}).save(tmp_path)
    with np.load(tmp_path / "strips.npz") as z:
        assert set(z.files) == {"down_blocks%2E0%2Eresnets%2E1", "noise"}
    back = Result.load(tmp_path).artifacts[pr.STRIPS]
    assert set(back) == set(strips) and all(np.array_equal(back[k], v) for k, v in strips.items())


def test_main_job_has_the_old_settings():
    """The main job's models and settings are those of the report's old FULL/QUICK dicts; the sanity generators are
    their own jobs with what each must show as the note."""
    quick = pr.main_job(quick=True)
    specs = ["zoo:unet", "zoo:ldm", "zoo:vae", "zoo:gan"]
    controls = ["untrained:zoo:vae", "untrained:zoo:gan"]  # the GAN/VAE's untrained copies, same settings
    assert [j.spec for j in quick] == specs + controls + [SANITY.format(k) for k in pr.SANITY]
    assert all(j.part == "control" for j in quick if j.spec in controls)
    by = {j.spec: j for j in quick}
    assert by["zoo:unet"].settings == pr.Settings(n=8, pairs=4, steps=4, spaces=("noise", "text_embeds", "h_space"))
    assert by["zoo:ldm"].settings == pr.Settings(n=8, pairs=4, steps=4, spaces=("noise", "vae_latent"))
    assert by["zoo:vae"].settings == by["zoo:gan"].settings == pr.Settings(n=32, pairs=8)
    sane = [j for j in quick if j.part == "sanity"]
    assert [j.note for j in sane] == list(pr.SANITY.values())
    import layerscope.testing.sanity as sanity

    assert all(callable(getattr(sanity, k)) for k in pr.SANITY)  # every sanity job names a real factory
    assert all(j.settings == pr.Settings(n=16, pairs=4) for j in sane)
    full = {j.spec: j.settings for j in pr.main_job(quick=False)}
    assert list(full)[:5] == ["zoo:unet", "zoo:dit", "zoo:ldm", "zoo:vae", "zoo:gan"]
    assert full["zoo:ldm"].spaces == ("noise", "h_space", "vae_latent")
    assert full["zoo:unet"] == pr.Settings(n=16, pairs=8, steps=6)
    assert full["zoo:dit"] == pr.Settings(n=16, pairs=8, steps=10, spaces=("*",))
    assert full["zoo:gan"] == full["untrained:zoo:gan"] == pr.Settings(n=64, pairs=16)
    assert full[SANITY.format("linear_decoder")] == pr.Settings(n=32, pairs=8)
