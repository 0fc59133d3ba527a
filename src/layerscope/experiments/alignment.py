"""Do models arrange their representations alike? Representational alignment across layers, steps and models, and
a test of the Platonic Representation Hypothesis (Huh et al. 2024) against Schaerf (2025, section 3.1), with its
controls and a specification curve (docs/alignment.md has the definitions in full).

- **Inputs matched across models**: in the Shapes world a *scene* (held-out factor combination): text models
  generate it from its prompt, generators with a ``code`` layer get its one-hot there; the same seeds for all. Open
  domain: the same prompts and seeds (text models) or latents (torch generators of one latent shape).
- **Features**: the exact linear Gram matrix of every layer's whole map at every step (conditional branch), and of
  its spatial / token mean (``pooled``); every measure is computed from Grams (:func:`kernel_similarity`).
- **Controls are feature sets like the models'**: an untrained copy of each model (:func:`layerscope.untrained`,
  same inputs and seeds) and the world's render as a one-layer model (``render``).
- **Analysis** (:mod:`.alignment_analysis`): per diffusion step matched by noise level (and a per-layer best step),
  component similarity against its nulls, the arrangement along two coordinates, the order of factor-group peaks,
  subsampling intervals, and the specification curve of the two claims.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..engine import Capture, PerTarget, ProgressArg, replace
from ..errors import ConfigError
from ..metrics.alignment import EMBEDDABLE, METRICS
from .alignment_analysis import FEATURES, analyse
from .base import OPEN_PROMPTS, Job, Result, generation_kwargs, settings_dict
from .executor import Executor, Part, Task, run_cells
from .plans import Generations, StudyPlan, capture_bytes, model_bytes
from .workspace import Cell, open_workspace

if TYPE_CHECKING:  # pragma: no cover
    from ..models.base import Generator

NAME = "alignment"
MIN_SCENES = 16  # the intervals' subsamples hold n // 2 scenes; debiased CKA needs 4 and is noisy below 8
#: roles left out of the arrangement and matching: a ``code`` layer holds the scene's one-hot by construction
INPUT_ROLES = ("code",)
WORLD_REFERENCES = ("factors", "oracle", "render", "structure", "content", "surface")
#: controls a study can run beside its models: an untrained copy of each, the world's render as a one-layer model
CONTROLS = ("untrained", "render")
RENDER = "render"  # the spec of the render's feature set
#: dims of a layer's map that are positions (averaged by ``pooled``; counted by the image-distance coordinate)
POSITION_DIMS = ("h", "w", "token")


@dataclass(frozen=True)
class Settings:
    """An alignment study of two or more models (or one, for within-model similarity). ``n``: scenes (Shapes
    world) or prompt/seed rows (open domain); ``seed``: the scenes' and rows' first seed; ``prompts``: open-domain
    prompts (None: a fixed list, cycled); ``layers``: a glob or globs (None: every layer); ``metrics``: the measures
    of the descriptive tables, among linear_cka, debiased_cka, mutual_knn, cknna; ``curve_measures``: the measures of
    the verdicts and the specification curve; ``k``: neighbours of the kNN measures; ``n_boot``: subsamples of the
    intervals; ``permutations``: scene shuffles of the permutation null; ``controls``: among :data:`CONTROLS`;
    ``control_seed``: the untrained copies' seed; generation: ``steps`` (None: the model's), ``guidance`` and
    ``generation`` (other keywords), ``max_batch``."""

    n: int = 64
    seed: int = 0
    prompts: tuple[str, ...] | None = None
    layers: str | tuple[str, ...] | None = None
    metrics: tuple[str, ...] = ("linear_cka", "debiased_cka", "mutual_knn", "cknna")
    curve_measures: tuple[str, ...] = ("debiased_cka", "mutual_knn")
    k: int = 10
    n_boot: int = 200
    permutations: int = 100
    controls: tuple[str, ...] = CONTROLS
    control_seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    max_batch: int | None = None
    generation: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelFeatures:
    """One feature set (a model, a control, the render): ``grams[(layer, step, features)]`` (n, n) float64 linear
    Grams, and what its layers are. ``distance``: each layer's distance from the image (log2 of the image's side
    over the layer's positions' side; 0 at image resolution). ``control``: "" for a model, else the control's
    kind; ``of``: the model a control stands beside."""

    spec: str
    layers: list[str]
    steps: list[int]
    timesteps: list[float]
    iterative: bool
    grams: dict[tuple[str, int, str], torch.Tensor]
    roles: dict[str, str] = field(default_factory=dict)
    distance: dict[str, float] = field(default_factory=dict)
    control: str = ""
    of: str = ""
    duplicates: dict[str, str] = field(default_factory=dict)  # a layer equal to an earlier one -> that layer

    def analysed(self) -> list[str]:
        """The layers that take part in the arrangement and matching: not the experiment's own inputs, and each
        exact copy of an earlier layer (a block and its last sub-layer) once."""
        key = tuple(self.duplicates)
        if getattr(self, "_analysed", (None, None))[0] != key:
            names = [
                n for n in self.layers if self.roles.get(n, "layer") not in INPUT_ROLES and n not in self.duplicates
            ]
            self._analysed = (key, names)
        return list(self._analysed[1])

    def depth(self, layer: str) -> float:
        """Position along the model's computation, input -> output, among the analysed layers (0..1)."""
        names = self.analysed()
        if layer not in names:
            return float("nan")
        return names.index(layer) / (len(names) - 1) if len(names) > 1 else 0.0

    def find_duplicates(self) -> None:
        """Mark each layer whose whole map equals an earlier layer's at every step (equal Grams, bitwise)."""
        self.duplicates = {}
        kept: list[str] = []
        for name in self.layers:
            twin = next(
                (
                    k
                    for k in kept
                    if all(torch.equal(self.grams[(name, s, "full")], self.grams[(k, s, "full")]) for s in self.steps)
                ),
                None,
            )
            if twin is None:
                kept.append(name)
            else:
                self.duplicates[name] = twin


# ---------------------------------------------------------------------------------------------------------------------
# matching the inputs


def _mode(models: Sequence[Generator]) -> str:
    """``scenes`` (all read by the Shapes oracle), ``prompts`` (all text models) or ``latents`` (torch generators)."""
    caps = [m.capabilities for m in models]
    if all(c.oracle == "shapes" for c in caps):
        bad = [m.spec for m, c in zip(models, caps) if c.conditioning != "text" and _code_layer(m) is None]
        if bad:
            raise ConfigError(
                f"{bad[0]} takes neither a prompt nor a scene code (no layer with role 'code'): its "
                "inputs cannot be matched to the other models' scenes"
            )
        return "scenes"
    kinds = {c.conditioning for c in caps}
    if kinds == {"text"}:
        return "prompts"
    if kinds == {"latent"}:
        shapes = {tuple(m.layer_map()["z"].shape) if "z" in m.layer_map() else None for m in models}
        if len(shapes) == 1 and None not in shapes:
            return "latents"
        raise ConfigError(
            f"torch generators with different latent shapes {sorted(map(str, shapes))} get no "
            "common latents: their inputs cannot be matched"
        )
    raise ConfigError(
        "these models' inputs cannot be matched: in the open domain align text models with text models "
        f"(same prompts and seeds) or torch generators with torch generators (same latents); got "
        f"{', '.join(f'{m.spec} ({c.conditioning})' for m, c in zip(models, caps))}"
    )


def _code_layer(model: Generator) -> str | None:
    return next((e.name for e in model.layer_map().layers if e.role == "code"), None)


def scenes(n: int, seed: int = 0) -> np.ndarray:
    """``n`` held-out Shapes scenes (factor indices, (n, 6)), the rows every model of a Shapes-world study sees."""
    from ..world.factors import sample_factors

    return sample_factors(n, seed + 303, split="test")


def _one_hot(factors: np.ndarray, names: Sequence[str]) -> torch.Tensor:
    from ..world.factors import FACTORS, SIZES

    cols = [
        torch.nn.functional.one_hot(torch.as_tensor(factors[:, FACTORS.index(f)]).long(), SIZES[f]).double()
        for f in names
    ]
    return torch.cat(cols, dim=1)


def world_references(factors: np.ndarray) -> dict[str, torch.Tensor]:
    """The references that are not models: the factors (one-hot), the oracle's features of each scene's render, the
    render's pixels, and the one-hot of each factor group (structure, content, surface)."""
    from ..world.factors import FACTORS, GROUPS
    from ..world.oracle import read
    from ..world.render import render

    image = render(factors, 32)
    refs = {
        "factors": _one_hot(factors, FACTORS),
        "oracle": read(image).features.double(),
        "render": torch.as_tensor(np.asarray(image)).double().flatten(1),
    }
    for group, members in GROUPS.items():
        refs[group] = _one_hot(factors, members)
    return refs


def render_features(refs: dict[str, torch.Tensor]) -> ModelFeatures:
    """The world's render as a one-layer model: its pixels (channel, h, w) are the layer, at image resolution, with
    no steps; pooled like any map (the mean colour)."""
    pixels = refs[RENDER]
    side = int(round((pixels.shape[1] / 3) ** 0.5))
    pooled = _pooled(pixels.reshape(len(pixels), 3, side, side), ("channel", "h", "w"))
    return ModelFeatures(
        RENDER,
        ["pixels"],
        [0],
        [],
        False,
        {("pixels", 0, "full"): pixels @ pixels.T, ("pixels", 0, "pooled"): pooled @ pooled.T},
        {"pixels": "layer"},
        {"pixels": 0.0},
        control="render",
    )


# ---------------------------------------------------------------------------------------------------------------------
# features


def _pooled(x: torch.Tensor, dims: Sequence[str]) -> torch.Tensor:
    """A captured map (n, *per-sample dims) averaged over its positions (dims named in :data:`POSITION_DIMS`)."""
    axes = [1 + k for k, d in enumerate(dims) if d in POSITION_DIMS]
    return x.mean(dim=axes) if axes else x


def _distance(dims: Sequence[str], shape: Sequence[int], image_pixels: int) -> float:
    """log2 of (image side / the layer's positions' side): 0 at image resolution, +1 per halving."""
    positions = math.prod(int(n) for d, n in zip(dims, shape) if d in POSITION_DIMS)
    return 0.5 * math.log2(image_pixels / max(1, positions))


def collect(
    model: Generator, st: Settings, mode: str, factors: np.ndarray | None, progress: ProgressArg = None
) -> ModelFeatures:
    """One capture of every selected layer at every step (conditional branch) for the matched inputs, kept as the
    exact Gram matrices of the whole maps and of their position means."""
    gen_kw = generation_kwargs(st.steps, st.guidance, st.generation)
    lmap = model.layer_map()
    names = [e.name for e in (lmap.layers if st.layers is None else lmap.select(st.layers)) if not e.is_space]
    if not names:
        raise ConfigError(f"{model.spec} has no capturable layer matching {st.layers!r}")
    n = st.n
    seeds = [st.seed + i for i in range(n)]
    ivs = []
    if mode == "scenes" and model.capabilities.conditioning != "text":
        from ..world.factors import FACTORS

        code = _code_layer(model)
        assert factors is not None and code is not None
        ivs = [replace(code, PerTarget(_one_hot(factors, FACTORS).float()), targets=list(range(n)))]
        prompts: list[Any] = [None] * n
    elif mode == "scenes":
        from ..world.text import prompts_for

        prompts = list(prompts_for(factors))
    elif mode == "prompts":
        pool = st.prompts or OPEN_PROMPTS
        prompts = [pool[i % len(pool)] for i in range(n)]
    else:
        prompts = [None] * n
    branches = ["cond"] if "cond" in model.branch_labels(model.config(**gen_kw)) else None
    cap = Capture(names, branches=branches)
    grams: dict[tuple[str, int, str], torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="layerscope-align-") as tmp:
        if model.capture_bytes(cap, n, **gen_kw) > cap.budget_bytes:
            cap = Capture(names, branches=branches, store=Path(tmp) / "features.zarr")
        res = model.generate(
            prompts, seeds, capture=cap, interventions=ivs, max_batch=st.max_batch, progress=progress, **gen_kw
        )
        steps = [int(s) if s is not None else 0 for s in res.capture.steps_of(names[0])]
        for name in names:
            dims = lmap[name].dims
            for k, s in enumerate(steps):
                x = torch.as_tensor(np.asarray(res.capture[name][:, k, 0])).double()
                full, pooled = x.flatten(1), _pooled(x, dims).flatten(1)
                grams[(name, s, "full")] = full @ full.T
                grams[(name, s, "pooled")] = pooled @ pooled.T
    image_pixels = int(res.images.shape[-2] * res.images.shape[-1])
    all_t = [float(t) for t in res.timesteps]
    control = getattr(model, "control", None) or {}
    return ModelFeatures(
        model.spec,
        names,
        steps,
        [all_t[s] for s in steps] if all_t else [],
        model.capabilities.iterative,
        grams,
        {n: lmap[n].role for n in names},
        {n: _distance(lmap[n].dims, lmap[n].shape, image_pixels) for n in names},
        control=str(control.get("kind", "")),
        of=str(control.get("of", "")),
    )


# ---------------------------------------------------------------------------------------------------------------------
# the experiment


def _check(models: Sequence[Generator], st: Settings) -> str:
    if not models:
        raise ConfigError("give at least one model to align")
    specs = [m.spec for m in models]
    if len(set(specs)) != len(specs):
        raise ConfigError(f"each model once: {specs} names one twice")
    for name, chosen, valid in (("metric", st.metrics, METRICS), ("curve measure", st.curve_measures, EMBEDDABLE)):
        bad = [m for m in chosen if m not in valid]
        if bad or not chosen:
            raise ConfigError(f"unknown alignment {name}(s) {bad or list(chosen)}; valid: {', '.join(valid)}")
    bad = [c for c in st.controls if c not in CONTROLS]
    if bad:
        raise ConfigError(f"unknown control(s) {bad}; valid: {', '.join(CONTROLS)}")
    if st.n < MIN_SCENES:
        raise ConfigError(
            f"n must be at least {MIN_SCENES} scenes or rows (debiased CKA on half-samples of them), got {st.n}"
        )
    knn = [m for m in (*st.metrics, *st.curve_measures) if m in ("mutual_knn", "cknna")]
    if knn and not 2 <= st.k < st.n // 2:
        raise ConfigError(
            f"k must be between 2 and n // 2 - 1 = {st.n // 2 - 1} for the kNN measures (the intervals' subsamples "
            f"hold n // 2 rows), got {st.k}"
        )
    if st.n_boot < 20 or st.permutations < 20:
        raise ConfigError(f"n_boot and permutations must be >= 20, got {st.n_boot} and {st.permutations}")
    mode = _mode(models)
    for m in models:
        lmap = m.layer_map()
        chosen = lmap.layers if st.layers is None else [e for e in lmap.select(st.layers) if not e.is_space]
        if not chosen:
            raise ConfigError(f"{m.spec} has no capturable layer" + (f" matching {st.layers!r}" if st.layers else ""))
        if "untrained" in st.controls and not m.has_weights:
            raise ConfigError(f"{m.spec} has no weights: it cannot be generated, nor an untrained copy of it")
    return mode


def _with_controls(ms: list[Generator], st: Settings) -> list[Generator]:
    """The models and, with the ``untrained`` control, an untrained copy of each that is not itself a control (the
    same inputs and seeds)."""
    if "untrained" not in st.controls:
        return list(ms)
    from ..controls import untrained

    return [*ms, *(untrained(m, seed=st.control_seed) for m in ms if m.control is None)]


def plan(models: Generator | Sequence[Generator], settings: Settings) -> list[StudyPlan]:
    """What :func:`run` will generate (``--dry-run``), one plan per model and control; nothing is generated. Each
    makes the ``n`` matched inputs once, every selected layer captured at every step (streamed to a temporary store
    when over the capture's memory budget)."""
    ms = [models] if not isinstance(models, Sequence) else list(models)
    st = settings
    _check(ms, st)
    gen_kw = generation_kwargs(st.steps, st.guidance, st.generation)
    plans = []
    for m in ms:
        lmap = m.layer_map()
        names = [e.name for e in (lmap.layers if st.layers is None else lmap.select(st.layers)) if not e.is_space]
        cfg = m.config(**gen_kw)
        labels = m.branch_labels(cfg)
        cap = Capture(names, branches=["cond"] if "cond" in labels else None)
        held = capture_bytes(m, cap, st.n, **gen_kw)
        size = st.max_batch or m.default_max_batch
        copies = 2 if "untrained" in st.controls else 1
        row = Generations(
            f"{st.n} matched inputs, {len(names)} layers at every step"
            + (", and the same for its untrained copy" if copies == 2 else ""),
            copies * -(-st.n // size),
            copies * st.n,
            min(st.n, size),
            m.num_steps(cfg),
            len(labels),
            held,
            held if held > cap.budget_bytes else 0,  # a capture over the budget streams to a temporary store
            streamed=held > cap.budget_bytes,
        )
        weights, per_row = model_bytes(m)
        plans.append(StudyPlan(NAME, m.spec, [row], weights, per_row))
    return plans


def run(
    models: Generator | Sequence[Generator],
    settings: Settings,
    out: str | Path | None = None,
    progress: ProgressArg = None,
    executor: Executor | None = None,
) -> Result:
    """The alignment study on loaded models and their controls (the same inputs for all, see the module docstring):
    tables ``layers``, ``within``, ``across``, ``world``, ``peaks``, ``peak_order``, ``matching``, ``curve`` (see
    :mod:`.alignment_analysis`); the record holds the settings, the input mode, the rule and each feature set's
    layers, steps and merged duplicates. ``out``: the folder the Result is saved in; each model's and control's
    features are kept there as a cell until then, so a rerun collects only the missing ones. ``executor``: where
    each feature set is collected (:mod:`.executor`); the tables are the same either way."""
    ms = [models] if not isinstance(models, Sequence) else list(models)
    st = settings
    mode = _check(ms, st)
    factors = scenes(st.n, st.seed) if mode == "scenes" else None
    everything = _with_controls(ms, st)
    with open_workspace(out, NAME, [m.spec for m in ms], st, keep_cells=False) as ws:
        finished = ws.finished()
        if finished is not None:
            return finished
        tasks = [
            Task(f"features_{i}_{m.spec}", m.spec, _features_cell, (st, mode, factors))
            for i, m in enumerate(everything)
        ]  # one cell per model or control: its features
        desc = f"alignment: features of {len(ms)} models" + (
            f" and {len(everything) - len(ms)} untrained copies" if len(everything) > len(ms) else ""
        )
        parts = run_cells(ws, {m.spec: m for m in everything}, tasks, executor, progress, desc)
        feats = [_features_from(Cell(arrays=p.arrays, record=p.record)) for p in parts]
        refs = world_references(factors) if factors is not None else {}
        if RENDER in st.controls and refs:
            feats.append(render_features(refs))
        for f in feats:
            f.find_duplicates()
        tables = analyse(feats, refs, st, progress=progress)
        record = {
            "models": [m.spec for m in ms],
            "model": "+".join(m.spec for m in ms),
            "settings": settings_dict(st),
            "mode": mode,
            "rows": st.n,
            "controls": {f.spec: {"kind": f.control, "of": f.of} for f in feats if f.control},
            "steps": {f.spec: f.steps for f in feats},
            "timesteps": {f.spec: f.timesteps for f in feats},
            "iterative": {f.spec: f.iterative for f in feats},
            "duplicates": {f.spec: f.duplicates for f in feats if f.duplicates},
            "references": list(refs),
            "notes": [] if RENDER not in st.controls or refs else ["the render control needs a world: left out"],
        }
        return ws.save(Result(NAME, tables, record))


def _features_cell(model: "Generator", st: Settings, mode: str, factors: Any) -> Part:
    """One model's features as an executor's cell."""
    f = collect(model, st, mode, factors)
    return Part(arrays=_feature_arrays(f), record=_feature_record(f))


def _feature_arrays(f: ModelFeatures) -> dict[str, np.ndarray]:
    return {f"{layer}@{step}@{kind}": x.numpy() for (layer, step, kind), x in f.grams.items()}


def _feature_record(f: ModelFeatures) -> dict[str, Any]:
    return {
        "spec": f.spec,
        "layers": f.layers,
        "steps": f.steps,
        "timesteps": f.timesteps,
        "iterative": f.iterative,
        "roles": f.roles,
        "distance": f.distance,
        "control": f.control,
        "of": f.of,
    }


def _features_from(cell: Any) -> ModelFeatures:
    r = cell.record
    grams = {
        (layer, int(step), kind): torch.from_numpy(cell.arrays[f"{layer}@{step}@{kind}"])
        for layer in r["layers"]
        for step in r["steps"]
        for kind in FEATURES
    }
    return ModelFeatures(
        r["spec"],
        r["layers"],
        r["steps"],
        r["timesteps"],
        r["iterative"],
        grams,
        r["roles"],
        r["distance"],
        r["control"],
        r["of"],
    )


MAIN_MODELS = ("zoo:unet", "zoo:dit", "zoo:ldm", "zoo:vae", "zoo:gan")
FULL = Settings(n=64, steps=10)
QUICK = Settings(n=24, steps=4, metrics=("linear_cka", "mutual_knn"), k=5, n_boot=50, permutations=50)


def main_job(quick: bool = False) -> list[Job]:
    """The five zoo models and their controls on the same held-out scenes."""
    return [Job(MAIN_MODELS, QUICK if quick else FULL, folder="zoo")]


def __getattr__(name: str) -> Any:
    """The analysis's names (thresholds, outcomes) and the claims (``CLAIMS``, ``claims_curve``) also from here."""
    from . import alignment_analysis, alignment_claims

    for module in (alignment_claims, alignment_analysis):
        if name in module.__all__:
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
