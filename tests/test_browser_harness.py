"""The headless-Chromium harness tells a displayed figure from a broken or hidden one."""

import base64
import io

import numpy as np
from browser import page_report
from PIL import Image


def _png_data_uri() -> str:
    yy, xx = np.mgrid[0:24, 0:32]
    arr = np.stack([xx * 8, yy * 10, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def test_page_report_tells_displayed_from_broken_and_hidden(tmp_path, browser):
    good = _png_data_uri()
    broken = "data:image/png;base64," + base64.b64encode(b"this is not a png at all").decode("ascii")
    html = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Harness check</title></head>
<body>
<h1>Report</h1>
<h2>Valid figure</h2><img alt="valid" src="{good}">
<h2>Broken figure</h2><img alt="broken" src="{broken}">
<h2>Hidden figure</h2><img alt="hidden" style="display:none" src="{good}">
</body></html>"""
    path = tmp_path / "report.html"
    path.write_text(html, encoding="utf-8")

    rep = page_report(path, binaries=browser)

    assert rep["title"] == "Harness check"
    assert rep["h2"] == ["Valid figure", "Broken figure", "Hidden figure"]
    assert rep["n_images"] == 3
    by_alt = {img["alt"]: img for img in rep["images"]}
    assert [img["alt"] for img in rep["images"]] == ["valid", "broken", "hidden"]
    assert [img["alt"] for img in rep["images"] if img["displayed"]] == ["valid"]
    assert rep["n_displayed"] == 1

    v = by_alt["valid"]
    assert v["complete"] and (v["naturalWidth"], v["naturalHeight"]) == (32, 24)
    assert v["width"] > 0 and v["height"] > 0 and v["visible"]
    assert v["src_prefix"].startswith("data:image/png;base64,")
    assert by_alt["broken"]["naturalWidth"] == 0  # failed to decode
    h = by_alt["hidden"]
    assert h["naturalWidth"] == 32 and h["width"] == 0 and not h["visible"]  # decoded but not laid out
    assert rep["console_errors"] is None or isinstance(rep["console_errors"], list)
