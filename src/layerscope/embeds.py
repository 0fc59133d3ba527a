"""Conditioning tensors from files, for models conditioned on embeddings rather than text (the Kandinsky 2.2
decoder takes CLIP image embeddings): wherever such a model takes a prompt, a string ``path.npy`` (one embedding),
``path.npy#k`` (row ``k`` of an ``(N, D)`` array) or the same with ``.safetensors`` (its only tensor, or the one named
``image_embeds``) stands for the tensor stored there. So the CLI's ``--pair``, ``--prompts`` and a labels CSV's
``prompt`` column can name embeddings. Files are read without pickle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

SUFFIXES = (".npy", ".safetensors")
_CACHE: dict[tuple[str, float], np.ndarray] = {}


def is_ref(prompt: Any) -> bool:
    """Whether a prompt is a reference to an embedding file."""
    return isinstance(prompt, str) and prompt.partition("#")[0].endswith(SUFFIXES)


def _read(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ConfigError(f"the embedding file {str(path)!r} does not exist")
    key = (str(path.resolve()), path.stat().st_mtime)
    if key not in _CACHE:
        try:
            if path.suffix == ".npy":
                arr = np.load(path, allow_pickle=False)
            else:
                from safetensors.numpy import load_file

                tensors = load_file(str(path))
                if len(tensors) != 1 and "image_embeds" not in tensors:
                    raise ConfigError(
                        f"{str(path)!r} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:5])}); store one, "
                        "or name it image_embeds"
                    )
                arr = tensors["image_embeds"] if "image_embeds" in tensors else next(iter(tensors.values()))
        except ConfigError:
            raise
        except Exception as exc:  # not an array file, a pickled object, a truncated file
            raise ConfigError(f"cannot read embeddings from {str(path)!r}: {exc}") from None
        if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.floating):
            raise ConfigError(
                f"{str(path)!r} holds a {arr.dtype} array of shape {arr.shape}; embeddings are floats, one (D,) or "
                "a batch (N, D)"
            )
        if not np.isfinite(arr).all():
            raise ConfigError(f"{str(path)!r} holds NaN or infinite values")
        _CACHE[key] = arr
    return _CACHE[key]


def load_ref(ref: str) -> torch.Tensor:
    """The embedding a reference names, as a float32 tensor of shape (D,)."""
    name, sep, row = ref.partition("#")
    arr = _read(Path(name).expanduser())
    if sep:
        try:
            k = int(row)
        except ValueError:
            raise ConfigError(f"{ref!r}: the row after '#' must be a whole number") from None
        if arr.ndim != 2 or not 0 <= k < arr.shape[0]:
            raise ConfigError(f"{ref!r}: row {k} does not exist in an array of shape {arr.shape}")
        arr = arr[k]
    elif arr.ndim == 2:
        if arr.shape[0] != 1:
            raise ConfigError(f"{ref!r} holds {arr.shape[0]} embeddings: name one as {name}#k (k = 0..{len(arr) - 1})")
        arr = arr[0]
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def refs(path: str | Path) -> list[str]:
    """One reference per embedding in a file: ``path#0``, ``path#1``, ... (or ``path`` for a single one)."""
    arr = _read(Path(path).expanduser())
    return [str(path)] if arr.ndim == 1 else [f"{path}#{k}" for k in range(arr.shape[0])]
