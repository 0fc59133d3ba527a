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
from layerscope.experiments import alignment_analysis as an
from layerscope.experiments.base import Result

SMALL = al.Settings(
    n=16,
    steps=2,
    k=3,
    n_boot=20,
    permutations=20,
    metrics=("linear_cka", "mutual_knn"),
    curve_measures=("debiased_cka",),
)


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
        assert len(feats.grams) == 2 * len(feats.layers) * len(feats.steps)  # whole maps and position means
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
    assert set(t) == {"layers", "within", "across", "world", "peaks", "peak_order", "matching", "crossfit"}
    cf = t["crossfit"]  # the selection-bias check of best steps: one row per ordered pair of models
    assert len(cf) == 2 and np.allclose(cf["difference"], cf["in_sample"] - cf["cross_fitted"])
    w = t["within"]
    diag = w[(w["layer_a"] == w["layer_b"]) & (w["step_a"] == w["step_b"]) & (w["metric"] == "linear_cka")]
    assert np.allclose(diag["value"], 1.0)  # every feature set is identical to itself
    world = t["world"]
    assert set(world["reference"]) == set(al.WORLD_REFERENCES)
    assert set(world["model"]) == {"zoo:dit", "zoo:gan", "untrained:zoo:dit", "untrained:zoo:gan"}
    # the GAN's code layer is the scene's one-hot by construction: CKA 1 with the factors, also untrained
    code = world[(world["layer"] == "code") & (world["reference"] == "factors") & (world["metric"] == "linear_cka")]
    assert np.allclose(code["value"], 1.0, atol=1e-9) and len(code) == 2
    bounded = world[world["metric"].isin(["linear_cka", "mutual_knn"])]["value"]  # debiased CKA may dip below 0
    assert ((bounded >= -1e-9) & (bounded <= 1 + 1e-9)).all()
    assert set(world["metric"]) == {"linear_cka", "mutual_knn", an.STAT_METRIC}  # the verdicts' measure is added
    peaks = t["peaks"]
    assert set(peaks["group"]) == {"structure", "content", "surface"}
    assert set(peaks["step"]) == {"0", "1", "best"} and "render" not in set(peaks["model"])
    m = t["matching"]
    assert set(m["step"]) == {"0", "1", "best"} and set(m["features"]) == {"full", "pooled"}
    assert "render" not in set(m["model_b"]) and "render" in set(m["model_a"])  # the render is a null, never a target
    assert "code" not in ";".join(m["matches"])  # the scene's own one-hot takes no part in the matching
    models = m[(m["control_a"] == "") & (m["control_b"] == "")]
    assert len(models) == 2 * 3 * 2 and models["components"].isin(["alike", "unalike", "undecided"]).all()
    assert set(models["nulls"].str.count("=")) == {3}  # render, untrained A, untrained B
    ok = models["similarity_low"].notna()
    assert ((models["similarity_low"] <= models["similarity"] + 1e-9) | ~ok).all()
    # the DiT's blocks all sit at one resolution: the image-distance order of a pair with it is undefined
    assert (models["arrangement_image_distance"] == "degenerate").all()
    across = t["across"]
    assert set(across["step"]) == {-1, 0, 1}  # first, middle and last step of the grid, and best steps
    back = Result.load(result.save(tmp_path / "al"))
    for name in result.tables:
        pd.testing.assert_frame_equal(back[name], result[name])


def test_claims_curve_follows_the_shared_schema(result):
    from layerscope.stats.speccurve import check_curve

    c = al.claims_curve(result)
    check_curve(c)
    assert set(c["claim"]) == set(al.CLAIMS)
    assert set(c["control"]) == {"", "untrained"}
    arr = c[c["claim"] == "alignment.arrangements_different"]
    assert len(arr) == 2 * len(arr["control"].unique()) * 3 * 2 * 2 * len(an.ORDER_THRESHOLDS)
    # a degenerate order decides nothing
    assert (arr[arr["value"].isna()]["verdict"] == "undecided").all()


def test_duplicate_layers_are_merged(zoo):
    """A layer whose whole map equals an earlier layer's at every step is an exact copy: it counts once."""
    f = al.collect(zoo[1], SMALL, "scenes", al.scenes(16))
    for s in f.steps:
        f.grams[("net.3", s, "full")] = f.grams[("net.2", s, "full")].clone()
    f.find_duplicates()
    assert f.duplicates == {"net.3": "net.2"} and "net.3" not in f.analysed()
    assert f.depth("net.2") == 1.0  # depth runs over the analysed layers


def test_image_distance_from_the_layer_map(zoo):
    f = al.collect(zoo[1], SMALL, "scenes", al.scenes(16))
    assert f.distance == {"code": 5.0, "fc": 3.0, "net.0": 2.0, "net.1": 1.0, "net.2": 0.0, "net.3": 0.0}


def test_bad_inputs_fail_before_generation(zoo):
    sd, gan = tiny("sd"), ls.load("torch:toy_generators:make_gan")
    sd.layer_map(), gan.layer_map()  # the (cached) shape trace is not part of a study
    with CountRuns(sd) as runs, CountRuns(zoo[0]) as zoo_runs:
        for models, st, msg in [
            ([sd, gan], SMALL, "cannot be matched"),  # a text model and a torch generator, open domain
            (zoo, al.Settings(n=16, k=16, metrics=("mutual_knn",)), "k must be"),
            (zoo, al.Settings(n=4), "at least 16"),
            (zoo, al.Settings(n=16, k=3, metrics=("pearson",)), "valid: linear_cka"),
            (zoo, al.Settings(n=16, k=3, controls=("shuffled",)), "unknown control"),
            (zoo, al.Settings(n=16, k=3, curve_measures=("cknna",)), "valid: linear_cka, debiased_cka, mutual_knn"),
            (zoo, al.Settings(n=16, k=3, n_boot=5), "n_boot and permutations"),
            ([sd, sd], SMALL, "each model once"),
            ([sd], al.Settings(n=16, k=3, layers="noise"), "no capturable layer"),
        ]:
            with pytest.raises(ls.ConfigError, match=msg):
                al.run(models, st)
    assert runs.calls == [] and zoo_runs.calls == []


def test_open_domain_text_models_share_prompts_and_seeds():
    sd = tiny("sd")
    res = al.run([sd], al.Settings(n=16, steps=2, k=3, n_boot=20, metrics=("linear_cka",), controls=()))
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
            "--curve-measures",
            "debiased_cka",
            "--n-boot",
            "20",
            "--permutations",
            "20",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert (out / "matching.parquet").exists() and (out / "verdicts_per_step.png").stat().st_size > 0
    assert "specifications" in " ".join(res.output.split())
    bad = CliRunner().invoke(command(), ["align", "zoo:dit", "--n", "16", "--k", "20"])
    assert bad.exit_code == 2 and "k must be" in bad.output
