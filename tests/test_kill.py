"""Issue 22: real interruptions. A CLI run (or a streamed capture) in a child process is stopped with SIGINT or
SIGKILL once part of its work is saved; the rerun keeps every saved part untouched, computes only the rest, and ends
with the tables of an uninterrupted run. Two main-job runs on one folder: the second is refused at once."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import CountRuns

import layerscope as ls
from layerscope.cli import command
from layerscope.experiments import abstractions as ab
from layerscope.experiments import properties as pr
from layerscope.experiments.base import Result
from layerscope.experiments.workspace import CELLS

CLI = [sys.executable, "-c", "from layerscope.cli import main; main()"]
# the same thread count as this process (conftest): float reductions, and so the bits, depend on it
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}


def spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop_when(child: subprocess.Popen, ready, sig: int, timeout: float = 120.0) -> None:
    """Send ``sig`` to ``child`` as soon as ``ready()`` holds; fail if it ends or times out first."""
    t0 = time.monotonic()
    while not ready():
        if child.poll() is not None:
            pytest.fail(f"the run ended (rc {child.returncode}) before it could be stopped:\n{child.stdout.read()}")
        if time.monotonic() - t0 > timeout:
            child.kill()
            pytest.fail("the run saved nothing in time")
        time.sleep(0.02)
    child.send_signal(sig)
    out, _ = child.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert child.returncode != 0 and "Traceback" not in out, out
    else:
        assert child.returncode == -signal.SIGKILL


def markers(folder: Path, pattern: str) -> list[Path]:
    """The markers of the finished cells."""
    return list((folder / CELLS).glob(pattern))


def stem(marker: Path) -> str:
    return f"{marker.parent.parent.name}/{marker.name.removesuffix('.json')}"


def invoke(args: list[str], monkeypatch) -> tuple[str, list[str]]:
    """Run the CLI command in this process; return its output and the cells it saved (``folder/stem``)."""
    from layerscope.experiments import workspace

    real, saved = workspace.Workspace.put, []

    def put(self, key, *a, **kw):
        saved.append(f"{self.folder.name}/{workspace._stem(key)}")
        return real(self, key, *a, **kw)

    monkeypatch.setattr(workspace.Workspace, "put", put)
    res = CliRunner().invoke(command(), args)
    monkeypatch.undo()
    assert res.exit_code == 0, res.output
    return res.output, saved


# the CLI with a pause before every space after the first, so the signal always lands between spaces (each space is
# still scored in full); and SIGINT raising KeyboardInterrupt even when the suite runs as a background job of a
# non-interactive shell, which starts every process with SIGINT ignored (Python then installs no handler for it)
SLOW_SPACES = textwrap.dedent(
    """
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from layerscope.cli import main
    from layerscope.experiments import properties as p
    score = p._space_cell
    def slow(gen, sh, si, *rest):
        if si > 0:
            time.sleep(60)
        return score(gen, sh, si, *rest)
    p._space_cell = slow
    sys.argv[0] = "layerscope"
    main()
    """
)


def test_properties_interrupted_between_spaces_resumes(tmp_path, monkeypatch):
    folder = tmp_path / "p"
    spaces = ["noise", "mid_block", "up_blocks.1"]
    args = ["properties", "zoo:unet", *[a for s in spaces for a in ("-s", s)], "--n", "8", "--pairs", "2"]
    args += ["--steps", "2", "--out", str(folder)]
    child = spawn([sys.executable, "-c", SLOW_SPACES, *args])
    stop_when(child, lambda: len(markers(folder, "space_*.json")) >= 1, signal.SIGINT)
    kept = {stem(k) for k in markers(folder, "space_*.json")}
    assert not Result.exists(folder) and kept
    _, saved = invoke(args, monkeypatch)
    assert saved and not kept & set(saved)  # the saved spaces were read back, only the others computed
    whole = pr.run(ls.load("zoo:unet"), pr.Settings(spaces=tuple(spaces), n=8, pairs=2, steps=2))
    resumed = Result.load(folder)
    for name in whole.tables:
        pd.testing.assert_frame_equal(resumed[name], whole[name])


def test_abstractions_killed_between_batches_resumes(tmp_path, monkeypatch):
    folder = tmp_path / "a"
    st = ab.Settings(n=32, layers=("mid_block", "up_blocks.1"), forks=2, fork_prompts=4, taus=(0, 2), steps=4)
    args = ["abstractions", "zoo:unet", "--n", "32", "--layers", "mid_block", "--layers", "up_blocks.1"]
    args += ["--forks", "2", "--fork-prompts", "4", "--taus", "0,2", "--steps", "4", "--out", str(folder)]
    child = spawn([*CLI, *args])
    stop_when(child, lambda: len(markers(folder, "features_*.json")) >= 1, signal.SIGKILL)
    kept = {stem(k) for k in markers(folder, "*.json")}
    _, saved = invoke(args, monkeypatch)
    assert kept and saved and not kept & set(saved)  # saved batches read back, only the others computed
    whole = ab.run(ls.load("zoo:unet"), st, out=tmp_path / "whole")
    resumed = Result.load(folder)
    for name in whole.tables:
        pd.testing.assert_frame_equal(resumed[name], whole[name])


CAPTURE = textwrap.dedent(
    """
    import sys, layerscope as ls
    sd = ls.load("tiny:sd")
    prompts = [f"prompt {i}" for i in range(8)]
    sd.generate(prompts, seeds=list(range(8)), capture=ls.Capture(["mid_block", "noise"], store=sys.argv[1]),
                max_batch=1, num_inference_steps=2, guidance_scale=4.0)
    """
)


def test_streamed_capture_killed_mid_run_resumes_bitwise(tmp_path, sd):
    path = tmp_path / "store"
    child = spawn([sys.executable, "-c", CAPTURE, str(path)])
    stop_when(
        child, lambda: len(list((path / "manifest").glob("*.json"))) >= 2 if path.is_dir() else False, signal.SIGKILL
    )
    prompts, seeds = [f"prompt {i}" for i in range(8)], list(range(8))
    gen = dict(max_batch=1, num_inference_steps=2, guidance_scale=4.0)
    with CountRuns(sd) as runs:
        resumed = sd.generate(prompts, seeds=seeds, capture=ls.Capture(["mid_block", "noise"], store=path), **gen)
    whole = sd.generate(prompts, seeds=seeds, capture=ls.Capture(["mid_block", "noise"]), **gen)
    assert 0 < sum(runs.calls) < 8  # only the samples the killed run had not finished
    store = ls.ActivationStore.open(path, verify=True)
    assert store.complete and torch.equal(resumed.images, whole.images)
    for layer in ("mid_block", "noise"):
        assert torch.equal(store.to_tensor(layer), whole.capture[layer]), layer


def test_main_job_killed_and_a_second_run_at_the_same_time(tmp_path, monkeypatch):
    folder = tmp_path / "report"
    args = ["run", "--quick", "--only", "alignment", "--out", str(folder)]
    first = spawn([*CLI, *args])
    section = folder / "alignment"

    def first_saved_a_model() -> bool:
        return any(section.glob(f"*/{CELLS}/features_*.json")) if section.exists() else False

    t0 = time.monotonic()
    while not (folder / ".layerscope.lock").exists() and time.monotonic() - t0 < 60:
        time.sleep(0.02)
    second = subprocess.run([*CLI, *args], env=ENV, capture_output=True, text=True, timeout=120)
    said = " ".join((second.stdout + second.stderr).split())
    assert second.returncode == 2 and f"in use by pid {first.pid}" in said and "Traceback" not in said, said
    stop_when(first, first_saved_a_model, signal.SIGKILL)
    kept = {stem(p) for p in section.glob(f"*/{CELLS}/features_*.json")}
    out, saved = invoke(args, monkeypatch)
    assert "report:" in out and (folder / "index.html").exists() and (folder / "run.json").exists()
    assert kept and saved and not kept & set(saved)
