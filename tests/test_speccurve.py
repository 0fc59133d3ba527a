"""Specification curves: the schema check and the verdict of verdicts, on hand-built curves whose verdict is known."""

import itertools

import numpy as np
import pandas as pd
import pytest

from layerscope.errors import ConfigError
from layerscope.stats import speccurve as sc

META = {"x.claim": {"text": "X holds.", "paper": "Someone 2025", "measured": "a thing", "shipped": {"a": 1, "b": "p"}}}


def curve(verdict_of, levels=None, claim="x.claim", subject="m", control="") -> pd.DataFrame:
    """One row per combination of ``levels`` (choice -> levels), its verdict ``verdict_of(choices)``."""
    levels = levels or {"a": [1, 2, 3], "b": ["p", "q"], "c": [0.1, 0.2]}
    rows = []
    for combo in itertools.product(*levels.values()):
        choices = dict(zip(levels, combo))
        rows.append(
            {
                "claim": claim,
                "subject": subject,
                "control": control,
                "spec": sc.spec_string(choices),
                "verdict": verdict_of(choices),
                "statistic": "s",
                "value": float(combo[0]),
                "ci_low": np.nan,
                "ci_high": np.nan,
            }
        )
    return pd.DataFrame(rows)


def one(df: pd.DataFrame) -> dict:
    s = sc.summarize(df, META)
    assert len(s) == 1
    return s.iloc[0].to_dict()


def test_spec_strings_sort_names_and_round_trip():
    s = sc.spec_string({"window": "all", "inert": 0.2, "b": 3})
    assert s == "b=3; inert=0.2; window=all"
    assert sc.parse_spec(s) == {"b": "3", "inert": "0.2", "window": "all"}
    assert sc.matches(s, {"inert": 0.2}) and not sc.matches(s, {"inert": 0.3}) and sc.matches(s, {})


def test_all_support_is_supported_and_all_contradict_is_contradicted():
    r = one(curve(lambda c: "supports"))
    assert r["verdict"] == "supported" and r["supports"] == 1.0 and r["n_specs"] == 12
    assert (r["text"], r["paper"], r["measured"]) == ("X holds.", "Someone 2025", "a thing")
    r = one(curve(lambda c: "contradicts"))
    assert r["verdict"] == "contradicted" and r["contradicts"] == 1.0 and r["depends_on"] == ""


def test_eighty_percent_is_enough_and_less_is_not():
    # 10 of 12 support (83%): supported; 9 of 12 (75%) with no choice explaining it: undecided
    ten = curve(lambda c: "contradicts" if (c["a"], c["b"], c["c"]) in {(1, "p", 0.1), (2, "q", 0.2)} else "supports")
    assert one(ten)["verdict"] == "supported"
    bad = {(1, "p", 0.1), (2, "q", 0.2), (3, "p", 0.2)}
    nine = curve(lambda c: "contradicts" if (c["a"], c["b"], c["c"]) in bad else "supports")
    assert one(nine)["verdict"] == "undecided"


def test_split_by_one_choice_depends_on_it():
    r = one(curve(lambda c: "supports" if c["b"] == "p" else "contradicts"))
    assert r["verdict"] == "depends on b" and r["depends_on"] == "b"
    assert r["by_level"] == "b=p: supports (100%); b=q: contradicts (100%)"
    # within-level noise below 20% still names the choice; the other choices explain nothing
    rng = np.random.default_rng(0)
    levels = {"a": list(range(10)), "b": ["p", "q"], "c": [0.1, 0.2, 0.3]}
    flip = {(a, c) for a in range(10) for c in (0.1, 0.2, 0.3) if rng.random() < 0.1}
    noisy = curve(
        lambda ch: ("supports" if ch["b"] == "p" else "contradicts") if (ch["a"], ch["c"]) not in flip else "undecided",
        levels,
    )
    assert one(noisy)["verdict"] == "depends on b"


def test_the_choice_that_explains_best_is_named():
    # nested choices (not a full grid): a and b each keep the verdict >= 80% constant within their levels, a purer
    combos = [(1, "p", k) for k in range(9)] + [(2, "q", k) for k in range(9)] + [(1, "q", 9)]
    rows = pd.concat(
        [
            curve(lambda c: "supports" if c["a"] == 1 else "contradicts", {"a": [a], "b": [b], "k": [k]})
            for a, b, k in combos
        ],
        ignore_index=True,
    )
    r = one(rows)
    assert r["verdict"] == "depends on a" and r["by_level"] == "a=1: supports (100%); a=2: contradicts (100%)"


def test_split_by_nothing_is_undecided():
    # the verdict alternates with the parity of a + the index of c: no single choice keeps it constant
    r = one(curve(lambda c: "supports" if (c["a"] + [0.1, 0.2].index(c["c"])) % 2 else "contradicts"))
    assert r["verdict"] == "undecided" and r["depends_on"] == "" and 0.3 < r["supports"] < 0.7
    assert one(curve(lambda c: "undecided"))["verdict"] == "undecided"


def test_a_control_that_supports_as_often_as_the_model_is_said():
    model = curve(lambda c: "supports")
    same = curve(lambda c: "supports" if c["a"] != 3 or c["b"] == "p" else "contradicts", control="untrained")
    other = curve(lambda c: "contradicts", control="render")
    r = one(pd.concat([model, same, other], ignore_index=True))
    assert r["verdict"] == "supported"  # the controls do not change the model's verdict
    assert r["supports (untrained)"] == pytest.approx(10 / 12) and r["supports (render)"] == 0.0
    assert "'untrained' supports it about as often" in r["control_note"] and "render" not in r["control_note"]
    assert r["controls"] == "render: 0.00 of 12; untrained: 0.83 of 12"
    # a model that never supports the claim: a control that never does either says nothing
    r = one(pd.concat([curve(lambda c: "contradicts"), other], ignore_index=True))
    assert r["control_note"] == ""


def test_the_shipped_specification_gives_the_statistic():
    r = one(curve(lambda c: "supports" if c["a"] == 1 else "contradicts"))
    assert r["shipped_spec"] == "a=1; b=p; c=0.1" and r["value"] == 1.0 and r["shipped_verdict"] == "supports"
    no_shipped = sc.summarize(curve(lambda c: "supports"), {"x.claim": {"text": "X"}}).iloc[0]
    assert no_shipped["statistic"] == "" and np.isnan(no_shipped["value"])


def test_one_row_per_claim_and_subject_and_subjects_without_model_rows_are_left_out():
    df = pd.concat(
        [
            curve(lambda c: "supports", subject="m1"),
            curve(lambda c: "contradicts", subject="m2"),
            curve(lambda c: "supports", claim="y.other", subject="m1"),
            curve(lambda c: "supports", subject="only-control", control="untrained"),
        ],
        ignore_index=True,
    )
    s = sc.summarize(df, META)
    assert list(zip(s["claim"], s["subject"], s["verdict"])) == [
        ("x.claim", "m1", "supported"),
        ("x.claim", "m2", "contradicted"),
        ("y.other", "m1", "supported"),
    ]
    assert s.loc[2, "text"] == ""  # no metadata for y.other


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: d.drop(columns="verdict"), "lacks the column"),
        (lambda d: d.assign(verdict="maybe"), "is not one of supports"),
        (lambda d: d.assign(claim="noexperiment"), "is not '<experiment>.<short_name>'"),
        (lambda d: d.assign(control=None), "must hold strings"),
        (lambda d: d.assign(value="high"), "must be numbers"),
        (lambda d: pd.concat([d, d.iloc[:1]], ignore_index=True), "give each specification once"),
        (lambda d: d.to_dict(), "is a pandas DataFrame"),
    ],
)
def test_check_curve_says_what_is_wrong_in_one_sentence(change, words):
    with pytest.raises(ConfigError, match=words) as err:
        sc.check_curve(change(curve(lambda c: "supports")))
    assert "\n" not in str(err.value)


def test_an_empty_curve_is_a_curve_with_no_claims():
    assert sc.summarize(sc.check_curve(sc.empty_curve())).empty
    good = curve(lambda c: "supports").assign(extra=1)  # extra columns are allowed
    assert sc.check_curve(good) is good
