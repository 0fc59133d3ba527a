"""The main job end to end: `layerscope run --quick` on the zoo, the HTML report (checked in headless Chromium),
rebuilding it without a model, and the CLI's sweep/run/report commands and their errors."""

import json
import re

import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import CountRuns

import layerscope.loading
from layerscope.cli import command
from layerscope.experiments.base import Result

runner = CliRunner()


def invoke(*args):
    return runner.invoke(command(), [str(a) for a in args])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "layerscope-report"
    res = invoke("run", "--quick", "--no-progress", "--out", out)
    assert res.exit_code == 0, res.output
    return out


def test_run_quick_writes_tables_and_page(report):
    page = (report / "index.html").read_text()
    record = json.loads((report / "run.json").read_text())
    assert record["quick"] is True and {"injection", "abstractions", "properties"} <= set(record["sections"])
    for spec in ("zoo_unet", "zoo_dit"):
        folder = report / "injection" / spec
        table = pd.read_parquet(folder / "injection.parquet")
        assert {"transfer", "keep"} == set(table["metric"])
        labels = pd.read_parquet(folder / "labels.parquet")
        assert set(labels["label"]) <= {"structure", "content", "surface", "mixed", "inert"}
        sanity = Result.load(folder).record["sanity"]
        assert sanity["no_layer_vs_O"] < 1e-5 and sanity["every_layer_vs_E"] < 1e-5
    # every figure is embedded and says how to reproduce it
    n_img = page.count('<img src="data:image/png;base64,')
    assert n_img >= 6
    assert page.count("Reproduce: <code>layerscope ") == n_img
    assert page.count("Reproduce: <code>layerscope sweep zoo:") >= 6
    assert page.count("Reproduce: <code>layerscope abstractions zoo:") >= 6
    assert "Sanity (passed)" in page and "three-way split" in page
    assert "Models" in page and "prompt agreement" in page  # model cards
    for spec in ("zoo_unet", "zoo_dit"):
        probes = pd.read_parquet(report / "abstractions" / spec / "probes.parquet")
        assert {"accuracy", "cross_entropy", "mi_bound", "accuracy_low", "accuracy_high"} == set(probes["metric"])
        assert "x_t" in set(probes["layer"])
    # zoo:ldm under both pair protocols, beside the SD 1.4 anchors; its probes at its study's layers; its VAE latent
    for protocol, named in (("zoo_ldm_full", None), ("zoo_ldm_partial", [2, 3])):
        res = Result.load(report / "injection" / protocol)
        assert res.record["settings"]["named"] == named and res.record["sanity"]["no_layer_vs_O"] < 1e-5
        assert set(res.tables["summary"]["layer"]) >= {"mid_block", "up_blocks.1.resnets.1", "noise"}
    assert "zoo:ldm: partial prompts naming 2-3 factors" in page and "Stable Diffusion 1.4 anchors" in page
    probes = pd.read_parquet(report / "abstractions" / "zoo_ldm" / "probes.parquet")
    assert "mid_block" in set(probes["layer"]) and not any(str(x).startswith("skip.") for x in set(probes["layer"]))
    ldm_scores = pd.read_parquet(report / "properties" / "zoo_ldm" / "properties.parquet")
    assert {"noise", "vae_latent"} == set(ldm_scores["space"])
    assert page.count("Reproduce: <code>layerscope properties zoo:") >= 3
    assert "picture" in page and "Sanity generators built to fail" in page
    for spec in ("zoo_unet", "zoo_vae", "zoo_gan"):
        scores = pd.read_parquet(report / "properties" / spec / "properties.parquet")
        assert set(scores["property"]) == {"density", "smoothness", "organization", "relevance"}
        assert scores["score"].between(0, 1).all()
    jobs = record["sections"]["properties"]["jobs"]
    sane = [j for j in jobs if j["part"] == "sanity"]
    assert len(sane) == 3 and all(j["note"] for j in sane)
    sanity = pd.concat([Result.load(report / "properties" / j["folder"])["properties"] for j in sane])
    sanity = sanity.set_index(["model", "property"])["score"]
    assert sanity.xs("relevance", level="property").min() < 0.05  # the generator that ignores its latent
    # model cards are written into the run record at run time (the page is built from files only)
    cards = {j["spec"]: j["card"] for j in record["sections"]["injection"]["jobs"]}
    assert cards["zoo:unet"]["parameters"] > 0 and "quality" in cards["zoo:unet"]


def test_report_rebuilds_without_any_model(report, monkeypatch):
    before = (report / "index.html").read_text()

    def no_model(*a, **k):
        raise AssertionError("`layerscope report` must not load a model")

    monkeypatch.setattr(layerscope.loading, "load", no_model)
    res = invoke("report", report)
    assert res.exit_code == 0, res.output
    after = (report / "index.html").read_text()
    strip = re.compile(r"page built [0-9: -]+")
    assert strip.sub("", before) == strip.sub("", after)


def test_report_renders_in_headless_chromium(report, browser):
    from browser import page_report

    seen = page_report(report / "index.html", binaries=browser)
    assert seen["title"] == "layerscope report"
    assert seen["n_images"] >= 6
    assert seen["n_displayed"] == seen["n_images"], [i for i in seen["images"] if not i["displayed"]]
    assert all(i["naturalWidth"] > 100 and i["height"] > 50 for i in seen["images"])
    assert any("Injection sweep" in h for h in seen["h2"]) and "Models" in seen["h2"]
    assert any("Latent abstractions" in h for h in seen["h2"])
    assert any("Latent-space properties" in h for h in seen["h2"])
    assert not seen["console_errors"]


def test_cli_errors_are_one_sentence_before_any_compute():
    cases = [
        (["sweep", "zoo:dit"], "give at least one (original, edit) prompt pair"),
        (["sweep", "tiny:sd", "--random-pairs", "2"], "random pairs are Shapes-world prompts"),
        (["sweep", "zoo:dit", "--random-pairs", "1", "--windows", "all,sometimes"], "valid windows"),
        (["sweep", "zoo:dit", "--random-pairs", "1", "--layers", "transformer_block.*"], "closest valid names"),
        (["sweep", "zoo:dit", "--random-pairs", "1", "--seeds", "a,b"], "comma-separated integers"),
        (["sweep", "zoo:nope", "--random-pairs", "1"], "valid: zoo:unet"),
        (["report", "/nonexistent/folder"], "not a layerscope report folder"),
        (["run", "--quick", "--only", "bogus"], "unknown report section"),
    ]
    for args, msg in cases:
        res = invoke(*args)
        assert res.exit_code == 2, (args, res.output)
        assert msg in " ".join(res.output.split()), (args, res.output)
    res = invoke("sweep", "zoo:dit", "--pair", "only one")
    assert res.exit_code == 2 and "requires 2 arguments" in res.output


def test_cli_sweep_writes_table_figures_and_labels(tmp_path):
    from layerscope.world.text import prompt_for

    out = tmp_path / "sw"
    args = [
        "sweep",
        "zoo:dit",
        "--pair",
        prompt_for([0, 3, 6, 7, 0, 7]),
        prompt_for([5, 8, 1, 0, 2, 0]),
        "--random-pairs",
        "1",
        "--layers",
        "transformer_blocks.*",
        "--combine",
        "transformer_blocks.0,transformer_blocks.1",
        "--windows",
        "all,late",
        "--steps",
        "4",
        "--out",
        out,
    ]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    table = pd.read_parquet(out / "injection.parquet")
    assert table["pair"].nunique() == 2 and set(table["window"]) == {"all", "late"}
    assert "transformer_blocks.0+transformer_blocks.1" in set(table["layer"])
    for name in ("grid.png", "transfer_groups.png", "transfer_factors.png", "summary.parquet", "labels.parquet"):
        assert (out / name).stat().st_size > 0
    assert "per-layer specialization" in res.output
    # a rerun resumes: nothing left to generate
    import layerscope as ls

    real = ls.load

    def counted(spec, **kw):
        counted.model = real(spec, **kw)
        counted.model.layer_map()  # the (cached) shape trace is not part of the sweep
        counted.runs = CountRuns(counted.model).__enter__()
        return counted.model

    layerscope.loading.load, saved = counted, layerscope.loading.load
    try:
        again = invoke(*args)
    finally:
        layerscope.loading.load = saved
    assert again.exit_code == 0, again.output
    assert counted.runs.calls == []


@pytest.mark.parametrize("cmd", [[], ["run"], ["report"], ["sweep"], ["layers"], ["properties"], ["abstractions"]])
def test_help_everywhere(cmd):
    res = invoke(*cmd, "--help")
    assert res.exit_code == 0 and "Usage" in res.output


def test_every_sections_command_reproduces_layers_and_image_size():
    """The probes, forks, properties and alignment commands the report prints parse back to the job's layers and
    image size (zoo:ldm's probe grid runs at chosen layers: its command must name them)."""
    import shlex

    from layerscope.experiments import abstractions as ab
    from layerscope.experiments.base import settings_dict
    from layerscope.report.sections import abstractions, alignment, properties

    gen = {"height": 48, "width": 40}
    st = settings_dict(ab.Settings(n=8, steps=4, layers=("mid_block", "up_blocks.1"), forks=2, generation=gen))
    cmds = {
        "abstractions": abstractions.probes_command("zoo:ldm", st, "o"),
        "forks": abstractions.forks_command("zoo:ldm", st, "o"),
        "properties": properties.properties_command("zoo:ldm", settings_dict(pr_settings(gen)), "o"),
        "align": alignment.align_command(["zoo:unet", "zoo:dit"], settings_dict(al_settings(gen)), "o"),
    }
    group = command()
    for name, cmd in cmds.items():
        args = shlex.split(cmd)
        sub = "abstractions" if name == "forks" else args[1]
        p = group.commands[sub].make_context(sub, args[2:]).params
        assert (p["height"], p["width"]) == (48, 40), name
        if name in ("abstractions", "align"):
            assert tuple(p["layers"]) == ("mid_block", "up_blocks.1"), name


def pr_settings(gen):
    from layerscope.experiments import properties as pr

    return pr.Settings(n=8, pairs=4, generation=gen)


def al_settings(gen):
    from layerscope.experiments import alignment as al

    return al.Settings(n=8, layers=("mid_block", "up_blocks.1"), generation=gen)
