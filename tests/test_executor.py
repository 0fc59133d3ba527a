"""The executor seam (issue 19): an experiment's cells run serially or on Ray actors with the same tables; a worker
killed mid-cell is replaced and its cell rerun, nothing finished is recomputed, nothing written twice; a cell that
fails on its own fails the run at once; an interrupted study resumes under either executor."""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import tiny

import layerscope as ls
from layerscope.cli import command
from layerscope.executors import RayExecutor, make_executor
from layerscope.experiments import injection as inj
from layerscope.experiments.executor import Part, SerialExecutor, Task, run_cells
from layerscope.experiments.workspace import Workspace, identity

ST = inj.Settings(
    pairs=(("a red cube", "a blue ball"), ("a cat", "a dog")),
    seeds=(0, 1),
    layers=["mid_block", "up_blocks.*"],
    steps=2,
    scorer="images",
    metrics=("ssim", "hist"),
)


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray", reason="the Ray extra (pip install -e '.[ray]') is not installed")
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


# -- test cells (pickled by value onto the workers) -----------------------------------------------------------------
def _record_cell(model, folder: str, key: str, wait_for_kill: bool = False) -> Part:
    """Appends this process's pid to <folder>/<key>.runs; with ``wait_for_kill`` the first run waits to be killed."""
    runs = Path(folder) / f"{key}.runs"
    first = not runs.exists()
    with runs.open("a") as f:
        f.write(f"{os.getpid()}\n")
    if wait_for_kill and first:
        time.sleep(120)  # the test kills this process long before
    return Part({"t": pd.DataFrame({"key": [key], "spec": [model.spec]})}, record={"pid": os.getpid()})


def _bad_cell(model, folder: str, key: str) -> Part:
    (Path(folder) / f"{key}.runs").open("a").write("x\n")
    raise ls.ConfigError(f"cell {key}: this input is bad")


def _ws(folder: Path) -> Workspace:
    return Workspace(folder, identity("test", ["tiny:sd"], {"n": 1}))


# -- same answer ----------------------------------------------------------------------------------------------------
def test_serial_and_ray_injection_tables_are_identical(ray, tmp_path):
    model = tiny("sd")
    serial = inj.run(model, ST, out=tmp_path / "serial")
    on_ray = inj.run(model, ST, out=tmp_path / "ray", executor=RayExecutor(workers=2, threads=2))
    for name in ("injection", "summary", "labels"):  # bitwise: same values, same dtypes, same (cell) order
        pd.testing.assert_frame_equal(serial.tables[name], on_ray.tables[name], check_exact=True)
    cells = sorted(p.name for p in (tmp_path / "ray" / "cells").glob("*.json"))
    assert cells == sorted(p.name for p in (tmp_path / "serial" / "cells").glob("*.json")) and len(cells) == 4


def test_an_interrupted_study_resumes_under_either_executor(ray, tmp_path):
    model = tiny("sd")
    full = inj.run(model, ST, out=tmp_path / "a").tables["injection"]
    # an interrupted run: the result and two of the four cells gone
    (tmp_path / "a" / "result.json").unlink()
    gone = sorted((tmp_path / "a" / "cells").glob("*.json"))[:2]
    for marker in gone:
        marker.unlink()
    ran: list[str] = []

    class Counting(RayExecutor):
        def run(self, tasks, models):
            ran.extend(t.key for t in tasks)
            return super().run(tasks, models)

    again = inj.run(model, ST, out=tmp_path / "a", executor=Counting(workers=2, threads=2))
    assert sorted(ran) == sorted(m.stem for m in gone)  # only the missing cells were computed
    pd.testing.assert_frame_equal(full, again.tables["injection"], check_exact=True)


# -- faults ---------------------------------------------------------------------------------------------------------
def test_a_worker_killed_mid_cell_is_replaced_and_its_cell_runs_again(ray, tmp_path):
    ws = _ws(tmp_path / "ws")
    flags = tmp_path / "flags"
    flags.mkdir()
    tasks = [Task(f"c{i}", "tiny:sd", _record_cell, (str(flags), f"c{i}", i == 1)) for i in range(4)]
    ex = RayExecutor(workers=2, threads=1)

    def killer() -> None:  # kill the process running c1 while it is in the middle of it
        runs = flags / "c1.runs"
        for _ in range(600):
            if runs.exists() and runs.read_text().strip():
                os.kill(int(runs.read_text().split()[0]), signal.SIGKILL)
                return
            time.sleep(0.1)

    t = threading.Thread(target=killer)
    t.start()
    with ws:
        parts = run_cells(ws, {"tiny:sd": tiny("sd")}, tasks, ex)
    t.join()
    assert [p.tables["t"]["key"][0] for p in parts] == ["c0", "c1", "c2", "c3"]  # every cell, in task order
    assert ex.restarts == ["c1"]
    pids = (flags / "c1.runs").read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1] and parts[1].record["pid"] == int(pids[1])  # rerun elsewhere
    assert all(len((flags / f"c{i}.runs").read_text().split()) == 1 for i in (0, 2, 3))  # nothing else recomputed
    assert len(list((tmp_path / "ws" / "cells").glob("*.json"))) == 4  # each cell written once, by the driver
    with ws:  # a rerun finds every cell finished and computes nothing
        again = run_cells(ws, {"tiny:sd": tiny("sd")}, tasks, SerialExecutor())
    assert [p.record["pid"] for p in again] == [p.record["pid"] for p in parts]
    assert len((flags / "c0.runs").read_text().split()) == 1


def test_a_cell_that_fails_on_its_own_fails_the_run_without_retries(ray, tmp_path):
    ws = _ws(tmp_path / "ws")
    flags = tmp_path / "flags"
    flags.mkdir()
    tasks = [Task("bad", "tiny:sd", _bad_cell, (str(flags), "bad"))]
    ex = RayExecutor(workers=1, threads=1)
    with ws, pytest.raises(ls.ConfigError, match="cell bad: this input is bad"):
        run_cells(ws, {"tiny:sd": tiny("sd")}, tasks, ex)
    assert (flags / "bad.runs").read_text().split() == ["x"] and ex.restarts == []
    assert not list((tmp_path / "ws" / "cells").glob("*.json"))


# -- options and errors ----------------------------------------------------------------------------------------------
def test_without_ray_the_executor_is_one_sentence_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ls.ConfigError, match=r'pip install -e "\.\[ray\]"'):
        make_executor("ray")
    res = CliRunner().invoke(command(), ["sweep", "tiny:sd", "--pair", "a", "b", "--executor", "ray"])
    assert res.exit_code == 2 and "[ray]" in res.output


def test_executor_options_are_checked():
    with pytest.raises(ls.ConfigError, match="valid: serial, ray"):
        make_executor("dask")
    with pytest.raises(ls.ConfigError, match="go with --executor ray"):
        make_executor("serial", workers=2)
    built = ls.load(tiny("sd").pipe)  # a model built in this process cannot be reloaded by a worker
    from layerscope.executors import load_call

    with pytest.raises(ls.ConfigError, match="cannot load its own copy"):
        load_call(built)
    assert load_call(tiny("sd")) == ("tiny:sd", {})


def test_cli_sweep_on_ray(ray, tmp_path):
    args = ["sweep", "tiny:sd", "--pair", "a red cube", "a blue ball", "-l", "mid_block", "--steps", "2",
            "--scorer", "images", "--metrics", "ssim", "--executor", "ray", "--workers", "2"]  # fmt: skip
    res = CliRunner().invoke(command(), [*args, "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert "ray executor" in res.output and (tmp_path / "s" / "result.json").exists()


# -- every experiment's cells -----------------------------------------------------------------------------------------
def _same(a, b) -> None:
    assert set(a.tables) == set(b.tables)
    for name in a.tables:
        pd.testing.assert_frame_equal(a.tables[name], b.tables[name], check_exact=True, obj=name)


def test_properties_abstractions_and_alignment_cells_run_on_ray_with_the_same_tables(ray, tmp_path):
    from layerscope.experiments import abstractions as ab
    from layerscope.experiments import alignment as al
    from layerscope.experiments import properties as pr

    ex = RayExecutor(workers=2, threads=2)
    sd, dit, gan = tiny("sd"), ls.load("zoo:dit"), ls.load("zoo:gan")
    st = pr.Settings(spaces=("noise", "mid_block"), n=4, pairs=2, steps=2, n_boot=50)  # one cell per space
    _same(pr.run(sd, st, out=tmp_path / "p1"), pr.run(sd, st, out=tmp_path / "p2", executor=ex))
    st = ab.Settings(n=16, steps=3, layers=("transformer_blocks.*",), max_batch=8, forks=2, fork_prompts=2, taus=(0, 1))
    _same(ab.run(dit, st, out=tmp_path / "a1"), ab.run(dit, st, out=tmp_path / "a2", executor=ex))  # batches, forks
    st = al.Settings(n=16, steps=2, k=3, n_boot=20, permutations=20, metrics=("linear_cka",))  # with the controls
    _same(al.run([dit, gan], st, out=tmp_path / "l1"), al.run([dit, gan], st, out=tmp_path / "l2", executor=ex))
