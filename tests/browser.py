"""Headless-Chromium check of a self-contained HTML report (test helper, not a test module).

``find_or_install_chromium()`` locates Debian's ``chromium`` and ``chromedriver`` (installing them with apt-get
when running as root and they are missing); ``page_report(path)`` opens an HTML file in headless Chromium through
Selenium and returns what a reader would see: the title, every ``<img>`` with whether it is actually displayed
(decoded, non-zero natural size, laid out with a non-zero box and visible), the ``<h2>`` texts and the SEVERE
console entries.

Selenium is given the chromedriver path and the Chromium binary explicitly, so Selenium Manager never tries to
download a browser or a driver; the browser runs with a fresh temporary profile and with its background networking
off (the test machines have no internet, and Chrome's background connections would otherwise stall it).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser")
DRIVER_NAMES = ("chromedriver",)
APT_PACKAGES = ("chromium", "chromium-driver")

CHROME_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-default-browser-check",
    "--window-size=1280,1024",
)

# Runs in the page: one record per <img>, plus the title and the <h2> texts.
_PAGE_JS = r"""
const imgs = Array.from(document.querySelectorAll('img')).map((img, i) => {
  const r = img.getBoundingClientRect();
  const st = window.getComputedStyle(img);
  let visible = st.display !== 'none' && st.visibility !== 'hidden' && st.visibility !== 'collapse'
                && parseFloat(st.opacity || '1') > 0 && img.getClientRects().length > 0;
  if (visible && typeof img.checkVisibility === 'function') {
    visible = img.checkVisibility({checkOpacity: true, checkVisibilityCSS: true});
  }
  const src = img.getAttribute('src') || '';
  return {
    index: i,
    alt: img.getAttribute('alt'),
    src_prefix: src.slice(0, 40),
    src_length: src.length,
    complete: img.complete,
    naturalWidth: img.naturalWidth,
    naturalHeight: img.naturalHeight,
    width: r.width,
    height: r.height,
    visible: visible,
  };
});
return {
  title: document.title,
  url: document.location.href,
  readyState: document.readyState,
  images: imgs,
  h2: Array.from(document.querySelectorAll('h2')).map(h => h.textContent.trim()),
};
"""


def _which(names: tuple[str, ...], default: str) -> str | None:
    if os.path.isfile(default) and os.access(default, os.X_OK):
        return default
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def _locate() -> tuple[str, str] | None:
    chromium = _which(CHROMIUM_NAMES, "/usr/bin/chromium")
    driver = _which(DRIVER_NAMES, "/usr/bin/chromedriver")
    return (chromium, driver) if chromium and driver else None


def _apt(args: list[str], timeout: float) -> bool:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # wait for apt's lock (another apt run may be installing) instead of failing at once
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=600", *args]
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


@functools.lru_cache(maxsize=1)
def find_or_install_chromium() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths; installs Debian's packages with apt-get if missing and running as root.

    None when they are missing and cannot be installed (not root, no apt-get, or the install failed).
    """
    found = _locate()
    if found is not None:
        return found
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if not is_root or shutil.which("apt-get") is None:
        return None
    install = ["install", "-y", "--no-install-recommends", *APT_PACKAGES]
    if not _apt(install, timeout=1200):
        # the package lists may be stale or empty (fresh container): refresh them and try once more
        if not _apt(["update"], timeout=600) or not _apt(install, timeout=1200):
            return _locate()
    return _locate()


def chrome_options(chromium: str, profile_dir: str):
    from selenium.webdriver.chrome.options import Options

    options = Options()
    options.binary_location = chromium
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return options


def page_report(
    html_path: str | os.PathLike, *, timeout: float = 60.0, binaries: tuple[str, str] | None = None
) -> dict[str, Any]:
    """Open ``html_path`` in headless Chromium and report its title, images, <h2> texts and console errors.

    Returned dict: ``title``, ``url``, ``n_images``, ``images`` (one dict per <img> in document order: ``alt``,
    ``src_prefix`` (first 40 characters of src), ``src_length``, ``complete``, ``naturalWidth``,
    ``naturalHeight``, ``width``/``height`` (rendered, getBoundingClientRect), ``visible``, ``displayed``),
    ``n_displayed``, ``h2`` (texts), ``console_errors`` (SEVERE browser-log messages, or None when the driver
    gives no log). ``displayed`` = complete and naturalWidth > 0 and rendered width > 0 and visible.
    Raises RuntimeError when Chromium/chromedriver are not available.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    binaries = binaries or find_or_install_chromium()
    if binaries is None:
        raise RuntimeError("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    chromium, chromedriver = binaries
    path = Path(html_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(path)

    profile = tempfile.mkdtemp(prefix="ls_chromium_")
    driver = None
    try:
        service = Service(executable_path=chromedriver)
        driver = webdriver.Chrome(service=service, options=chrome_options(chromium, profile))
        driver.set_page_load_timeout(timeout)
        driver.set_script_timeout(timeout)
        driver.get(path.as_uri())
        WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return document.readyState") == "complete")
        # readyState 'complete' follows the load event, which waits for every <img>; give decoding a last chance
        deadline = time.monotonic() + min(timeout, 10.0)
        while time.monotonic() < deadline:
            if driver.execute_script("return Array.from(document.images).every(i => i.complete)"):
                break
            time.sleep(0.05)
        page = driver.execute_script(_PAGE_JS)
        try:
            logs = driver.get_log("browser")
            console_errors: list[str] | None = [e.get("message", "") for e in logs if e.get("level") == "SEVERE"]
        except Exception:  # not every driver exposes the browser log
            console_errors = None
    finally:
        if driver is not None:
            try:
                driver.quit()
            except Exception:
                pass
        shutil.rmtree(profile, ignore_errors=True)

    images = []
    for img in page["images"]:
        img = dict(img)
        img["displayed"] = bool(img["complete"] and img["naturalWidth"] > 0 and img["width"] > 0 and img["visible"])
        images.append(img)
    return {
        "title": page["title"],
        "url": page["url"],
        "n_images": len(images),
        "images": images,
        "n_displayed": sum(i["displayed"] for i in images),
        "h2": list(page["h2"]),
        "console_errors": console_errors,
    }
