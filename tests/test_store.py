"""Zarr store: schema, lazy reads, interrupt + resume without duplicates or recomputation, mismatch refusal."""

import json
import warnings

import pytest
import torch
import zarr
from conftest import GEN, CountRuns

import layerscope as ls

PROMPTS = ["a red cube", "a blue ball", "a green cone", "a small cat", "a big dog"]
LAYERS = ["mid_block", "up_blocks.1.resnets.0", "noise", "text_embeds"]


class Interrupt(Exception):
    pass


def test_store_schema_and_equality_with_memory(sd, tmp_path):
    cap_mem = ls.Capture(LAYERS, steps=[0, 2])
    mem = sd.generate(PROMPTS, seeds=range(5), capture=cap_mem, max_batch=2, **GEN).capture
    path = tmp_path / "acts.zarr"
    res = sd.generate(PROMPTS, seeds=range(5), capture=ls.Capture(LAYERS, steps=[0, 2], store=path), max_batch=2, **GEN)
    store = ls.ActivationStore.open(path)
    assert store.complete
    attrs = store.attrs
    assert attrs["model"] == "tiny:sd" and attrs["seeds"] == [0, 1, 2, 3, 4] and attrs["prompts"] == PROMPTS
    assert attrs["layerscope"]["version"] == ls.__version__
    assert len(attrs["timesteps"]) == GEN["num_inference_steps"]
    arr = store["mid_block"]
    assert isinstance(arr, zarr.Array)  # lazy
    assert arr.attrs["dims"] == ["sample", "step", "branch", "channel", "h", "w"]
    assert arr.attrs["steps"] == [0, 2] and arr.attrs["branches"] == ["uncond", "cond"]
    assert store["noise"].attrs["steps"] == [None]
    for layer in LAYERS:
        torch.testing.assert_close(store.to_tensor(layer), mem[layer], atol=0, rtol=0)
    # the metadata is plain JSON on disk, readable without layerscope
    meta = json.loads((path / "zarr.json").read_text())
    assert meta["attributes"]["fingerprint"] == attrs["fingerprint"]
    assert res.images.shape[0] == 5


def test_interrupt_and_resume(sd, tmp_path):
    path = tmp_path / "resume.zarr"
    cap = ls.Capture(LAYERS, store=path)

    def stop_after_first(done, total):
        if done >= 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        sd.generate(PROMPTS, seeds=range(5), capture=cap, max_batch=2, progress=stop_after_first, **GEN)
    store = ls.ActivationStore.open(path)
    assert store.pending() == [2, 3, 4]
    with CountRuns(sd) as runs:
        sd.generate(PROMPTS, seeds=range(5), capture=cap, max_batch=2, **GEN)
    assert runs.calls == [2, 1]  # only the unfinished samples are generated
    with CountRuns(sd) as runs:
        sd.generate(PROMPTS, seeds=range(5), capture=cap, max_batch=2, **GEN)
    assert runs.calls == []  # complete: nothing recomputed
    full = sd.generate(PROMPTS, seeds=range(5), capture=ls.Capture(LAYERS), max_batch=2, **GEN).capture
    store = ls.ActivationStore.open(path)
    assert store.complete
    for layer in LAYERS:
        data = store.to_tensor(layer)
        assert data.shape[0] == len(PROMPTS)  # no duplicated samples
        torch.testing.assert_close(data, full[layer], atol=0, rtol=0)


def test_store_refuses_other_experiment(sd, tmp_path):
    path = tmp_path / "exp.zarr"
    sd.generate(PROMPTS[:2], seeds=[0, 1], capture=ls.Capture(["mid_block"], store=path), **GEN)
    with pytest.raises(ls.StoreMismatchError, match="different experiment"):
        sd.generate(PROMPTS[:2], seeds=[0, 9], capture=ls.Capture(["mid_block"], store=path), **GEN)
    with pytest.raises(ls.StoreMismatchError, match="experiment"):
        sd.generate(PROMPTS[:2], seeds=[0, 1], capture=ls.Capture(["mid_block"], pooled=True, store=path), **GEN)
    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ls.StoreMismatchError, match="not empty"):
        sd.generate(PROMPTS[:1], capture=ls.Capture(["mid_block"], store=other), **GEN)


def test_budget(sd, tmp_path):
    with CountRuns(sd) as runs:
        with pytest.raises(ls.BudgetError, match="store="):
            sd.generate(PROMPTS, capture=ls.Capture("*", budget_bytes=10_000), **GEN)
        with pytest.raises(ls.BudgetError, match="max_batch"):
            sd.generate(PROMPTS, capture=ls.Capture("*", budget_bytes=10_000, store=tmp_path / "b.zarr"), **GEN)
    assert runs.calls == []
    lmap = sd.layer_map()
    est_layers = ["mid_block"]
    res = sd.generate(PROMPTS[:2], capture=ls.Capture(est_layers), **GEN)
    expected = 2 * GEN["num_inference_steps"] * 2 * torch.Size(lmap["mid_block"].shape).numel() * 4
    assert res.capture.nbytes() == expected
    assert sd.capture_bytes(ls.Capture(est_layers), n_samples=2, **GEN) == expected
    half = ls.Capture(est_layers, dtype=torch.float16, branches=["cond"], steps=[0])
    assert sd.capture_bytes(half, n_samples=2, **GEN) == expected // 2 // 2 // GEN["num_inference_steps"]


def test_stored_capture_from_store_as_source(sd, tmp_path):
    path = tmp_path / "src.zarr"
    sd.generate(["a blue ball"], seeds=[1], capture=ls.Capture(["mid_block"], store=path), **GEN)
    store = ls.ActivationStore.open(path)
    a = sd.generate("a red cube", seeds=0, interventions=[ls.replace("mid_block", ls.Stored(store))], **GEN).images
    b = sd.generate(
        ["a red cube", "a blue ball"],
        seeds=[0, 1],
        interventions=[ls.replace("mid_block", ls.Row(1), targets=[0])],
        **GEN,
    ).images[0]
    torch.testing.assert_close(a[0], b, atol=1e-5, rtol=0)


def test_a_store_opens_in_xarray_with_named_dims_and_coordinates(sd, tmp_path):
    """to_xarray: one lazy variable per layer, dims named per layer, prompt/seed/done per sample, timestep per
    captured step, branch labels; the values are the store's; xarray.open_zarr reads the group directly."""
    import numpy as np
    import xarray as xr

    path = tmp_path / "s"
    cap = ls.Capture(["mid_block", "noise"], store=path, steps=[0, 2])
    sd.generate(["a cat", "a dog"], seeds=[3, 4], capture=cap, **GEN)
    store = ls.ActivationStore.open(path)
    ds = store.to_xarray()
    assert ds["mid_block"].dims == ("sample", "step", "branch", "mid_block.channel", "mid_block.h", "mid_block.w")
    assert ds["noise"].dims[:3] == ("sample", "once", "unbranched")
    assert list(ds["prompt"].values) == ["a cat", "a dog"] and list(ds["seed"].values) == [3, 4]
    assert (
        bool(ds["done"].all()) and list(ds["step"].values) == [0, 2] and list(ds["branch"].values) == ["uncond", "cond"]
    )
    assert list(ds["timestep"].values) == [store.attrs["timesteps"][0], store.attrs["timesteps"][2]]
    assert not isinstance(ds["mid_block"].variable._data, np.ndarray)  # lazy: nothing read yet
    np.testing.assert_array_equal(
        ds["mid_block"].sel(step=2, branch="cond").values, np.asarray(store["mid_block"][:, 1, 1])
    )
    name = "mid_block.resnets.0"
    cap = ls.Capture(name, store=tmp_path / "u", update=True)
    sd.generate(["a cat"], capture=cap, **GEN)
    u = ls.ActivationStore.open(tmp_path / "u")
    np.testing.assert_array_equal(u.to_xarray("update")[name].values, np.asarray(u._arr(name, "update")[...]))
    direct = xr.open_zarr(str(path), group="output", consolidated=False)
    assert direct["mid_block"].dims == ds["mid_block"].dims and set(direct.data_vars) == {"mid_block", "noise"}
    with warnings.catch_warnings():  # zarr names the lock file and manifest/ as not zarr nodes
        warnings.simplefilter("ignore")
        root = xr.open_zarr(str(path), consolidated=False)  # the done flags and images, read by zarr itself
    assert root["done"].values.tolist() == [True, True] and root["images"].dims[0] == "sample"
    np.testing.assert_array_equal(root["images"].values, store.images().numpy())
    # a store written before dimension names: a clear error, not xarray's
    meta = path / "output" / "mid_block" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc.pop("dimension_names")
    meta.write_text(json.dumps(doc))
    old = ls.ActivationStore.open(path)
    with pytest.raises(ls.ConfigError, match="without zarr dimension names"):
        old.to_xarray()
