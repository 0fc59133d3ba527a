"""The probe grid on real captures: features per layer x step (+ projected x_t), oracle labels, user CSV labels;
forking entropy; the experiment's shape (Settings -> run -> Result) and its section."""

import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny

import layerscope as ls
from layerscope.cli import command
from layerscope.experiments import abstractions as ab
from layerscope.experiments.base import Result
from layerscope.stats import plugin_entropy

X_T = "x_t"  # the zoo's denoiser input (role denoiser_input): the probes' baseline


@pytest.fixture(scope="module")
def dit():
    return ls.load("zoo:dit")


def test_the_baseline_is_the_denoiser_input_by_role(dit):
    assert ab.baseline_layer(dit.layer_map()) == X_T
    assert ab.baseline_layer(tiny("sd").layer_map()) == X_T
    assert ab.baseline_layer(ls.load("zoo:vae").layer_map()) is None  # no denoiser: no baseline


def test_collect_features_layers_steps_and_baseline(dit):
    feats = ab.collect_features(
        dit, [""] * 6, list(range(6)), steps=[0, 2], projection=16, guidance_scale=1.0, num_inference_steps=3
    )
    n_layers = len(dit.layer_map().layers)
    assert feats.layers[0] == feats.baseline == X_T and len(feats.layers) == n_layers + 1
    assert feats.steps == [0, 2] and len(feats.timesteps) == 2 and feats.timesteps[0] > feats.timesteps[1]
    assert len(feats.cells) == (n_layers + 1) * 2
    assert feats.cells[(X_T, 0)].shape == (6, 16)
    width = dit.layer_map()["transformer_blocks.0"].shape[-1]
    assert feats.cells[("transformer_blocks.0", 2)].shape == (6, width)  # pooled over tokens
    # the baseline at step 0 is a projection of the initial noise: independent of the model, fixed by the seeds
    again = ab.collect_features(
        dit,
        [""] * 6,
        list(range(6)),
        steps=[0],
        layers="transformer_blocks.0",
        projection=16,
        guidance_scale=1.0,
        num_inference_steps=3,
    )
    torch.testing.assert_close(again.cells[(X_T, 0)], feats.cells[(X_T, 0)])


def test_features_stream_to_a_store_when_large(dit, tmp_path, monkeypatch):
    kw = dict(steps=[0, 2], projection=16, guidance_scale=1.0, num_inference_steps=3)
    mem = ab.collect_features(dit, [""] * 4, list(range(4)), **kw)
    kept = ab.collect_features(dit, [""] * 4, list(range(4)), store=tmp_path / "f.zarr", **kw)
    assert (tmp_path / "f.zarr" / "zarr.json").exists()
    seen = []
    real = ls.Generator.generate

    def spy(self, *a, capture=None, **k):
        seen.append(capture.store)
        return real(self, *a, capture=capture, **k)

    monkeypatch.setattr(type(dit), "capture_bytes", lambda self, cap, n, **k: cap.budget_bytes + 1)
    monkeypatch.setattr(ls.Generator, "generate", spy)
    auto = ab.collect_features(dit, [""] * 4, list(range(4)), **kw)  # "too large": a temporary store, then deleted
    assert seen and seen[0] is not None and not seen[0].exists()
    for feats in (kept, auto):
        assert feats.cells.keys() == mem.cells.keys()
        for key, x in mem.cells.items():
            torch.testing.assert_close(feats.cells[key], x)


def test_layers_as_random_projections_of_the_whole_map(dit):
    kw = dict(steps=[1], projection=8, guidance_scale=1.0, num_inference_steps=3, layers="transformer_blocks.0")
    pooled = ab.collect_features(dit, [""] * 4, list(range(4)), **kw)
    proj = ab.collect_features(dit, [""] * 4, list(range(4)), project_layers=True, **kw)
    assert proj.cells[("transformer_blocks.0", 1)].shape == (4, 8)
    torch.testing.assert_close(proj.cells[(X_T, 1)], pooled.cells[(X_T, 1)])
    full = (
        dit.generate(
            [""] * 4,
            list(range(4)),
            capture=ls.Capture("transformer_blocks.0", steps=[1], branches=["cond"]),
            guidance_scale=1.0,
            num_inference_steps=3,
        )
        .capture["transformer_blocks.0"][:, 0, 0]
        .flatten(1)
    )
    torch.testing.assert_close(proj.cells[("transformer_blocks.0", 1)], full @ ab._projection(full.shape[1], 8))


def test_run_probes_table_on_the_zoo(dit):
    table, record = ab.run_probes(dit, n=48, num_inference_steps=3, layers="transformer_blocks.*")
    assert set(table["metric"]) == {"accuracy", "cross_entropy", "mi_bound", "accuracy_low", "accuracy_high"}
    wide = table.pivot_table(index=["layer", "step", "factor"], columns="metric", values="value")
    lo, acc, hi = wide["accuracy_low"], wide["accuracy"], wide["accuracy_high"]
    assert ((lo <= acc + 1e-9) & (acc <= hi + 1e-9)).all()
    assert set(record["onset_ci"]) == set(record["chance"])
    assert set(table["factor"]) == {"floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation"}
    assert set(table["step"]) == {0, 1, 2} and record["baseline"] == X_T and X_T in set(table["layer"])
    acc = table[table["metric"] == "accuracy"]["value"]
    assert ((acc >= 0) & (acc <= 1)).all()
    mi = table[table["metric"] == "mi_bound"]
    assert (mi["value"] >= 0).all()
    for f, h in record["entropy_bits"].items():
        assert (mi[mi["factor"] == f]["value"] <= h + 1e-6).all()
    assert record["samples"] == 48 and 0 <= record["in_distribution"] <= 1


def test_user_labels_from_csv_on_tiny_sd(tmp_path):
    """A label that is a function of the prompt is readable from the text-conditioned layers at the first step."""
    colours = ["red", "blue"]
    rows = [
        (
            f"a photo of a {colours[i % 2]} {'cube' if i % 3 else 'ball'} number {i}",
            colours[i % 2],
            "cube" if i % 3 else "ball",
        )
        for i in range(48)
    ]
    path = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=["prompt", "colour", "object"]).to_csv(path, index=False)
    prompts, labels, factors, sizes = ab.labels_from_csv(path)
    assert factors == ["colour", "object"] and sizes == [2, 2] and labels.shape == (48, 2)
    table, record = ab.run_probes_csv(
        tiny("sd"), path, layers="*attentions*", steps=[0], num_inference_steps=2, guidance_scale=4.0
    )
    assert record["baseline"] == X_T
    best = table[(table["metric"] == "accuracy") & (table["layer"] != X_T)].groupby("factor")["value"].max()
    assert best["colour"] >= 0.9 and best["object"] >= 0.9
    base = table[(table["metric"] == "accuracy") & (table["layer"] == X_T) & (table["factor"] == "colour")]
    assert base["value"].max() <= 0.85  # the initial noise knows nothing of the prompt
    from layerscope.report.sections.abstractions import order_sentence

    said = order_sentence("tiny:sd", table, record)  # the user's factors, not the Shapes world's: no paper verdict
    assert "colour" in said and "object" in said and "Corallo" not in said and "hue" not in said
    with pytest.raises(ls.ConfigError, match="'prompt' column"):
        bad = tmp_path / "bad.csv"
        bad.write_text("text,colour\na,red\n")
        ab.labels_from_csv(bad)


def test_readable_onsets():
    rows = []
    for step in range(4):
        for layer, acc in (("a", 0.2 + 0.25 * step), ("b", 0.95 if step >= 2 else 0.1), (X_T, 1.0)):
            rows.append({"layer": layer, "step": step, "factor": "f", "metric": "accuracy", "value": acc})
    t = pd.DataFrame(rows)
    exclude = ab.baseline_of({"baseline": X_T})
    assert exclude == (X_T,) and ab.baseline_of({"baseline": None}) == ()
    assert ab.readable_onsets(t, 0.9, exclude=exclude)["f"] == {"step": 2, "layer": "b", "value": 0.95}
    assert ab.readable_onsets(t, 0.99, exclude=exclude)["f"] is None
    assert ab.readable_onsets(t, 0.99)["f"]["layer"] == X_T  # without exclude the baseline counts as a layer


def test_cli_abstractions_errors():
    runner = CliRunner()
    res = runner.invoke(command(), ["abstractions", "tiny:sd"])
    assert res.exit_code == 2 and "--labels" in res.output
    res = runner.invoke(command(), ["abstractions", "zoo:dit", "--n", "3"])
    assert res.exit_code == 2 and "at least 8" in " ".join(res.output.split())  # rich wraps long lines


# -- forking -------------------------------------------------------------------------------------------------------
def _forked_x_t(model, steps, at, **kw):
    cap = ls.Capture(["x_t"], pooled=False, branches=["cond"])
    res = model.generate(
        [kw.pop("prompt", "")] * 3,
        [7] * 3,
        capture=cap,
        fork_at=at,
        fork_seeds=[1, 2, 3],
        max_batch=kw.pop("max_batch", None),
        num_inference_steps=steps,
        eta=1.0,
        **kw,
    )
    return res.capture["x_t"][:, :, 0], res.images


@pytest.mark.parametrize("family", ["zoo:dit", "tiny:sd", "tiny:pixart"])
def test_forks_share_the_trajectory_up_to_tau_and_differ_after(family, dit):
    """zoo:dit (our DDIM loop, forks in one batch), tiny:sd (diffusers, callback_on_step_end), tiny:pixart (legacy
    callback). The tiny models' identical rows in one batch differ by ~1e-5 even without noise (batched float
    arithmetic), so their forks run one per batch: bitwise equality then tests the fork, not the kernels."""
    model = dit if family == "zoo:dit" else tiny(family.split(":")[1])
    kw = (
        {"guidance_scale": 1.0}
        if family == "zoo:dit"
        else {"prompt": "a red cat", "guidance_scale": 4.0, "max_batch": 1}
    )
    for at in (0, 2):
        x, images = _forked_x_t(model, 4, at, **dict(kw))
        for step in range(4):
            same = [torch.equal(x[0, step], x[k, step]) for k in (1, 2)]
            assert same == ([True, True] if step <= at else [False, False]), (family, at, step)
        assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])
    # forks of different starts differ from step 0; the same fork request reproduces bitwise
    again, images2 = _forked_x_t(model, 4, 2, **dict(kw))
    torch.testing.assert_close(again, x, rtol=0, atol=0)
    torch.testing.assert_close(images2, images, rtol=0, atol=0)


def test_fork_per_row_steps_and_batch_independence(dit):
    """fork_at per row, and a row's forked ending does not depend on its batch (only on its seeds)."""
    kw = dict(num_inference_steps=4, guidance_scale=1.0, eta=1.0)
    both = dit.generate([""] * 4, [3, 3, 4, 4], fork_at=[1, 1, 0, 2], fork_seeds=[5, 6, 5, 6], **kw).images
    alone = dit.generate([""], [4], fork_at=2, fork_seeds=[6], **kw).images
    torch.testing.assert_close(alone[0], both[3], rtol=0, atol=1e-4)
    assert (alone[0] - both[2]).abs().max() > 1e-2  # same start, other fork step and seed


def test_no_fork_leaves_generation_unchanged(dit):
    """fork_at=None: deterministic sampling is what the pipeline gives with the old single generator; stochastic
    sampling gives each row its own noise (before, every row drew from one generator seeded by the batch's first)."""
    from layerscope.models.base import seeded_noise

    new = dit.generate([""] * 2, [11, 12], num_inference_steps=3, guidance_scale=1.0).images
    noise = seeded_noise([11, 12], (3, 32, 32), "cpu", torch.float32)
    old = dit.pipe(
        prompt=[""] * 2,
        latents=noise,
        num_inference_steps=3,
        guidance_scale=1.0,
        output_type="latent",
        return_dict=False,
        generator=torch.Generator("cpu").manual_seed(11),
    )[0]
    torch.testing.assert_close(new, (old / 2 + 0.5).clamp(0, 1), rtol=0, atol=0)
    kw = dict(num_inference_steps=3, guidance_scale=1.0, eta=1.0)
    pair = dit.generate([""] * 2, [11, 12], **kw).images
    alone = dit.generate([""], [12], **kw).images
    torch.testing.assert_close(alone[0], pair[1], rtol=0, atol=1e-4)
    assert (pair[0] - pair[1]).abs().max() > 1e-2


def test_fork_errors(dit):
    with pytest.raises(ls.ConfigError, match="deterministic sampler .*eta=0"):
        tiny("sd").generate(["a cat"] * 2, [0, 0], fork_at=1, fork_seeds=[1, 2], num_inference_steps=3)
    with pytest.raises(ls.ConfigError, match="deterministic sampler .*FlowMatch"):
        tiny("sd3").generate(["a cat"] * 2, [0, 0], fork_at=1, fork_seeds=[1, 2], num_inference_steps=3, eta=1.0)
    with pytest.raises(ls.ConfigError, match="fork_at must be a step in 0..2"):
        dit.generate([""] * 2, [0, 0], fork_at=3, fork_seeds=[1, 2], num_inference_steps=3, eta=1.0)
    with pytest.raises(ls.ConfigError, match="both fork_at"):
        dit.generate([""] * 2, [0, 0], fork_at=1, num_inference_steps=3, eta=1.0)
    with pytest.raises(ls.ConfigError, match="one per row"):
        dit.generate([""] * 2, [0, 0], fork_at=1, fork_seeds=[1], num_inference_steps=3, eta=1.0)
    with pytest.raises(ls.ConfigError, match="cannot fork"):
        ls.load("zoo:vae").generate([None] * 2, [0, 0], fork_at=0, fork_seeds=[1, 2])


def test_plugin_entropy():
    assert plugin_entropy([3, 3, 3, 3]) == 0.0
    for k in (2, 3, 4, 8):
        assert plugin_entropy(list(range(k)) * 3) == pytest.approx(np.log2(k))
    assert plugin_entropy([0] * 7 + [1]) == pytest.approx(-(7 / 8 * np.log2(7 / 8) + 1 / 8 * np.log2(1 / 8)))
    assert plugin_entropy(["a", "b"]) == pytest.approx(1.0)


def test_commitment_times_on_a_synthetic_table():
    curves = {
        "early": [2.0, 0.4, 0.1, 0.0],
        "late": [2.0, 1.5, 0.9, 0.2],
        "back": [2.0, 0.3, 0.8, 0.1],
        "never": [2.0, 1.9, 1.8, 1.7],
        "flat": [0.2, 0.1, 0.0, 0.0],
    }
    summary = pd.DataFrame(
        [{"tau": tau, "factor": f, "entropy": h} for f, hs in curves.items() for tau, h in zip((0, 2, 4, 6), hs)]
    )
    assert ab.commitment_times(summary, 0.5) == {"early": 2, "late": 6, "back": 6, "never": None, "flat": 0}
    assert ab.commitment_times(summary, fraction=0.5) == {"early": 2, "late": 4, "back": 2, "never": None, "flat": 2}


def test_fork_entropy_table_and_summary():
    plan = ab.fork_plan(2, 4, [0, 3], seed=5)
    assert len(plan) == 16 and set(plan["seed"]) == {5, 6}
    assert plan[plan["tau"] == 0]["fork_seed"].tolist() == plan[plan["tau"] == 3]["fork_seed"].tolist()
    assert plan["fork_seed"].nunique() == 8
    pred = np.zeros((16, 2), dtype=int)
    pred[:4, 0] = [0, 1, 2, 3]  # tau 0, prompt 0: four values of factor a
    pred[4:8, 0] = [0, 0, 1, 1]  # tau 0, prompt 1
    t = ab.fork_entropy_table(plan, pred, np.ones((16, 2)), ["a", "b"], [4, 2])
    row = t[(t["tau"] == 0) & (t["prompt"] == 0) & (t["factor"] == "a")].iloc[0]
    assert row["entropy"] == pytest.approx(2.0) and row["normalised"] == pytest.approx(1.0) and row["distinct"] == 4
    assert (t[t["factor"] == "b"]["entropy"] == 0).all() and (t[t["tau"] == 3]["entropy"] == 0).all()
    s = ab.entropy_summary(t)
    a0 = s[(s["tau"] == 0) & (s["factor"] == "a")].iloc[0]
    assert a0["entropy"] == pytest.approx(1.5) and a0["low"] <= 1.5 <= a0["high"] and a0["prompts"] == 2


def test_run_forking_on_the_zoo(dit):
    """The last DDIM step of the zoo draws no noise (alpha_prev = 1): forks at the last step end identically."""
    table, record = ab.run_forking(dit, n_prompts=3, n_forks=3, taus=[0, 2], num_inference_steps=3)
    assert len(table) == 2 * 3 * 6 and set(table["tau"]) == {0, 2}
    assert ((table["entropy"] >= 0) & (table["entropy"] <= np.log2(3) + 1e-9)).all()
    assert (table[table["tau"] == 2]["entropy"] == 0).all()
    assert record["generations"] == 18 and record["settings"]["eta"] == 1.0
    assert record["settings"]["sampler"] is not None
    assert record["settings"]["sampler"] == dit.capabilities.sampler
    assert set(record["commitment"]) == set(table["factor"])
    assert all(v in (0, 2) for v in record["commitment"].values())  # entropy 0 at tau 2: committed by then


def test_cli_abstractions_forking(tmp_path):
    runner = CliRunner()
    out = tmp_path / "forks"
    res = runner.invoke(
        command(),
        [
            "abstractions",
            "zoo:dit",
            "--no-probes",
            "--forks",
            "2",
            "--fork-prompts",
            "2",
            "--taus",
            "0,1",
            "--steps",
            "2",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "order of commitment" in res.output and not (out / ab.TABLE).exists()
    table = pd.read_parquet(out / ab.FORK_TABLE)
    saved = Result.load(out)
    assert set(saved.tables) == {"forks"} and saved.record["settings"]["forks"] == 2 and "probes" not in saved.record
    assert len(table) == 2 * 2 * 6 and (out / "forking.png").stat().st_size > 0
    assert (table[table["tau"] == 1]["entropy"] == 0).all()  # the last DDIM step draws no noise
    for args, msg in (
        (["zoo:dit", "--no-probes"], "needs --forks"),
        (["tiny:sd", "--forks", "2"], "zoo model"),
        (["zoo:dit", "--no-probes", "--forks", "2", "--taus", "a,b"], "comma-separated"),
    ):
        res = runner.invoke(command(), ["abstractions", *args])
        assert res.exit_code == 2 and msg in " ".join(res.output.split()), res.output  # rich wraps long lines


# -- the experiment's shape: Settings -> run -> Result, main job, section ---------------------------------------------
SMALL = ab.Settings(n=16, steps=3, layers=("transformer_blocks.*",), forks=2, fork_prompts=2, taus=(0, 1))


@pytest.fixture(scope="module")
def small(dit):
    return ab.run(dit, SMALL)


def test_run_is_the_probe_grid_then_forking_and_round_trips(dit, small, tmp_path):
    """run() makes the same calls as the functions it wraps (bitwise-equal tables and parquet files), and its Result
    saves as probes.parquet / forks.parquet and loads back identical."""
    assert set(small.tables) == {"probes", "forks"} and small.experiment == ab.NAME == "abstractions"
    assert {"model", "settings", "probes", "forking"} <= set(small.record)
    assert small.record["model"] == "zoo:dit" and small.record["settings"]["taus"] == [0, 1]
    table, record = ab.run_probes(dit, n=16, layers=["transformer_blocks.*"], num_inference_steps=3)
    ftable, frecord = ab.run_forking(dit, 2, 2, [0, 1], num_inference_steps=3)
    pd.testing.assert_frame_equal(small["probes"], table, check_exact=True)
    pd.testing.assert_frame_equal(small["forks"], ftable, check_exact=True)
    assert small.record["probes"]["baseline"] == record["baseline"] == X_T
    assert small.record["forking"]["commitment"] == frecord["commitment"]
    folder = small.save(tmp_path / "saved")
    direct = tmp_path / "direct"
    direct.mkdir()
    table.to_parquet(direct / ab.TABLE, index=False)
    ftable.to_parquet(direct / ab.FORK_TABLE, index=False)
    for name in (ab.TABLE, ab.FORK_TABLE):
        assert (folder / name).read_bytes() == (direct / name).read_bytes(), name
    back = Result.load(folder)
    assert back.experiment == "abstractions" and set(back.tables) == set(small.tables)
    for name, t in small.tables.items():
        pd.testing.assert_frame_equal(back[name], t, check_exact=True)
    assert back.record["settings"] == small.record["settings"]
    assert back.record["probes"]["chance"] == small.record["probes"]["chance"]
    assert back.record["forking"]["taus"] == small.record["forking"]["taus"]


def test_settings_errors_come_before_any_generation(dit, monkeypatch):
    """Forking and oracle labels are decided from capabilities (the Shapes oracle), never from the spec string, and
    every settings error is raised before a single generation."""
    sd = tiny("sd")

    def no_generation(self, *a, **k):
        raise AssertionError("generated before the settings were checked")

    monkeypatch.setattr(ls.Generator, "generate", no_generation)
    assert sd.capabilities.oracle != "shapes"
    with pytest.raises(ls.ConfigError, match="Shapes oracle.*zoo model"):
        ab.run(sd, ab.Settings(probes=False, forks=2))
    with pytest.raises(ls.ConfigError, match="--labels"):
        ab.run(sd, ab.Settings())
    for st, msg in (
        (ab.Settings(probes=False), "nothing to do"),
        (ab.Settings(n=3), "at least 8"),
        (ab.Settings(probes=False, forks=1), "2 forks"),
        (ab.Settings(probes=False, forks=2, steps=3, taus=(0, 3)), r"in 0\.\.2"),
        (ab.Settings(labels="/nonexistent/labels.csv"), "does not exist"),
    ):
        with pytest.raises(ls.ConfigError, match=msg):
            ab.run(dit, st)
    # a model the Shapes oracle reads passes the checks whatever its spec says (and reaches generation)
    renamed = copy.copy(dit)
    renamed.spec = "hf:/somewhere/else"
    with pytest.raises(AssertionError, match="generated before"):
        ab.run(renamed, ab.Settings(probes=False, forks=2, steps=3, fork_prompts=1))


def test_main_job_is_the_old_sections_settings():
    """The probe grid then forking on zoo:unet and zoo:dit, and on zoo:ldm at the layers and 6 steps of its injection
    study (fewer starts: the 10-minute budget)."""
    for quick, (n, steps, prompts, forks, taus) in (
        (False, (320, 10, 6, 8, tuple(range(9)))),
        (True, (64, 4, 3, 4, (0, 1, 2))),
    ):
        jobs = ab.main_job(quick)
        assert [j.spec for j in jobs] == ["zoo:unet", "zoo:dit", "zoo:ldm"]
        assert [j.folder_name() for j in jobs] == ["zoo_unet", "zoo_dit", "zoo_ldm"]
        want = ab.Settings(n=n, steps=steps, fork_prompts=prompts, forks=forks, taus=taus)
        assert jobs[0].settings == jobs[1].settings == want
        ldm = want if quick else ab.Settings(n=320, steps=6, fork_prompts=6, forks=8, taus=tuple(range(5)))
        assert jobs[2].settings == dataclasses.replace(ldm, layers=ab.LDM_LAYERS)
    assert "mid_block" in ab.LDM_LAYERS and not any(n.startswith(("skip.", "noise")) for n in ab.LDM_LAYERS)


def test_section_renders_from_saved_results(small, tmp_path):
    """figures, console and render read the saved Result only (the CLI's files, the page's commands)."""
    from layerscope.experiments.base import settings_dict
    from layerscope.report import SectionRun
    from layerscope.report.html import Page
    from layerscope.report.sections import abstractions as section

    assert section.EXPERIMENT is ab and section.KEY == "abstractions"
    folder = tmp_path / "abstractions"
    small.save(folder / "zoo_dit")
    figs = section.figures(Result.load(folder / "zoo_dit"), folder / "zoo_dit")
    assert set(figs) == {"accuracy.png", "mi_bound.png", "heatmap.png", "forking.png"}
    items = section.console(small)
    titles = [i[0] for i in items if isinstance(i, tuple)]
    assert titles == [
        "zoo:dit: when each factor becomes linearly readable",
        "zoo:dit: when the generation commits to each factor (forking entropy)",
    ]
    texts = [i for i in items if isinstance(i, str)]
    assert "order in which" in texts[0] and "order of commitment" in texts[1] and "Probe-readable order" in texts[1]
    job = {"spec": "zoo:dit", "folder": "zoo_dit", "part": "model", "settings": settings_dict(SMALL)}
    html = section.render(SectionRun("abstractions", folder, {"jobs": [job]}), Page(tmp_path))
    assert html.count("<img ") == 4 and "<h3>zoo:dit</h3>" in html
    # the probe grid's layers are part of the command (the page escapes the quotes)
    assert (
        "layerscope abstractions zoo:dit --n 16 --steps 3 -l &#x27;transformer_blocks.*&#x27; --out probes-zoo_dit"
        in html
    )
    assert (
        "layerscope abstractions zoo:dit --no-probes --forks 2 --fork-prompts 2 --taus 0,1 --steps 3 "
        "--out forks-zoo_dit"
    ) in html
    assert "probe half-way step" in html
