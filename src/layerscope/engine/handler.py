"""The per-site handler: what happens to one site's tensor in one chunk and step (interventions, then capture).

Rows of a branched tensor are laid out as ``branch * n_samples + sample`` (diffusers concatenates the unconditional
half first); :class:`RunState` counts the denoising steps of a chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

from ..errors import ConfigError
from ..layers import LayerInfo
from .plan import CapturePlan, PlannedIntervention, channel_view, reduced_dims, resolve_branches
from .spec import Capture, Row, Stored
from .store import ArraySpec


class RunState:
    """One chunk's generation as the hooks see it: rows, branches, and which step each denoiser call belongs to.

    ``call`` counts denoiser calls; ``step`` is the step of the current call (``call_steps[call]``: schedulers that
    evaluate the denoiser more than once per step, such as Heun or PNDM, map several calls to one step), and
    ``first_of_step`` says whether the current call is the first of its step."""

    def __init__(self, n: int, branches: Sequence[str]) -> None:
        self.n = n
        self.branches = list(branches)
        self.call = -1
        self.step = -1
        self.first_of_step = True
        self.call_steps: list[int] | None = None  # set at the first call (None: one call per step)

    def next_call(self) -> None:
        self.call += 1
        steps = self.call_steps
        if steps is None:
            self.step, self.first_of_step = self.call, True
            return
        if self.call >= len(steps):
            raise ConfigError(
                f"the denoiser was called {self.call + 1} times, more than the {len(steps)} calls its scheduler "
                "announced for this run"
            )
        step = steps[self.call]
        self.first_of_step = self.call == 0 or steps[self.call - 1] != step
        self.step = step

    def rows(self, info: LayerInfo, samples: Sequence[int], branch_idx: Sequence[int]) -> list[int]:
        if not info.branched:
            return list(samples)
        return [b * self.n + i for b in branch_idx for i in samples]


class SiteHandler:
    """Everything that happens at one site in one chunk: interventions, then capture."""

    index: torch.Tensor | None  # per-row token index of indexed sites, set by hooks.set_indices

    def __init__(
        self,
        info: LayerInfo,
        run: RunState,
        sample_ids: list[int],
        ivs: list[PlannedIntervention],
        cap: Capture | None,
        cap_plan: CapturePlan | None,
        sink: Callable[[ArraySpec, int, torch.Tensor], None] | None = None,
    ) -> None:
        self.info = info
        self.sink = sink  # told of every filled step (spec, step index, buffer): the store's streaming writer
        self.run = run
        self.sample_ids = sample_ids
        self.ivs: list[tuple[PlannedIntervention, list[int], int | list[int] | None]] = []
        local = {g: k for k, g in enumerate(sample_ids)}
        for p in ivs:
            tl = [local[t] for t in p.targets if t in local]
            src_local: int | list[int] | None = local.get(cast(Row, p.iv.source).index) if p.kind == "row" else None
            if p.kind == "row" and src_local is None and tl:
                raise ConfigError(
                    f"intervention at {info.name}: source row {cast(Row, p.iv.source).index} is not in the same batch "
                    "as its targets; raise max_batch or use injection_sweep, which keeps sources and targets together"
                )
            if tl:
                if p.kind == "per_target":  # the rows of the source that belong to this chunk's targets
                    src_local = [k for k, t in enumerate(p.targets) if t in local]
                self.ivs.append((p, tl, src_local))
        self.cap = cap
        self.cap_steps = set(cap_plan.steps) if cap_plan else set()
        self.cap_specs = [s for (_, name), s in cap_plan.specs.items() if name == info.name] if cap_plan else []
        self.cap_branch_idx = resolve_branches(info, cap.branches, run.branches, "capture") if cap is not None else []
        self.buffers: dict[str, torch.Tensor] = {}
        self.filled: dict[str, int] = {}
        self.calls_at: int | None = None
        self._tensor_cache: dict[tuple[object, ...], torch.Tensor] = {}

    @property
    def wants_input(self) -> bool:
        """Whether the site's input is read (an ``update`` capture: output - input)."""
        return any(s.what == "update" for s in self.cap_specs)

    # -- called from the hooks --------------------------------------------------------------------------------------
    def process(self, x: torch.Tensor, get_in: Callable[[], torch.Tensor] | None) -> torch.Tensor:
        info, run = self.info, self.run
        step = run.step if info.per_step else None
        key = run.call if info.per_step else -99
        if self.calls_at == key:
            raise ConfigError(
                f"{info.name} ran twice in {'step ' + str(step) if info.per_step else 'one generation'}; layerscope "
                "needs each layer called once per denoiser call (is the module reused or true-CFG enabled?)"
            )
        self.calls_at = key
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"{info.name}: expected a tensor at its site, found {type(x).__name__}")
        expect_rows = run.n * len(run.branches) if info.branched else run.n
        if x.shape[0] != expect_rows:
            raise ConfigError(
                f"{info.name}: its tensor has {x.shape[0]} rows but this batch lays out {expect_rows} "
                f"({run.n} samples x {len(run.branches) if info.branched else 1} branches); the adapter's batch layout "
                "does not fit this pipeline call"
            )
        active = [(p, tl, s) for (p, tl, s) in self.ivs if p.steps is None or step in p.steps]
        if active:
            orig = x
            x = x.clone()
            for p, tl, src_local in active:
                self._apply(x, orig, p, tl, src_local, step)
        if self.cap_specs and (step is None or (step in self.cap_steps and run.first_of_step)):
            self._capture(x, get_in)  # a step evaluated several times is captured at its first call
        return x

    def _apply(
        self,
        x: torch.Tensor,
        orig: torch.Tensor,
        p: PlannedIntervention,
        tl: list[int],
        src_local: int | list[int] | None,
        step: int | None,
    ) -> None:
        op, alpha = p.iv.op, p.iv.alpha
        if op == "replace" and p.kind == "row" and p.head_mask is None and p.keys is None and p.word is None:
            dst, src = self._row_copy(p, tl, cast(int, src_local), x.device)
            x[dst] = orig[src]  # every branch's target rows from the source row, in one indexed copy
            return
        for b in p.branch_idx:
            rows = self.run.rows(self.info, tl, [b])
            cur = x[rows]
            if op in ("zero", "scale"):
                x[rows] = self._select(p, tl, b, cur * alpha if op == "scale" else torch.zeros_like(cur), cur)
                continue
            if p.kind == "row":
                src = orig[self.run.rows(self.info, [cast(int, src_local)], [b])[0]]
            elif p.kind == "tensor":
                assert p.tensor is not None
                src = self._cached(("t",), p.tensor, x)
            elif p.kind == "per_target":
                assert p.tensor is not None
                src = self._cached(("p", id(p)), p.tensor, x)[src_local]
            else:
                s = cast(Stored, p.iv.source)
                layer = s.layer or self.info.name
                t = s.capture.lookup(layer, s.what, s.sample, step, p.stored_branch[b])
                src = channel_view(t, self.info).to(device=x.device, dtype=x.dtype)
            if op == "replace":
                new = src.expand_as(cur)
            elif op == "add":
                new = cur + alpha * src
            else:  # blend
                new = (1 - alpha) * cur + alpha * src
            x[rows] = self._select(p, tl, b, new.to(x.dtype), cur)

    def _row_copy(
        self, p: PlannedIntervention, tl: list[int], src_local: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Index tensors (made once per chunk) of a Row replace: the target rows and, row for row, the source's."""
        key = ("rows", id(p), device)
        if key not in self._tensor_cache:
            dst = self.run.rows(self.info, tl, p.branch_idx)
            src = [r for b in p.branch_idx for r in self.run.rows(self.info, [src_local], [b]) * len(tl)]
            self._tensor_cache[key] = torch.tensor(dst, device=device)
            self._tensor_cache[key + ("src",)] = torch.tensor(src, device=device)
        return self._tensor_cache[key], self._tensor_cache[key + ("src",)]

    def _select(
        self, p: PlannedIntervention, tl: list[int], b: int, new: torch.Tensor, cur: torch.Tensor
    ) -> torch.Tensor:
        """``new`` where the intervention's heads / keys are selected, ``cur`` elsewhere (all of ``new`` without)."""
        mask: torch.Tensor | None = None
        if p.head_mask is not None:
            mask = p.head_mask.to(cur.device).unsqueeze(0)
        if p.keys is not None or p.word is not None:
            keys = torch.zeros(cur.shape[0], cur.shape[-1], dtype=torch.bool, device=cur.device)
            branch = self.run.branches[b] if self.info.branched else "none"
            for r, t in enumerate(tl):
                keys[r, p.keys if p.keys is not None else p.key_pos[(branch, self.sample_ids[t])]] = True
            keys = keys.reshape((cur.shape[0],) + (1,) * (cur.ndim - 2) + (cur.shape[-1],))
            mask = keys if mask is None else mask & keys
        if mask is None:
            return new
        return torch.where(mask, new.expand_as(cur), cur)

    def _cached(self, key: tuple[object, ...], t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        k = key + (like.device, like.dtype, id(t))
        if k not in self._tensor_cache:
            self._tensor_cache[k] = t.to(device=like.device, dtype=like.dtype)
        return self._tensor_cache[k]

    def _take(self, x: torch.Tensor) -> torch.Tensor:
        """The captured rows as a view (sample, branch, *feature), pooled if asked; no copy yet."""
        info, run = self.info, self.run
        if info.branched:
            x = x.reshape((len(run.branches), run.n) + tuple(x.shape[1:]))
            if len(self.cap_branch_idx) != len(run.branches):
                x = x[self.cap_branch_idx]
            x = x.transpose(0, 1)
        else:
            x = x.unsqueeze(1)
        assert self.cap is not None
        dims = [k + 2 for k in reduced_dims(info, self.cap)]
        if dims:
            x = x.float().mean(dim=dims)
        return x.detach()

    def _capture(self, x: torch.Tensor, get_in: Callable[[], torch.Tensor] | None) -> None:
        assert self.cap is not None
        for spec in self.cap_specs:
            # plan_capture allows "update" only on sites that have an input (get_in is set there)
            data = self._take(x if spec.what == "output" else x - cast("Callable[[], torch.Tensor]", get_in)())
            buf = self.buffers.get(spec.what)
            if buf is None:  # one preallocated (sample, step, branch, *feature) buffer: a single copy per capture
                buf = torch.empty((data.shape[0], len(spec.steps)) + tuple(data.shape[1:]), dtype=self.cap.torch_dtype)
                self.buffers[spec.what] = buf
            k = self.filled.get(spec.what, 0)
            if k >= len(spec.steps):
                raise ConfigError(f"{self.info.name}: captured more steps than the {len(spec.steps)} planned")
            buf[:, k].copy_(data)
            self.filled[spec.what] = k + 1
            if self.sink is not None:
                self.sink(spec, k, buf)

    def finish(self) -> dict[str, torch.Tensor]:
        out = {}
        for spec in self.cap_specs:
            got = self.filled.get(spec.what, 0)
            if got != len(spec.steps):
                raise ConfigError(
                    f"{self.info.name}: captured {got} of {len(spec.steps)} expected steps; the layer did not run "
                    "once per denoising step (is it skipped or cached by the pipeline?)"
                )
            out[spec.what] = self.buffers[spec.what]
        return out


class ShapeRecorder:
    """Records per-sample output (and input) shapes of every site during a trace run."""

    index: torch.Tensor | None  # per-row token index of indexed sites, set by hooks.set_indices

    def __init__(self, info: LayerInfo) -> None:
        self.info = info
        self.shape: tuple[int, ...] | None = None
        self.in_shape: tuple[int, ...] | None = None

    def process(self, x: Any, get_in: Callable[[], Any] | None) -> Any:
        if isinstance(x, torch.Tensor) and x.shape[0] != 1:
            raise ConfigError(
                f"{self.info.name}: the trace batch has 1 row but the tensor at this site has {x.shape[0]}; the "
                "adapter's site does not point at the activation"
            )
        if self.shape is None and isinstance(x, torch.Tensor):
            self.shape = tuple(x.shape[1:])
            if get_in is not None:
                inp = get_in()
                if isinstance(inp, torch.Tensor):
                    self.in_shape = tuple(inp.shape[1:])
        return x
