"""The Ray executor's overhead: one injection study run serially and on a 2-worker local Ray, in one run.

Run from the repository root (needs the extra: ``pip install -e ".[ray]"``)::

    python benchmarks/bench_executor.py [--model zoo:unet] [--pairs 8] [--steps 10] [--repeats 2]

The study is the main job's zoo:unet injection (every layer and space, windows all and late) without its sanity
anchors. Serial: this process, torch on every CPU. Ray: a local Ray started by the benchmark (``ray.init`` timed
apart), 2 worker actors with the CPUs shared among them (1 torch thread each on 2 cores); each worker loads the model
once. On 2 compute-bound cores no speed-up is expected: the ratio is the executor's cost (actor start and model
loads, pickling each cell's images and tables back to the driver, scheduling). Each repeat runs into a fresh folder;
the Ray tables are checked equal to the serial ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import CpuShare, cpu_model, git_head, n_cpus  # noqa: E402

import layerscope as ls
from layerscope.executors import RayExecutor
from layerscope.experiments import injection as inj


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="zoo:unet")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    import ray

    cpus = n_cpus()
    torch.set_num_threads(cpus)
    print("layerscope executor benchmark")
    print(f"  torch {torch.__version__}, ray {ray.__version__}, {cpus} CPUs ({cpu_model()}), commit {git_head()}")
    model = ls.load(args.model)
    st = dataclasses.replace(inj.FULL, random_pairs=args.pairs, steps=args.steps, sanity=False)
    cells = len(inj.plan_injection(model, inj._pairs(model, st), **inj._plan_kw(model, st)[2]).cells())
    print(
        f"  study: {args.model} injection, {args.pairs} pairs x windows {st.windows}: {cells} cells, {args.steps} steps"
    )
    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    t_init = time.perf_counter() - t0
    print(f"  ray.init (local, {cpus} CPUs): {t_init:.1f} s")
    threads = max(1, cpus // args.workers)
    times: dict[str, list[float]] = {"serial": [], "ray": []}
    tables: dict[str, pd.DataFrame] = {}
    with CpuShare() as load:
        for r in range(args.repeats):
            for name in ["serial", "ray"] if r % 2 == 0 else ["ray", "serial"]:
                with tempfile.TemporaryDirectory() as tmp:
                    ex = RayExecutor(workers=args.workers, threads=threads) if name == "ray" else None
                    t = time.perf_counter()
                    res = inj.run(model, st, out=Path(tmp) / "study", executor=ex)
                    times[name].append(time.perf_counter() - t)
                    tables[name] = res.tables["injection"]
                print(f"  repeat {r + 1}: {name} {times[name][-1]:.1f} s")
    same = tables["serial"].equals(tables["ray"])
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"  other processes kept {load.other:.2f} cores busy on average" if load.other is not None else "")
    print(f"\n  tables equal (serial vs ray): {same}")
    print(
        f"  serial {med['serial']:.1f} s, ray ({args.workers} workers x {threads} threads) {med['ray']:.1f} s (medians)"
    )
    ratio = med["ray"] / med["serial"]
    print(f"  ratio ray / serial: {ratio:.3f} {'PASS' if ratio <= 1.15 else 'MISS'} (<= 1.15)")
    print(f"  with ray.init counted once: {(med['ray'] + t_init) / med['serial']:.3f}")


if __name__ == "__main__":
    main()
