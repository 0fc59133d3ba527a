"""The HTML report escapes every user-controlled field (issue 21 item 12, issue 22 "Report").

A report folder is built whose ``run.json`` and saved Results (made here in the shape the experiments save them,
no model is run) carry script payloads in every field a user controls: model specs, prompts, layer names, space
names, a labels CSV's factor names (table values and column names), concept, notes, job folders and the report
folder's own name, settings, model cards (text and fields that are numbers in a real run) and ``seconds``. The page
``report.build_report`` writes must then hold no element or attribute the report does not emit itself (it emits no
script at all), and every payload must appear on it as text. In headless Chromium (skipped when it cannot be had)
no payload may run: the page's title, its root element and ``window`` stay untouched.
"""

from __future__ import annotations

import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from layerscope.experiments import properties as pr
from layerscope.experiments.base import Result
from layerscope.report import RUN_FILE, build_report
from layerscope.report.html import Page
from layerscope.report.sections import SECTIONS
from layerscope.world.factors import FACTORS, GROUPS

# Each payload would leave a mark if it ran: the page's title and a data-pwned attribute on <html> (and the script
# window.__pwned). Folder names hold no slash (no </script>) and at most 255 bytes.
RUN = "document.title='PWNED';document.documentElement.dataset.pwned='{}'"
SCRIPT = "<script>window.__pwned=1;" + RUN.format("script") + "</script>"
IMG = '"><img src=x onerror="' + RUN.format("img") + '">'
SVG = "'><svg onload=\"" + RUN.format("svg") + '">'
JS = "javascript:" + RUN.format("href")
PAYLOAD = SCRIPT + IMG + SVG
FOLDER_PAYLOAD = IMG + SVG
TITLE = "layerscope report"

#: every tainted field, by name: its value must reach the page as text (escaped), never as markup
SHOWN: set[str] = set()


def t(field: str, *, js: bool = False, shown: bool = True) -> str:
    """The value of a user-controlled field: a marker naming it, then the payloads (``js``: starts with a
    ``javascript:`` URL, as a link target would)."""
    if shown:
        SHOWN.add(field)
    return (JS + " " if js else "") + f"@{field}@" + PAYLOAD


def tf(field: str, *, shown: bool = True) -> str:
    """A tainted folder name (no slash)."""
    if shown:
        SHOWN.add(field)
    return f"@{field}@" + FOLDER_PAYLOAD


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


# -- saved Results in the shape each experiment saves them (columns and record keys of a real `run --quick`) ------


def injection_result(rng: np.random.Generator, model: str, layers: list[str]) -> Result:
    windows = ["all", "late"]
    summary, labels = [], []
    for w in windows:
        for i, layer in enumerate(layers):
            stage = t(f"stage {i}", shown=False)
            for level, targets in (("factor", FACTORS), ("group", tuple(GROUPS))):
                for target in targets:
                    for metric in ("transfer", "keep"):
                        est = float(rng.uniform(0.2, 0.9))
                        summary.append(
                            dict(
                                model=model,
                                window=w,
                                layer=layer,
                                layer_index=i,
                                stage=stage,
                                level=level,
                                target=target,
                                metric=metric,
                                estimate=est,
                                ci_low=est - 0.1,
                                ci_high=est + 0.1,
                                n=2,
                            )
                        )
            labels.append(
                dict(
                    model=model,
                    window=w,
                    layer=layer,
                    layer_index=i,
                    stage=stage,
                    transfer_surface=0.3,
                    transfer_structure=0.9,
                    transfer_content=0.2,
                    label=("structure", "mixed")[i % 2],
                )
            )
    record = {
        "model": model,
        "settings": {"pairs": [[t("prompt O", shown=False), t("prompt E", shown=False)]], "windows": windows},
        "plan": {"model": model, "pairs": [], "seeds": [0], "windows": windows, "scorer": "oracle"},
        "sanity": {"no_layer_vs_O": 1e-7, "every_layer_vs_E": 0.0, "O_vs_E": 1.0},
        "notes": [t("injection result note", shown=False)],
    }
    return Result("injection", {"summary": _frame(summary), "labels": _frame(labels)}, record)


def _probes(rng: np.random.Generator, model: str, layers: list[str], factors: list[str]) -> pd.DataFrame:
    rows = []
    for i, layer in enumerate(layers):
        for step in range(3):
            for f in factors:
                acc = float(min(1.0, 0.3 + 0.3 * step + 0.05 * i))
                for metric, v in (
                    ("accuracy", acc),
                    ("cross_entropy", 1 - acc),
                    ("mi_bound", acc),
                    ("accuracy_low", acc - 0.1),
                    ("accuracy_high", acc),
                ):
                    rows.append(
                        dict(
                            model=model,
                            layer=layer,
                            layer_index=i,
                            step=step,
                            timestep=500.0 - 250 * step,
                            factor=f,
                            metric=metric,
                            value=v,
                        )
                    )
    return _frame(rows)


def _probe_record(layers: list[str], factors: list[str]) -> dict:
    return {
        "samples": 16,
        "steps": [0, 1, 2],
        "layers": layers,
        "baseline": "x_t",
        "entropy_bits": {f: 1.0 for f in factors},
        "chance": {f: 0.25 for f in factors},
        "fit_seconds": 1.5,
        "onset_ci": {f: [0.0, 2.0] for f in factors},
        "labels": None,
    }


def abstractions_result(rng: np.random.Generator, model: str, layers: list[str]) -> Result:
    """Oracle labels: the probe grid and forking (the forks read the Shapes factors)."""
    layers = ["x_t", *layers]
    probes = _probes(rng, model, layers, list(FACTORS))
    probe_record = {**_probe_record(layers, list(FACTORS)), "in_distribution": 0.5}
    probe_record["oracle_confidence"] = {f: 0.9 for f in FACTORS}
    taus = [0, 1]
    forks = _frame(
        [
            dict(
                model=model,
                tau=tau,
                timestep=500.0 - 250 * tau,
                factor=f,
                prompt=p,
                entropy=float(1 - tau),
                normalised=float(1 - tau) / 2,
                distinct=2 - tau,
                mode_share=0.5 + 0.5 * tau,
                confidence=0.9,
                forks=2,
            )
            for tau in taus
            for f in FACTORS
            for p in range(2)
        ]
    )
    forking = {
        "model": model,
        "starts": 2,
        "forks": 2,
        "taus": taus,
        "generations": 8,
        "generate_seconds": 1.0,
        "seconds_per_generation": 0.125,
        "threshold_bits": 0.5,
        "fraction": 0.5,
        "max_bits": {f: 1.0 for f in FACTORS},
        "commitment": {f: 1 for f in FACTORS},
    }
    record = {"model": model, "notes": [], "probes": probe_record, "forking": forking}
    return Result("abstractions", {"probes": probes, "forks": forks}, record)


def abstractions_csv_result(rng: np.random.Generator, model: str, layers: list[str]) -> Result:
    """A user's labels CSV: its column names are the factors (probe grid only, as `--labels` runs it)."""
    factors = [t("CSV column colour"), t("CSV column size")]
    layers = ["x_t", *layers]
    record = {**_probe_record(layers, factors), "labels": t("labels CSV path", shown=False)}
    return Result("abstractions", {"probes": _probes(rng, model, layers, factors)}, {"model": model, "probes": record})


def properties_result(rng: np.random.Generator, model: str, spaces: list[str]) -> Result:
    scores, details = [], []
    for space in spaces:
        for p in pr.PROPERTIES:
            s = float(rng.uniform())
            scores.append(
                dict(
                    model=model,
                    space=space,
                    kind="latent",
                    property=p,
                    score=s,
                    low=s - 0.1,
                    high=s + 0.1,
                    mark=pr.mark(s),
                )
            )
        for metric in ("change@0.1", "change@0.3", "change@1", "in_dist_base", "path", "rho_distance"):
            details.append(dict(model=model, space=space, metric=metric, value=float(rng.uniform())))
    columns = ["sample", "density", t("strip column", shown=False)]
    strips = {s: rng.integers(0, 255, (len(columns), 3, 8, 8), dtype=np.uint8) for s in spaces}
    record = {
        "model": model,
        "spaces": spaces,
        "steps": None,
        "n": 8,
        "pairs": 2,
        "scorer": t("scorer"),
        "concept": t("concept prompt"),
        "strip_columns": columns,
    }
    tables = {pr.SCORES: _frame(scores), pr.DETAILS: _frame(details)}
    return Result("properties", tables, record, {pr.STRIPS: strips})


def alignment_result(rng: np.random.Generator, models: list[str], layers: list[str]) -> Result:
    """The shape of alignment_analysis.analyse's tables: models, their untrained copies and the render."""
    world, within, across, peaks, peak_order, matching, crossfit = [], [], [], [], [], [], []
    copies = [f"untrained:{m}" for m in models]
    for m in (*models, *copies):
        control = "" if m in models else "untrained"
        for i, a in enumerate(layers):
            for ref in ("factors", "oracle"):
                world.append(
                    dict(
                        model=m,
                        control=control,
                        layer=a,
                        layer_index=i,
                        depth=i / 2,
                        step=0,
                        reference=ref,
                        metric="debiased_cka",
                        value=float(rng.uniform()),
                    )
                )
            if m in models:
                for b in layers:
                    within.append(
                        dict(
                            model=m,
                            metric="debiased_cka",
                            view="layers",
                            layer_a=a,
                            step_a=0,
                            layer_b=b,
                            step_b=0,
                            value=float(rng.uniform()),
                        )
                    )
        for level in ("0", "best"):
            for g in GROUPS:
                row = dict(model=m, control=control, step=level, group=g, layer=layers[1], layer_step=0, value=0.4)
                row.update(value_low=0.2, value_high=0.6)
                for coord in ("depth", "image_distance"):
                    row.update({coord: 0.5, f"{coord}_low": 0.2, f"{coord}_high": 0.8})
                peaks.append(row)
    for k, (ma, mb) in enumerate(((models[0], models[1]), (models[1], models[0]))):
        for a in layers:
            for b in layers:
                across.append(
                    dict(
                        model_a=ma,
                        model_b=mb,
                        metric="debiased_cka",
                        step=-1,
                        layer_a=a,
                        depth_a=0.0,
                        layer_b=b,
                        depth_b=0.0,
                        value=float(rng.uniform()),
                    )
                )
        for coord in ("depth", "image_distance"):
            peak_order.append(
                dict(
                    model_a=ma,
                    model_b=mb,
                    control="",
                    step="0",
                    coordinate=coord,
                    order_a=t(f"order_a {k} {coord}"),
                    order_b=t(f"order_b {k} {coord}"),
                    agreement=1.0,
                )
            )
        crossfit.append(dict(model_a=ma, model_b=mb, in_sample=0.9, cross_fitted=0.89, difference=0.01, splits=10))
        for control, (xa, xb) in (("", (ma, mb)), ("untrained", (f"untrained:{ma}", f"untrained:{mb}"))):
            for level in ("0", "best"):
                for features in ("full", "pooled"):
                    row = dict(
                        model_a=xa,
                        model_b=xb,
                        control_a=control,
                        control_b=control,
                        features=features,
                        measure="debiased_cka",
                        step=level,
                        timestep=np.nan,
                        similarity=0.9,
                        similarity_low=0.85,
                        similarity_high=0.95,
                        perm_q95=0.1,
                        perm_p=0.01,
                        layers_a=len(layers),
                        layers_b=len(layers),
                        matches=t(f"matches {k} {control or 'model'} {level} {features}", shown=False),
                        nulls=t(f"nulls {k} {control or 'model'}", shown=(level, features) == ("0", "full")),
                        excess=0.1,
                        excess_low=0.05,
                        excess_high=0.15,
                        strongest_null="render",
                        components=t(f"components {k} {control or 'model'}", shown=(level, features) == ("0", "full")),
                    )
                    for coord in ("depth", "image_distance"):
                        row.update({f"order_{coord}": 0.9, f"order_{coord}_low": 0.8, f"order_{coord}_high": 1.0})
                        row[f"arrangement_{coord}"] = t(
                            f"arrangement {k} {control or 'model'} {coord}", shown=(level, features) == ("0", "full")
                        )
                    matching.append(row)
    # the render as A, a null: calibrated outcomes only on pairs of models and of their copies
    matching.append({**matching[0], "model_a": "render", "control_a": "render", "components": None})
    record = {
        "models": models,
        "model": "+".join(models),
        "rows": 16,
        "iterative": {m: False for m in (*models, *copies, "render")},
        "controls": {c: {"kind": "untrained", "of": m} for c, m in zip(copies, models)},
        "duplicates": {models[0]: {t("duplicate layer"): layers[0]}},
        "notes": [],
    }
    tables = {
        "world": _frame(world),
        "within": _frame(within),
        "across": _frame(across),
        "peaks": _frame(peaks),
        "peak_order": _frame(peak_order),
        "matching": _frame(matching),
        "crossfit": _frame(crossfit),
    }
    return Result("alignment", tables, record)


def card(name: str, field: str, numbers: bool) -> dict:
    """A model card as the main job writes it into run.json; ``numbers``: the numeric fields as a real run has
    them (else tainted strings where numbers belong)."""

    def num(v: float, what: str) -> float | str:
        return v if numbers else t(f"{field} card {what}")

    return {
        "name": name,
        "kind": t(f"{field} card kind", shown=False),
        "description": t(f"{field} card description", js=True),
        "parameters": num(739312, "parameters"),
        "steps": num(9000, "steps"),
        "train_seconds": num(4665.6, "train_seconds"),
        "device": t(f"{field} card device"),
        "resolution": num(32, "resolution"),
        "weights_bytes": num(2975408, "weights_bytes"),
        "quality": {
            "samples": num(1000, "samples"),
            "settings": {"sampler": t(f"{field} card sampling settings")},
            "prompt_agreement": {t(f"{field} card agreement factor"): num(0.969, "agreement")},
            "in_distribution": num(0.869, "in_distribution"),
            "frechet_distance": num(100.04, "frechet_distance"),
            "frechet_floor": num(56.17, "frechet_floor"),
        },
    }


def _job(spec, folder: str, settings: dict, cards: list[dict], part: str = "model", note: str = "") -> dict:
    specs = [spec] if isinstance(spec, str) else list(spec)
    return {
        "spec": spec,
        "specs": specs,
        "folder": folder,
        "part": part,
        "note": note,
        "settings": settings,
        "seconds": t(f"job seconds {folder[:12]}", shown=False),
        "card": cards[0],
        "cards": cards,
    }


def build_tainted_report(root: Path) -> tuple[Path, set[str]]:
    """A report folder (named with a payload) whose run.json and saved Results carry payloads everywhere, and the
    names of the fields that must be shown on its page."""
    SHOWN.clear()
    rng = np.random.default_rng(0)
    out = root / tf("report folder")
    unet, dit = t("model spec unet"), t("model spec dit")
    gan, vae = t("model spec gan"), t("model spec vae")
    sanity = "torch:layerscope.testing.sanity:" + t("model spec sanity generator")
    layers = [t("layer 0"), t("layer 1")]
    spaces = [t("space z"), t("space h")]
    cards = {
        unet: card(unet, "unet", numbers=True),
        dit: card(dit, "dit", numbers=False),
        gan: card(gan, "gan", numbers=True),
        vae: card(vae, "vae", numbers=False),
    }
    sections: dict[str, dict] = {}

    def section(key: str, jobs: list[tuple[dict, Result]]) -> None:
        for job, result in jobs:
            result.save(out / key / job["folder"])
        sections[key] = {
            "seconds": t(f"{key} seconds"),
            "notes": [t(f"{key} note")],
            "models": [s for job, _ in jobs for s in job["specs"]],
            "jobs": [job for job, _ in jobs],
        }

    inj_settings = {
        "random_pairs": t("sweep random_pairs"),
        "windows": ["all", t("sweep window")],
        "steps": t("sweep steps"),
    }
    section(
        "injection",
        [
            (_job(unet, tf("injection folder unet"), inj_settings, [cards[unet]]), injection_result(rng, unet, layers)),
            (_job(dit, tf("injection folder dit"), inj_settings, [cards[dit]]), injection_result(rng, dit, layers)),
        ],
    )
    ab_settings = {
        "n": t("abstractions n"),
        "steps": t("abstractions steps"),
        "forks": t("abstractions forks"),
        "fork_prompts": t("abstractions fork_prompts"),
        "taus": [t("abstractions tau")],
    }
    section(
        "abstractions",
        [
            (_job(unet, tf("abstractions folder"), ab_settings, [cards[unet]]), abstractions_result(rng, unet, layers)),
            (
                _job(dit, tf("abstractions csv folder"), ab_settings, [cards[dit]]),
                abstractions_csv_result(rng, dit, layers),
            ),
        ],
    )
    pr_settings = {
        "n": t("properties n"),
        "pairs": t("properties pairs"),
        "steps": t("properties steps"),
        "at": t("properties at"),
        "spaces": [t("properties space glob")],
        "scorer": t("properties scorer"),
        "concept": t("properties concept"),
        "seed": t("properties seed"),
    }
    section(
        "properties",
        [
            (_job(gan, tf("properties folder"), pr_settings, [cards[gan]]), properties_result(rng, gan, spaces)),
            (
                _job(
                    sanity,
                    tf("properties sanity folder", shown=False),
                    pr_settings,
                    [{"name": sanity}],
                    part="sanity",
                    note=t("sanity note"),
                ),
                properties_result(rng, sanity, spaces[:1]),
            ),
        ],
    )
    al_settings = {
        "n": t("alignment n"),
        "steps": t("alignment steps"),
        "metrics": [t("alignment metric")],
        "k": t("alignment k"),
        "controls": [t("alignment control")],
    }
    section(
        "alignment",
        [
            (
                _job([gan, vae], tf("alignment folder"), al_settings, [cards[gan], cards[vae]]),
                alignment_result(rng, [gan, vae], layers),
            )
        ],
    )
    record = {"version": t("version"), "quick": True, "started": t("started"), "sections": sections}
    (out / RUN_FILE).write_text(json.dumps(record, indent=1))
    return out, set(SHOWN)


# -- what the page holds --------------------------------------------------------------------------------------------

KEYS = [s.KEY for s in SECTIONS] + ["models"]
#: the only markup the report emits itself: tag -> attribute -> allowed values (a set, or a test)
ALLOWED = {
    "html": {"lang": {"en"}},
    "meta": {"charset": {"utf-8"}},
    "section": {"id": set(KEYS)},
    "a": {"href": {f"#{k}" for k in KEYS}},
    "div": {"class": {"note", "finding", "card", "cards"}},
    "table": {"class": {"dataframe data"}},
    "tr": {"style": {"text-align: right;"}},
    "img": {"src": re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+").fullmatch, "alt": lambda v: True},
    **dict.fromkeys(
        "head title style body h1 h2 h3 h4 p i b br code nav ul li figure figcaption thead tbody th td".split(), {}
    ),
}


class _Parsed(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))
        self.text.append("\n")

    handle_startendtag = handle_starttag

    def handle_endtag(self, tag):
        self.text.append("\n")

    def handle_data(self, data):
        self.text.append(data)


def parse(doc: str) -> tuple[list[tuple[str, list[tuple[str, str | None]]]], str]:
    p = _Parsed()
    p.feed(doc)
    p.close()
    return p.tags, "".join(p.text)


def foreign_markup(tags) -> list[str]:
    """Every element or attribute the report does not emit itself."""
    bad = []
    for tag, attrs in tags:
        if tag not in ALLOWED:
            bad.append(f"<{tag}>")
            continue
        for name, value in attrs:
            ok = ALLOWED[tag].get(name)
            if ok is None or not (ok(value or "") if callable(ok) else value in ok):
                bad.append(f"<{tag} {name}={value!r}>")
    return bad


def _tiny_png(fig) -> bytes:
    """A stand-in for ``figures.png_bytes``: the figures are drawn, but not rasterised (seconds; the page embeds a
    figure as a data URI of PNG bytes, whatever its text says)."""
    import matplotlib.pyplot as plt
    from PIL import Image

    plt.close(fig)
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 60, 60)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tainted(tmp_path_factory) -> tuple[Path, set[str]]:
    folder, shown = build_tainted_report(tmp_path_factory.mktemp("safety"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("layerscope.report.figures.png_bytes", _tiny_png)
        return build_report(folder), shown


def test_every_user_field_reaches_the_page_escaped(tainted):
    page, shown = tainted
    doc = page.read_text(encoding="utf-8")
    tags, text = parse(doc)
    # the report emits no script, no event handler and no link but its own anchors: none may appear
    assert not [tag for tag, _ in tags if tag in ("script", "svg", "iframe", "object", "embed")]
    assert not [(tag, a) for tag, attrs in tags for a, _ in attrs if a.lower().startswith("on")]
    assert foreign_markup(tags) == []
    assert sum(tag == "img" for tag, _ in tags) >= 10  # the figures are there, each a data URI
    # every tainted field is on the page, as text, with its payload whole
    missing = sorted(f for f in shown if f"@{f}@" + (FOLDER_PAYLOAD if "folder" in f else SCRIPT) not in text)
    assert missing == []
    assert JS in text  # a javascript: URL is text, never a link target


def test_numbers_from_run_json_are_checked():
    """Card fields that are numbers in a real run are formatted as before; anything else is escaped text."""
    from layerscope.report.html import _model_cards

    page = Page(Path("."))
    real = _model_cards([card("zoo:dit", "dit", numbers=True)], page)
    assert "0.74M parameters, 32x32 pixels, 3.0 MB of weights" in real
    assert "trained 9000 steps, 78 min on" in real and " 96.9%</li>" in real
    assert "in-distribution 86.9%; Frechet distance 100.0 (floor 56.2)" in real
    faked = _model_cards([card("x", "x", numbers=False)], page)
    tags, text = parse(faked)
    assert foreign_markup(tags) == [] and "@x card frechet_distance@" + SCRIPT in text


def test_tables_escape_column_names_and_cells(tmp_path):
    df = pd.DataFrame({t("column", shown=False): [t("cell", shown=False), 1.5], "n": [1, 2]})
    frag = Page(tmp_path).table(df, t("caption", shown=False))
    tags, text = parse(frag)
    assert foreign_markup(tags) == []
    assert all(f"@{f}@" + SCRIPT in text for f in ("column", "cell", "caption"))


def test_no_payload_runs_in_headless_chromium(tainted, browser):
    from browser import chrome_options
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    page, _ = tainted
    chromium, chromedriver = browser
    profile = page.parent.parent / "chromium-profile"
    driver = webdriver.Chrome(
        service=Service(executable_path=chromedriver), options=chrome_options(chromium, str(profile))
    )
    try:
        driver.set_page_load_timeout(60)
        driver.get(page.resolve().as_uri())
        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.readyState") == "complete")
        seen = driver.execute_script(
            "return {title: document.title, pwned: window.__pwned === undefined ? null : window.__pwned,"
            " mark: document.documentElement.getAttribute('data-pwned'), scripts: document.scripts.length,"
            " svgs: document.querySelectorAll('svg').length,"
            " handlers: Array.from(document.querySelectorAll('*')).filter(e => Array.from(e.attributes)"
            "   .some(a => a.name.startsWith('on'))).length,"
            " imgs: Array.from(document.images).filter(i => !i.src.startsWith('data:image/png;base64,')).length,"
            " text: document.body.innerText}"
        )
    finally:
        driver.quit()
    assert seen["title"] == TITLE
    assert seen["pwned"] is None and seen["mark"] is None
    assert (seen["scripts"], seen["svgs"], seen["handlers"], seen["imgs"]) == (0, 0, 0, 0)
    assert "@layer 0@" + SCRIPT in seen["text"] and "@report folder@" + IMG in seen["text"]  # shown as text


def test_nothing_is_unpickled_anywhere_in_the_package():
    """Every torch.load passes weights_only=True, every np.load allow_pickle=False, and no pickle, joblib or
    read_pickle is used: a file a user is given cannot run code when layerscope loads it."""
    import re
    from pathlib import Path

    import layerscope

    root = Path(layerscope.__file__).parent
    calls = {"torch.load(": "weights_only=True", "np.load(": "allow_pickle=False"}
    checked = 0
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib)\b", text, re.M), path
        assert "read_pickle" not in text and "pickle.load" not in text, path
        for call, needs in calls.items():
            for m in re.finditer(re.escape(call), text):
                line_end = text.find(")", m.end())
                if text[m.start() - 2 : m.start()] == "``":  # named in a docstring
                    continue
                assert needs in text[m.start() : line_end + 1], f"{path.name}: {text[m.start() : line_end + 1]}"
                checked += 1
    assert checked >= 3  # the checkpoint loader, Result arrays, embedding files
