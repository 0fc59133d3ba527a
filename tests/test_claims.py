"""The claims of injection, properties and abstractions re-derived from saved Results at every specification, and
the claims section / ``layerscope claims`` built from a small saved report folder."""

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import layerscope as ls
from layerscope.cli import command
from layerscope.errors import ConfigError
from layerscope.experiments import abstractions as ab
from layerscope.experiments import abstractions_claims as abc
from layerscope.experiments import injection as inj
from layerscope.experiments import injection_claims as ic
from layerscope.experiments import properties as pr
from layerscope.experiments import properties_claims as pc
from layerscope.experiments.base import Result, settings_dict
from layerscope.stats import speccurve as sc

INJ = inj.Settings(
    random_pairs=4,
    layers=("transformer_blocks.0", "transformer_blocks.2", "transformer_blocks.5", "noise", "text_embeds"),
    windows=("all", "late"),
    steps=3,
)
PROPS_GAN = pr.Settings(n=8, pairs=2, n_boot=50)
PROPS_DIT = pr.Settings(spaces=("noise", "transformer_blocks.5"), n=4, pairs=2, steps=2, n_boot=50)
ABS = ab.Settings(n=16, steps=3, layers=("transformer_blocks.*",), forks=2, fork_prompts=2, taus=(0, 1))


@pytest.fixture(scope="module")
def dit():
    return ls.load("zoo:dit")


@pytest.fixture(scope="module")
def injection(dit):
    return inj.run(dit, INJ)


@pytest.fixture(scope="module")
def props(dit):
    return {"zoo:gan": pr.run(ls.load("zoo:gan"), PROPS_GAN), "zoo:dit": pr.run(dit, PROPS_DIT)}


@pytest.fixture(scope="module")
def abstractions(dit):
    return ab.run(dit, ABS)


def rows_at(curve: pd.DataFrame, claim: str, **choices) -> pd.DataFrame:
    return curve[(curve["claim"] == claim) & curve["spec"].map(lambda s: sc.matches(s, choices))]


# -- injection ----------------------------------------------------------------------------------------------------


def test_injection_curve_covers_every_choice_once(injection):
    curve = ic.claims_curve(injection)
    split = curve[curve["claim"] == "injection.roles_split"]
    n = len(ic.INERT_LEVELS) * len(ic.MARGIN_LEVELS) * len(ic.MEASURES) * len(ic.PAIR_SUBSETS) * 2  # 2 windows
    assert len(split) == n * len(ic.SETS)
    assert len(curve[curve["claim"] == "injection.roles_order"]) == n * len(ic.POSITIONS)
    assert set(curve["subject"]) == {"zoo:dit"} and set(curve["control"]) == {""}
    assert all(sc.parse_spec(s)["protocol"] == "full" and sc.parse_spec(s)["scorer"] == "oracle" for s in curve["spec"])
    assert set(split["value"]) <= {0.0, 1.0, 2.0, 3.0}
    assert (split["verdict"] == np.where(split["value"] == 3, "supports", "contradicts")).all()


def test_the_shipped_specification_gives_the_experiments_own_labels(injection):
    """At inert = margin = 0.2, transfer, every pair, the labels are those of injection.specialize, per window, and
    the split claim's verdict is what those labels say."""
    labels = injection["labels"]
    for window in ("all", "late"):
        obs, layers, arr = ic._observations(injection["injection"], window, "transfer")
        scores = ic._weighted_means(arr, np.ones((1, len(obs))))[0]
        codes = ic.label_codes(scores, inj.INERT_BELOW, inj.MARGIN)
        mine = dict(zip(layers, (ic.CODE_NAMES[c] for c in codes)))
        theirs = labels[labels["window"] == window].set_index("layer")["label"].to_dict()
        assert mine == theirs
        found = {lab for lab in theirs.values() if lab in ic.ROLES}
        row = rows_at(
            ic.claims_curve(injection),
            "injection.roles_split",
            **{**ic.SHIPPED["injection.roles_split"], "window": window},
        )
        assert len(row) == 1 and row["value"].iloc[0] == len(found)
        assert row["verdict"].iloc[0] == ("supports" if len(found) == 3 else "contradicts")


def test_label_codes_match_the_experiments_rule_on_random_scores():
    rng = np.random.default_rng(1)
    scores = rng.random((500, 3))
    scores[rng.random((500, 3)) < 0.2] = np.nan
    codes = ic.label_codes(scores, inj.INERT_BELOW, inj.MARGIN)
    for s, c in zip(scores, codes):
        assert ic.CODE_NAMES[c] == inj.label(dict(zip(ic.ROLES, s)))


def test_raising_a_threshold_never_adds_labels():
    rng = np.random.default_rng(2)
    scores = rng.random((300, 3))
    for fixed, key in ((0.2, "inert"), (0.2, "margin")):
        prev = None
        for level in sorted(ic.INERT_LEVELS if key == "inert" else ic.MARGIN_LEVELS):
            inert, margin = (level, fixed) if key == "inert" else (fixed, level)
            codes = ic.label_codes(scores, inert, margin)
            kept = set(np.flatnonzero(codes != 4)) if key == "inert" else set(np.flatnonzero(codes < 3))
            if prev is not None:
                assert kept <= prev  # layers only ever become inert (or mixed): none gains a label
            prev = kept


def test_roles_found_never_grow_with_a_threshold(injection):
    curve = ic.claims_curve(injection)
    split = curve[curve["claim"] == "injection.roles_split"].copy()
    specs = split["spec"].map(sc.parse_spec)
    for key in ("inert", "margin"):
        others = specs.map(lambda s, k=key: tuple(sorted((n, v) for n, v in s.items() if n != k)))
        level = specs.map(lambda s, k=key: float(s[k]))
        for _, sub in split.assign(_o=others, _l=level).groupby("_o"):
            vals = sub.sort_values("_l")["value"].to_numpy()
            assert (np.diff(vals) <= 0).all()


def test_the_order_claim_follows_the_layout(injection):
    assert ic.layout(injection) == "other"  # no down_blocks.3 etc.: the majority order (content first) is expected
    fake = Result("injection", dict(injection.tables), json.loads(json.dumps(injection.record)))
    fake.record["layer_info"] = {p.replace("*", "0"): {"is_space": False} for p, _, _ in inj.SD14_ANCHORS}
    assert ic.layout(fake) == "sd14"
    assert ic._order_verdict(0.3, "surface first") == "supports" == ic._order_verdict(-0.3, "content first")
    assert ic._order_verdict(0.3, "content first") == "contradicts"
    assert ic._order_verdict(float("nan"), "content first") == "undecided"
    order = ic.claims_curve(injection)
    order = order[order["claim"] == "injection.roles_order"]
    assert order["statistic"].str.contains("content first expected").all()
    assert (order["verdict"][order["value"].isna()] == "undecided").all()


def test_the_shipped_statistic_has_a_bootstrap_interval(injection):
    curve = ic.claims_curve(injection)
    shipped = rows_at(curve, "injection.roles_split", **ic.SHIPPED["injection.roles_split"])
    assert len(shipped) == 1
    lo, hi = shipped[["ci_low", "ci_high"]].iloc[0]
    assert 0 <= lo <= hi <= 3
    others = curve[(curve["claim"] == "injection.roles_split") & ~curve.index.isin(shipped.index)]
    assert others["ci_low"].isna().all()


def test_a_partial_protocol_result_is_labelled_partial(dit):
    st = inj.Settings(
        random_pairs=2, named=(2, 3), seeds=(0,), e_seeds=(1000,), seed_per_pair=True, layers=("transformer_blocks.5",),
        steps=2,
    )  # fmt: skip
    curve = ic.claims_curve(inj.run(dit, st))
    assert {sc.parse_spec(s)["protocol"] for s in curve["spec"]} == {"partial"}
    # two pairs split into halves of one pair each
    assert {sc.parse_spec(s)["pairs"] for s in curve["spec"]} == {"all", "half1", "half2"}


def test_an_image_scored_sweep_gives_the_experiments_own_labels_too():
    """Open domain (tiny:sd, SSIM and histogram): at the shipped thresholds the labels are specialize's."""
    from conftest import tiny

    st = inj.Settings(
        pairs=(("a red cube", "a blue ball"), ("a green cone", "a big house")), layers=("up_blocks.1", "mid_block"),
        metrics=("ssim", "hist"), steps=2, guidance=4.0,
    )  # fmt: skip
    result = inj.run(tiny("sd"), st)
    assert result.record["plan"]["scorer"] == "images"
    curve = ic.claims_curve(result)
    assert {sc.parse_spec(s)["measure"] for s in curve["spec"]} == {"transfer"}
    assert {sc.parse_spec(s)["scorer"] for s in curve["spec"]} == {"images"}
    scores = ic._image_scores(result["injection"], "all", np.ones(2), [(0, 0), (1, 0)])
    codes = ic.label_codes(scores, inj.INERT_BELOW, inj.MARGIN)
    assert [ic.CODE_NAMES[c] for c in codes] == list(result["labels"]["label"])


# -- properties -----------------------------------------------------------------------------------------------------


def test_properties_curve_shipped_verdict_is_the_scorecards(props):
    for spec, result in props.items():
        curve = pc.claims_curve(result)
        claim = pc.claim_of(result)
        assert claim == ("properties.latent_all_four" if spec == "zoo:gan" else "properties.diffusion_none_all_four")
        assert set(curve["claim"]) == {claim}
        shipped = rows_at(curve, claim, **pc.SHIPPED[claim])
        assert len(shipped) == 1
        full = pr.holds_all(result[pr.SCORES])["all_full"]
        expect = full.all() if claim == pc.LATENT_CLAIM else not full.any()
        assert shipped["verdict"].iloc[0] == ("supports" if expect else "contradicts")
        n = len(pc.FULL_LEVELS) * len(pc.ESTIMATES)
        assert len(curve) == n * (2 if spec == "zoo:dit" else 1)  # the GAN scores no layer: one space set


def test_a_stricter_cut_off_never_makes_a_latent_hold_more(props):
    curve = pc.claims_curve(props["zoo:gan"])
    specs = curve["spec"].map(sc.parse_spec)
    for estimate in pc.ESTIMATES:
        sub = curve[specs.map(lambda s, e=estimate: s["estimate"] == e)]
        sub = sub.assign(cut=specs[sub.index].map(lambda s: float(s["full_at"]))).sort_values("cut")
        ok = (sub["verdict"] == "supports").to_numpy()
        assert not (ok[1:] & ~ok[:-1]).any()  # once it fails at a cut, it fails at every higher one
    # the lower CI bound is stricter than the estimate, the upper bound more lenient
    by = {(s["estimate"], s["full_at"]): v for s, v in zip(specs, curve["verdict"])}
    for cut in {s["full_at"] for s in specs}:
        order = [by[(e, cut)] == "supports" for e in ("low", "score", "high")]
        assert order == sorted(order)


def test_properties_missing_scores_are_undecided_not_a_verdict(props):
    result = props["zoo:gan"]
    scores = result[pr.SCORES].copy()
    scores.loc[scores["property"] == "density", ["score", "low", "high"]] = np.nan
    scores.loc[scores["property"] != "density", ["score", "low", "high"]] = 0.99
    fake = Result("properties", {pr.SCORES: scores, pr.DETAILS: result[pr.DETAILS]}, result.record)
    assert set(pc.claims_curve(fake)["verdict"]) == {"undecided"}
    scores.loc[scores["property"] == "smoothness", ["score", "low", "high"]] = 0.1  # one property clearly fails
    assert set(pc.claims_curve(fake)["verdict"]) == {"contradicts"}


# -- abstractions ---------------------------------------------------------------------------------------------------


def test_abstractions_curve_reads_the_experiments_own_times(abstractions):
    curve = abc.claims_curve(abstractions)
    assert len(curve) == len(abc.CRITERIA) * len(abc.EARLY_SETS)
    frec = abstractions.record["forking"]
    never = max(frec["taus"]) + 1
    commit = {f: (never if t is None else t) for f, t in frec["commitment"].items()}
    for early_name, early in abc.EARLY_SETS.items():
        row = rows_at(curve, abc.CLAIM, **{**abc.SHIPPED[abc.CLAIM], "early": early_name})
        lead = min(commit[f] for f in abc.LATE) - max(commit[f] for f in early)
        assert row["value"].iloc[0] == lead
        assert row["verdict"].iloc[0] == ("supports" if lead > 0 else "contradicts" if lead < 0 else "undecided")
        lo, hi = row[["ci_low", "ci_high"]].iloc[0]
        assert lo <= lead <= hi
    # the shipped specification supports the claim exactly when the section's forking sentence finds the paper's order
    from layerscope.report.sections import abstractions as section

    shipped = rows_at(curve, abc.CLAIM, **abc.SHIPPED[abc.CLAIM])
    as_paper = "As Corallo et al. (2024) report" in section.forking_sentence("zoo:dit", frec)
    assert (shipped["verdict"].iloc[0] == "supports") == as_paper
    # the probes' half-way steps, as the section's order sentence reads them
    prec = abstractions.record["probes"]
    half = ab.relative_onsets(abstractions[ab.PROBES], prec["chance"], exclude=ab.baseline_of(prec))
    never = max(prec["steps"]) + 1
    steps = {f: (never if h is None else h["step"]) for f, h in half.items()}
    row = rows_at(curve, abc.CLAIM, method="probe", readout="accuracy", criterion="relative", level=0.5,
                  early="background")  # fmt: skip
    assert row["value"].iloc[0] == min(steps[f] for f in abc.LATE) - max(steps["wall_hue"], steps["floor_hue"])


def test_abstractions_without_forks_or_probes_leave_their_rows_out(abstractions):
    probes_only = Result("abstractions", {ab.PROBES: abstractions[ab.PROBES]}, {**abstractions.record, "forking": None})
    curve = abc.claims_curve(probes_only)
    assert {sc.parse_spec(s)["method"] for s in curve["spec"]} == {"probe"}
    # a probe grid on a user's labels (not the Shapes factors) and no forks: no claim, an empty curve
    labels = {**abstractions.record["probes"], "labels": "mine.csv"}
    user = Result("abstractions", {ab.PROBES: abstractions[ab.PROBES]}, {**abstractions.record, "probes": labels})
    user.record["forking"] = None
    empty = abc.claims_curve(user)
    assert empty.empty and sc.summarize(empty).empty


# -- the section and the CLI ----------------------------------------------------------------------------------------


def _job(spec, folder, settings, part="model", note="", card=None):
    return {
        "spec": spec,
        "specs": [spec],
        "folder": folder,
        "part": part,
        "note": note,
        "settings": settings_dict(settings),
        "seconds": 1.0,
        "card": card or {"name": spec},
        "cards": [card or {"name": spec}],
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory, injection, props, abstractions):
    """A small report folder: injection and abstractions on zoo:dit, properties on zoo:gan and zoo:dit, a sanity
    generator, and an 'untrained' control (the same Result relabelled, so it supports exactly as often)."""
    out = tmp_path_factory.mktemp("claims") / "report"
    injection.save(out / "injection" / "zoo_dit")
    injection.save(out / "injection" / "untrained_zoo_dit")
    abstractions.save(out / "abstractions" / "zoo_dit")
    props["zoo:gan"].save(out / "properties" / "zoo_gan")
    props["zoo:dit"].save(out / "properties" / "zoo_dit")
    sane = pr.run(ls.load(pr.SANITY_SPEC.format("ignores_latent")), pr.Settings(n=8, pairs=2, n_boot=20))
    sane.save(out / "properties" / "sanity_ignores")
    control = {"name": "untrained:zoo:dit", "control": {"kind": "untrained", "of": "zoo:dit"}}
    sections = {
        "injection": {
            "jobs": [
                _job("zoo:dit", "zoo_dit", INJ),
                _job("untrained:zoo:dit", "untrained_zoo_dit", INJ, card=control),
            ]
        },
        "abstractions": {"jobs": [_job("zoo:dit", "zoo_dit", ABS)]},
        "properties": {
            "jobs": [
                _job("zoo:gan", "zoo_gan", PROPS_GAN),
                _job("zoo:dit", "zoo_dit", PROPS_DIT),
                _job(pr.SANITY_SPEC.format("ignores_latent"), "sanity_ignores", PROPS_GAN, "sanity", "relevance ~0"),
            ]
        },
    }
    record = {"version": "test", "quick": True, "started": "2026-01-01 00:00:00", "sections": sections}
    (out / "run.json").write_text(json.dumps(record))
    return out


def test_the_claims_table_is_generated_from_the_saved_results(report):
    from layerscope.report.sections import claims

    summ, curve, notes = claims.summary(report)
    assert notes == []
    assert set(summ["claim"]) == {
        "injection.roles_split",
        "injection.roles_order",
        "properties.latent_all_four",
        "properties.diffusion_none_all_four",
        "abstractions.extent_order",
    }
    # the untrained control (the same Result) supports exactly as often as the model: said beside the claim
    inj_rows = summ[summ["claim"].str.startswith("injection.")]
    assert (inj_rows["supports (untrained)"] == inj_rows["supports"]).all()
    noted = inj_rows[inj_rows["supports"] >= sc.CONTROL_WITHIN]
    assert noted["control_note"].str.contains("'untrained' supports it about as often").all()
    # the sanity generator is a control of the latent claim's subject, not a subject of its own
    latent = summ[summ["claim"] == "properties.latent_all_four"]
    assert list(latent["subject"]) == ["zoo:gan"] and "sanity: ignores_latent" in latent["controls"].iloc[0]
    # the table's shipped statistic is the curve's shipped row
    table = claims.claims_table(summ)
    assert len(table) == len(summ) and table["verdict"].iloc[0] == summ["verdict"].iloc[0]
    first = summ.iloc[0]
    assert first["shipped_spec"] and first["statistic"] in table.iloc[0, 5]


def test_the_claims_section_comes_first_on_the_page(report, monkeypatch):
    from layerscope.report import build_report

    monkeypatch.setattr("layerscope.report.figures.png_bytes", lambda fig: b"\x89PNG fake")
    page = build_report(report).read_text()
    claims_at = page.index("<h2>Claims: the papers")
    assert claims_at < page.index("<nav>") < page.index("<h2>Injection sweep")
    part = page[claims_at : page.index("<nav>")]
    assert part.count("<img ") == 5 and part.count("Reproduce: <code>layerscope claims ") == 5
    assert "Claims table (generated from the saved Results)" in part and "no claims derived" not in part


def test_cli_claims_prints_and_writes_markdown(report, tmp_path):
    md = tmp_path / "claims.md"
    res = CliRunner().invoke(command(), ["claims", str(report), "--markdown", str(md)])
    assert res.exit_code == 0, res.output
    assert "injection.roles_split" in res.output and f"wrote {md}" in res.output
    text = md.read_text()
    assert text.startswith("# Claims, as measured") and f"Generated by `layerscope claims {report} --markdown" in text
    assert "| claim | paper | subject |" in text and "`abstractions.extent_order`" in text
    bad = CliRunner().invoke(command(), ["claims", str(tmp_path)])
    assert bad.exit_code == 2 and "run.json is missing" in bad.output


def test_the_main_job_runs_no_experiment_for_the_claims_section(tmp_path):
    from layerscope.main_job import run_main_job
    from layerscope.report.sections import LEADING, SECTIONS

    assert all(sec.EXPERIMENT is None for sec in LEADING) and all(sec.EXPERIMENT for sec in SECTIONS)
    with pytest.raises(ConfigError, match="unknown report section"):
        run_main_job(tmp_path / "out", only=["claims"])


def test_a_claims_module_that_does_not_import_is_said_not_skipped(report, monkeypatch):
    from layerscope.report.sections import claims

    monkeypatch.setitem(claims.CLAIM_MODULES, "injection", "layerscope.experiments.no_such_claims")
    summ, _curve, notes = claims.summary(report)
    assert any(n.startswith("injection: its claims module does not import (ModuleNotFoundError") for n in notes)
    assert not summ["claim"].str.startswith("injection.").any() and len(summ)
