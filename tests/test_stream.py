"""Streaming to a store while the denoiser runs (issue 20, item 2): every site's step goes straight into its place in
the store's chunk files through a bounded queue; the files are bitwise those zarr writes; a writer error reaches the
caller as one sentence; a store killed mid-batch is resumable and its half-written chunks are never counted done."""

import errno
import json
import time
from pathlib import Path

import pytest
import torch
from conftest import CountRuns

import layerscope as ls
from layerscope.engine import store as store_mod
from layerscope.engine import stream as stream_mod

PROMPTS = ["a red cube", "a blue ball", "a green cone", "a small cat", "a big dog"]
SEEDS = list(range(len(PROMPTS)))
GEN = dict(num_inference_steps=3, guidance_scale=4.0)  # two CFG branches
MAP = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.map"


class Interrupt(Exception):
    pass


@pytest.fixture(autouse=True)
def per_step(monkeypatch):
    """The tests' tiny arrays are written step by step, as real models' arrays are (those of less than
    ``SMALL_SEGMENT`` bytes a step are written once at the batch's end; tests that want that say so)."""
    monkeypatch.setattr(store_mod, "SMALL_SEGMENT", 0)


def run(sd, path, capture, max_batch=2, prompts=PROMPTS, **kw):
    return sd.generate(
        prompts, seeds=SEEDS[: len(prompts)], capture=capture(path), max_batch=max_batch, **GEN, **kw
    )  # fmt: skip


def files(path):
    """Every chunk file and manifest of a store, by relative path (metadata and the lock left out)."""
    out = {}
    for f in sorted(Path(path).rglob("*")):
        rel = f.relative_to(path).as_posix()
        if f.is_file() and ("/c." in f"/{rel}" or rel.startswith("manifest/")):
            out[rel] = f.read_bytes()
    return out


def writes_per_sample(sd, tmp_path, monkeypatch, make):
    """How many chunk writes one sample of ``make``'s capture takes (one per site and step, and its image)."""
    real = store_mod._pwrite
    count = []
    monkeypatch.setattr(store_mod, "_pwrite", lambda *a: (count.append(1), real(*a))[1])
    run(sd, tmp_path / "count.zarr", make, prompts=PROMPTS[:1])
    monkeypatch.setattr(store_mod, "_pwrite", real)
    return len(count)


CAPTURES = {
    # several layers and steps, both CFG branches, tensors computed once
    "full": lambda p: ls.Capture(["mid_block", "up_blocks.1.resnets.0", "noise", "text_embeds"], steps=[0, 2], store=p),
    "pooled": lambda p: ls.Capture(["mid_block", "mid_block.resnets.0"], pooled=True, update=True, store=p),
    "cond branch, map": lambda p: ls.Capture([MAP, "mid_block"], branches=["cond"], heads="mean", store=p),
}


@pytest.mark.parametrize("small", [0, 64 * 2**10], ids=["per step", "small at the end"])
@pytest.mark.parametrize(("kind", "max_batch"), [("full", 1), ("full", 2), ("pooled", 2), ("cond branch, map", 2)])
def test_streamed_store_is_bitwise_the_memory_capture_and_zarrs_own_files(
    sd, tmp_path, monkeypatch, kind, max_batch, small
):
    monkeypatch.setattr(store_mod, "SMALL_SEGMENT", small)
    make = CAPTURES[kind]
    mem = sd.generate(
        PROMPTS, seeds=SEEDS, capture=make(None), max_batch=max_batch, **GEN
    )  # 5 samples: with batches of 2 the last block is half empty (padding)
    path = tmp_path / "direct.zarr"
    writes = []
    real = store_mod._pwrite
    monkeypatch.setattr(store_mod, "_pwrite", lambda *a: (writes.append(1), real(*a))[1])
    res = run(sd, path, make, max_batch)
    assert writes  # went straight into the files
    store = ls.ActivationStore.open(path, verify=True)
    assert store.complete and torch.equal(res.images, mem.images) and torch.equal(store.images(), mem.images)
    for what in ("output", "update"):
        assert store.layer_names(what) == sorted(mem.capture.layer_names(what))
        for layer in store.layer_names(what):
            assert torch.equal(store.to_tensor(layer, what), mem.capture._arr(layer, what)), (what, layer)
    # the same run written by zarr (the fallback path) leaves byte-identical chunk files and manifests
    monkeypatch.setattr(store_mod.ActivationStore, "direct_batch", lambda self, specs, samples: None)
    run(sd, tmp_path / "zarr.zarr", make, max_batch)
    assert files(path) == files(tmp_path / "zarr.zarr")


def test_queue_is_bounded_when_the_writer_is_slow(sd, tmp_path, monkeypatch):
    """A writer slower than the denoiser makes the denoiser wait: never more than Q denoiser steps are handed over
    and not yet written (plus the one being written), and at most one finished batch waits while the next
    generates."""
    q = 1
    monkeypatch.setattr(stream_mod, "QUEUE_ITEMS", q)
    writers = []
    real_init = stream_mod.StoreWriter.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        writers.append(self)

    real_write = store_mod.DirectBatch.write

    def slow(self, *a):
        time.sleep(0.02)
        return real_write(self, *a)

    monkeypatch.setattr(stream_mod.StoreWriter, "__init__", init)
    monkeypatch.setattr(store_mod.DirectBatch, "write", slow)
    make = CAPTURES["full"]
    path = tmp_path / "slow.zarr"
    run(sd, path, make, max_batch=1, prompts=PROMPTS[:3])
    (w,) = writers
    assert w.maxsize == q and w.handed == w.written > 3 * q
    assert q <= w.max_behind <= q + 1  # the bound was reached, and held
    assert w.max_unwritten <= 1
    mem = sd.generate(PROMPTS[:3], seeds=SEEDS[:3], capture=make(None), max_batch=1, **GEN).capture
    store = ls.ActivationStore.open(path, verify=True)
    assert store.complete
    for layer in store.layer_names():
        assert torch.equal(store.to_tensor(layer), mem[layer]), layer


def test_writer_error_is_one_sentence_and_stops_the_run(sd, tmp_path, monkeypatch):
    path = tmp_path / "eio.zarr"
    make = CAPTURES["full"]
    first = 2 * writes_per_sample(sd, tmp_path, monkeypatch, make)
    real = store_mod._pwrite
    count = []

    def broken(*a):
        count.append(1)
        if len(count) > first + 3:  # in the second batch
            raise OSError(errno.EIO, "Input/output error")
        return real(*a)

    monkeypatch.setattr(store_mod, "_pwrite", broken)
    with CountRuns(sd) as runs:
        with pytest.raises(stream_mod.StoreWriteError) as info:
            run(sd, path, make)
    msg = str(info.value)
    assert msg == (
        f"writing the activation store {str(path)!r} failed (Input/output error); the batches finished before are "
        "kept, rerun the same command to resume"
    )
    assert runs.calls[:2] == [2, 2]  # raised in the second batch, or at the latest once the third was generated
    monkeypatch.setattr(store_mod, "_pwrite", real)
    store = ls.ActivationStore.open(path)
    assert store.pending() == [2, 3, 4]  # the first batch was finished and kept
    with CountRuns(sd) as runs:
        run(sd, path, make)
    assert runs.calls == [2, 1]
    mem = sd.generate(PROMPTS, seeds=SEEDS, capture=make(None), max_batch=2, **GEN).capture
    store = ls.ActivationStore.open(path, verify=True)
    for layer in store.layer_names():
        assert torch.equal(store.to_tensor(layer), mem[layer]), layer


def test_other_writer_errors_reach_the_caller_as_they_are(sd, tmp_path, monkeypatch):
    def boom(self, *a):
        raise Interrupt("the writer broke")

    monkeypatch.setattr(store_mod.DirectBatch, "write", boom)
    with pytest.raises(Interrupt, match="the writer broke"):
        run(sd, tmp_path / "x.zarr", CAPTURES["pooled"])


@pytest.mark.parametrize("rewrite", [False, True])
def test_store_killed_mid_batch_is_resumable_and_regenerates_that_batch(sd, tmp_path, monkeypatch, rewrite):
    """A kill while a batch's chunks are half written: on reopen the store is not damaged, the batch is pending, and
    a rerun regenerates exactly it. ``rewrite``: the batch rewrites a block whose old record said it was complete
    (the record goes before the first byte is rewritten)."""
    path = tmp_path / "kill.zarr"
    make = CAPTURES["full"]
    mem = sd.generate(PROMPTS, seeds=SEEDS, capture=make(None), max_batch=2, **GEN)
    if rewrite:
        run(sd, path, make)
        victim = path / "output" / "mid_block" / "c.1.0.0.0.0.0"
        victim.unlink()  # block 1 is damaged: its samples are regenerated, over its old files
        start = 0
    else:
        start = 2 * writes_per_sample(sd, tmp_path, monkeypatch, make)  # the first batch's writes
    real = store_mod._pwrite
    count = []

    def killed(file, fd, data, offset):
        count.append(1)
        if len(count) > start + 7:  # the process dies in the middle of the batch
            raise Interrupt
        real(file, fd, data[: len(data) // 2] if len(count) == start + 7 else data, offset)

    monkeypatch.setattr(store_mod, "_pwrite", killed)
    with pytest.raises(Interrupt):
        run(sd, path, make)
    monkeypatch.setattr(store_mod, "_pwrite", real)
    store = ls.ActivationStore.open(path)  # not damaged: the half-written block was never recorded
    assert store.check() == []
    assert store.pending() == ([2, 3] if rewrite else [2, 3, 4])
    assert not (path / "manifest" / "1.json").exists()
    assert [f for f in path.glob("output/*/c.1.*") if f.is_file()]  # block 1 was written in part
    with CountRuns(sd) as runs:
        res = run(sd, path, make)
    assert runs.calls == ([2] if rewrite else [2, 1])
    store = ls.ActivationStore.open(path, verify=True)
    assert store.complete and torch.equal(res.images, mem.images)
    for what in ("output", "update"):
        for layer in store.layer_names(what):
            assert torch.equal(store.to_tensor(layer, what), mem.capture._arr(layer, what)), (what, layer)
    assert json.loads((path / "manifest" / "1.json").read_text())["samples"] == [2, 4]


def test_fresh_store_is_created_on_the_writer_thread(sd, tmp_path, monkeypatch):
    """A fresh store's arrays are made while the generation starts, not before it (its checks still come first)."""
    import threading

    where = []
    real = store_mod._create

    def create(*a, **kw):
        where.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(store_mod, "_create", create)
    run(sd, tmp_path / "t.zarr", CAPTURES["pooled"], prompts=PROMPTS[:1])
    assert where == ["layerscope-store-writer"]
    assert ls.ActivationStore.open(tmp_path / "t.zarr", verify=True).complete


def test_array_metadata_is_what_zarr_writes(sd, tmp_path, monkeypatch):
    """A store's zarr.json files are written as plain JSON (built by zarr's metadata classes, no zarr I/O): every
    array's metadata equals what zarr's create_array writes for it, and the store, its done flags and its images
    read back through zarr itself."""
    import numpy as np
    import zarr

    specs, adopted = [], []
    adopt = store_mod.ActivationStore._adopt

    def spy(self, metas):
        adopt(self, metas)
        adopted.append(len(self._handles))

    monkeypatch.setattr(store_mod.ActivationStore, "_adopt", spy)
    real = store_mod._create
    store_mod._create = lambda path, attrs, sp, *a: (specs.extend(sp), real(path, attrs, sp, *a))[1]
    try:
        layers = ["mid_block", "noise", MAP, "down_blocks.0.resnets.0"]
        written = run(sd, tmp_path / "s", lambda p: ls.Capture(layers, store=p), max_batch=5).capture
    finally:
        store_mod._create = real
    assert len(specs) >= 4
    # the run's handles came from the metadata it wrote, not from disk: equal to what zarr reads back
    on_disk = zarr.open_group(str(tmp_path / "s"), mode="r")
    assert adopted == [len(specs) + 1]  # every array's handle, and the done flags', made at creation
    for s in specs:
        arr = written._handles[(s.what, s.layer)]
        assert arr.metadata == on_disk[s.what][s.layer].metadata and arr.path == f"{s.what}/{s.layer}", s.layer
    ref = zarr.open_group(str(tmp_path / "ref"), mode="w")
    dt = np.dtype("float32")
    for s in specs:
        ref.require_group(s.what).create_array(
            s.layer, shape=s.shape, chunks=store_mod._chunks(s.shape, 5, dt.itemsize), dtype=dt, compressors=None,
            chunk_key_encoding={"name": "default", "separator": "."},
            fill_value=0, dimension_names=store_mod.dimension_names(s),
            attributes=store_mod._jsonable(
                {"layer": s.layer, "what": s.what, "dims": list(s.dims), "steps": s.steps, "branches": s.branches,
                 **s.attrs}
            ),
        )  # fmt: skip
        mine = json.loads((tmp_path / "s" / s.what / s.layer / "zarr.json").read_text())
        assert mine == json.loads((tmp_path / "ref" / s.what / s.layer / "zarr.json").read_text()), s.layer
    store = ls.ActivationStore.open(tmp_path / "s", verify=True)
    assert on_disk["done"][...].tolist() == [True] * 5  # uncompressed flags: zarr reads what _write_done wrote
    assert torch.equal(torch.from_numpy(on_disk["images"][...]), store.images())
    memory = run(sd, None, lambda p: ls.Capture(layers), max_batch=5).capture
    for layer in layers:
        assert torch.equal(store.to_tensor(layer), memory[layer]), layer


@pytest.mark.parametrize("dtype", ["float32", "float16", "bool"])
def test_array_meta_equals_zarrs_for_each_dtype(tmp_path, dtype):
    import numpy as np
    import zarr

    dt = np.dtype(dtype)
    mine = store_mod._array_meta((6, 3, 2, 4), (2, 3, 2, 4), dt, ("sample", "step", "branch", "x.c"), {"k": [1]})
    zarr.create_array(
        str(tmp_path / "ref"), shape=(6, 3, 2, 4), chunks=(2, 3, 2, 4), dtype=dt, compressors=None,
        fill_value=False if dtype == "bool" else 0, dimension_names=("sample", "step", "branch", "x.c"),
        chunk_key_encoding={"name": "default", "separator": "."},
        attributes={"k": [1]}, zarr_format=3,
    )  # fmt: skip
    assert mine == json.loads((tmp_path / "ref" / "zarr.json").read_text())


def test_a_store_with_nested_chunk_keys_still_resumes(sd, tmp_path, monkeypatch):
    """Stores written before chunk keys were flat (``c/1/0/...``, zarr's default) are read and resumed by their own
    metadata: a run stopped after its first batch finishes in today's layerscope, bitwise as one run."""
    make = CAPTURES["full"]
    monkeypatch.setattr(store_mod, "CHUNK_SEPARATOR", "/")
    real = stream_mod.StoreWriter.begin
    calls = []

    def begin(self, ids, specs):
        calls.append(ids)
        if len(calls) == 2:
            raise Interrupt
        return real(self, ids, specs)

    monkeypatch.setattr(stream_mod.StoreWriter, "begin", begin)
    with pytest.raises(Interrupt):
        run(sd, tmp_path / "stopped.zarr", make)
    monkeypatch.setattr(stream_mod.StoreWriter, "begin", real)
    monkeypatch.setattr(store_mod, "CHUNK_SEPARATOR", ".")
    stopped = tmp_path / "stopped.zarr"
    assert (stopped / "output" / "mid_block" / "c" / "0").is_dir()  # nested keys on disk
    res = run(sd, stopped, make)
    store = ls.ActivationStore.open(stopped, verify=True)
    mem = sd.generate(PROMPTS, seeds=SEEDS, capture=make(None), max_batch=2, **GEN)
    assert store.complete and torch.equal(res.images, mem.images)
    assert not list(stopped.glob("output/*/c.*"))  # the resumed batches wrote where the metadata says
    for layer in store.layer_names():
        assert torch.equal(store.to_tensor(layer), mem.capture[layer]), layer


def test_the_writer_is_handed_one_piece_per_denoiser_step(sd, tmp_path, monkeypatch):
    """Every wake of the writer thread preempts one of torch's threads on a busy machine, so the sites of one step go
    over together: one hand-over per captured step and batch, however many layers are captured."""
    writers = []
    real_init = stream_mod.StoreWriter.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        writers.append(self)

    monkeypatch.setattr(stream_mod.StoreWriter, "__init__", init)
    layers = ["mid_block", "up_blocks.1.resnets.0", "down_blocks.0.resnets.0", MAP]
    run(sd, tmp_path / "s.zarr", lambda p: ls.Capture(layers, store=p), max_batch=1, prompts=PROMPTS[:2])
    (w,) = writers
    assert w.handed == w.written == 2 * GEN["num_inference_steps"]  # 2 batches x 3 steps, not x 4 layers
