"""Issue 22: saved Results and report records that are damaged fail in one sentence naming the file; artifact keys
round-trip whatever they hold; a damaged Result in a workspace is recomputed."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import CountRuns

import layerscope as ls
from layerscope.cli import command
from layerscope.experiments import properties as pr
from layerscope.experiments.base import Result, ResultDamagedError

KEYS = ["a.b", "a__b", "x/y", "50%", "%2E", "up_blocks.0.attentions.1", ""]


def result() -> Result:
    arrays = {k: np.arange(i + 2, dtype=np.float32) for i, k in enumerate(KEYS)}
    table = pd.DataFrame({"layer": ["mid_block", "up_blocks.0"], "score": [0.5, 0.25]})
    return Result("properties", {"labels": table}, {"notes": ["n"]}, {"images": arrays})


def test_artifact_keys_round_trip(tmp_path):
    back = Result.load(result().save(tmp_path))
    assert list(back.artifacts["images"]) == KEYS
    for i, k in enumerate(KEYS):
        np.testing.assert_array_equal(back.artifacts["images"][k], np.arange(i + 2, dtype=np.float32))


def test_a_result_saved_by_an_older_version_still_loads(tmp_path):
    """Format 1: no file records, dots written as "__" in npz member names."""
    table = pd.DataFrame({"x": [1, 2]})
    table.to_parquet(tmp_path / "t.parquet", index=False)
    np.savez_compressed(tmp_path / "a.npz", **{"mid_block__attn": np.ones(2)})
    meta = {"experiment": "injection", "layerscope": "0.1", "tables": ["t"], "artifacts": ["a"], "record": {}}
    (tmp_path / "result.json").write_text(json.dumps(meta))
    back = Result.load(tmp_path)
    assert list(back.artifacts["a"]) == ["mid_block.attn"]
    pd.testing.assert_frame_equal(back["t"], table)


def damage(folder, how):
    if how == "truncated":
        p = folder / "labels.parquet"
        p.write_bytes(p.read_bytes()[:30])
    elif how == "garbage":  # same size, other bytes
        p = folder / "labels.parquet"
        p.write_bytes(b"x" * p.stat().st_size)
    elif how == "missing":
        (folder / "images.npz").unlink()
    elif how == "json":
        (folder / "result.json").write_text('{"experiment": "prop')
    elif how == "shape":
        (folder / "result.json").write_text("[1, 2]")


@pytest.mark.parametrize(
    "how, match",
    [
        ("truncated", r"labels\.parquet has 30 bytes, \d+ were written"),
        ("garbage", r"labels\.parquet was changed after it was written"),
        ("missing", r"images\.npz is missing"),
        ("json", r"result\.json cannot be read"),
        ("shape", r"result\.json cannot be read \(it lacks"),
    ],
)
def test_a_damaged_result_is_one_sentence_naming_the_file(tmp_path, how, match):
    folder = result().save(tmp_path / "r")
    damage(folder, how)
    with pytest.raises(ResultDamagedError, match=match) as err:
        Result.load(folder)
    assert isinstance(err.value, ls.DamagedError) and "\n" not in str(err.value)


def test_a_damaged_result_in_a_workspace_is_recomputed(tmp_path):
    gan = ls.load("zoo:gan")
    st = pr.Settings(n=8, pairs=4, n_boot=20)
    first = pr.run(gan, st, out=tmp_path / "p")
    p = tmp_path / "p" / f"{pr.SCORES}.parquet"
    p.write_bytes(p.read_bytes()[:40])
    with CountRuns(gan) as runs:
        again = pr.run(gan, st, out=tmp_path / "p")
    assert runs.calls  # recomputed, not read back
    assert any(f"{pr.SCORES}.parquet has 40 bytes" in n and "recomputed" in n for n in again.notes)
    pd.testing.assert_frame_equal(first[pr.SCORES], again[pr.SCORES])
    assert Result.load(tmp_path / "p").notes == again.notes


def report_folder(tmp_path):
    """A report folder as the main job leaves it: run.json naming one section job, and that job's Result."""
    folder = tmp_path / "report"
    result().save(folder / "properties" / "zoo_gan")
    job = {"spec": "zoo:gan", "folder": "zoo_gan", "part": "model", "seconds": 1.0, "settings": {}}
    record = {"version": ls.__version__, "quick": True, "sections": {"properties": {"jobs": [job], "notes": []}}}
    (folder / "run.json").write_text(json.dumps(record))
    return folder


@pytest.mark.parametrize(
    "how, match",
    [
        ("run.json: not json", r"run\.json is not valid JSON"),
        ("run.json: no sections", r"run\.json is not a layerscope run record \(it has no 'sections' object\)"),
        ("run.json: a list", r"run\.json is not a layerscope run record \(it holds a list"),
        ("run.json: job without folder", r"a job of section 'properties' has no 'folder'"),
        ("labels.parquet: garbage", r"labels\.parquet was changed after it was written"),
        ("labels.parquet: truncated", r"labels\.parquet has 30 bytes"),
    ],
)
def test_report_of_a_damaged_folder_is_one_sentence(tmp_path, how, match):
    folder = report_folder(tmp_path)
    run_json = folder / "run.json"
    record = json.loads(run_json.read_text())
    if how == "run.json: not json":
        run_json.write_text('{"sections": {')
    elif how == "run.json: no sections":
        run_json.write_text(json.dumps({k: v for k, v in record.items() if k != "sections"}))
    elif how == "run.json: a list":
        run_json.write_text("[]")
    elif how == "run.json: job without folder":
        del record["sections"]["properties"]["jobs"][0]["folder"]
        run_json.write_text(json.dumps(record))
    else:
        damage(folder / "properties" / "zoo_gan", how.split(": ")[1])
    res = CliRunner().invoke(command(), ["report", str(folder)])
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    text = " ".join(ln.strip() for ln in lines)
    assert "Traceback" not in res.output and re.search(match, text), res.output


def test_a_full_disk_during_sweep_is_one_sentence_and_the_rerun_resumes(tmp_path, monkeypatch):
    """The disk fills after the first table the sweep writes: exit 2 in one sentence; with space again, the same
    command computes only the cells that were not saved."""
    import errno

    from layerscope.experiments import workspace

    folder = tmp_path / "sweep"
    args = ["sweep", "zoo:dit", "--random-pairs", "1", "-l", "transformer_blocks.0", "-l", "transformer_blocks.1"]
    args += ["--windows", "all,late", "--steps", "2", "--out", str(folder)]
    real_parquet, writes = pd.DataFrame.to_parquet, []

    def to_parquet(self, path, *a, **kw):
        writes.append(path)
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_parquet(self, path, *a, **kw)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", to_parquet)
    res = CliRunner().invoke(command(), args)
    monkeypatch.undo()
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert re.search(r"the disk holding .*sweep.* is full; free space and rerun the same command to resume", text)
    kept = {p.name for p in (folder / "cells").glob("*.json")}
    assert len(kept) == 1 and not list(folder.rglob(".*.tmp"))  # one finished cell, no half-written file
    real_put, again = workspace.Workspace.put, []

    def put(self, key, *a, **kw):
        again.append(workspace._stem(key) + ".json")
        return real_put(self, key, *a, **kw)

    monkeypatch.setattr(workspace.Workspace, "put", put)
    res = CliRunner().invoke(command(), args)
    assert res.exit_code == 0, res.output
    assert again and not kept & set(again)
