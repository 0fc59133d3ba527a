"""Captured activations: in memory (:class:`CaptureResult`) or streamed to a zarr folder (:class:`ActivationStore`).

Store schema (zarr v3, one folder per experiment)::

    <store>/                      group; attrs: layerscope {schema, version}, model, prompts, negative_prompt, seeds,
                                  timesteps, num_inference_steps, guidance_scale, height, width, branches,
                                  fingerprint, experiment (capture settings and interventions)
    <store>/output/<layer>        float array, dims (sample, step, branch, *feature) where feature is
                                  (channel, h, w) for maps, (token, channel) for sequences, (channel,) when pooled;
                                  attrs: layer, kind, stage, what, dims, steps (step indices, [null] for tensors
                                  computed once per generation), branches, pooled
    <store>/update/<layer>        same for block updates (output - input), when requested
    <store>/done                  bool (sample,): True once every array holds that sample; a resumed run only
                                  generates samples that are not done, so nothing finished is recomputed and no
                                  sample is written twice

Arrays are chunked one sample batch x all steps (split along steps above 32 MiB), so a batch is one file per
layer (``ActivationStore.open(path)["up_blocks.1"]`` is a lazy zarr array).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import zarr
from zarr.core.sync import sync as zarr_sync

from ..errors import ConfigError, LayerNameError, StoreMismatchError, close_matches

SCHEMA = 1


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


class _Lookup:
    """Shared access used by interventions that take a stored capture as their source."""

    def _arr(self, layer: str, what: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _meta(self, layer: str, what: str) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def layer_names(self, what: str = "output") -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

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


class ActivationStore(_Lookup):
    """A zarr folder of captured activations (see the module docstring for its schema)."""

    def __init__(self, path: str | Path, group: zarr.Group) -> None:
        self.path = Path(path)
        self.group = group
        self._handles: dict[tuple[str, str], zarr.Array[Any]] = {}

    def _array(self, what: str, layer: str) -> zarr.Array[Any]:
        key = (what, layer)
        if key not in self._handles:  # each lookup would reread metadata from disk
            self._handles[key] = cast("zarr.Array[Any]", cast(zarr.Group, self.group[what])[layer])
        return self._handles[key]

    # opening ----------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> "ActivationStore":
        """Open an existing store for lazy reading."""
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise ConfigError(f"{str(path)!r} is not a layerscope activation store (no zarr.json there)")
        group = zarr.open_group(str(path), mode="r")
        if "layerscope" not in group.attrs:
            raise ConfigError(f"{str(path)!r} is a zarr group but not a layerscope activation store")
        return cls(path, group)

    @classmethod
    def create_or_resume(
        cls, path: str | Path, attrs: dict[str, Any], specs: list[ArraySpec], chunk_samples: int, dtype: torch.dtype
    ) -> "ActivationStore":
        """Create a store for this experiment, or reopen it to resume; a different experiment is refused."""
        path = Path(path)
        fp = attrs["fingerprint"]
        if (path / "zarr.json").exists():
            group = zarr.open_group(str(path), mode="a")
            old = dict(group.attrs)
            if "layerscope" not in old:
                raise StoreMismatchError(f"{str(path)!r} exists and is not a layerscope store; choose another path")
            if old.get("fingerprint") != fp:
                diff = sorted(
                    k
                    for k in set(old) | set(attrs)
                    if k not in ("fingerprint", "timesteps", "layerscope") and old.get(k) != _jsonable(attrs.get(k))
                )
                raise StoreMismatchError(
                    f"the store {str(path)!r} holds a different experiment (differs in: {', '.join(diff) or 'settings'}); "
                    "use a new store path or delete the old one"
                )
            return cls(path, group)
        if path.exists() and any(path.iterdir()):
            raise StoreMismatchError(f"{str(path)!r} exists, is not empty and is not a zarr store; choose another path")
        group = zarr.open_group(str(path), mode="w")
        np_dtype = np.dtype(torch_dtype_name(dtype))
        n = specs[0].shape[0] if specs else 0
        subs = {what: group.require_group(what) for what in {s.what for s in specs}}
        for s in specs:
            subs[s.what].create_array(
                s.layer,
                shape=s.shape,
                chunks=_chunks(s.shape, chunk_samples, np_dtype.itemsize),
                dtype=np_dtype,
                compressors=None,
                fill_value=0,
                attributes=_jsonable(
                    {
                        "layer": s.layer,
                        "what": s.what,
                        "dims": list(s.dims),
                        "steps": s.steps,
                        "branches": s.branches,
                        **s.attrs,
                    }
                ),
            )
        group.create_array("done", shape=(n,), chunks=(max(n, 1),), dtype=bool, fill_value=False)
        # attrs last: a folder without them is an unfinished creation and is re-created
        group.attrs.update(_jsonable(attrs))
        return cls(path, group)

    # writing ----------------------------------------------------------------------------------------------------
    def pending(self) -> list[int]:
        done = np.asarray(cast("zarr.Array[Any]", self.group["done"])[:])
        return [int(i) for i in np.flatnonzero(~done)]

    def write_batch(self, items: list[tuple[ArraySpec, torch.Tensor]], samples: list[int]) -> None:
        """Write one batch of samples for every layer, all arrays concurrently (zarr's async API)."""
        contiguous = samples == list(range(samples[0], samples[-1] + 1))

        arrays = [self._array(spec.what, spec.layer).async_array for spec, _ in items]

        async def put(arr: Any, data: torch.Tensor) -> None:
            values = data.numpy()
            if contiguous:
                await arr.setitem(slice(samples[0], samples[-1] + 1), values)
            else:
                for k, i in enumerate(samples):
                    await arr.setitem(i, values[k])

        async def put_all() -> None:
            await asyncio.gather(*(put(arr, data) for arr, (_, data) in zip(arrays, items)))

        zarr_sync(put_all())

    def mark_done(self, samples: list[int], timesteps: list[float]) -> None:
        done = cast("zarr.Array[Any]", self.group["done"])
        mask = np.asarray(done[:])
        mask[samples] = True
        done[:] = mask
        if timesteps and not self.group.attrs.get("timesteps"):
            self.group.attrs["timesteps"] = [float(t) for t in timesteps]

    # reading ----------------------------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def complete(self) -> bool:
        return not self.pending()

    def layer_names(self, what: str = "output") -> list[str]:
        if what not in self.group:
            return []
        return sorted(name for name, _ in cast(zarr.Group, self.group[what]).arrays())

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

    def delete(self) -> None:
        shutil.rmtree(self.path)


CHUNK_BYTES = 32 * 2**20


def _chunks(shape: tuple[int, ...], chunk_samples: int, itemsize: int) -> tuple[int, ...]:
    """One chunk per sample batch and layer holding all steps, split along steps above CHUNK_BYTES."""
    samples = min(chunk_samples, shape[0])
    per_step = samples * int(np.prod(shape[2:])) * itemsize
    steps = max(1, min(shape[1], CHUNK_BYTES // max(per_step, 1)))
    return (samples, steps) + tuple(shape[2:])


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
