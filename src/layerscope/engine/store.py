"""Captured activations: in memory (:class:`CaptureResult`) or streamed to a zarr folder (:class:`ActivationStore`).

Store schema (zarr v3, one folder per experiment; schema 2)::

    <store>/                      group; attrs: layerscope {schema, version}, model, prompts, negative_prompt, seeds,
                                  timesteps, num_inference_steps, guidance_scale, height, width, branches,
                                  fingerprint, experiment (capture settings and interventions)
    <store>/output/<layer>        float array, dims (sample, step, branch, *feature) where feature is
                                  (channel, h, w) for maps, (token, channel) for sequences, (channel,) when pooled;
                                  attrs: layer, kind, stage, what, dims, steps (step indices, [null] for tensors
                                  computed once per generation), branches, pooled
    <store>/update/<layer>        same for block updates (output - input), when requested
    <store>/images                float32 (sample, 3, H, W) in [0, 1]: the generated images exactly as ``generate``
                                  returned them (so a resumed run returns every row, finished ones read back from
                                  here, bitwise equal to an uninterrupted run); created with the first batch
    <store>/done                  bool (sample,): True once every array holds that sample; a resumed run only
                                  generates samples that are not done, so nothing finished is recomputed and no
                                  sample is written twice
    <store>/manifest/<block>.json what the store wrote (not zarr; plain JSON): one file per sample block ``k`` (the
                                  samples ``k*c .. (k+1)*c-1`` of chunk size ``c``), ``{"block", "samples": [start,
                                  stop], "files": {chunk file path: [size in bytes, crc32]}}`` for every chunk file of
                                  that block in every data array (output, update, images); rewritten atomically after
                                  a batch's data is written and before its samples are marked done
    <store>/.layerscope.lock      the writer's lock (``layerscope.folders.lock``), holding its pid; not zarr

Arrays are chunked one sample batch x all steps (split along steps above 32 MiB), so a batch is one file per
layer (``ActivationStore.open(path)["up_blocks.1"]`` is a lazy zarr array).

**Integrity.** ``ActivationStore.open`` checks that every chunk file of the manifest exists with its recorded size
(a stat per file), ``open(path, verify=True)`` also its crc32 (reads every byte), and raises
:class:`StoreIntegrityError` naming the first damaged file. A resumed run (:meth:`ActivationStore.create_or_resume`)
does the size check and marks the samples of every damaged block as not done, so exactly those are regenerated.
The store is created under a temporary name beside its path and moved into place with the root ``zarr.json`` last,
so a kill at any moment leaves nothing or a resumable store; ``done``, the root metadata and the manifest are
written atomically (temporary file + rename).

**Streaming.** A capture streamed by :class:`~.stream.StoreWriter` writes each denoiser step of every site, as soon as
the hooks have captured it, straight into its place in the chunk files (:meth:`ActivationStore.direct_batch`: byte
offsets from the uncompressed chunk layout, crc32 folded as the pieces arrive), on one writer thread fed through a
bounded queue; the files are byte for byte what zarr writes. A block being rewritten loses its manifest record first,
and a batch's record and ``done`` flags come only after its last write (:meth:`ActivationStore.commit_direct`), so a
kill mid-batch leaves a block that reopens as not done. Batches that fill only part of a block, and arrays with other
codecs, go through zarr. A fresh store's arrays are created on the writer thread while the first steps run
(``create_or_resume(defer=True)``). Every ``zarr.json`` is built by zarr's own metadata classes in this process and
written as a plain file (no I/O through zarr's event loop); chunk keys are flat (``c.1.0.0...``, see
:data:`CHUNK_SEPARATOR`), and arrays whose steps are small are written once at the batch's end (:data:`SMALL_SEGMENT`).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import shutil
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import zarr
from zarr.core.sync import sync as zarr_sync

from ..errors import ConfigError, DamagedError, LayerNameError, StoreMismatchError, close_matches
from ..folders import LOCK_FILE, atomic_write_bytes, atomic_write_text, disk_errors

SCHEMA = 2

MANIFEST = "manifest"
IMAGES = "images"
CREATING = ".layerscope-creating"  # marker inside a store folder while a creation moves its files in
TMP_TAG = ".layerscope-tmp-"  # temporary folders (creations, the images array) start or contain this
WRITE_ALL_CHUNKS: Any = {"write_empty_chunks": True}  # every chunk file exists, so a missing one is damage


class StoreIntegrityError(StoreMismatchError, DamagedError):
    """A store's files do not match what it recorded writing (a missing, truncated or changed chunk file), or its
    metadata cannot be read."""


def fingerprint(payload: dict[str, Any]) -> str:
    """A stable hash of an experiment description (what makes two runs the same experiment)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class ArraySpec:
    layer: str
    what: str
    shape: tuple[int, ...]  # full shape: (sample, step, branch, *feature)
    dims: tuple[str, ...]
    steps: list[int | None]
    branches: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


def dimension_names(s: ArraySpec) -> tuple[str, ...]:
    """The zarr dimension names of an array, unique in its group so ``xarray.open_zarr`` can read the whole group:
    ``sample``; ``step`` (the captured steps, shared by every per-step array) or ``once`` (computed once per
    generation); ``branch`` (the CFG branches kept) or ``unbranched``; then the layer's own feature dims, prefixed
    with its name (``mid_block.channel``, ``mid_block.h``, ...)."""
    step = "once" if s.steps == [None] else "step"
    branch = "unbranched" if s.branches == ["none"] else "branch"
    return ("sample", step, branch) + tuple(f"{s.layer}.{d}" for d in s.dims[3:])


def check_array_names(specs: list[ArraySpec]) -> None:
    """Refuse, before any generation, a layer whose name cannot be a zarr array name (``/`` nests arrays)."""
    for s in specs:
        name = s.layer
        if "/" in name or name in ("", ".", "..") or name.startswith("__"):
            raise ConfigError(
                f"the layer name {name!r} cannot name an array in a zarr store (names must not contain '/', be "
                "'.' or '..', or start with '__'); capture it in memory (store=None) or give the layer another name"
            )


class _Lookup:
    """Shared access used by interventions that take a stored capture as their source."""

    def _arr(self, layer: str, what: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _meta(self, layer: str, what: str) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def layer_names(self, what: str = "output") -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def recorded(self) -> dict[str, Any]:
        """The run the capture came from, as far as recorded: model, num_inference_steps, height, width,
        timesteps (keys missing when unknown; nothing is checked for a capture that records nothing)."""
        return {}

    def steps_of(self, layer: str, what: str = "output") -> list[int | None]:
        return list(self._meta(layer, what)["steps"])

    def branches_of(self, layer: str, what: str = "output") -> list[str]:
        return list(self._meta(layer, what)["branches"])

    def feature_shape(self, layer: str, what: str = "output") -> tuple[int, ...]:
        return tuple(self._arr(layer, what).shape[3:])

    def n_samples(self, layer: str, what: str = "output") -> int:
        return int(self._arr(layer, what).shape[0])

    def check_layer(self, layer: str, what: str = "output") -> None:
        names = self.layer_names(what)
        if layer not in names:
            raise LayerNameError(
                f"the capture holds no {what} for {layer!r}; it has: {', '.join(close_matches(layer, names))}"
            )

    def lookup(self, layer: str, what: str, sample: int, step: int | None, branch: str | None) -> torch.Tensor:
        """The stored tensor of one sample at one step (None for once-per-generation tensors) and branch."""
        steps = self.steps_of(layer, what)
        si = 0 if steps == [None] else steps.index(step)
        branches = self.branches_of(layer, what)
        bi = 0 if len(branches) == 1 else branches.index(cast(str, branch))
        data = self._arr(layer, what)[sample, si, bi]
        return data if isinstance(data, torch.Tensor) else torch.from_numpy(np.asarray(data))


class CaptureResult(_Lookup):
    """Captures held in memory: ``result["layer"]`` is a tensor (sample, step, branch, *feature)."""

    def __init__(self) -> None:
        self.output: dict[str, torch.Tensor] = {}
        self.update: dict[str, torch.Tensor] = {}
        self.meta: dict[tuple[str, str], dict[str, Any]] = {}
        self.timesteps: list[float] = []
        self.attrs: dict[str, Any] = {}
        self._parts: dict[tuple[str, str], list[torch.Tensor]] = {}

    def _arr(self, layer: str, what: str) -> torch.Tensor:
        self.check_layer(layer, what)
        return (self.output if what == "output" else self.update)[layer]

    def _meta(self, layer: str, what: str) -> dict[str, Any]:
        self.check_layer(layer, what)
        return self.meta[(what, layer)]

    def layer_names(self, what: str = "output") -> list[str]:
        return list((self.output if what == "output" else self.update).keys())

    def recorded(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            k: self.attrs[k] for k in ("model", "num_inference_steps", "height", "width") if k in self.attrs
        }
        if self.timesteps:
            rec["timesteps"] = list(self.timesteps)
        return rec

    def __getitem__(self, layer: str) -> torch.Tensor:
        return self._arr(layer, "output")

    def __contains__(self, layer: str) -> bool:
        return layer in self.output

    def keys(self) -> list[str]:
        return list(self.output)

    def dims(self, layer: str, what: str = "output") -> tuple[str, ...]:
        return tuple(self._meta(layer, what)["dims"])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.output, self.update) for t in d.values())

    # building ---------------------------------------------------------------------------------------------------
    def _append(self, spec: ArraySpec, data: torch.Tensor) -> None:
        key = (spec.what, spec.layer)
        if key not in self.meta:
            self.meta[key] = {"dims": spec.dims, "steps": spec.steps, "branches": spec.branches, **spec.attrs}
        self._parts.setdefault(key, []).append(data)

    def _finalize(self) -> None:
        """Join the per-batch parts once (batches arrive in sample order)."""
        for (what, layer), parts in self._parts.items():
            target = self.output if what == "output" else self.update
            target[layer] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        self._parts = {}


@dataclass
class _Creation:
    """What :func:`_create` needs to write a fresh store."""

    attrs: dict[str, Any]
    specs: list[ArraySpec]
    n: int
    chunk_samples: int
    dtype: torch.dtype


@dataclass
class Damage:
    """One damaged file of a store: its path relative to the store, what is wrong, the sample block it holds."""

    file: str
    problem: str
    block: int | None = None


class ActivationStore(_Lookup):
    """A zarr folder of captured activations (see the module docstring for its schema and integrity rules)."""

    def __init__(self, path: str | Path, group: zarr.Group | None, creation: _Creation | None = None) -> None:
        self.path = Path(path)
        self._group = group
        self._creation = creation  # a fresh store not yet on disk (create_or_resume(defer=True))
        self._handles: dict[tuple[str, str], zarr.Array[Any]] = {}
        self._data: list[zarr.Array[Any]] | None = None  # every data array (output, update, images), for manifests

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self.materialize()
        assert self._group is not None
        return self._group

    @group.setter
    def group(self, group: zarr.Group) -> None:
        self._group = group

    def materialize(self) -> None:
        """Create a store whose creation was deferred (``create_or_resume(defer=True)``); a no-op otherwise. The
        streaming writer calls it on its thread, so the arrays are made while the first steps run."""
        c = self._creation
        if c is None:
            return
        with disk_errors(self.path):
            root, metas = _create(self.path, c.attrs, c.specs, c.n, c.chunk_samples, c.dtype)
        self._group = _group_from(self.path, root)
        self._creation = None
        self._adopt(metas)

    def _adopt(self, metas: dict[tuple[str, str], dict[str, Any]]) -> None:
        """Handles of the arrays just created, from the metadata this run wrote (no reread of every array's
        zarr.json through zarr's event-loop thread, about 0.7 ms each). Left to the lazy lookup on any surprise."""
        try:
            handles = {key: _array_from(self.group, "/".join(k for k in key if k), meta) for key, meta in metas.items()}
        except Exception:  # another zarr's internals: open them from disk when first used
            return
        for key, arr in handles.items():
            self._handles[key] = arr.with_config(WRITE_ALL_CHUNKS)
        self._data = [self._handles[k] for k in sorted(k for k in metas if k[0] in ("output", "update"))]

    def _array(self, what: str, layer: str) -> zarr.Array[Any]:
        return self._handle((what, layer), f"{what}/{layer}", lambda: cast(zarr.Group, self.group[what])[layer])

    def _handle(self, key: tuple[str, str], label: str, get: Callable[[], Any]) -> zarr.Array[Any]:
        """A cached array handle (each lookup would reread metadata from disk); unreadable metadata in one sentence."""
        if key not in self._handles:
            try:
                arr = cast("zarr.Array[Any]", get())
            except (KeyError, LayerNameError):
                raise
            except Exception as exc:
                raise StoreIntegrityError(
                    f"the metadata of {label} in the store {str(self.path)!r} cannot be read "
                    f"({type(exc).__name__}: {exc}); restore it or delete the store"
                ) from None
            self._handles[key] = arr.with_config(WRITE_ALL_CHUNKS)
        return self._handles[key]

    # opening ----------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> "ActivationStore":
        """Open an existing store for lazy reading; its chunk files are checked against its manifest (sizes; also
        checksums with ``verify=True``), and a damaged store raises :class:`StoreIntegrityError`."""
        path = Path(path)
        if not (path / "zarr.json").exists():
            if (path / CREATING).exists():
                raise ConfigError(
                    f"{str(path)!r} is an unfinished activation store (its creation was interrupted); rerun the "
                    "capture to create it"
                )
            raise ConfigError(f"{str(path)!r} is not a layerscope activation store (no zarr.json there)")
        group = _open_group(path, "r")
        if "layerscope" not in group.attrs:
            raise ConfigError(f"{str(path)!r} is a zarr group but not a layerscope activation store")
        store = cls(path, group)
        damage = store.check(verify=verify)
        if damage:
            raise StoreIntegrityError(_damage_message(path, damage))
        return store

    @staticmethod
    def check_target(path: str | Path) -> None:
        """Refuse a folder that is neither a layerscope store nor empty (before a lock file is put into it)."""
        path = Path(path)
        if (path / "zarr.json").exists() or (path / CREATING).exists() or not path.is_dir():
            return
        if _foreign_entries(path):
            raise StoreMismatchError(f"{str(path)!r} exists, is not empty and is not a zarr store; choose another path")

    @classmethod
    def create_or_resume(
        cls,
        path: str | Path,
        attrs: dict[str, Any],
        specs: list[ArraySpec],
        chunk_samples: int,
        dtype: torch.dtype,
        defer: bool = False,
    ) -> "ActivationStore":
        """Create a store for this experiment, or reopen it to resume; a different experiment is refused.

        The caller holds ``layerscope.folders.lock(path)``. On resume, the samples of blocks whose chunk files are
        missing or have the wrong size are marked not done (so they are regenerated). With ``defer``, a store that
        must be created is checked here but written by :meth:`materialize` (or its first use)."""
        path = Path(path)
        fp = attrs["fingerprint"]
        n = specs[0].shape[0] if specs else len(attrs.get("prompts", []))
        with disk_errors(path):
            _clean_temporaries(path)
            if (path / "zarr.json").exists():
                group = _open_group(path, "a")
                old = dict(group.attrs)
                if "layerscope" not in old:
                    raise StoreMismatchError(
                        f"{str(path)!r} exists and is a zarr group without layerscope's attributes, so it is not a "
                        "layerscope store; choose another path (or delete it if it is a store an older layerscope "
                        "left unfinished)"
                    )
                if old.get("fingerprint") != fp:
                    diff = sorted(
                        k
                        for k in set(old) | set(attrs)
                        if k not in ("fingerprint", "timesteps", "layerscope") and old.get(k) != _jsonable(attrs.get(k))
                    )
                    raise StoreMismatchError(
                        f"the store {str(path)!r} holds a different experiment (differs in: "
                        f"{', '.join(diff) or 'settings'}); use a new store path or delete the old one"
                    )
                store = cls(path, group)
                if store.schema < SCHEMA:
                    if store.pending() != list(range(n)):
                        raise StoreMismatchError(
                            f"the store {str(path)!r} was written by an older layerscope (store schema "
                            f"{store.schema}) that kept no images, so a resumed run could not return every image; "
                            "delete it or use a new store path"
                        )
                    _clear(path)  # holds nothing finished: re-created in today's schema
                else:
                    (path / CREATING).unlink(missing_ok=True)
                    store._repair()
                    return store
            if (path / CREATING).exists():
                _clear(path)  # an interrupted creation: its files are ours, and nothing in them is finished
            if path.exists() and _foreign_entries(path):
                raise StoreMismatchError(
                    f"{str(path)!r} exists, is not empty and is not a zarr store; choose another path"
                )
            creation = _Creation(attrs, specs, n, chunk_samples, dtype)
            if defer:
                return cls(path, None, creation)
            store = cls(path, None, creation)
            store.materialize()
        return store

    # writing ----------------------------------------------------------------------------------------------------
    @property
    def schema(self) -> int:
        return int(cast(dict[str, Any], self.group.attrs.get("layerscope", {})).get("schema", 1))

    @property
    def n(self) -> int:
        if self._creation is not None:
            return self._creation.n
        return int(self._done_array().shape[0])

    def _done_array(self) -> zarr.Array[Any]:
        return self._array_at("done")

    def _array_at(self, name: str) -> zarr.Array[Any]:
        return self._handle(("", name), name, lambda: self.group[name])

    def _done_file(self) -> tuple[Path, int]:
        arr = self._done_array()
        return self.path / "done" / arr.metadata.encode_chunk_key((0,)), int(arr.chunks[0])

    def _read_done(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        file, size = self._done_file()
        try:
            data = file.read_bytes()
        except FileNotFoundError:  # never written: nothing done
            return np.zeros(self.n, dtype=bool)
        if len(data) != size:
            raise StoreIntegrityError(
                f"the store {str(self.path)!r} is damaged: {file.relative_to(self.path)} holds {len(data)} of "
                f"{size} bytes; delete the store and rerun the capture"
            )
        return np.frombuffer(data, dtype=np.uint8)[: self.n].astype(bool)

    def _write_done(self, mask: np.ndarray[Any, np.dtype[np.bool_]]) -> None:
        file, size = self._done_file()
        data = np.zeros(size, dtype=np.uint8)
        data[: len(mask)] = mask
        atomic_write_bytes(file, data.tobytes())  # a kill or full disk leaves the old flags, never half of them

    def pending(self) -> list[int]:
        if self._creation is not None:  # not created yet: nothing is done
            return list(range(self._creation.n))
        return [int(i) for i in np.flatnonzero(~self._read_done())]

    @property
    def has_images(self) -> bool:
        return ("", IMAGES) in self._handles or IMAGES in self.group

    def images(self, samples: list[int] | None = None) -> torch.Tensor:
        """The generated images of ``samples`` (default all), float32 (sample, 3, H, W) in [0, 1]."""
        if not self.has_images:
            raise ConfigError(f"the store {str(self.path)!r} holds no images (written by an older layerscope)")
        arr = self._array_at(IMAGES)
        data = arr[...] if samples is None else arr.get_orthogonal_selection((np.asarray(samples, dtype=np.int64),))
        return torch.from_numpy(np.ascontiguousarray(data))

    def _ensure_images(self, shape: tuple[int, ...]) -> zarr.Array[Any]:
        """The images array, created with the first batch (atomically: built under a temporary name, renamed)."""
        if self.has_images:
            arr = self._array_at(IMAGES)
            if tuple(arr.shape[1:]) != tuple(shape):
                raise StoreMismatchError(
                    f"the store {str(self.path)!r} holds images of shape {tuple(arr.shape[1:])}, but this run "
                    f"generates {tuple(shape)}; use a new store path"
                )
            return arr
        cs = self._chunk_samples()
        tmp = self.path / f"{TMP_TAG}{IMAGES}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        meta = _array_meta(
            (self.n,) + tuple(shape),
            (cs,) + tuple(shape),
            np.dtype(np.float32),
            ("sample", "image.channel", "image.h", "image.w"),
            {"dims": ["sample", "channel", "h", "w"], "range": [0.0, 1.0]},
        )
        _write_node(tmp, meta)
        tmp.rename(self.path / IMAGES)
        try:
            self._handles[("", IMAGES)] = _array_from(self.group, IMAGES, meta).with_config(WRITE_ALL_CHUNKS)
        except Exception:  # another zarr's internals: opened from disk below
            pass
        arr = self._array_at(IMAGES)
        if self._data is not None:
            self._data.append(arr)
        return arr

    def _chunk_samples(self) -> int:
        for arr in self._data_arrays():
            if arr.path != IMAGES:
                return int(arr.chunks[0])
        return int(self._done_array().chunks[0])

    def write_batch(
        self, items: list[tuple[ArraySpec, torch.Tensor]], samples: list[int], images: torch.Tensor | None = None
    ) -> None:
        """Write one batch of samples for every layer (and its images), all arrays concurrently (zarr's async API),
        then record the manifest of the blocks it touched. A full disk raises ``DiskFullError``."""
        contiguous = samples == list(range(samples[0], samples[-1] + 1))
        with disk_errors(self.path):
            pairs = [(self._array(spec.what, spec.layer).async_array, data) for spec, data in items]
            if images is not None:
                pairs.append((self._ensure_images(tuple(images.shape[1:])).async_array, images.float()))

            async def put(arr: Any, data: torch.Tensor) -> None:
                values = data.numpy()
                if contiguous:
                    await arr.setitem(slice(samples[0], samples[-1] + 1), values)
                else:
                    for k, i in enumerate(samples):
                        await arr.setitem(i, values[k])

            async def put_all() -> None:
                await asyncio.gather(*(put(arr, data) for arr, data in pairs))

            zarr_sync(put_all())
            cs = self._chunk_samples()
            for block in sorted({i // cs for i in samples}):
                self._record_block(block, cs)

    def direct_batch(self, specs: list[ArraySpec], samples: list[int]) -> DirectBatch | None:
        """A writer for this batch straight into its chunk files (step by step, while the denoiser runs), or None
        when zarr must write it: a batch that fills only part of a sample block, or an array whose chunks are not
        plain little-endian bytes of the layout :func:`_chunks` makes."""
        if self.schema < SCHEMA or sys.byteorder != "little" or not samples:
            return None
        cs = self._chunk_samples()
        n = self.n
        first, last = samples[0], samples[-1]
        if samples != list(range(first, last + 1)) or first % cs or (last + 1 != n and (last + 1) % cs):
            return None  # not whole blocks
        layouts: dict[tuple[str, str], _Layout] = {}
        for spec in specs:
            lay = _layout(self._array(spec.what, spec.layer), cs)
            if lay is None:
                return None
            layouts[(spec.what, spec.layer)] = lay
        blocks = sorted({i // cs for i in samples})
        with disk_errors(self.path):
            for block in blocks:  # a block being rewritten holds nothing finished: its old record goes first
                (self.path / MANIFEST / f"{block}.json").unlink(missing_ok=True)
        return DirectBatch(self, samples, layouts, blocks, cs)

    def commit_direct(self, batch: DirectBatch, images: torch.Tensor | None) -> None:
        """Finish a :meth:`direct_batch`: check every segment was written, add the images, then the manifest of its
        blocks (from the checksums taken while writing). ``mark_done`` comes after."""
        with disk_errors(self.path):
            if images is not None:
                arr = self._ensure_images(tuple(images.shape[1:]))
                lay = _layout(arr, batch.cs)
                imgs = images.float().contiguous()
                if lay is None or lay.sc != lay.steps:  # zarr writes them; read back for the manifest below
                    arr[batch.samples[0] : batch.samples[-1] + 1] = imgs.numpy()
                else:  # (sample, channel, h, w), chunked whole per sample: one segment per image
                    lay = _Layout(lay.arr, lay.n, 1, lay.cs, 1, lay.seg * lay.steps)
                    for r, s in enumerate(batch.samples):
                        batch.put(lay, s, 0, imgs[r])
            known = batch.close()
            for block in batch.blocks:
                self._record_block(block, batch.cs, known)

    def mark_done(self, samples: list[int], timesteps: list[float]) -> None:
        with disk_errors(self.path):
            mask = self._read_done()
            mask[samples] = True
            if timesteps and not self.group.attrs.get("timesteps"):
                self._set_root_attr("timesteps", [float(t) for t in timesteps])
            self._write_done(mask)

    def _set_root_attr(self, key: str, value: Any) -> None:
        """Rewrite the root zarr.json atomically (zarr writes it in place, which a kill could leave half-written)."""
        file = self.path / "zarr.json"
        meta = json.loads(file.read_text())
        meta.setdefault("attributes", {})[key] = value
        atomic_write_text(file, json.dumps(meta, indent=2))
        self.group = _group_from(self.path, meta)

    # integrity --------------------------------------------------------------------------------------------------
    def _data_arrays(self) -> list[zarr.Array[Any]]:
        if self._data is None:
            arrays = [self._array(what, name) for what in ("output", "update") for name in self.layer_names(what)]
            if self.has_images:
                arrays.append(self._array_at(IMAGES))
            self._data = arrays
        return self._data

    def _block_files(self, block: int) -> list[str]:
        """Paths (relative to the store) of every data chunk file holding samples of sample block ``block``."""
        files = []
        for arr in self._data_arrays():
            grid = [range(int(c)) for c in arr.cdata_shape[1:]]
            for rest in itertools.product(*grid):
                files.append(f"{arr.path}/{arr.metadata.encode_chunk_key((block,) + tuple(rest))}")
        return files

    def _record_block(self, block: int, cs: int, known: dict[str, tuple[int, int]] | None = None) -> None:
        """Write the manifest of ``block``: size and crc32 of its chunk files (``known``: those the writer already
        has, for files it wrote itself; the others are read back)."""
        files: dict[str, list[int]] = {}
        for rel in self._block_files(block):
            if known is not None and rel in known:
                files[rel] = list(known[rel])
                continue
            data = (self.path / rel).read_bytes()
            files[rel] = [len(data), zlib.crc32(data)]
        entry = {"block": block, "samples": [block * cs, min((block + 1) * cs, self.n)], "files": files}
        atomic_write_text(self.path / MANIFEST / f"{block}.json", json.dumps(entry, separators=(",", ":")))

    def manifest(self) -> dict[int, dict[str, Any]]:
        """The recorded manifest, by sample block (an unreadable block file maps to an empty dict)."""
        folder = self.path / MANIFEST
        out: dict[int, dict[str, Any]] = {}
        if not folder.is_dir():
            return out
        for f in folder.iterdir():
            if f.suffix != ".json" or not f.stem.isdigit():
                continue
            try:
                entry = json.loads(f.read_text())
                if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
                    raise ValueError("not a manifest")
            except (ValueError, OSError):
                entry = {}
            out[int(f.stem)] = entry
        return out

    def check(self, verify: bool = False) -> list[Damage]:
        """Every damaged file: manifest chunk files missing or of another size (``verify``: or another crc32), and
        blocks holding finished samples with no readable manifest. Stores of schema 1 have no manifest: []."""
        if self.schema < 2:
            return []
        damage: list[Damage] = []
        manifest = self.manifest()
        for block in sorted(manifest):
            entry = manifest[block]
            if not entry:
                damage.append(Damage(f"{MANIFEST}/{block}.json", "not a readable manifest", block))
                continue
            for rel, (size, crc) in entry["files"].items():
                problem = _file_problem(self.path / rel, int(size), int(crc) if verify else None)
                if problem:
                    damage.append(Damage(rel, problem, block))
        cs = self._chunk_samples()
        done = self._read_done()
        for block in sorted({int(i) // cs for i in np.flatnonzero(done)} - set(manifest)):
            damage.append(Damage(f"{MANIFEST}/{block}.json", "missing", block))
        return damage

    def _repair(self) -> None:
        """Mark the samples of every damaged block not done (size check), so a resumed run regenerates them."""
        blocks = {d.block for d in self.check() if d.block is not None}
        if not blocks:
            return
        cs = self._chunk_samples()
        mask = self._read_done()
        for b in blocks:
            mask[b * cs : (b + 1) * cs] = False
        self._write_done(mask)

    # reading ----------------------------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def recorded(self) -> dict[str, Any]:
        attrs = self.attrs
        rec: dict[str, Any] = {k: attrs[k] for k in ("model", "num_inference_steps", "height", "width") if k in attrs}
        if attrs.get("timesteps"):
            rec["timesteps"] = list(attrs["timesteps"])
        return rec

    @property
    def complete(self) -> bool:
        return not self.pending()

    def layer_names(self, what: str = "output") -> list[str]:
        try:
            if what not in self.group:
                return []
            return sorted(name for name, _ in cast(zarr.Group, self.group[what]).arrays())
        except Exception as exc:
            raise StoreIntegrityError(
                f"the arrays of {what}/ in the store {str(self.path)!r} cannot be listed ({type(exc).__name__}: "
                f"{exc}); restore their zarr.json files or delete the store"
            ) from None

    def _arr(self, layer: str, what: str) -> zarr.Array[Any]:
        if (what, layer) not in self._handles:
            self.check_layer(layer, what)
        return self._array(what, layer)

    def _meta(self, layer: str, what: str) -> dict[str, Any]:
        return dict(self._arr(layer, what).attrs)

    def __getitem__(self, layer: str) -> zarr.Array[Any]:
        return self._arr(layer, "output")

    def dims(self, layer: str, what: str = "output") -> tuple[str, ...]:
        return tuple(self._meta(layer, what)["dims"])

    def to_tensor(self, layer: str, what: str = "output") -> torch.Tensor:
        return torch.from_numpy(np.asarray(self._arr(layer, what)[...]))

    def to_xarray(self, what: str = "output") -> Any:
        """The store's ``output`` (or ``update``) arrays as an ``xarray.Dataset``, lazily (zarr-backed: nothing is
        read until a value is asked for): one variable per layer with dims ``sample``, ``step`` / ``once``,
        ``branch`` / ``unbranched`` and its own feature dims (:func:`dimension_names`), and coordinates ``prompt``,
        ``seed`` and ``done`` per sample, ``step`` (step index) and ``timestep`` per captured step, ``branch``
        labels. ``xarray.open_zarr(path, group="output")`` reads the same variables without the coordinates."""
        try:
            import xarray as xr
        except ImportError:  # pragma: no cover - a dependency
            raise ConfigError("to_xarray needs xarray: pip install xarray") from None
        names = self.layer_names(what)
        if not names:
            raise LayerNameError(f"the store {str(self.path)!r} holds no {what!r} arrays")
        first = self._arr(names[0], what)
        if getattr(first.metadata, "dimension_names", None) is None:
            raise ConfigError(
                f"the store {str(self.path)!r} was written without zarr dimension names (layerscope before they were "
                "added); read its arrays with store[layer], or capture it again"
            )
        ds = xr.open_zarr(str(self.path), group=what, consolidated=False, chunks=None, zarr_format=3)
        attrs = self.attrs
        coords: dict[str, Any] = {
            "sample": np.arange(self.n),
            "prompt": ("sample", [str(p) for p in attrs.get("prompts", [""] * self.n)]),
            "seed": ("sample", [int(x) for x in attrs.get("seeds", [0] * self.n)]),
            "done": ("sample", self._read_done()),
        }
        per_step = [n for n in names if "step" in ds[n].dims]
        if per_step:
            steps = [int(x) for x in self._meta(per_step[0], what)["steps"]]
            coords["step"] = steps
            ts = attrs.get("timesteps") or []
            if ts:
                coords["timestep"] = ("step", [float(ts[k]) for k in steps])
        branched = [n for n in names if "branch" in ds[n].dims]
        if branched:
            coords["branch"] = list(self._meta(branched[0], what)["branches"])
        ds = ds.assign_coords(coords)
        ds.attrs = {
            k: attrs[k] for k in ("model", "num_inference_steps", "guidance_scale", "height", "width") if k in attrs
        }
        return ds

    def delete(self) -> None:
        shutil.rmtree(self.path)


# files and metadata ---------------------------------------------------------------------------------------------
def _file_problem(file: Path, size: int, crc: int | None) -> str | None:
    try:
        have = file.stat().st_size
    except FileNotFoundError:
        return "missing"
    if have < size:
        return f"truncated ({have} of {size} bytes)"
    if have != size:
        return f"{have} bytes where {size} were written"
    if crc is not None and zlib.crc32(file.read_bytes()) != crc:
        return "changed since it was written (checksum mismatch)"
    return None


def _damage_message(path: Path, damage: list[Damage]) -> str:
    first = damage[0]
    return (
        f"the store {str(path)!r} is damaged: {first.file} is {first.problem} ({len(damage)} damaged file"
        f"{'s' if len(damage) != 1 else ''} in all); rerun the same capture to regenerate the damaged samples, or "
        "delete the store"
    )


def _read_json(file: Path, store: Path) -> None:
    """Raise :class:`StoreIntegrityError` naming ``file`` when it is not a JSON object."""
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        return
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreIntegrityError(
            f"the store metadata file {str(file)!r} is not valid JSON ({exc}); restore it or delete the store"
        ) from None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or "node_type" not in meta:
        raise StoreIntegrityError(
            f"the store metadata file {str(file)!r} is not zarr v3 metadata (a JSON object with zarr_format 3 and "
            "node_type); restore it or delete the store"
        )


def _check_metadata(path: Path) -> None:
    """Every zarr.json of the store (root, groups, arrays; not the chunks) is readable JSON."""
    _read_json(path / "zarr.json", path)
    for what in ("output", "update"):
        sub = path / what
        if sub.is_dir():
            _read_json(sub / "zarr.json", path)
            for child in sub.iterdir():
                if child.is_dir():
                    _read_json(child / "zarr.json", path)
    for name in ("done", IMAGES):
        _read_json(path / name / "zarr.json", path)


def _open_group(path: Path, mode: str) -> zarr.Group:
    _check_metadata(path)
    try:
        return zarr.open_group(str(path), mode=cast(Any, mode))
    except Exception as exc:
        raise StoreIntegrityError(
            f"the store metadata file {str(path / 'zarr.json')!r} is not valid zarr metadata "
            f"({type(exc).__name__}: {exc}); restore it or delete the store"
        ) from None


def _group_from(path: Path, meta: dict[str, Any]) -> zarr.Group:
    """The store's root group from the metadata this run just wrote there (no reread through zarr's event loop)."""
    from zarr.core.group import AsyncGroup, GroupMetadata
    from zarr.storage import LocalStore, StorePath

    try:
        return zarr.Group(AsyncGroup(GroupMetadata.from_dict(dict(meta)), StorePath(LocalStore(path))))
    except Exception:  # another zarr's internals: read it back
        return zarr.open_group(str(path), mode="a")


def _array_from(group: zarr.Group, name: str, meta: dict[str, Any]) -> zarr.Array[Any]:
    """The handle of the array ``name`` (a path in ``group``) from the metadata this run wrote."""
    from zarr.core.array import AsyncArray
    from zarr.core.metadata import ArrayV3Metadata

    return zarr.Array(AsyncArray(ArrayV3Metadata.from_dict(dict(meta)), group.store_path / name))


def _array_meta(
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: np.dtype[Any],
    names: tuple[str, ...],
    attributes: dict[str, Any],
) -> dict[str, Any]:
    """The zarr v3 metadata of an uncompressed array (little-endian bytes, filled with zeros, chunk keys
    ``c.<i>.<j>...``), as zarr's own ``ArrayV3Metadata`` writes it; built in this process, no I/O."""
    from zarr.core.dtype import parse_data_type
    from zarr.core.metadata import ArrayV3Metadata

    codec: dict[str, Any] = {"name": "bytes"}
    if dtype.itemsize > 1:
        codec["configuration"] = {"endian": "little"}
    meta = ArrayV3Metadata(
        shape=shape,
        data_type=parse_data_type(dtype, zarr_format=3),
        chunk_grid={"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        chunk_key_encoding={"name": "default", "configuration": {"separator": CHUNK_SEPARATOR}},
        fill_value=False if dtype == np.bool_ else 0,
        codecs=[codec],
        attributes=attributes,
        dimension_names=names,
    )
    return cast(dict[str, Any], _jsonable(meta.to_dict()))


#: chunk keys ``c.1.0.0.0.0.0``: one file per chunk in the array's folder. zarr's default ``/`` nests a folder per
#: dimension, so a 6-dim array made 6 folders per sample block: 212 ``mkdir`` calls for a one-sample capture of
#: every layer of ``tiny:sd``, at 20-790 us each on the ext4 disk of the 2-core VM it was measured on. Stores
#: written with ``/`` (before 2026-12-07) read and resume as before: every key comes from the array's own metadata.
CHUNK_SEPARATOR = "."


def _group_meta(attributes: dict[str, Any]) -> dict[str, Any]:
    return {"attributes": attributes, "zarr_format": 3, "node_type": "group"}


def _write_node(folder: Path, meta: dict[str, Any]) -> None:
    """A zarr node (group or array): its folder and its zarr.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zarr.json").write_text(json.dumps(meta, indent=2))


def _is_ours(name: str) -> bool:
    """Lock, marker, probe and temporary files layerscope keeps in a store folder."""
    return name.startswith(".layerscope")


def _foreign_entries(path: Path) -> list[str]:
    return [e.name for e in path.iterdir() if not _is_ours(e.name)]


def _clean_temporaries(path: Path) -> None:
    """Remove what killed creations left: temporary folders beside the store and inside it (the caller holds the
    store's lock, so no other run is writing them)."""
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".{path.name}{TMP_TAG}*"):
            shutil.rmtree(tmp, ignore_errors=True)
    if path.is_dir():
        for tmp in path.glob(f"{TMP_TAG}*"):
            shutil.rmtree(tmp, ignore_errors=True)


def _clear(path: Path) -> None:
    """Empty a store folder of an unfinished creation, keeping the lock file (the marker goes last)."""
    for e in path.iterdir():
        if e.name in (LOCK_FILE, CREATING):
            continue
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink()
    (path / CREATING).unlink(missing_ok=True)


def _create(
    path: Path, attrs: dict[str, Any], specs: list[ArraySpec], n: int, chunk_samples: int, dtype: torch.dtype
) -> tuple[dict[str, Any], dict[tuple[str, str], dict[str, Any]]]:
    """Build the store under a temporary name beside ``path``, then move it in with the root zarr.json last.
    Every zarr.json is written here as plain JSON (zarr v3 metadata built by zarr's own classes, no I/O through
    zarr: each of its calls is a round trip to its event-loop thread, which on a machine whose cores torch keeps
    busy costs more than the file). Returns the root group's metadata and the arrays', by (what, layer)."""
    metas: dict[tuple[str, str], dict[str, Any]] = {}
    tmp = path.parent / f".{path.name}{TMP_TAG}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np_dtype = np.dtype(torch_dtype_name(dtype))
    template: dict[str, Any] | None = None
    for what in sorted({s.what for s in specs}):
        _write_node(tmp / what, _group_meta({}))
    for s in specs:
        attributes = _jsonable(
            {
                "layer": s.layer,
                "what": s.what,
                "dims": list(s.dims),
                "steps": s.steps,
                "branches": s.branches,
                **s.attrs,
            }
        )
        chunks = _chunks(s.shape, chunk_samples, np_dtype.itemsize)
        if template is None:
            meta = template = _array_meta(s.shape, chunks, np_dtype, dimension_names(s), attributes)
        else:  # the arrays differ only in these fields (building each through zarr's classes costs 0.15 ms)
            meta = {
                **template,
                "shape": list(s.shape),
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
                "attributes": attributes,
                "dimension_names": list(dimension_names(s)),
            }
        _write_node(tmp / s.what / s.layer, meta)
        metas[(s.what, s.layer)] = meta
    # uncompressed like every array here (the flags are written as raw bytes: see _write_done)
    done = _array_meta((n,), (max(n, 1),), np.dtype(np.bool_), ("sample",), {})
    _write_node(tmp / "done", done)
    metas[("", "done")] = done
    meta = _jsonable(attrs)
    meta["layerscope"] = {**meta.get("layerscope", {}), "schema": SCHEMA}
    root = _group_meta(meta)
    (tmp / "zarr.json").write_text(json.dumps(root, indent=2))
    (tmp / MANIFEST).mkdir()
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / CREATING, str(os.getpid()))
    for entry in sorted(tmp.iterdir()):
        if entry.name != "zarr.json":
            entry.rename(path / entry.name)
    (tmp / "zarr.json").rename(path / "zarr.json")  # the commit point: from here on the store is resumable
    (path / CREATING).unlink()
    tmp.rmdir()
    return root, metas


CHUNK_BYTES = 32 * 2**20


def _chunks(shape: tuple[int, ...], chunk_samples: int, itemsize: int) -> tuple[int, ...]:
    """One chunk per sample batch and layer holding all steps, split along steps above CHUNK_BYTES."""
    samples = min(chunk_samples, shape[0])
    per_step = samples * int(np.prod(shape[2:])) * itemsize
    steps = max(1, min(shape[1], CHUNK_BYTES // max(per_step, 1)))
    return (samples, steps) + tuple(shape[2:])


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# streaming straight into chunk files ----------------------------------------------------------------------------
@dataclass
class _Layout:
    """Where an array's data lies in its uncompressed chunk files: a chunk holds ``cs`` samples x ``sc`` steps of
    ``seg`` bytes each (everything after the step dim in one chunk), sample-major, padded to full size."""

    arr: zarr.Array[Any]
    n: int
    steps: int
    cs: int
    sc: int
    seg: int


def _layout(arr: zarr.Array[Any], cs: int) -> _Layout | None:
    """The layout of ``arr`` when its chunks are plain little-endian bytes filled with zero bytes, with ``cs``
    samples, any steps, and the whole of every later dim; else None (zarr writes it)."""
    from zarr.codecs import BytesCodec

    meta = arr.metadata
    codecs = getattr(meta, "codecs", None)
    if not codecs or len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return None
    if codecs[0].endian is not None and getattr(codecs[0].endian, "value", codecs[0].endian) != "little":
        return None
    shape, chunks = tuple(arr.shape), tuple(arr.chunks)
    if len(shape) < 2 or chunks[0] != cs or chunks[2:] != shape[2:]:
        return None
    dtype = np.dtype(arr.dtype)
    if dtype.byteorder == ">" or np.asarray(meta.fill_value, dtype=dtype).tobytes() != bytes(dtype.itemsize):
        return None
    seg = int(np.prod(shape[2:], dtype=np.int64)) * dtype.itemsize
    return _Layout(arr, int(shape[0]), int(shape[1]), cs, int(chunks[1]), seg)


def _pwrite(path: Path, fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of the open chunk file ``path`` (the one place chunk bytes are written
    directly; tests patch it to fake a full disk)."""
    while len(data):
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


#: per-sample step segments smaller than this are written once, at the end of the batch (DirectBatch.write)
SMALL_SEGMENT = 64 * 2**10


class _ChunkFile:
    """One chunk file being written segment by segment in any order; its crc32 is folded in file order as the
    segments arrive (a segment that comes early waits, as a view, for those before it; padding is zero bytes)."""

    def __init__(self, path: Path, rel: str, n_seg: int, seg: int, present: list[bool]) -> None:
        self.path, self.rel, self.n_seg, self.seg, self.present = path, rel, n_seg, seg, present
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self.fd: int | None = os.open(path, flags, 0o644)
        except FileNotFoundError:  # a store with nested chunk keys ("/"): their folders first
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, flags, 0o644)
        os.ftruncate(self.fd, n_seg * seg)  # full size, zero bytes (the fill value) where nothing is written
        self.crc = 0
        self.next = 0
        self.waiting: dict[int, memoryview] = {}

    def put(self, idx: int, data: memoryview) -> None:
        """Write segments ``idx, idx + 1, ...`` (as many as ``data`` holds, all present) in one piece."""
        count = len(data) // self.seg
        assert self.fd is not None and count and len(data) == count * self.seg
        assert all(self.present[idx : idx + count])
        _pwrite(self.path, self.fd, data, idx * self.seg)
        self.waiting[idx] = data
        while self.next < self.n_seg:
            if not self.present[self.next]:
                self.crc = zlib.crc32(_zeros(self.seg), self.crc)
                self.next += 1
            elif self.next in self.waiting:
                piece = self.waiting.pop(self.next)
                self.crc = zlib.crc32(piece, self.crc)
                self.next += len(piece) // self.seg
            else:
                break

    def close(self) -> tuple[int, int]:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.next != self.n_seg:
            raise RuntimeError(f"{self.rel}: {self.n_seg - self.next} segments were never written")  # a bug
        return self.n_seg * self.seg, self.crc


_ZEROS: dict[int, bytes] = {}


def _zeros(size: int) -> bytes:
    if size not in _ZEROS:
        _ZEROS[size] = bytes(size)
    return _ZEROS[size]


class DirectBatch:
    """One batch of whole sample blocks written into the store's chunk files as the capture fills them: each
    site's step goes to its place in its (uncompressed) chunk file at once, so the files are complete when the
    generation ends; :meth:`ActivationStore.commit_direct` then adds the images and the manifest. The bytes on disk
    are exactly those zarr would write."""

    def __init__(
        self,
        store: ActivationStore,
        samples: list[int],
        layouts: dict[tuple[str, str], _Layout],
        blocks: list[int],
        cs: int,
    ) -> None:
        self.store = store
        self.samples = samples
        self.layouts = layouts
        self.blocks = blocks
        self.cs = cs
        self.files: dict[str, _ChunkFile] = {}
        self._open: dict[tuple[str, int, int], _ChunkFile] = {}  # by (array, sample block, step chunk)
        self.deferred: dict[tuple[str, str], tuple[_Layout, torch.Tensor]] = {}  # small arrays, written at close

    def write(self, spec: ArraySpec, k: int, buf: torch.Tensor) -> None:
        """Write step index ``k`` of every sample of ``buf`` (batch, step, branch, *feature) of ``spec``'s array.
        An array whose steps are small (under ``SMALL_SEGMENT`` bytes a sample) is written at :meth:`close` instead,
        all its steps of a sample in one piece: there is nothing to overlap, and each write costs the writer thread
        more than its bytes."""
        lay = self.layouts[(spec.what, spec.layer)]
        if lay.seg < SMALL_SEGMENT:
            self.deferred[(spec.what, spec.layer)] = (lay, buf)
            return
        for r, s in enumerate(self.samples):
            self.put(lay, s, k, buf[r, k])

    def put(self, lay: _Layout, sample: int, k: int, data: torch.Tensor) -> None:
        """Write one sample's data at step index ``k`` of the array of ``lay`` (or at steps ``k, k + 1, ...`` when
        ``data`` holds several, all in one chunk)."""
        block, within = divmod(sample, lay.cs)
        j, kk = divmod(k, lay.sc)
        key = (lay.arr.path, block, j)
        f = self._open.get(key)
        if f is None:
            rel = f"{lay.arr.path}/{lay.arr.metadata.encode_chunk_key((block, j) + (0,) * (len(lay.arr.shape) - 2))}"
            f = self.files.get(rel)
            if f is None:
                steps = range(j * lay.sc, (j + 1) * lay.sc)
                rows = range(block * lay.cs, (block + 1) * lay.cs)
                present = [s < lay.n and t < lay.steps for s in rows for t in steps]
                f = self.files[rel] = _ChunkFile(self.store.path / rel, rel, lay.cs * lay.sc, lay.seg, present)
            self._open[key] = f
        assert data.is_contiguous()
        f.put(within * lay.sc + kk, data.numpy().data.cast("B"))

    def _write_deferred(self) -> None:
        """Every sample's steps of the arrays :meth:`write` left for the end, one piece per chunk file."""
        for lay, buf in self.deferred.values():
            for r, s in enumerate(self.samples):
                for j in range(0, lay.steps, lay.sc):
                    self.put(lay, s, j, buf[r, j : j + lay.sc])
        self.deferred = {}

    def close(self) -> dict[str, tuple[int, int]]:
        """Close every file; their sizes and checksums (raises when a segment was never written)."""
        self._write_deferred()
        out = {}
        errors = []
        for rel, f in self.files.items():
            try:
                out[rel] = f.close()
            except RuntimeError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        return out

    def abort(self) -> None:
        for f in self.files.values():
            if f.fd is not None:
                os.close(f.fd)
                f.fd = None
