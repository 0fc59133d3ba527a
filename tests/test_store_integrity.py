"""Activation store integrity (issue 22): a store knows what it wrote (manifest: size + crc32 per chunk file), a
resumed run regenerates exactly the damaged samples and returns every image, stored sources are checked against the
run, creation is atomic, a store is locked while written, and bad paths, layer names, full disks and hand-edited
metadata get one sentence before any work."""

import errno
import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
import zarr
from conftest import CountRuns
from torch import nn

import layerscope as ls
from layerscope import folders
from layerscope.engine import StoreIntegrityError
from layerscope.engine import store as store_mod

PROMPTS = ["a red cube", "a blue ball", "a green cone", "a small cat"]
LAYERS = ["mid_block", "up_blocks.1.resnets.0", "noise"]
SEEDS = list(range(len(PROMPTS)))
GEN = dict(num_inference_steps=2, guidance_scale=4.0)  # two CFG branches, two steps: as cheap as it gets


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def reference(sd):
    """An uninterrupted in-memory run: the data every store must end up holding, bitwise."""
    return sd.generate(PROMPTS, seeds=SEEDS, capture=ls.Capture(LAYERS), max_batch=2, **GEN)


def capture(sd, path, max_batch=2, **kw):
    return sd.generate(PROMPTS, seeds=SEEDS, capture=ls.Capture(LAYERS, store=path), max_batch=max_batch, **GEN, **kw)


def assert_equal_to(reference, path, images=None):
    store = ls.ActivationStore.open(path, verify=True)
    assert store.complete
    for layer in LAYERS:
        assert torch.equal(store.to_tensor(layer), reference.capture[layer]), layer
    assert torch.equal(store.images(), reference.images)
    if images is not None:
        assert torch.equal(images, reference.images)


def chunk(path, layer, block):
    """The chunk file of ``layer`` holding sample block ``block`` (all steps in one chunk at these sizes)."""
    arr = ls.ActivationStore.open(path)[layer]
    key = arr.metadata.encode_chunk_key((block,) + (0,) * (arr.ndim - 1))
    return Path(path) / "output" / layer / key


# 1. a store knows what it wrote ---------------------------------------------------------------------------------
def test_manifest_records_every_chunk_file(sd, reference, tmp_path):
    path = tmp_path / "acts.zarr"
    capture(sd, path)
    blocks = sorted(int(f.stem) for f in (path / "manifest").glob("*.json"))
    assert blocks == [0, 1]  # 4 samples in blocks of 2
    entry = json.loads((path / "manifest" / "1.json").read_text())
    assert entry["samples"] == [2, 4]
    files = entry["files"]
    expected = {chunk(path, layer, 1).relative_to(path).as_posix() for layer in LAYERS} | {"images/c.1.0.0.0"}
    assert set(files) == expected  # every data array's chunk file of the block, images included
    for rel, (size, crc) in files.items():
        data = (path / rel).read_bytes()
        assert size == len(data) > 0
        assert crc == zlib.crc32(data)
    assert_equal_to(reference, path)


def test_deleted_chunk_is_named_and_only_its_samples_are_regenerated(sd, reference, tmp_path):
    path = tmp_path / "acts.zarr"
    capture(sd, path)
    victim = chunk(path, "mid_block", 1)
    victim.unlink()
    with pytest.raises(StoreIntegrityError, match=r"is damaged: output/mid_block/c\.1\S* is missing \(1 damaged file"):
        ls.ActivationStore.open(path)
    with CountRuns(sd) as runs:
        res = capture(sd, path)
    assert runs.calls == [2]  # samples 2 and 3 (block 1), nothing else
    assert_equal_to(reference, path, res.images)


def test_truncated_chunk_is_found_by_the_size_check(sd, reference, tmp_path):
    path = tmp_path / "acts.zarr"
    capture(sd, path)
    victim = path / "images" / "c.0.0.0.0"  # the images are data like any layer
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    with pytest.raises(StoreIntegrityError, match=rf"truncated \({len(data) // 3} of {len(data)} bytes\)"):
        ls.ActivationStore.open(path)
    with CountRuns(sd) as runs:
        res = capture(sd, path)
    assert runs.calls == [2]  # samples 0 and 1 (block 0)
    assert_equal_to(reference, path, res.images)


def test_changed_bytes_are_found_by_verify(sd, reference, tmp_path):
    path = tmp_path / "acts.zarr"
    capture(sd, path)
    victim = chunk(path, "mid_block", 0)
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    ls.ActivationStore.open(path)  # same size: the cheap check passes
    with pytest.raises(StoreIntegrityError, match="checksum mismatch"):
        ls.ActivationStore.open(path, verify=True)


def test_damaged_manifest_regenerates_its_block(sd, reference, tmp_path):
    path = tmp_path / "acts.zarr"
    capture(sd, path)
    (path / "manifest" / "1.json").write_text("{not json")
    with pytest.raises(StoreIntegrityError, match=r"manifest/1.json is not a readable manifest \(1 damaged file in"):
        ls.ActivationStore.open(path)
    with CountRuns(sd) as runs:
        res = capture(sd, path)
    assert runs.calls == [2]  # block 1: what it holds cannot be checked
    assert_equal_to(reference, path, res.images)


def test_resume_with_another_batch_size_keeps_the_manifest_true(sd, reference, tmp_path):
    """Batches of 1 over chunks of 2 write block 1 in two parts; the manifest follows every rewrite."""
    path = tmp_path / "acts.zarr"

    def stop(done, total):
        if done >= 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        capture(sd, path, progress=stop)
    with CountRuns(sd) as runs:
        res = capture(sd, path, max_batch=1)
    assert runs.calls == [1, 1]
    # batch composition changes float rounding (~1e-6), so the reference is batched the same way: [0, 1], [2], [3]
    rest = sd.generate(PROMPTS[2:], seeds=SEEDS[2:], capture=ls.Capture(LAYERS), max_batch=1, **GEN)
    store = ls.ActivationStore.open(path, verify=True)
    assert store.complete
    for layer in LAYERS:
        want = torch.cat([reference.capture[layer][:2], rest.capture[layer]])
        assert torch.equal(store.to_tensor(layer), want), layer
    want = torch.cat([reference.images[:2], rest.images])
    assert torch.equal(store.images(), want) and torch.equal(res.images, want)


# 2. a resumed streamed generate returns every row ---------------------------------------------------------------
def test_resumed_generate_returns_every_row_in_prompt_order(sd, reference, tmp_path):
    path = tmp_path / "acts.zarr"

    def stop(done, total):
        if done >= 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        capture(sd, path, progress=stop)
    with CountRuns(sd) as runs:
        res = capture(sd, path)
    assert runs.calls == [2]
    assert res.images.shape[0] == len(PROMPTS)
    assert torch.equal(res.images, reference.images)  # finished rows read back bitwise
    with CountRuns(sd) as runs:
        again = capture(sd, path)  # complete: nothing generated, every row returned
    assert runs.calls == []
    assert torch.equal(again.images, reference.images)
    assert again.timesteps == reference.timesteps and len(again.timesteps) == GEN["num_inference_steps"]


def test_store_of_an_older_schema_is_not_resumed_into_a_subset(sd, tmp_path):
    path = tmp_path / "acts.zarr"
    capture(sd, path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["layerscope"]["schema"] = 1
    (path / "zarr.json").write_text(json.dumps(meta))
    with CountRuns(sd) as runs:
        with pytest.raises(ls.StoreMismatchError, match="older layerscope .* kept no images"):
            capture(sd, path)
    assert runs.calls == []


# 3. stored sources are checked before generating ----------------------------------------------------------------
def test_stored_source_from_another_run_is_refused_before_generating(sd, tmp_path):
    path = tmp_path / "six.zarr"
    sd.generate(["a blue ball"], seeds=[1], capture=ls.Capture(["mid_block"], store=path), num_inference_steps=6)
    six = ls.ActivationStore.open(path)
    with CountRuns(sd) as runs:
        with pytest.raises(ls.ConfigError, match=r"another run, with num_inference_steps=6 \(this run: 4\)"):
            sd.generate("a red cube", interventions=[ls.replace("mid_block", ls.Stored(six))], num_inference_steps=4)
        big = sd.generate(["a blue ball"], capture=ls.Capture(["mid_block"], pooled=True), height=64, width=64, **GEN)
        runs.calls.clear()
        with pytest.raises(ls.ConfigError, match=r"height=64 \(this run: 32\), width=64 \(this run: 32\)"):
            sd.generate("a red cube", interventions=[ls.add("mid_block", ls.Stored(big.capture))], **GEN)
        other = sd.generate(["a blue ball"], capture=ls.Capture(["mid_block"]), **GEN).capture
        other.attrs["model"] = "tiny:sd2"
        runs.calls.clear()
        with pytest.raises(ls.ConfigError, match=r"model 'tiny:sd2' \(this run: 'tiny:sd'\)"):
            sd.generate("a red cube", interventions=[ls.replace("mid_block", ls.Stored(other))], **GEN)
    assert runs.calls == []
    # the same settings are accepted
    sd.generate("a red cube", interventions=[ls.replace("mid_block", ls.Stored(six))], num_inference_steps=6)


def test_stored_source_at_other_timesteps_is_refused_before_anything_is_kept(sd, tmp_path):
    src = sd.generate(["a blue ball"], capture=ls.Capture(["mid_block"]), **GEN).capture
    src.timesteps = [t + 1.0 for t in src.timesteps]  # same step count, another schedule
    path = tmp_path / "out.zarr"
    with pytest.raises(ls.ConfigError, match="recorded at timesteps .* but this run steps through"):
        sd.generate(
            ["a red cube", "a cat"],
            interventions=[ls.replace("mid_block", ls.Stored(src))],
            capture=ls.Capture(["mid_block"], store=path),
            max_batch=1,
            **GEN,
        )
    assert ls.ActivationStore.open(path).pending() == [0, 1]  # nothing written


# 4. atomic creation and locking ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fail_at", [0, 2, 3])  # the first move, one in the middle, the root zarr.json
def test_a_creation_killed_at_any_move_leaves_nothing_or_a_resumable_store(sd, reference, tmp_path, monkeypatch,
                                                                           fail_at):  # fmt: skip
    path = tmp_path / "acts.zarr"
    real = Path.rename
    calls = []

    def rename(self, target):
        calls.append(target)
        if len(calls) > fail_at:
            raise Interrupt  # the process dies here
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(Interrupt):
        capture(sd, path)
    monkeypatch.setattr(Path, "rename", real)
    assert not (path / "zarr.json").exists()  # the root metadata is the last move: nothing committed yet
    with pytest.raises(ls.ConfigError, match="unfinished activation store|not a layerscope activation store"):
        ls.ActivationStore.open(path)
    res = capture(sd, path)
    assert_equal_to(reference, path, res.images)
    assert not list(tmp_path.glob(".acts.zarr.layerscope-tmp-*"))  # leftovers cleaned


def test_a_creation_killed_while_building_is_cleaned_up(sd, reference, tmp_path, monkeypatch):
    path = tmp_path / "acts.zarr"
    real = store_mod._write_node
    n = []

    def write_node(*a, **kw):  # killed while writing the second zarr node of the temporary store
        n.append(1)
        if len(n) == 2:
            raise Interrupt
        return real(*a, **kw)

    monkeypatch.setattr(store_mod, "_write_node", write_node)
    with pytest.raises(Interrupt):
        capture(sd, path)
    monkeypatch.setattr(store_mod, "_write_node", real)
    assert list(tmp_path.glob(".acts.zarr.layerscope-tmp-*"))
    assert [p.name for p in path.iterdir()] == [folders.LOCK_FILE]
    res = capture(sd, path)
    assert_equal_to(reference, path, res.images)
    assert not list(tmp_path.glob(".acts.zarr.layerscope-tmp-*"))


def test_a_store_being_written_is_locked(sd, tmp_path):
    path = tmp_path / "acts.zarr"
    with CountRuns(sd) as runs:
        with folders.lock(path, "activation store"):  # flock: a second lock, even in this process, is refused
            with pytest.raises(folders.FolderInUseError, match=rf"in use by pid {os.getpid()}"):
                capture(sd, path)
    assert runs.calls == []
    script = textwrap.dedent(
        f"""
        import fcntl, os, sys
        fd = os.open({str(path / folders.LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        print("locked", flush=True)
        sys.stdin.read()
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with CountRuns(sd) as runs:
            with pytest.raises(folders.FolderInUseError, match=rf"in use by pid {child.pid}"):
                capture(sd, path)
        assert runs.calls == []
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    capture(sd, path)  # released when the holder ends
    # the lock file (and the manifest folder) do not confuse the store or zarr
    store = ls.ActivationStore.open(path)
    assert (path / folders.LOCK_FILE).exists()
    assert store.layer_names() == sorted(LAYERS)
    assert sorted(name for name, _ in zarr.open_group(str(path))["output"].arrays()) == sorted(LAYERS)


# 5. bad paths, layer names, full disks --------------------------------------------------------------------------
def test_store_path_that_is_a_file_is_refused_before_generating(sd, tmp_path):
    file = tmp_path / "acts.zarr"
    file.write_text("not a folder")
    with CountRuns(sd) as runs:
        with pytest.raises(ls.ConfigError, match="is an existing file; give a folder path"):
            capture(sd, file)
    assert runs.calls == []


class Slashed(nn.Module):
    """A generator with a child module whose name holds a '/'."""

    latent_dim = 4

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleDict({"a/b": nn.Linear(4, 12)})

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.blocks["a/b"](z)).view(-1, 3, 2, 2)


def test_layer_name_with_a_slash_is_refused_for_stores(tmp_path):
    g = ls.load(Slashed())
    assert "blocks.a/b" in [e.name for e in g.layer_map()]
    assert g.generate(["", ""], capture=ls.Capture("blocks.a/b")).capture["blocks.a/b"].shape[0] == 2  # memory: fine
    with CountRuns(g) as runs:
        with pytest.raises(ls.ConfigError, match=r"layer name 'blocks.a/b' cannot name an array in a zarr store"):
            g.generate(["", ""], capture=ls.Capture("blocks.a/b", store=tmp_path / "s.zarr"))
    assert runs.calls == []
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("where", ["chunk", "manifest", "done"])
def test_full_disk_is_one_sentence_and_the_store_resumes(sd, reference, tmp_path, monkeypatch, where):
    path = tmp_path / "acts.zarr"
    if where == "chunk":  # chunk bytes are written straight into the files as each step is captured
        module, name = store_mod, "_pwrite"
    elif where == "manifest":
        module, name = store_mod, "atomic_write_text"
    else:
        module, name = store_mod, "atomic_write_bytes"
    real = getattr(module, name)
    count = []
    # writes before the failure: the first batch's 12 chunk writes (2 samples x (2 steps of 2 layers, the noise
    # once, the image)) and one more; the creation marker, the first manifest and the root metadata; the first
    # batch's done flags
    after = {"chunk": 12, "manifest": 3, "done": 1}[where]

    def full(*a, **kw):
        if where == "chunk" and "/c." not in str(a[0]):
            return real(*a, **kw)  # metadata
        count.append(1)
        if len(count) > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **kw)

    monkeypatch.setattr(module, name, full)
    with pytest.raises(folders.DiskFullError, match=r"^the disk holding .* is full; free space and rerun"):
        capture(sd, path)
    monkeypatch.setattr(module, name, real)
    assert ls.ActivationStore.open(path).pending()  # something is left to do
    res = capture(sd, path)
    assert_equal_to(reference, path, res.images)


# 6. hand-edited metadata ----------------------------------------------------------------------------------------
def test_invalid_metadata_is_one_sentence_naming_the_file(sd, tmp_path):
    path = tmp_path / "acts.zarr"
    capture(sd, path)
    root = path / "zarr.json"
    good = root.read_text()
    root.write_text(good[:-10])  # a hand edit gone wrong
    with pytest.raises(StoreIntegrityError, match=rf"metadata file '{root}' is not valid JSON"):
        ls.ActivationStore.open(path)
    with CountRuns(sd) as runs:
        with pytest.raises(StoreIntegrityError, match=rf"metadata file '{root}' is not valid JSON"):
            capture(sd, path)
    assert runs.calls == []
    root.write_text(good)
    layer_meta = path / "output" / "mid_block" / "zarr.json"
    layer_meta.write_text("[1, 2")
    with pytest.raises(StoreIntegrityError, match=rf"'{layer_meta}' is not valid JSON"):
        ls.ActivationStore.open(path)
    layer_meta.write_text("{}")  # JSON, but not zarr metadata
    with pytest.raises(StoreIntegrityError, match=rf"'{layer_meta}' is not zarr v3 metadata"):
        ls.ActivationStore.open(path)
    meta = json.loads(good)
    meta["attributes"] = "oops"  # zarr metadata zarr itself refuses
    root.write_text(json.dumps(meta))
    layer_meta.write_text((path / "output" / "noise" / "zarr.json").read_text())
    with pytest.raises(StoreIntegrityError, match=rf"metadata file '{root}' is not valid zarr metadata"):
        ls.ActivationStore.open(path)
