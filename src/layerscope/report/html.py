"""Self-contained HTML: one page, figures embedded as PNG data URIs, tables, model cards, reproduce commands."""

from __future__ import annotations

import base64
import html
import json
import numbers
import time
from pathlib import Path
from typing import Any

import pandas as pd

from .._version import __version__

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.5em} code,pre{background:#f4f4f6;border-radius:4px;padding:.1em .35em;font-size:.88em}
pre{padding:.6em;overflow-x:auto} figure{margin:1.2em 0;overflow-x:auto} figure img{max-width:100%;height:auto}
figcaption{font-size:.9em;color:#444;margin-top:.3em} table.data{border-collapse:collapse;font-size:.82em;margin:.6em 0}
table.data th,table.data td{border:1px solid #ddd;padding:.2em .5em;text-align:right}
table.data th{background:#f4f4f6} table.data td:first-child,table.data th:first-child{text-align:left}
.note{background:#fff7e0;border-left:4px solid #e0a800;padding:.4em .8em;margin:.6em 0;font-size:.9em}
.finding{background:#eef6ff;border-left:4px solid #3b82f6;padding:.5em .9em;margin:.8em 0}
nav ul{columns:2} .cards{display:flex;flex-wrap:wrap;gap:1em} .card{border:1px solid #ddd;border-radius:6px;
padding:.6em .9em;flex:1 1 300px;font-size:.88em} .card h4{margin:.1em 0 .4em 0}
"""


class Page:
    """Helpers a section's ``render`` uses to produce its HTML fragment."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.n_figures = 0

    @staticmethod
    def esc(text: Any) -> str:
        return html.escape(str(text))

    def figure(self, fig_or_png: Any, caption: str, command: str | None = None, alt: str | None = None) -> str:
        """A figure (matplotlib Figure or PNG bytes) embedded as a data URI, with its caption and CLI command."""
        from .figures import png_bytes

        png = fig_or_png if isinstance(fig_or_png, bytes) else png_bytes(fig_or_png)
        self.n_figures += 1
        data = base64.b64encode(png).decode("ascii")
        cmd = f"<br>Reproduce: <code>{self.esc(command)}</code>" if command else ""
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{self.esc(alt or caption)}">'
            f"<figcaption><b>Figure {self.n_figures}.</b> {self.esc(caption)}{cmd}</figcaption></figure>"
        )

    def table(self, df: pd.DataFrame, caption: str = "", floats: str = "{:.2f}", max_rows: int = 400) -> str:
        """A DataFrame as an HTML table (first ``max_rows`` rows)."""
        shown = df.head(max_rows)
        body = shown.to_html(
            index=False,
            classes="data",
            border=0,
            na_rep="–",
            float_format=lambda v: floats.format(v),
            escape=True,  # column names and cells come from data (layer names, a user's factor names, prompts)
        )
        more = f"<p><i>{len(df) - max_rows} more rows in the saved table.</i></p>" if len(df) > max_rows else ""
        cap = f"<p><b>{self.esc(caption)}</b></p>" if caption else ""
        return cap + body + more

    def note(self, text: str) -> str:
        return f'<div class="note">{self.esc(text)}</div>'

    def finding(self, text: str) -> str:
        return f'<div class="finding">{self.esc(text)}</div>'

    def p(self, text: str) -> str:
        return f"<p>{self.esc(text)}</p>"


def _num(value: Any, fmt: str = "{}", mul: float = 1, div: float = 1) -> str:
    """A number from data, ``fmt.format(mul * value / div)``; anything that is not a real number is shown as
    escaped text (run.json is user-editable: its fields reach the page only escaped or as checked numbers)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return fmt.format(mul * value / div)
    return html.escape(str(value))


def _model_cards(cards: list[dict[str, Any]], page: Page) -> str:
    """Model cards as the main job wrote them into run.json (no model or weights are read here)."""
    esc = page.esc
    out = []
    for c in cards:
        rows = [f"<h4>{esc(c.get('name', '?'))}</h4>"]
        if c.get("description"):
            rows.append(f"<p>{esc(c['description'])}</p><ul>")
            if c.get("parameters"):
                res = esc(c.get("resolution", "?"))
                rows.append(
                    f"<li>{_num(c['parameters'], '{:.2f}', div=1e6)}M parameters, {res}x{res} "
                    f"pixels, {_num(c.get('weights_bytes', '?'), '{:.1f}', div=1e6)} MB of weights</li>"
                )
            if c.get("steps"):
                mins = (
                    f", {_num(c['train_seconds'], '{:.0f}', div=60)} min on {esc(c.get('device', '?'))}"
                    if c.get("train_seconds")
                    else ""
                )
                rows.append(f"<li>trained {esc(c['steps'])} steps{mins}</li>")
            q = c.get("quality")
            if q:
                if q.get("prompt_agreement"):
                    ag = ", ".join(f"{esc(k)} {_num(v, '{:.1f}', mul=100)}%" for k, v in q["prompt_agreement"].items())
                    rows.append(f"<li>prompt agreement (oracle, {esc(q.get('samples', '?'))} samples): {ag}</li>")
                rows.append(
                    f"<li>in-distribution {_num(q.get('in_distribution', '?'), '{:.1f}', mul=100)}%; Frechet "
                    f"distance {_num(q.get('frechet_distance', '?'), '{:.1f}')} "
                    f"(floor {_num(q.get('frechet_floor', '?'), '{:.1f}')})</li>"
                )
                if q.get("settings"):
                    rows.append(f"<li>sampling: {esc(json.dumps(q['settings']))}</li>")
            rows.append("</ul>")
        out.append(f'<div class="card">{"".join(rows)}</div>')
    return f'<div class="cards">{"".join(out)}</div>'


def build(folder: Path) -> Path:
    """Assemble ``folder/index.html`` from the sections' saved Results (see :mod:`layerscope.report`)."""
    from . import PAGE, SectionRun, read_run
    from .sections import LEADING, SECTIONS

    record = read_run(folder)
    page = Page(folder)
    body, toc = [], []
    lead = []
    for sec in LEADING:  # no experiment of their own (the claims table): they read the whole folder and record
        frag = sec.render(SectionRun(sec.KEY, folder, record), page)
        if frag:
            lead.append(f"<section><h2>{page.esc(sec.TITLE)}</h2>{frag}</section>")
    cards: dict[str, dict[str, Any]] = {}
    for sec in SECTIONS:
        info = record["sections"].get(sec.KEY)
        if info is None or not (folder / sec.KEY).exists():
            continue
        for job in info.get("jobs", []):
            if job.get("part", "model") != "model":
                continue
            specs = job.get("specs") or [job["spec"]]
            for spec, card in zip(specs, job.get("cards") or [job.get("card")]):
                cards.setdefault(spec, card or {"name": spec})
        notes = "".join(page.note(n) for n in info.get("notes", []))
        frag = sec.render(SectionRun(sec.KEY, folder / sec.KEY, info), page)
        secs = f"<p><i>computed in {_num(info.get('seconds', '?'))} s</i></p>"
        body.append(f'<section id="{sec.KEY}"><h2>{page.esc(sec.TITLE)}</h2>{secs}{notes}{frag}</section>')
        toc.append(f'<li><a href="#{sec.KEY}">{page.esc(sec.TITLE)}</a></li>')
    card_html = (
        f'<section id="models"><h2>Models</h2>{_model_cards(list(cards.values()), page)}</section>' if cards else ""
    )
    mode = "quick mode (small settings, for tests)" if record.get("quick") else "full run"
    head = (
        f"<h1>layerscope report</h1><p>layerscope {page.esc(record.get('version', __version__))}, "
        f"{page.esc(mode)}, run {page.esc(record.get('started', '?'))}; page built "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}. Rebuild from the saved tables: "
        f"<code>layerscope report {page.esc(folder)}</code>.</p>"
    )
    if card_html:
        toc.append('<li><a href="#models">Models</a></li>')
    nav = f"<nav><ul>{''.join(toc)}</ul></nav>"
    doc = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>layerscope report</title>'
        f"<style>{CSS}</style></head><body>{head}{''.join(lead)}{nav}{''.join(body)}{card_html}</body></html>"
    )
    out = folder / PAGE
    out.write_text(doc, encoding="utf-8")
    return out
