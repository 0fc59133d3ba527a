import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
sys.path.insert(0, str(Path(__file__).parent))  # test helper modules (torch: specs)

import layerscope as ls  # noqa: E402

_CACHE: dict[str, ls.Generator] = {}

# a few steps keep every test to seconds; the engine is step-count agnostic
GEN = dict(num_inference_steps=3, guidance_scale=4.0)


def tiny(family: str) -> ls.Generator:
    if family not in _CACHE:
        _CACHE[family] = ls.load(f"tiny:{family}")
    return _CACHE[family]


@pytest.fixture(scope="session")
def sd() -> ls.Generator:
    return tiny("sd")


def prompts_for(model: ls.Generator, texts: list[str]) -> list:
    """Kandinsky's decoder takes image embeddings; everything else takes text."""
    if model.capabilities.conditioning == "image_embeds":
        dim = model.layer_map()["image_embeds"].shape[0]
        return [torch.randn(dim, generator=torch.Generator().manual_seed(hash(t) % 2**31)) for t in texts]
    return texts


class CountRuns:
    """Counts generations of a model (wraps its run_batch)."""

    def __init__(self, model: ls.Generator) -> None:
        self.model = model
        self.calls: list[int] = []

    def __enter__(self):
        orig = self.model.run_batch

        def wrapped(prompts, seeds, cfg):
            self.calls.append(len(prompts))
            return orig(prompts, seeds, cfg)

        self.model.run_batch = wrapped
        return self

    def __exit__(self, *exc):
        del self.model.run_batch


@pytest.fixture(scope="session")
def browser() -> tuple[str, str]:
    """(chromium, chromedriver) for headless checks of HTML reports; skips when they cannot be had."""
    from browser import find_or_install_chromium

    found = find_or_install_chromium()
    if found is None:
        pytest.skip(
            "headless Chromium is unavailable: chromium/chromedriver are not installed and could not be "
            "installed (needs root and apt-get: apt-get install chromium chromium-driver)"
        )
    return found
