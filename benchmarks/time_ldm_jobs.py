"""Time the main job's zoo:ldm jobs (full settings) on a given LDM folder (weights do not change the cost)."""

import shutil
import sys
import time

import layerscope as ls
from layerscope.experiments import abstractions as ab
from layerscope.experiments import injection as inj
from layerscope.experiments import properties as pr

folder = sys.argv[1]
which = sys.argv[2].split(",") if len(sys.argv) > 2 else ["injection", "properties", "abstractions"]
m = ls.load("zoo:ldm", folder=folder)
jobs = []
if "injection" in which:
    jobs += [(j.folder_name(), inj, j.settings) for j in inj.main_job() if j.spec == "zoo:ldm"]
if "properties" in which:
    jobs += [("properties", pr, j.settings) for j in pr.main_job() if j.spec == "zoo:ldm"]
if "abstractions" in which:
    jobs += [("abstractions", ab, j.settings) for j in ab.main_job() if j.spec == "zoo:ldm"]
for name, mod, st in jobs:
    out = f"/tmp/time_ldm/{name}"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    r = mod.run(m, st, out=out, progress=False)
    print(name, round(time.perf_counter() - t, 1), "s", flush=True)
