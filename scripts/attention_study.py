"""The injection study below the blocks on zoo:ldm: self- vs cross-attention, next to the main job's block-level sets.

    python scripts/attention_study.py [--out /tmp/ls-attention] [--quick]

Both pair protocols of the main job's zoo:ldm study (``injection.LDM_FULL``: (a) 48 full-prompt pairs on one seed,
(b) 72 partial-prompt pairs naming 2-3 factors, E on its own seed, every pair on new seeds), the same pairs, 6 DDIM
steps, guidance 3.0, every step, both CFG branches. The layer sets, fixed before any result was seen:

- each transformer block's self-attention output (``*.attn1``) and cross-attention output (``*.attn2``), one row each;
- all self-attention outputs together, all cross-attention outputs together;
- the decoder's self-attention queries and keys together (Plug-and-Play's move: its maps), and the decoder's
  self-attention keys and values together (StyleID's move).

Prints, per protocol, the group transfer [95% CI] and label of every set as a markdown table, then the CI check.
Each finished cell is saved under ``--out`` and a rerun resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import layerscope as ls
from layerscope.experiments import injection as inj


def layer_sets(model: ls.Generator) -> list[str | tuple[str, ...]]:
    lmap = model.layer_map()
    self_ = [e.name for e in lmap.select("*.attn1")]
    cross = [e.name for e in lmap.select("*.attn2")]
    decoder = [n for n in self_ if lmap[n].stage == "decoder"]
    qk = tuple(f"{n}.to_{p}" for n in decoder for p in ("q", "k"))
    kv = tuple(f"{n}.to_{p}" for n in decoder for p in ("k", "v"))
    return [*self_, *cross, tuple(self_), tuple(cross), qk, kv]


COMBOS = ("all self-attention", "all cross-attention", "decoder self-attn q+k (PnP)", "decoder self-attn k+v (StyleID)")


def table(result: inj.Result, names: dict[str, str]) -> str:
    s = result.tables["summary"]
    s = s[(s["level"] == "group") & (s["metric"] == "transfer") & (s["window"] == "all")]
    labels = result.tables["labels"].set_index("layer")["label"]
    rows = ["| set | structure | content | surface | label |", "| --- | --- | --- | --- | --- |"]
    for layer in dict.fromkeys(s["layer"]):
        cells = []
        for g in ("structure", "content", "surface"):
            r = s[(s["layer"] == layer) & (s["target"] == g)].iloc[0]
            ci = "" if r["ci_high"] - r["ci_low"] < 0.005 else f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
            cells.append(f"{r['estimate']:.2f}{ci}")
        rows.append(f"| {names.get(layer, '`' + layer + '`')} | {' | '.join(cells)} | {labels[layer]} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/ls-attention")
    ap.add_argument("--quick", action="store_true", help="2 pairs and 4 steps per protocol (a smoke run)")
    args = ap.parse_args()
    model = ls.load("zoo:ldm")
    sets = layer_sets(model)
    names = {"+".join(s): f"{c}" for s, c in zip(sets[-4:], COMBOS)}
    for key, st in (inj.LDM_QUICK if args.quick else inj.LDM_FULL).items():
        st = dataclasses.replace(st, layers=sets, sanity=False)
        t0 = time.perf_counter()
        result = inj.run(model, st, out=f"{args.out}/{key}", progress=True)
        print(f"\n## protocol {key}: {time.perf_counter() - t0:.0f} s (a resumed run: the rerun's time)\n")
        print(table(result, names))
        print("\nCI check:", inj.ci_check(result.tables["summary"]))


if __name__ == "__main__":
    main()
