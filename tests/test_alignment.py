"""The alignment experiment: matched inputs across models, its tables, the Platonic verdict rule, the CLI and
every refusal before any generation."""

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import CountRuns, tiny

import layerscope as ls
from layerscope.cli import command
from layerscope.experiments import alignment as al
from layerscope.experiments.base import Result

SMALL = al.Settings(n=16, steps=2, k=3, n_boot=20, project=64, metrics=("linear_cka", "mutual_knn"))


@pytest.fixture(scope="module")
def zoo():
    return [ls.load(s) for s in ("zoo:dit", "zoo:gan")]


@pytest.fixture(scope="module")
def result(zoo):
    return al.run(zoo, SMALL)


def test_scenes_are_the_same_inputs_for_every_model(zoo):
    """The text model draws the scene from its prompt, the GAN from the scene's code: the oracle reads the scene."""
    from layerscope.world.oracle import read

    f = al.scenes(16)
    for model in zoo:
        feats = al.collect(model, SMALL, "scenes", f)
        assert len(feats.cells) == len(feats.layers) * len(feats.steps)
    gan = zoo[1]
    code = al._code_layer(gan)
    assert code == "code"
    onehot = al.world_references(f)["factors"].float()
    out = gan.generate(
        [None] * 16,
        seeds=list(range(16)),
        interventions=[ls.replace(code, ls.PerTarget(onehot), targets=list(range(16)))],
    )
    assert (read(out.images).pred == f).all()


def test_tables_and_round_trip(result, tmp_path):
    t = result.tables
    assert set(t) == {"layers", "within", "across", "world", "arrangement", "matching"}
    w = t["within"]
    diag = w[(w["layer_a"] == w["layer_b"]) & (w["step_a"] == w["step_b"]) & (w["metric"] == "linear_cka")]
    assert np.allclose(diag["value"], 1.0)  # every feature set is identical to itself
    world = t["world"]
    assert set(world["reference"]) == set(al.WORLD_REFERENCES)
    # the GAN's code layer is the scene's one-hot by construction: CKA 1 with the factors
    code = world[
        (world["model"] == "zoo:gan")
        & (world["layer"] == "code")
        & (world["reference"] == "factors")
        & (world["metric"] == "linear_cka")
    ]
    assert code["value"].iloc[0] == pytest.approx(1.0, abs=1e-9)
    bounded = world[world["metric"].isin(["linear_cka", "mutual_knn"])]["value"]  # debiased CKA may dip below 0
    assert ((bounded >= -1e-9) & (bounded <= 1 + 1e-9)).all()
    assert set(world["metric"]) == {"linear_cka", "mutual_knn", al.STAT_METRIC}  # the verdict's measure is added
    a = t["arrangement"]
    assert set(a["group"]) == {"structure", "content", "surface"} and len(a) == 6
    assert ((a["depth_low"] <= a["depth"] + 1e-9) | a["depth_low"].isna()).all()
    m = t["matching"]
    assert (m["chance_similarity"] < m["component_similarity"]).all()
    assert "code" not in ";".join(m["matches"])  # the scene's own one-hot takes no part in the matching
    assert len(m) == 2 and set(m["supports"]) <= {
        "Huh et al. (convergence)",
        "neither",
        "Schaerf (alike components, different arrangements)",
    }
    across = t["across"]
    assert set(across["step"]) == {-1}  # a diffusion model and a GAN share no steps: best steps only
    back = Result.load(result.save(tmp_path / "al"))
    for name in result.tables:
        pd.testing.assert_frame_equal(back[name], result[name])


def test_the_verdict_rule():
    assert al._verdict((0.6, 0.9), (0.6, 0.9))[2].startswith("Huh")
    assert al._verdict((0.6, 0.9), (-0.2, 0.3))[2].startswith("Schaerf")
    assert al._verdict((0.2, 0.4), (-0.2, 0.3)) == ("unalike", "different", "neither")
    assert al._verdict((0.4, 0.9), (0.6, 0.9))[:2] == ("undecided", "preserved")


def test_bad_inputs_fail_before_generation(zoo):
    sd, gan = tiny("sd"), ls.load("torch:toy_generators:make_gan")
    sd.layer_map(), gan.layer_map()  # the (cached) shape trace is not part of a study
    with CountRuns(sd) as runs, CountRuns(zoo[0]) as zoo_runs:
        for models, st, msg in [
            ([sd, gan], SMALL, "cannot be matched"),  # a text model and a torch generator, open domain
            (zoo, al.Settings(n=16, k=16, metrics=("mutual_knn",)), "k must be"),
            (zoo, al.Settings(n=4), "at least 16"),
            (zoo, al.Settings(n=16, metrics=("pearson",)), "valid: linear_cka"),
            ([sd, sd], SMALL, "each model once"),
            ([sd], al.Settings(n=16, layers="noise"), "no capturable layer"),
        ]:
            with pytest.raises(ls.ConfigError, match=msg):
                al.run(models, st)
    assert runs.calls == [] and zoo_runs.calls == []


def test_open_domain_text_models_share_prompts_and_seeds():
    sd = tiny("sd")
    res = al.run([sd], al.Settings(n=16, steps=2, k=3, n_boot=10, project=16, metrics=("linear_cka",)))
    assert res.record["mode"] == "prompts" and res["world"].empty and res["matching"].empty
    assert "One model only" in __import__("layerscope.report.sections.alignment", fromlist=["x"]).platonic_sentence(res)


def test_cli_align(tmp_path):
    out = tmp_path / "a"
    res = CliRunner().invoke(
        command(),
        [
            "align",
            "zoo:dit",
            "zoo:gan",
            "--n",
            "16",
            "--steps",
            "2",
            "--k",
            "3",
            "--metric",
            "linear_cka,mutual_knn",
            "--project",
            "32",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert (out / "matching.parquet").exists() and (out / "arrangement.png").stat().st_size > 0
    assert "Platonic test" in " ".join(res.output.split())
    bad = CliRunner().invoke(command(), ["align", "zoo:dit", "--n", "16", "--k", "20"])
    assert bad.exit_code == 2 and "k must be" in bad.output
