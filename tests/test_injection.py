"""The injection experiment: sanity anchors on the zoo, oracle scores, resume per cell, labels, open-domain scores."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CountRuns, tiny

import layerscope as ls
from layerscope.experiments import injection as inj
from layerscope.experiments.base import Result

STEPS = dict(num_inference_steps=4)


@pytest.fixture(scope="module")
def dit():
    return ls.load("zoo:dit")


@pytest.fixture(scope="module")
def pairs():
    return inj.shapes_pairs(2, seed=0)


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_sanity_no_layer_gives_o_every_layer_gives_e(name, pairs):
    model = ls.load(f"zoo:{name}")
    s = inj.sanity(model, pairs[0], seed=3, **STEPS)
    assert s["no_layer_vs_O"] == 0.0  # against a plain batch of the sweep's layout: the same arithmetic, bitwise
    assert s["every_layer_vs_E"] < 1e-5
    assert s["O_vs_E"] > 0.3  # the pair really differs


def test_shapes_pairs_differ_in_every_factor():
    from layerscope.world.text import factors_from_prompt

    for o, e in inj.shapes_pairs(6, seed=4):
        assert (factors_from_prompt(o) != factors_from_prompt(e)).all()


def test_partial_pairs_name_the_same_factors_with_different_values():
    from layerscope.world.text import factors_from_partial

    counts = set()
    for o, e in inj.shapes_pairs(40, seed=4, named=(2, 3)):
        fo, fe = factors_from_partial(o), factors_from_partial(e)
        named = fo >= 0
        assert np.array_equal(named, fe >= 0) and (fo[named] != fe[named]).all()
        counts.add(int(named.sum()))
    assert counts == {2, 3}
    with pytest.raises(ls.ConfigError, match="min <= max"):
        inj.shapes_pairs(2, named=(3, 2))


def test_protocol_with_partial_prompts_and_other_seeds(dit, tmp_path):
    """Protocol (b): partial prompts, E on its own seed; the noise decides what the prompts leave open."""
    st = inj.Settings(
        random_pairs=2,
        named=(2, 3),
        seeds=(0, 1),
        e_seeds=(100, 101),
        layers=("transformer_blocks.0", "noise"),
        steps=3,
        sanity=True,
    )
    result = inj.run(dit, st, out=tmp_path / "b")
    table = result["injection"]
    assert set(zip(table["seed"], table["e_seed"])) == {(0, 100), (1, 101)}
    assert sorted(p.name for p in (tmp_path / "b" / "cells").glob("pair000_*.json")) == [
        "pair000_seed0-100_all.json",
        "pair000_seed1-101_all.json",
    ]
    assert result.record["sanity"]["every_layer_vs_E"] < 1e-5  # E from its own seed, rebuilt from every layer
    assert set(table["value"].dropna().unique()) <= {0.0, 1.0} and table["value"].notna().any()
    imgs, rows = inj.load_images(tmp_path / "b", 0, 0, "all", e_seed=100)
    assert rows[:2] == ["O", "E"] and imgs.shape[0] == 4
    with pytest.raises(ls.ConfigError, match="one E seed per seed"):
        inj.run(dit, inj.Settings(random_pairs=1, seeds=(0, 1), e_seeds=(5,), steps=2))
    with pytest.raises(ls.ConfigError, match="give random_pairs too"):
        inj.run(dit, inj.Settings(pairs=(("a red cube", "a blue ball"),), named=(2, 3), steps=2))


def test_oracle_table_and_summary(dit, pairs, tmp_path):
    layers = ("transformer_blocks.0", "transformer_blocks.5", "text_embeds", "noise")
    result = inj.run(dit, inj.Settings(pairs=tuple(pairs), layers=layers, windows=("all", "late"), steps=4))
    table = result["injection"]
    assert set(table.columns) >= {
        "model",
        "pair",
        "seed",
        "window",
        "layer",
        "layer_index",
        "stage",
        "factor",
        "metric",
        "value",
        "o_value",
        "e_value",
        "c_value",
    }
    assert len(table) == 2 * 2 * len(layers) * 6 * 2  # pairs x windows x layers x factors x (transfer, keep)
    assert set(table["value"].dropna().unique()) <= {0.0, 1.0}
    # transfer is E's reading, keep is O's, never both where they differ
    t = table.pivot_table(index=["pair", "window", "layer", "factor"], columns="metric", values="value")
    assert ((t["transfer"] + t["keep"]).dropna() <= 1).all()
    # a text-conditioned model follows its prompt: E's text embeddings at every step carry every factor over
    te = table[(table["layer"] == "text_embeds") & (table["window"] == "all") & (table["metric"] == "transfer")]
    assert te["value"].mean() >= 0.8
    summary = result["summary"]
    pd.testing.assert_frame_equal(summary, inj.summarize(table))
    grp = summary[(summary["level"] == "group") & (summary["metric"] == "transfer")]
    assert set(grp["target"]) == {"structure", "content", "surface"}
    ok = grp.dropna(subset=["ci_low"])
    assert ((ok["ci_low"] <= ok["estimate"] + 1e-9) & (ok["estimate"] <= ok["ci_high"] + 1e-9)).all()
    labels = result["labels"]
    assert set(labels["label"]) <= set(inj.LABELS)
    assert labels.set_index(["window", "layer"]).loc[("all", "text_embeds"), "label"] == "mixed"  # moves everything
    # one persistence convention: the Result saves and loads back whole, with its record
    back = Result.load(result.save(tmp_path / "saved"))
    assert back.experiment == "injection" and list(back.tables) == ["injection", "summary", "labels"]
    for name in result.tables:
        pd.testing.assert_frame_equal(back[name], result[name])
    assert back.record["plan"]["layer_sets"] == [[name] for name in layers]
    assert back.record["settings"]["windows"] == ["all", "late"]


def test_resume_per_cell_and_refuse_other_settings(dit, pairs, tmp_path, monkeypatch):
    kw = dict(layers=["transformer_blocks.2", "text_eos"], windows=("all", "early"), **STEPS)
    fresh = inj.run_injection(dit, pairs, **kw)
    calls = {"n": 0}
    real = inj.injection_sweep

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # interrupted during the third of four cells
        return real(*a, **k)

    monkeypatch.setattr(inj, "injection_sweep", flaky)
    with pytest.raises(KeyboardInterrupt):
        inj.run_injection(dit, pairs, out=tmp_path, **kw)
    monkeypatch.setattr(inj, "injection_sweep", real)
    assert len(list((tmp_path / "cells").glob("*.parquet"))) == 2
    with CountRuns(dit) as runs:
        resumed = inj.run_injection(dit, pairs, out=tmp_path, **kw)
    assert len(runs.calls) == 2  # only the two unfinished cells were generated
    key = ["window", "pair", "seed", "layer", "factor", "metric"]
    a = fresh.sort_values(key, ignore_index=True)
    b = resumed.sort_values(key, ignore_index=True)
    pd.testing.assert_frame_equal(a, b)
    assert (tmp_path / inj.TABLE).exists()
    imgs, rows = inj.load_images(tmp_path, 1, 0, "early")
    assert imgs.dtype == np.uint8 and imgs.shape[0] == 4 and rows[:2] == ["O", "E"]
    with pytest.raises(ls.StoreMismatchError, match="other settings"):
        inj.run_injection(dit, pairs, out=tmp_path, layers=["transformer_blocks.3"], windows=("all",), **STEPS)


def test_bad_inputs_fail_before_generation(dit, pairs):
    sd = tiny("sd")
    with CountRuns(dit) as runs, CountRuns(sd) as sd_runs:
        with pytest.raises(ls.ConfigError, match="open-domain"):  # Shapes prompts for a model no oracle reads
            inj.run(sd, inj.Settings(random_pairs=2, steps=2))
        with pytest.raises(ls.ConfigError, match="at least one"):
            inj.run(dit, inj.Settings(steps=2))
        with pytest.raises(ls.ConfigError, match="spaces=True"):
            inj.run(dit, inj.Settings(random_pairs=1, layers=("noise",), spaces=True, steps=2))
        with pytest.raises(ls.ConfigError, match="valid windows"):
            inj.run_injection(dit, pairs, windows=("sometimes",), **STEPS)
        with pytest.raises(ls.ConfigError, match="CFG branch"):
            inj.run_injection(dit, pairs, branches=["both"], **STEPS)
        with pytest.raises(ls.LayerNameError, match="closest"):
            inj.run_injection(dit, pairs, layers=["transformer_block.9"], **STEPS)
        with pytest.raises(ls.ConfigError, match="pair"):
            inj.run_injection(dit, [], **STEPS)
        with pytest.raises(ls.ConfigError, match="valid: ssim"):
            inj.run_injection(dit, pairs, scorer="images", metrics=["psnr"], **STEPS)
    assert runs.calls == [] and sd_runs.calls == []


def test_label_rule():
    assert inj.label({"structure": 0.1, "content": 0.05, "surface": 0.0}) == "inert"
    assert inj.label({"structure": 0.9, "content": 0.2, "surface": 0.1}) == "structure"
    assert inj.label({"structure": 0.3, "content": 0.05, "surface": 0.0}) == "structure"
    assert inj.label({"structure": 0.1, "content": 0.9, "surface": 0.75}) == "mixed"
    assert inj.label({"structure": 1.0, "content": 1.0, "surface": 1.0}) == "mixed"
    assert inj.label({"structure": 0.0, "content": float("nan"), "surface": 0.7}) == "surface"
    assert inj.label({}) == "inert"


def test_open_domain_scores_on_tiny_sd(tmp_path):
    sd = tiny("sd")
    notes = []
    table = inj.run_injection(
        sd,
        [("a red cube", "a blue ball")],
        layers=["up_blocks.1", "mid_block"],
        metrics=["ssim", "hist", "clip"],
        notify=notes.append,
        num_inference_steps=3,
        guidance_scale=4.0,
    )
    assert notes and "CLIP" in notes[0]  # no local checkpoint: skipped with a notice
    assert set(table["metric"]) == {f"{m}_{s}" for m in ("ssim", "hist") for s in ("to_E", "to_O", "baseline")}
    assert (table["value"] >= 0).all() and table["factor"].isna().all()
    summary = inj.summarize(table)
    assert set(summary["level"]) == {"metric"}
    labels = inj.specialize(summary)
    assert list(labels["layer"]) == ["up_blocks.1", "mid_block"]
    # full injection of E closes the whole O-to-E gap: the normalised score of the rule is 1
    every = tuple(sd.layer_map().names())
    full = inj.run_injection(
        sd,
        [("a red cube", "a blue ball")],
        layers=[every],
        metrics=["ssim", "hist"],
        num_inference_steps=3,
        guidance_scale=4.0,
    )
    lab = inj.specialize(inj.summarize(full))
    assert lab["transfer_structure"].iloc[0] == pytest.approx(1.0, abs=1e-3)
    assert lab["transfer_surface"].iloc[0] == pytest.approx(1.0, abs=1e-3)


def test_injection_rows_match_engine_sweep(dit, pairs):
    """The experiment scores exactly the images the engine's batched sweep makes."""
    from layerscope.world.oracle import read

    res = ls.injection_sweep(dit, *pairs[1], ["transformer_blocks.1"], seeds=(0, 0), **STEPS)
    table = inj.run_injection(dit, pairs[1:], layers=["transformer_blocks.1"], **STEPS)
    pred = read(torch.stack([res.injected["transformer_blocks.1"]])).pred[0]
    got = table[table["metric"] == "transfer"].sort_values(
        "factor",
        key=lambda c: c.map(
            {f: i for i, f in enumerate(["floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation"])}
        ),
    )
    assert list(got["c_value"]) == list(pred)


def test_default_layers_skip_the_denoiser_input_and_layer_aliases():
    """Decided from metadata: x_t (role denoiser_input) and h_space (the mid-block's own site) are left out."""
    sd = tiny("sd")
    names = inj.default_layers(sd, spaces=True)
    lmap = sd.layer_map()
    assert names[: len(lmap.layers)] == [e.name for e in lmap.layers]
    spaces = names[len(lmap.layers) :]
    assert "x_t" not in spaces and "h_space" not in spaces
    assert {"noise", "text_embeds", "text_eos", "vae_latent"} <= set(spaces)
    assert any(s.startswith("skip.") for s in spaces)
    assert inj.default_layers(sd, spaces=False) == [e.name for e in lmap.layers]


@pytest.mark.parametrize(
    "st",
    [
        inj.FULL,
        inj.Settings(
            random_pairs=4,
            named=(2, 3),
            seeds=(0, 1),
            e_seeds=(7, 8),
            seed_per_pair=True,
            layers=("mid_block", "up_*"),
            steps=6,
            generation={"height": 48, "width": 40},
        ),
    ],
)
def test_report_sweep_command_reproduces_the_settings(st):
    """The command the report prints parses into the same study settings."""
    import shlex

    from layerscope.cli import command
    from layerscope.experiments.base import settings_dict
    from layerscope.report.sections.injection import sweep_command

    args = shlex.split(sweep_command("zoo:dit", settings_dict(st), "out"))[2:]
    ctx = command().commands["sweep"].make_context("sweep", args)
    p = ctx.params
    assert p["model"] == "zoo:dit" and p["random_pairs"] == st.random_pairs and p["steps"] == st.steps
    assert p["windows"] == ",".join(st.windows) and p["spaces"] == st.spaces
    assert p["named"] == (f"{st.named[0]}-{st.named[1]}" if st.named else None)
    assert p["seeds"] == ",".join(map(str, st.seeds)) or st.seeds == (0,)
    assert p["e_seeds"] == (",".join(map(str, st.e_seeds)) if st.e_seeds else None)
    assert p["seed_per_pair"] == st.seed_per_pair
    assert tuple(p["layers"] or ()) == tuple(st.layers or ())
    assert (p["height"], p["width"]) == (st.generation.get("height"), st.generation.get("width"))


def _fake_table(values: dict[str, float], pairs: int = 40, seed: int = 0) -> pd.DataFrame:
    """An oracle table where each layer moves every factor in a share ``values[layer]`` of the pairs."""
    from layerscope.world.factors import FACTORS

    rng = np.random.default_rng(seed)
    recs = []
    for i, (layer, share) in enumerate(values.items()):
        for p in range(pairs):
            moved = rng.random(len(FACTORS)) < share
            for f, factor in enumerate(FACTORS):
                for metric, v in (("transfer", moved[f]), ("keep", not moved[f])):
                    recs.append(
                        dict(
                            model="m",
                            pair=p,
                            seed=0,
                            e_seed=0,
                            window="all",
                            layer=layer,
                            layer_index=i,
                            stage="decoder",
                            factor=factor,
                            metric=metric,
                            value=float(v),
                            o_value=0,
                            e_value=1,
                            c_value=int(moved[f]),
                        )
                    )
    return pd.DataFrame.from_records(recs)


def test_anchors_and_ci_check():
    table = _fake_table(
        {"down_blocks.0": 0.0, "mid_block": 0.5, "up_blocks.1.resnets.1": 1.0, "skip.up_blocks.1.resnets.2": 0.3}
    )
    summary = inj.summarize(table)
    labels = inj.specialize(summary)
    a = inj.anchors(summary, labels)
    assert list(a["layer"]) == ["mid_block", "skip.up_blocks.1.resnets.2", "up_blocks.1.resnets.1"]
    assert a.set_index("layer").at["up_blocks.1.resnets.1", "structure"] == (1.0, 1.0, 1.0)
    assert "PnP" in a.set_index("layer").at["up_blocks.1.resnets.1", "source"]
    ci = inj.ci_check(summary)
    mid = summary[(summary["level"] == "group") & (summary["metric"] == "transfer")]
    mid = mid[(mid["estimate"] >= 0.2) & (mid["estimate"] <= 0.8)]
    assert ci["shares_in_range"] == len(mid) > 0 and ci["pairs"] == 40
    assert ci["max_half_width"] == pytest.approx(((mid["ci_high"] - mid["ci_low"]) / 2).max())
    assert ci["within"] == (ci["max_half_width"] <= inj.CI_HALF_WIDTH)
    few = inj.ci_check(inj.summarize(_fake_table({"mid_block": 0.5}, pairs=8)))
    assert few["max_half_width"] > inj.CI_HALF_WIDTH and not few["within"]  # 8 pairs are too few
    from layerscope.report.sections.injection import anchors_table

    res = Result("injection", {"summary": summary, "labels": labels}, {"model": "zoo:ldm"})
    side = anchors_table([({"settings": {"named": [2, 3]}}, res), ({"settings": {}}, res)])
    assert list(side.columns[-2:]) == ["zoo:ldm (partial prompts)", "zoo:ldm (full prompts)"]
    assert side.iloc[2, -1] == "mixed: stru 1.00 [1.00, 1.00]; cont 1.00 [1.00, 1.00]; surf 1.00 [1.00, 1.00]"


def test_main_job_runs_both_protocols_on_zoo_ldm_at_its_layers():
    """zoo:ldm runs under protocol (a) (full prompts, a shared seed) and (b) (partial prompts, other seeds); every layer
    it injects at is a site of the shipped model, the anchors' layers among them."""
    for quick in (False, True):
        jobs = inj.main_job(quick)
        assert [j.folder_name() for j in jobs] == ["zoo_unet", "zoo_dit", "zoo_ldm_full", "zoo_ldm_partial"]
        full, partial = (j.settings for j in jobs[2:])
        assert full.named is None and not full.seed_per_pair and full.layers == partial.layers == inj.LDM_LAYERS
        assert partial.named == (2, 3) and partial.seed_per_pair and partial.e_seeds != partial.seeds
        assert full.sanity and partial.sanity
    unet, dit = (j.settings for j in inj.main_job(False)[:2])
    assert unet.random_pairs == dit.random_pairs == 48  # a share in [0.2, 0.8] gets a CI half-width <= 0.15
    assert unet.windows == ("all",) and dit.windows == ("all", "late")
    import fnmatch

    names = set(ls.load("zoo:ldm").layer_map().names())
    assert set(inj.LDM_LAYERS) - {"noise", "text_embeds"} <= names
    for glob, _, _ in inj.SD14_ANCHORS:  # the study covers every anchor
        assert fnmatch.filter(inj.LDM_LAYERS, glob), glob


def test_with_pooled_injects_the_pooled_text_with_every_block():
    """SD3/Flux/SDXL: a block alone leaves O's pooled text in every later block; with_pooled adds text_pooled to each
    layer set (decided from the map's pooled_condition role), and a model without one refuses it."""
    sd3 = tiny("sd3")
    last = [e.name for e in sd3.layer_map().layers][-1]
    plan = inj.plan_injection(sd3, [("a cat", "a dog")], layers=[last, "text_pooled"], with_pooled=True, **STEPS)
    assert plan.layer_sets == [[last, "text_pooled"], ["text_pooled"]]
    kw = dict(layers=[last], metrics=["ssim"], **STEPS)
    alone = inj.run_injection(sd3, [("a cat", "a dog")], **kw)
    both = inj.run_injection(sd3, [("a cat", "a dog")], with_pooled=True, **kw)
    assert set(both["layer"]) == {f"{last}+text_pooled"}
    to_e = lambda t: t[t["metric"] == "ssim_to_E"]["value"].mean()  # noqa: E731
    assert to_e(both) >= to_e(alone) - 1e-6  # E's pooled text too: at least as close to E
    with pytest.raises(ls.ConfigError, match="no pooled text condition"):
        inj.plan_injection(tiny("sd"), [("a cat", "a dog")], with_pooled=True, **STEPS)
