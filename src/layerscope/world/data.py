"""The Shapes world as a torch Dataset: any subset of the 480,000 combinations, rendered on demand."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .factors import N_COMBINATIONS, from_index, is_held_out
from .render import render
from .text import prompts_for


class ShapesDataset(Dataset):
    """Images rendered on demand, with their factor labels (and prompts with ``prompts=True``).

    ``indices``: combination numbers, or a split name: 'all', 'train' (the nine tenths never held out) or 'test'
    (the held-out tenth, :func:`~layerscope.world.factors.is_held_out`). Items are ``(image, factors)`` or
    ``(image, factors, prompt)``; ``image`` is float (3, size, size) in [0, 1]. Batched fetching
    (``__getitems__``) renders a whole batch in one vectorized call, so a DataLoader is fast.
    """

    def __init__(self, indices: str | Sequence[int] | np.ndarray = "all", size: int = 32, prompts: bool = False):
        if isinstance(indices, str):
            all_idx = np.arange(N_COMBINATIONS, dtype=np.int64)
            if indices == "all":
                indices = all_idx
            elif indices in ("train", "test"):
                held = is_held_out(all_idx)
                indices = all_idx[held] if indices == "test" else all_idx[~held]
            else:
                raise ValueError(f"indices must be combination numbers or 'all'/'train'/'test', got {indices!r}")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.factors = from_index(self.indices)
        self.size = size
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, items: Sequence[int]):
        f = self.factors[np.asarray(items, dtype=np.int64)]
        imgs = render(f, self.size)
        labels = torch.from_numpy(f)
        if self.prompts:
            return [(imgs[k], labels[k], p) for k, p in enumerate(prompts_for(f))]
        return [(imgs[k], labels[k]) for k in range(len(f))]
