"""The injection study (Schaerf 2025, Fig. 5): which layers carry structure, content and surface.

Two images are generated in parallel, O(riginal) and E(dit); E's representation at one layer (or a set of layers)
replaces O's at every step of a window, for every layer in turn, in one batched generation per cell (see
:func:`layerscope.injection_sweep`). Every injected image C is then scored against O and E:

- **Shapes world** (``scorer="oracle"``, the default for ``zoo:`` models): the oracle reads O, E and C. For each
  factor, ``transfer`` = 1 when C shows E's value, ``keep`` = 1 when it shows O's; both are undefined (NaN) when O
  and E show the same value. Averaged over pairs they are the share of pairs in which the layer moved the factor.
  Factor groups (:data:`layerscope.world.factors.GROUPS`): structure/composition (scale, orientation), content
  (shape), surface/colour (object, floor and wall hue).
- **Open domain** (``scorer="images"``): SSIM, SIFT matches, HSV histogram and LBP texture correlation (and CLIP when
  a local checkpoint is configured), each baseline-subtracted: ``m_to_E = max(0, m(C, E) - m(O, E))``, see
  :mod:`layerscope.metrics.similarity`.

The result is a tidy table (one row per model, pair, seed, window, layer, factor, metric) saved as parquet. A sweep
given an output folder keeps one file per cell (pair x seed x window) and an interrupted run resumes at the first
missing cell. :func:`summarize` turns the table into per-layer estimates with bootstrap CIs and :func:`specialize`
labels each layer by the rule documented there.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from .. import folders
from ..engine import WINDOWS, ProgressArg, injection_sweep, layer_sets
from ..errors import ConfigError
from ..validate import check_int, check_seed, check_seeds
from .base import Job, Result, generation_kwargs, settings_dict
from .executor import Executor, Part, Task, run_cells
from .plans import Generations, StudyPlan, image_bytes, model_bytes
from .workspace import Workspace, open_workspace

if TYPE_CHECKING:  # pragma: no cover
    from ..models.base import Generator

NAME = "injection"
TABLE = "injection.parquet"
META = "injection.json"
#: the specialization rule's thresholds (fixed before any result was seen; see :func:`specialize`)
INERT_BELOW = 0.2
MARGIN = 0.2
#: open-domain metrics standing for each group when the labels are computed without an oracle
IMAGE_GROUPS = {"structure": ("ssim", "sift"), "content": ("clip",), "surface": ("hist", "lbp")}
LABELS = ("structure", "content", "surface", "mixed", "inert")


@dataclass
class InjectionPlan:
    """Everything that defines an injection sweep; stored next to the table so a resumed run can be checked."""

    model: str
    pairs: list[tuple[str, str]]
    seeds: list[int]
    e_seeds: list[int] | None  # E's seed for each of ``seeds`` (None: E shares O's seed)
    seed_per_pair: bool  # pair p adds p to every seed: each pair has its own noise
    layer_sets: list[list[str]]
    windows: list[str]
    branches: list[str] | None
    scorer: str
    metrics: list[str]
    settings: dict[str, Any] = field(default_factory=dict)
    layer_info: dict[str, dict[str, Any]] = field(default_factory=dict)

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("layer_info")
        return d

    def cells(self) -> list[tuple[int, int, str]]:
        """(pair, O's seed, window) of every cell."""
        return [(p, o, w) for w in self.windows for p in range(len(self.pairs)) for o, _ in self.seeds_of(p)]

    def seeds_of(self, pair: int) -> list[tuple[int, int]]:
        """(O's seed, E's seed) of each cell of ``pair``."""
        return seed_pairs({"seeds": self.seeds, "e_seeds": self.e_seeds, "seed_per_pair": self.seed_per_pair}, pair)

    def e_seed(self, pair: int, seed: int) -> int:
        """E's seed in the cell of ``pair`` where O has ``seed``."""
        return dict(self.seeds_of(pair))[seed]


def seed_pairs(plan: dict[str, Any], pair: int) -> list[tuple[int, int]]:
    """(O's seed, E's seed) of each cell of ``pair`` in a plan (an :class:`InjectionPlan` as a dict, e.g. a saved
    result's ``record["plan"]``): ``seeds`` and ``e_seeds`` (E shares O's seed without them), plus ``pair`` when
    ``seed_per_pair``."""
    off = pair if plan.get("seed_per_pair") else 0
    seeds = list(plan["seeds"])
    e_seeds = plan.get("e_seeds") or seeds
    return [(int(o) + off, int(e) + off) for o, e in zip(seeds, e_seeds)]


def default_layers(model: "Generator", spaces: bool = True, **size: Any) -> list[str]:
    """Every layer of the map in forward order, then the candidate spaces that injection can patch.

    Left out: the denoiser's input (role ``denoiser_input``: ``x_t`` at every step is E's whole trajectory) and
    spaces that sit at a layer's own site (e.g. ``h_space``, the mid-block's output, already a layer)."""
    lmap = model.layer_map(size.get("height"), size.get("width"))
    names = [e.name for e in lmap.layers]
    if spaces:
        layer_sites = {e.site for e in lmap.layers}
        names += [
            e.name
            for e in lmap.spaces
            if e.role != "denoiser_input" and e.site not in layer_sites and e.name not in names
        ]
    return names


def _layer_sets(model: "Generator", layers: Any, cfg) -> list[tuple[str, ...]]:
    if layers is None:  # every layer (not the spaces): the paper's "for every layer"
        layers = [e.name for e in model.layer_map(cfg.height, cfg.width).layers]
    return layer_sets(model.layer_map(cfg.height, cfg.width), layers)


def _with_pooled(model: "Generator", sets: list[tuple[str, ...]], cfg: Any) -> list[tuple[str, ...]]:
    pooled = [e.name for e in model.layer_map(cfg.height, cfg.width) if e.role == "pooled_condition"]
    if not pooled:
        raise ConfigError(f"with_pooled: {model.spec} has no pooled text condition (no pooled_condition entry)")
    return [g if set(g) <= set(pooled) else g + tuple(p for p in pooled if p not in g) for g in sets]


def _scorer(model: "Generator", scorer: str) -> str:
    if scorer == "auto":
        return "oracle" if model.capabilities.default_scorer == "oracle" else "images"
    if scorer not in ("oracle", "images"):
        raise ConfigError(f"unknown scorer {scorer!r}; valid: auto, oracle, images")
    if scorer == "oracle" and model.capabilities.oracle != "shapes":
        raise ConfigError(
            f"the oracle scorer reads Shapes-world images and no oracle reads {model.spec}'s: use the images scorer"
        )
    return scorer


#: what a reader of a one-pass generator's sweep must know
ONE_PASS_NOTE = (
    "{spec} generates in one forward pass: a layer injected whole hands every later layer E's values, so it "
    "reproduces E (transfer 1) by construction unless later layers also read earlier ones (skips, a latent fed to "
    "every block); such a sweep tells where E's image becomes fixed, not which layers carry which factor"
)
#: a latent generator's E seeds when none are given: O's seed plus this
LATENT_E_OFFSET = 1000


def _latent_e_seeds(
    model: "Generator",
    pairs: Sequence[tuple[Any, Any]],
    seeds: Sequence[int],
    e_seeds: Sequence[int] | None,
    seed_per_pair: bool,
) -> list[int] | None:
    """O and E of a latent generator differ only by their latents: E's seeds (default: O's + LATENT_E_OFFSET) must
    differ from O's, and several pairs need seed_per_pair (else they are one pair repeated)."""
    text = all(isinstance(x, str) for p in pairs for x in p)
    if text and e_seeds is None:
        e_seeds = [s + LATENT_E_OFFSET for s in seeds]
    if text and e_seeds is not None and any(o == e for o, e in zip(seeds, e_seeds)):
        raise ConfigError(
            f"{model.spec} draws O and E from their seeds alone: with the same seed ({seeds}, E {list(e_seeds)}) "
            "O == E and nothing can transfer; give E other seeds"
        )
    if text and len(pairs) > 1 and not seed_per_pair:
        raise ConfigError(
            f"{model.spec} draws O and E from their seeds alone: {len(pairs)} pairs on the same seeds are one pair "
            "repeated; set seed_per_pair (--seed-per-pair) so each pair has its own latents"
        )
    return list(e_seeds) if e_seeds is not None else None


def plan_injection(
    model: "Generator",
    pairs: Sequence[tuple[Any, Any]],
    *,
    seeds: Sequence[int] = (0,),
    e_seeds: Sequence[int] | None = None,
    seed_per_pair: bool = False,
    layers: Any = None,
    windows: Sequence[str] = ("all",),
    branches: Sequence[str] | None = None,
    scorer: str = "auto",
    metrics: Sequence[str] | None = None,
    with_pooled: bool = False,
    **gen_kwargs: Any,
) -> InjectionPlan:
    """Validate a sweep and resolve its layer sets, windows and scorer, before any generation. ``with_pooled``: inject
    the pooled text condition (the map's ``pooled_condition`` entries: SDXL's, SD3's and Flux's ``text_pooled``)
    together with every layer set."""
    if not pairs:
        raise ConfigError("give at least one (original, edit) prompt pair")
    for p in pairs:
        if len(p) != 2:
            raise ConfigError(f"each pair must be (original, edit), got {p!r}")
    seeds = check_seeds(seeds)
    if not seeds:
        raise ConfigError("give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"the seeds repeat ({seeds}): give each seed once")
    if e_seeds is not None:
        e_seeds = check_seeds(e_seeds)
        if len(e_seeds) != len(seeds):
            raise ConfigError(f"give one E seed per seed: {len(seeds)} seeds, {len(e_seeds)} E seeds")
    if model.capabilities.conditioning == "latent":
        e_seeds = _latent_e_seeds(model, pairs, seeds, e_seeds, seed_per_pair)
    if seed_per_pair:  # the largest seed a pair reaches must stay a seed
        check_seeds([s + len(pairs) - 1 for s in [*seeds, *(e_seeds or [])]])
    bad = [w for w in windows if w not in WINDOWS]
    if bad or not windows:
        raise ConfigError(f"unknown step window(s) {bad}; valid windows: {', '.join(WINDOWS)}")
    cfg = model.config(**gen_kwargs)
    if model.num_steps(cfg) == 0 and list(windows) != ["all"]:
        raise ConfigError(f"{model.spec} generates in one pass: the only step window is 'all'")
    valid_branches = model.branch_labels(cfg)
    if branches is not None:
        bad = [b for b in branches if b not in valid_branches]
        if bad or not branches:
            raise ConfigError(f"unknown CFG branch(es) {bad}; this configuration has {', '.join(valid_branches)}")
    sets = _layer_sets(model, layers, cfg)
    if with_pooled:
        sets = _with_pooled(model, sets, cfg)
    kind = _scorer(model, scorer)
    if kind == "oracle":
        if metrics:
            raise ConfigError(
                f"image metrics ({', '.join(metrics)}) apply to the images scorer; the oracle scorer reads each "
                "factor (transfer, keep): drop --metrics or use --scorer images"
            )
        mets = ["transfer", "keep"]
    else:
        from ..metrics.similarity import METRICS

        mets = list(metrics) if metrics else ["ssim", "sift", "hist", "lbp", "clip"]
        bad = [m for m in mets if m not in METRICS]
        if bad:
            raise ConfigError(f"unknown metric(s) {bad}; valid: {', '.join(METRICS)}")
    lmap = model.layer_map(cfg.height, cfg.width)
    info = {}
    for group in sets:
        e = lmap[group[0]]
        info["+".join(group)] = {
            "kind": e.kind if len(group) == 1 else "combination",
            "stage": e.stage,
            "is_space": e.is_space,
            "index": len(info),
        }
    settings = {
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "height": cfg.height,
        "width": cfg.width,
    }
    settings.update({k: v for k, v in gen_kwargs.items() if k not in settings and _jsonable(v)})
    return InjectionPlan(
        model=model.spec,
        pairs=[(_as_text(o), _as_text(e)) for o, e in pairs],
        seeds=seeds,
        e_seeds=list(e_seeds) if e_seeds is not None else None,
        seed_per_pair=bool(seed_per_pair),
        layer_sets=[list(g) for g in sets],
        windows=list(windows),
        branches=list(branches) if branches is not None else None,
        scorer=kind,
        metrics=mets,
        settings=settings,
        layer_info=info,
    )


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def _as_text(p: Any) -> str:
    if isinstance(p, str):
        return p
    raise ConfigError(
        "the injection experiment takes text prompts (Kandinsky's image embeddings: use "
        "layerscope.injection_sweep directly)"
    )


def run_injection(
    model: "Generator",
    pairs: Sequence[tuple[str, str]],
    *,
    seeds: Sequence[int] = (0,),
    e_seeds: Sequence[int] | None = None,
    seed_per_pair: bool = False,
    layers: Any = None,
    windows: Sequence[str] = ("all",),
    branches: Sequence[str] | None = None,
    scorer: str = "auto",
    metrics: Sequence[str] | None = None,
    with_pooled: bool = False,
    out: str | Path | Workspace | None = None,
    max_batch: int | None = None,
    progress: ProgressArg = None,
    clip_path: str | Path | None = None,
    notify: Callable[[str], None] | None = None,
    executor: Executor | None = None,
    **gen_kwargs: Any,
) -> pd.DataFrame:
    """Run the injection sweep over pairs x seeds x windows and score every injected image; a tidy table.

    ``seeds``: O's seeds, one cell each; ``e_seeds``: E's seed for each (None: E shares O's seed, so the two differ
    only by their prompts; different seeds let the noise decide what the prompts leave open); ``seed_per_pair``:
    pair p adds p to every seed, so each pair has its own noise (see :func:`seed_pairs`).
    ``layers``: None = every layer of the map; a glob, a list of names/globs, or tuples for combinations (as in
    :func:`layerscope.injection_sweep`). ``windows``: among ``all``, ``early``, ``middle``, ``late``. ``branches``:
    the CFG-branch policy (None = both halves; ``["cond"]`` = the conditional half only). ``out``: a folder where
    each finished cell is saved (table part + images) and from which an interrupted run resumes. ``notify``
    receives notices (e.g. CLIP skipped); default: a Python warning. ``executor``: where the cells are computed
    (:mod:`.executor`: serial by default, or Ray actors); the table is the same either way.
    Columns: model, pair, seed, e_seed, window, layer, layer_index, stage, factor, metric, value, o_value, e_value, c_value
    (oracle readings of the factor; NaN for image metrics).
    """
    plan = plan_injection(
        model,
        pairs,
        seeds=seeds,
        e_seeds=e_seeds,
        seed_per_pair=seed_per_pair,
        layers=layers,
        windows=windows,
        branches=branches,
        scorer=scorer,
        metrics=metrics,
        with_pooled=with_pooled,
        **gen_kwargs,
    )
    check_int(max_batch, "max_batch (rows per generation: O, E and at least one injected row)", 3, optional=True)
    if isinstance(out, Workspace):  # run(): the study's workspace, claimed and locked by the caller
        return _sweep_cells(model, plan, out, max_batch, progress, clip_path, notify, gen_kwargs, executor)
    with open_workspace(out, NAME, [plan.model], plan.key()) as ws:
        table = _sweep_cells(model, plan, ws, max_batch, progress, clip_path, notify, gen_kwargs, executor)
        if ws.folder is not None:
            folders.atomic_write(ws.folder / TABLE, lambda tmp: table.to_parquet(tmp, index=False))
    return table


def _sweep_cells(
    model: "Generator",
    plan: InjectionPlan,
    ws: Workspace,
    max_batch: int | None,
    progress: ProgressArg,
    clip_path: str | Path | None,
    notify: Callable[[str], None] | None,
    gen_kwargs: dict[str, Any],
    executor: Executor | None = None,
) -> pd.DataFrame:
    if ws.folder is not None:
        meta = ws.folder / META
        if not meta.exists():
            folders.atomic_write_text(meta, json.dumps({"key": plan.key(), "layer_info": plan.layer_info}, indent=1))
    sets = [tuple(g) for g in plan.layer_sets]
    k = len(sets)
    max_batch = max_batch or min(k + 2, 64)
    cells = plan.cells()
    tasks = [
        Task(_cell_key(p, s, w, plan.e_seed(p, s)), plan.model, _injection_cell, (plan, p, s, w, max_batch, clip_path, gen_kwargs))
        for p, s, w in cells
    ]  # fmt: skip
    parts = run_cells(
        ws, {plan.model: model}, tasks, executor, progress, f"injection: {len(cells)} cells x {k} layer sets"
    )
    notes = list(ws.notes) + [n for part in parts for n in part.record.get("notes", [])]
    if notes and notify is not None:
        for n in dict.fromkeys(notes):
            notify(n)
    elif notes:
        import warnings

        for n in dict.fromkeys(notes):
            warnings.warn(n, stacklevel=3)
    return pd.concat([part.tables["injection"] for part in parts], ignore_index=True)


def _injection_cell(
    model: "Generator",
    plan: InjectionPlan,
    p: int,
    s: int,
    w: str,
    max_batch: int,
    clip_path: str | Path | None,
    gen_kwargs: dict[str, Any],
) -> Part:
    """One cell (pair ``p`` x O's seed ``s`` x window ``w``): the batched sweep and its scores, with the images."""
    score, notes = _scorer_for(plan, clip_path)
    o, e = plan.pairs[p]
    res = injection_sweep(
        model,
        o,
        e,
        [tuple(g) for g in plan.layer_sets],
        seeds=(s, plan.e_seed(p, s)),
        steps=None if w == "all" else w,
        branches=plan.branches,
        max_batch=max_batch,
        **gen_kwargs,
    )
    images = res.stack()
    part = score(images, plan, p, s, w)
    arr = (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
    rows = np.array(["O", "E", *res.injected])
    return Part({"injection": part}, {"images": arr, "rows": rows}, {"notes": notes} if notes else {})


_SCORERS: dict[tuple[Any, ...], tuple[Callable[..., pd.DataFrame], list[str]]] = {}


def _scorer_for(plan: InjectionPlan, clip_path: str | Path | None) -> tuple[Callable[..., pd.DataFrame], list[str]]:
    """The plan's scorer, made once per process (the oracle or CLIP load once), and the notices making it gave."""
    key = ("oracle",) if plan.scorer == "oracle" else ("images", tuple(plan.metrics), str(clip_path))
    if key not in _SCORERS:
        notes: list[str] = []
        score = _oracle_scorer() if plan.scorer == "oracle" else _image_scorer(plan, clip_path, notes.append)
        _SCORERS[key] = (score, notes)
    return _SCORERS[key]


# -- scoring -------------------------------------------------------------------------------------------------------


def _rows(plan: InjectionPlan, p: int, s: int, w: str) -> dict[str, Any]:
    return {"model": plan.model, "pair": p, "seed": s, "e_seed": plan.e_seed(p, s), "window": w}


def _oracle_scorer() -> Callable[..., pd.DataFrame]:
    from ..world.factors import FACTORS
    from ..world.oracle import load_oracle, read

    oracle = load_oracle()

    def score(images: torch.Tensor, plan: InjectionPlan, p: int, s: int, w: str) -> pd.DataFrame:
        pred = read(images, oracle).pred  # (2 + k, 6): O, E, injected...
        o, e, c = pred[0], pred[1], pred[2:]
        base = _rows(plan, p, s, w)
        recs = []
        for j, group in enumerate(plan.layer_sets):
            name = "+".join(group)
            meta = plan.layer_info[name]
            for f, factor in enumerate(FACTORS):
                differ = o[f] != e[f]
                for metric, val in (("transfer", c[j, f] == e[f]), ("keep", c[j, f] == o[f])):
                    recs.append(
                        {
                            **base,
                            "layer": name,
                            "layer_index": meta["index"],
                            "stage": meta["stage"],
                            "factor": factor,
                            "metric": metric,
                            "value": float(val) if differ else np.nan,
                            "o_value": int(o[f]),
                            "e_value": int(e[f]),
                            "c_value": int(c[j, f]),
                        }
                    )
        return pd.DataFrame.from_records(recs)

    return score


def _image_scorer(
    plan: InjectionPlan, clip_path: str | Path | None, notify: Callable[[str], None] | None
) -> Callable[..., pd.DataFrame]:
    from ..metrics.similarity import ClipEmbedder, clip_notice, injection_scores

    metrics = list(plan.metrics)
    clip = None
    if "clip" in metrics:
        clip = ClipEmbedder.from_local(clip_path)
        if clip is None:
            metrics.remove("clip")
            if notify is None:
                import warnings

                warnings.warn(clip_notice(None), stacklevel=3)
            else:
                notify(clip_notice(None))

    def score(images: torch.Tensor, plan: InjectionPlan, p: int, s: int, w: str) -> pd.DataFrame:
        scores = injection_scores(images[0], images[1], images[2:], metrics=tuple(metrics), clip=clip)
        base = _rows(plan, p, s, w)
        recs = []
        for j, group in enumerate(plan.layer_sets):
            name = "+".join(group)
            meta = plan.layer_info[name]
            for metric, vals in scores.items():
                recs.append(
                    {
                        **base,
                        "layer": name,
                        "layer_index": meta["index"],
                        "stage": meta["stage"],
                        "factor": None,
                        "metric": metric,
                        "value": float(vals[j]),
                        "o_value": np.nan,
                        "e_value": np.nan,
                        "c_value": np.nan,
                    }
                )
        return pd.DataFrame.from_records(recs)

    return score


# -- the output folder (one part per cell, resumable) -------------------------------------------------------------


def _cell_key(p: int, s: int, w: str, e_seed: int | None = None) -> str:
    seeds = f"{s}" if e_seed is None or e_seed == s else f"{s}-{e_seed}"
    return f"pair{p:03d}_seed{seeds}_{w}"


def load_plan(folder: str | Path) -> dict[str, Any]:
    """The stored plan of an injection folder (``key`` and ``layer_info``)."""
    path = Path(folder) / META
    if not path.exists():
        raise ConfigError(f"{folder} holds no injection sweep ({META} is missing)")
    return json.loads(path.read_text())


def load_images(
    folder: str | Path, pair: int, seed: int, window: str, e_seed: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """The saved images of one cell: uint8 (rows, 3, H, W) in order [O, E, injected...] and the row names
    (``e_seed``: E's seed where it differs from O's)."""
    key = _cell_key(pair, seed, window, e_seed)
    cell = Workspace(folder, {}).get(key)
    if cell is None or "images" not in cell.arrays:
        raise ConfigError(f"{folder} holds no finished injection cell {key!r}")
    return cell.arrays["images"], [str(r) for r in cell.arrays["rows"]]


# -- aggregation -----------------------------------------------------------------------------------------------------


def _group_of(factor: str) -> str:
    from ..world.factors import GROUPS

    for g, members in GROUPS.items():
        if factor in members:
            return g
    raise KeyError(factor)


def group_table(table: pd.DataFrame) -> pd.DataFrame:
    """Oracle rows averaged within each factor group per observation (pair, seed): factor -> group name."""
    t = table[table["metric"].isin(["transfer", "keep"])].copy()
    if t.empty:
        return t
    t["group"] = t["factor"].map(_group_of)
    keys = ["model", "pair", "seed", "window", "layer", "layer_index", "stage", "group", "metric"]
    g = t.groupby(keys, dropna=False, sort=False)["value"].mean().reset_index()  # mean skips NaN (same values)
    return g.dropna(subset=["value"])


def summarize(table: pd.DataFrame, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per model x window x layer x (factor or group) x metric: estimate with a bootstrap CI over pairs x seeds.

    Oracle shares (``transfer``, ``keep``) are means; image metrics are medians (as in the companion study).
    Columns: model, window, layer, layer_index, stage, level (factor / group / metric), target, metric, estimate,
    ci_low, ci_high, n.
    """
    from ..stats.bootstrap import mean_ci, median_ci

    out = []
    keys = ["model", "window", "layer", "layer_index", "stage"]
    oracle = table[table["metric"].isin(["transfer", "keep"])]
    frames = []
    if not oracle.empty:
        frames.append(("factor", oracle.assign(target=oracle["factor"]), mean_ci))
        g = group_table(table)
        frames.append(("group", g.assign(target=g["group"]), mean_ci))
    images = table[~table["metric"].isin(["transfer", "keep"])]
    if not images.empty:
        frames.append(("metric", images.assign(target=images["metric"].str.rsplit("_", n=2).str[0]), median_ci))
    for level, frame, stat in frames:
        for key, sub in frame.groupby(keys + ["target", "metric"], sort=False):
            vals = sub["value"].dropna().to_numpy()
            est, lo, hi = stat(vals, confidence=confidence, seed=seed) if len(vals) else (np.nan, np.nan, np.nan)
            out.append(
                dict(
                    zip(keys + ["target", "metric"], key), level=level, estimate=est, ci_low=lo, ci_high=hi, n=len(vals)
                )
            )
    cols = keys + ["level", "target", "metric", "estimate", "ci_low", "ci_high", "n"]
    return pd.DataFrame.from_records(out, columns=cols).sort_values(
        ["model", "window", "layer_index"], kind="stable", ignore_index=True
    )


def label(scores: dict[str, float]) -> str:
    """The specialization rule, on the group transfer shares of one layer (structure, content, surface).

    - ``inert``: no group reaches a transfer of ``INERT_BELOW`` (0.2): injecting E here barely changes O's factors;
    - ``structure`` / ``content`` / ``surface``: the strongest group leads the second by at least ``MARGIN`` (0.2);
    - ``mixed``: two or more groups transfer about equally (this includes layers that transfer everything).
    Groups without a value (NaN: e.g. CLIP unavailable) take no part.
    """
    vals = {g: v for g, v in scores.items() if v is not None and not np.isnan(v)}
    if not vals:
        return "inert"
    ranked = sorted(vals.items(), key=lambda kv: -kv[1])
    top_g, top = ranked[0]
    if top < INERT_BELOW:
        return "inert"
    second = ranked[1][1] if len(ranked) > 1 else 0.0
    return top_g if top - second >= MARGIN else "mixed"


def specialize(summary: pd.DataFrame) -> pd.DataFrame:
    """One label per model x window x layer from a :func:`summarize` table (rule: :func:`label`).

    Oracle tables use the group transfer shares. Image-metric tables use each group's metrics (structure: SSIM,
    SIFT; surface: HSV histogram, LBP; content: CLIP) as ``m_to_E / (1 - m_baseline)``: the share of the O-to-E
    gap the injection closed, which is 1 when C equals E, so the same thresholds apply.
    """
    keys = ["model", "window", "layer", "layer_index", "stage"]
    recs = []
    for key, sub in summary.groupby(keys, sort=False):
        scores: dict[str, float] = {}
        grp = sub[(sub["level"] == "group") & (sub["metric"] == "transfer")]
        if not grp.empty:
            scores = dict(zip(grp["target"], grp["estimate"]))
        else:
            est = {(r.target, r.metric): r.estimate for r in sub.itertuples()}
            for g, mets in IMAGE_GROUPS.items():
                closed = []
                for m in mets:
                    to_e, base = est.get((m, f"{m}_to_E")), est.get((m, f"{m}_baseline"))
                    if to_e is not None and base is not None and base < 1:
                        closed.append(min(1.0, to_e / (1.0 - base)))
                scores[g] = float(np.mean(closed)) if closed else np.nan
        recs.append(dict(zip(keys, key), **{f"transfer_{g}": v for g, v in scores.items()}, label=label(scores)))
    return pd.DataFrame.from_records(recs)


#: what published work reports for Stable Diffusion 1.4 at layers that a model in SD 1.x's layout has under the
#: same names (glob, what is reported, source); compared side by side with a model's labels by :func:`anchors`
SD14_ANCHORS = (
    ("down_blocks.2", "the most critical layers in the late encoder", "Schaerf 2025"),
    ("down_blocks.3", "the most critical layers in the late encoder", "Schaerf 2025"),
    ("mid_block", "content / semantic edits (h-space, the bottleneck's output)", "Kwon et al. 2023"),
    (
        "skip.up_blocks.1.resnets.*",
        "content: the skips from the third encoder block",
        "SkipInject, Schaerf et al. 2025",
    ),
    ("up_blocks.1.resnets.1", "structure / layout: the features PnP injects", "Tumanyan et al. 2023 (PnP)"),
    ("up_blocks.1.attentions.*", "structure: decoder self-attention (PnP injects its queries and keys)", "PnP"),
)
#: the confidence intervals a study should reach: half-width at most this for every share in SHARE_RANGE
CI_HALF_WIDTH, SHARE_RANGE = 0.15, (0.2, 0.8)


def anchors(summary: pd.DataFrame, labels: pd.DataFrame, window: str = "all") -> pd.DataFrame:
    """The :data:`SD14_ANCHORS` a sweep covered, each with the sweep's label and group transfers (estimate and CI)
    at every layer the anchor's glob matches. Empty when the sweep has none of them."""
    import fnmatch

    s = summary[(summary["level"] == "group") & (summary["metric"] == "transfer") & (summary["window"] == window)]
    lab = labels[labels["window"] == window].set_index("layer")["label"]
    layers = list(s.sort_values("layer_index", kind="stable")["layer"].drop_duplicates())
    recs = []
    for pattern, reported, source in SD14_ANCHORS:
        for layer in [x for x in layers if fnmatch.fnmatchcase(x, pattern)]:
            rec: dict[str, Any] = {"layer": layer, "SD 1.4 (reported)": reported, "source": source}
            for r in s[s["layer"] == layer].itertuples():
                rec[str(r.target)] = (float(r.estimate), float(r.ci_low), float(r.ci_high))
            rec["label"] = lab.get(layer, "")
            recs.append(rec)
    return pd.DataFrame.from_records(recs)


def ci_check(summary: pd.DataFrame, window: str = "all") -> dict[str, Any]:
    """The widest 95% CI (half-width) among group transfers in :data:`SHARE_RANGE`, and whether it is within
    :data:`CI_HALF_WIDTH`."""
    s = summary[(summary["level"] == "group") & (summary["metric"] == "transfer") & (summary["window"] == window)]
    lo, hi = SHARE_RANGE
    mid = s[(s["estimate"] >= lo) & (s["estimate"] <= hi)]
    half = ((mid["ci_high"] - mid["ci_low"]) / 2).to_numpy()
    worst = float(half.max()) if len(half) else 0.0
    where = mid.iloc[int(half.argmax())] if len(half) else None
    return {
        "shares_in_range": int(len(mid)),
        "max_half_width": worst,
        "at": None if where is None else f"{where['layer']} ({where['target']})",
        "within": worst <= CI_HALF_WIDTH,
        "pairs": int(s["n"].max()) if len(s) else 0,
    }


# -- Shapes-world pairs and sanity ---------------------------------------------------------------------------------


def shapes_pairs(n: int, seed: int = 0, named: tuple[int, int] | None = None) -> list[tuple[str, str]]:
    """``n`` prompt pairs of held-out Shapes combinations whose O and E differ in every factor (as the paper's pairs
    differ in object, background and style).

    ``named=(lo, hi)``: partial prompts instead (:func:`layerscope.world.text.partial_prompt`, canonical phrase
    order): each pair names the same ``lo..hi`` factors (a uniform count, then a uniform subset) in O and in E, with
    different values; what the prompts leave open is decided by each image's noise."""
    from ..world.factors import FACTORS, sample_factors
    from ..world.text import partial_prompt, prompts_for

    if named is not None:
        lo, hi = (check_int(v, "named factors per prompt", 1, len(FACTORS)) for v in named)
        if lo > hi:
            raise ConfigError(f"named factors per prompt: give (min, max) with min <= max, got {named}")
    rng = np.random.default_rng(seed)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        a, b = sample_factors(64, rng, split="test"), sample_factors(64, rng, split="test")
        ok = (a != b).all(axis=1)
        for fo, fe in zip(a[ok], b[ok]):
            if named is None:
                pairs.append(tuple(prompts_for(np.stack([fo, fe]))))
            else:
                mask = np.zeros(len(FACTORS), bool)
                mask[rng.choice(len(FACTORS), size=int(rng.integers(lo, hi + 1)), replace=False)] = True
                pairs.append((partial_prompt(fo, mask), partial_prompt(fe, mask)))
            if len(pairs) == n:
                break
    return pairs


def sanity(
    model: "Generator", pair: tuple[str, str], seed: int | tuple[int, int] = 0, **gen_kwargs: Any
) -> dict[str, float]:
    """The two anchors of the experiment: injecting at no layer gives O (the sweep's O row equals a plain
    generation of O) and injecting E at every layer and space from step 0 gives E. Max absolute pixel differences.
    ``seed``: one seed for O and E, or (O's, E's).

    The plain O is generated in a batch laid out as the sweep's (O, E, O, on the same seeds), so both run the same
    batched arithmetic: a leak of the injected row into O's shows, float32 rounding that depends on the batch size
    does not. (A batch-1 O differs from the O row of a batch of 2 without any intervention by 2.3e-05 on zoo:ldm's
    partial-prompt pair, measured; the stage-2 weights gave 2.7e-06.)"""
    every = tuple(model.layer_map().names())
    s_o, s_e = seed if isinstance(seed, tuple) else (seed, seed)
    res = injection_sweep(model, pair[0], pair[1], [every], seeds=(s_o, s_e), max_batch=3, **gen_kwargs)
    rows = [pair[0], pair[1], pair[0]]
    plain = model.generate(rows, seeds=[s_o, s_e, s_o], max_batch=3, **gen_kwargs).images[0]
    return {
        "no_layer_vs_O": float((res.original - plain).abs().max()),
        "every_layer_vs_E": float((res.injected["+".join(every)] - res.edit).abs().max()),
        "O_vs_E": float((res.original - res.edit).abs().max()),
    }


# -- the experiment: settings -> run -> Result ---------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """An injection study. ``pairs``: (original, edit) prompts; ``random_pairs``: add this many held-out Shapes-world
    pairs differing in every factor (models the Shapes oracle reads), or with ``named=(lo, hi)`` partial prompts
    naming ``lo..hi`` factors (:func:`shapes_pairs`); ``seeds``: O's seeds, ``e_seeds``: E's (None: E shares O's
    seed), ``seed_per_pair``: pair p adds p to every seed (its own noise); ``layers``: None = every layer (with
    ``spaces``: also the candidate spaces, :func:`default_layers`), or globs / names / tuples of names for
    combinations; ``with_pooled``: inject the pooled text condition with every layer set (SDXL, SD3, Flux: a block
    alone leaves O's pooled text driving the later blocks); ``sanity``: also run :func:`sanity` on the first pair.
    Generation: ``steps``, ``guidance`` (None:
    the model's) and ``generation`` (other keywords for ``generate``)."""

    pairs: tuple[tuple[str, str], ...] = ()
    random_pairs: int = 0
    pair_seed: int = 0
    named: tuple[int, int] | None = None
    seeds: tuple[int, ...] = (0,)
    e_seeds: tuple[int, ...] | None = None
    seed_per_pair: bool = False
    layers: Any = None
    spaces: bool = False
    windows: tuple[str, ...] = ("all",)
    branches: tuple[str, ...] | None = None
    scorer: str = "auto"
    metrics: tuple[str, ...] | None = None
    steps: int | None = None
    guidance: float | None = None
    max_batch: int | None = None
    clip_path: str | None = None
    sanity: bool = False
    with_pooled: bool = False
    generation: dict[str, Any] = field(default_factory=dict)


def _pairs(model: "Generator", st: Settings) -> list[tuple[str, str]]:
    check_int(st.random_pairs, "random_pairs", minimum=0)
    check_seed(st.pair_seed, "pair seed")
    if model.capabilities.conditioning == "latent":
        return _latent_pairs(model, st)
    if st.random_pairs and model.capabilities.oracle != "shapes":
        raise ConfigError(
            f"random pairs are Shapes-world prompts, for models the Shapes oracle reads (zoo: models); "
            f"{model.spec} is open-domain: give pairs (--pair O E)"
        )
    if st.named is not None and not st.random_pairs:
        raise ConfigError("named=(lo, hi) makes partial random pairs: give random_pairs too")
    pairs = [tuple(p) for p in st.pairs] + shapes_pairs(st.random_pairs, seed=st.pair_seed, named=st.named)
    if not pairs:
        raise ConfigError(
            "give at least one (original, edit) prompt pair (--pair O E), or random pairs for "
            "Shapes-world models (--random-pairs N)"
        )
    return pairs  # type: ignore[return-value]


def _latent_pairs(model: "Generator", st: Settings) -> list[tuple[str, str]]:
    """A generator conditioned on its latent alone: O and E are the images of two latents (from their seeds), so a
    pair holds no prompts; ``random_pairs`` (default 1) is the number of pairs."""
    given = [p for p in st.pairs if any(x != "" for x in p)]
    if given or st.named is not None:
        raise ConfigError(
            f"{model.spec} is conditioned on its latent, not on text: O and E are the images of two latents, drawn "
            "from seeds (O) and e_seeds (E); drop the prompt pairs (and named=), and give random_pairs=N for N pairs "
            "(with seed_per_pair, so each pair has its own latents)"
        )
    return [("", "")] * max(1, len(st.pairs) + st.random_pairs)


def _selection(model: "Generator", st: Settings, gen_kw: dict[str, Any]) -> Any:
    if st.layers is None:
        if not st.spaces:
            return None
        cfg = model.config(**gen_kw)
        return default_layers(model, spaces=True, height=cfg.height, width=cfg.width)
    if st.spaces:
        raise ConfigError(
            "spaces=True adds the candidate spaces to the default layers; with layers, name the "
            "spaces in the globs instead"
        )
    return st.layers if isinstance(st.layers, str) else [x if isinstance(x, str) else tuple(x) for x in st.layers]


def _plan_kw(model: "Generator", st: Settings) -> tuple[dict[str, Any], list[tuple[str, str]], dict[str, Any]]:
    """The generation keywords, the pairs and the keywords of :func:`plan_injection` / :func:`run_injection`."""
    gen_kw = generation_kwargs(st.steps, st.guidance, st.generation)
    plan_kw: dict[str, Any] = dict(
        seeds=st.seeds,
        e_seeds=st.e_seeds,
        seed_per_pair=st.seed_per_pair,
        layers=_selection(model, st, gen_kw),
        windows=st.windows,
        branches=list(st.branches) if st.branches is not None else None,
        scorer=st.scorer,
        metrics=list(st.metrics) if st.metrics else None,
        with_pooled=st.with_pooled,
        **gen_kw,
    )
    return gen_kw, _pairs(model, st), plan_kw


def plan(model: "Generator", settings: Settings) -> StudyPlan:
    """What :func:`run` will generate and store on ``model`` (``--dry-run``); nothing is generated. Each cell (pair x
    seed x window) runs O, E and the k injected rows in chunks of ``max_batch`` rows, each chunk with O and E again."""
    st = settings
    gen_kw, pairs, plan_kw = _plan_kw(model, st)
    p = plan_injection(model, pairs, **plan_kw)
    cfg = model.config(**gen_kw)
    steps, branches = model.num_steps(cfg), len(model.branch_labels(cfg))
    k = len(p.layer_sets)
    per_chunk = (st.max_batch or min(k + 2, 64)) - 2
    chunks = -(-k // per_chunk)
    cells = len(p.cells())
    rows = [
        Generations(
            f"cells ({len(p.pairs)} pairs x {len(p.seeds)} seeds x {len(p.windows)} windows), {k} layer sets",
            calls=cells * chunks,
            images=cells * (2 * chunks + k),
            batch=min(k, per_chunk) + 2,
            steps=steps,
            branches=branches,
            stored=image_bytes(model, cells * (k + 2), **gen_kw),
        )
    ]
    if st.sanity:
        # the sweep's O, E, O<-E and the plain O, E, O it is checked against
        rows.append(Generations("sanity anchors (first pair)", 2, 6, 3, steps, branches))
    weights, row = model_bytes(model)
    return StudyPlan(NAME, model.spec, rows, weights, row)


def run(
    model: "Generator",
    settings: Settings,
    out: str | Path | None = None,
    progress: ProgressArg = None,
    executor: Executor | None = None,
) -> Result:
    """The injection study on a loaded model: tables ``injection`` (one row per pair, seed, window, layer, factor,
    metric), ``summary`` (:func:`summarize`) and ``labels`` (:func:`specialize`); the record holds the plan, the
    sanity anchors (if asked) and notes. ``out``: each finished cell is saved there and a rerun resumes (with any
    executor: a study interrupted under Ray resumes serially and the other way round). ``executor``: where the cells
    are computed (:func:`.executor.make_executor`); the tables are the same either way."""
    st = settings
    gen_kw, pairs, plan_kw = _plan_kw(model, st)
    notes: list[str] = []
    plan = plan_injection(model, pairs, **plan_kw)  # every settings error, before the folder or any generation
    if not model.capabilities.iterative:
        notes.append(ONE_PASS_NOTE.format(spec=model.spec))
    with open_workspace(out, NAME, [model.spec], st) as ws:
        finished = ws.finished()
        if finished is not None:
            return finished
        table = run_injection(
            model,
            pairs,
            out=ws,
            max_batch=st.max_batch,
            progress=progress,
            clip_path=st.clip_path,
            notify=notes.append,
            executor=executor,
            **plan_kw,
        )
        summary = summarize(table)
        labels = specialize(summary)
        record: dict[str, Any] = {
            "model": model.spec,
            "settings": settings_dict(st),
            "plan": json.loads(json.dumps(plan.key())),
            "layer_info": plan.layer_info,
            "notes": notes,
        }
        if st.sanity:
            cell = ws.get("sanity")
            first = plan.seeds_of(0)[0]
            anchors = cell.record if cell is not None else sanity(model, pairs[0], seed=first, **gen_kw)
            if cell is None:
                ws.put("sanity", record=anchors)
            record["sanity"] = anchors
        return ws.save(Result(NAME, {"injection": table, "summary": summary, "labels": labels}, record))


#: the main job's settings: (full, quick)
MAIN_MODELS = ("zoo:unet", "zoo:dit")
#: 48 pairs: enough for a transfer share between 0.2 and 0.8 to have a 95% CI half-width <= 0.15 (the binomial
#: bound 1.96 sqrt(0.25 / n) is 0.14 at n = 48)
FULL = Settings(random_pairs=48, spaces=True, windows=("all", "late"), steps=10, sanity=True)
#: per model, the main job's settings where they are not FULL: zoo:unet's sweep is the costliest of the main job
#: (36 layer sets), so it runs the "all" window only and the 10-minute budget holds; zoo:dit keeps both windows
MAIN_FULL = {"zoo:unet": dataclasses.replace(FULL, windows=("all",))}
QUICK = Settings(random_pairs=2, spaces=True, windows=("all", "late"), steps=6, sanity=True)
#: zoo:ldm (SD 1.x's layout): every block, the first attention of the first cross-attention decoder block (PnP's
#: decoder self-attention, prompt-to-prompt's cross-attention), PnP's feature layer up_blocks.1.resnets.1, the first
#: skip from the third encoder block (SkipInject), the initial noise and the text embeddings, in map order: 14 sets,
#: so both protocols fit the main job's 10 minutes
LDM_LAYERS = (
    "down_blocks.0",
    "down_blocks.1",
    "down_blocks.2",
    "down_blocks.3",
    "mid_block",
    "up_blocks.0",
    "up_blocks.1.attentions.0",
    "up_blocks.1.resnets.1",
    "up_blocks.1",
    "up_blocks.2",
    "up_blocks.3",
    "skip.up_blocks.1.resnets.0",
    "noise",
    "text_embeds",
)
#: pairs per protocol and steps: (a)'s shares reach a 95% CI half-width <= 0.15 with 48 pairs; (b)'s pairs leave
#: factors open, so fewer pairs per share differ in a factor and it needs more (0.171 at 48 in a first run)
LDM_PAIRS, LDM_PARTIAL_PAIRS, LDM_STEPS = 48, 72, 6
#: protocol (a): full prompts differing in every factor, a shared seed; (b) partial prompts naming 2-3 factors, E on
#: its own seed and every pair on new seeds, so the noise decides what the prompts leave open
LDM_FULL = {
    "full": Settings(random_pairs=LDM_PAIRS, layers=LDM_LAYERS, steps=LDM_STEPS, sanity=True),
    "partial": Settings(
        random_pairs=LDM_PARTIAL_PAIRS,
        named=(2, 3),
        seeds=(0,),
        e_seeds=(1000,),
        seed_per_pair=True,
        layers=LDM_LAYERS,
        steps=LDM_STEPS,
        sanity=True,
    ),
}
LDM_QUICK = {k: dataclasses.replace(v, random_pairs=2, steps=4) for k, v in LDM_FULL.items()}


def main_job(quick: bool = False) -> list[Job]:
    """The injection sweep on the zoo's pixel-space diffusion models (every layer and space, 48 held-out pairs), then
    on zoo:ldm under both pair protocols."""
    jobs = [Job(spec, QUICK if quick else MAIN_FULL.get(spec, FULL)) for spec in MAIN_MODELS]
    ldm = LDM_QUICK if quick else LDM_FULL
    return jobs + [Job("zoo:ldm", st, folder=f"zoo_ldm_{k}") for k, st in ldm.items()]
