"""Issue 22: every experiment's output folder is claimed, locked and resumable; numbers are validated.

An interruption is simulated by making the generator fail on its k-th generation (as a kill would stop it); the
rerun must compute only what is missing and give the tables of an uninterrupted run."""

import json
import math
import re

import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import CountRuns

import layerscope as ls
from layerscope import folders
from layerscope.cli import command
from layerscope.experiments import abstractions as ab
from layerscope.experiments import alignment as al
from layerscope.experiments import injection as inj
from layerscope.experiments import properties as pr
from layerscope.experiments.workspace import CELLS, MANIFEST
from layerscope.folders import FolderInUseError

SANITY = "torch:layerscope.testing.sanity:linear_decoder"
PROPS = pr.Settings(n=8, pairs=4, n_boot=20)


class Killed(Exception):
    pass


def fail_after(model, k):
    """Make the model's (k+1)-th generation raise, like a kill in the middle of a run."""
    orig = model.run_batch
    calls = []

    def wrapped(prompts, seeds, cfg):
        calls.append(len(prompts))
        if len(calls) > k:
            raise Killed
        return orig(prompts, seeds, cfg)

    model.run_batch = wrapped
    return lambda: delattr(model, "run_batch")


def assert_same_tables(a, b):
    assert a.tables.keys() == b.tables.keys()
    for name in a.tables:
        pd.testing.assert_frame_equal(a.tables[name], b.tables[name])


def kill_after_puts(monkeypatch, k):
    """Stop the run right after its k-th cell is saved (as a kill between two cells would)."""
    from layerscope.experiments.workspace import Workspace

    real, saved = Workspace.put, []

    def put(self, *a, **kw):
        if len(saved) >= k:
            raise Killed
        saved.append(a[0])
        return real(self, *a, **kw)

    monkeypatch.setattr(Workspace, "put", put)
    return monkeypatch.undo


def test_properties_resume_scores_only_missing_spaces(tmp_path, monkeypatch):
    model = ls.load("tiny:sd")
    st = pr.Settings(n=4, pairs=2, n_boot=20, steps=2, spaces=("noise", "text_embeds", "mid_block"))
    with CountRuns(model) as runs:
        whole = pr.run(model, st, out=tmp_path / "whole")
    undo = kill_after_puts(monkeypatch, 1)
    with pytest.raises(Killed):
        pr.run(model, st, out=tmp_path / "cut")
    undo()
    assert len(list((tmp_path / "cut" / CELLS).glob("*.json"))) == 1
    with CountRuns(model) as again:
        resumed = pr.run(model, st, out=tmp_path / "cut")
    assert 0 < len(again.calls) < len(runs.calls)  # the base samples again, then only the two missing spaces
    assert_same_tables(whole, resumed)
    assert not (tmp_path / "cut" / CELLS).exists()  # intermediate cells dropped once the Result is saved
    with CountRuns(model) as runs:  # a finished folder: loaded, nothing generated
        done = pr.run(model, st, out=tmp_path / "cut")
    assert runs.calls == []
    assert_same_tables(whole, done)


def test_abstractions_resume_from_feature_and_fork_batches(tmp_path):
    model = ls.load("zoo:dit")
    st = ab.Settings(n=16, steps=3, forks=2, fork_prompts=2, taus=(0, 1), max_batch=8, layers=("transformer_blocks.0",))
    whole = ab.run(model, st, out=tmp_path / "whole")
    undo = fail_after(model, 1)  # one feature batch of two done
    with pytest.raises(Killed):
        ab.run(model, st, out=tmp_path / "cut")
    undo()
    with CountRuns(model) as runs:
        resumed = ab.run(model, st, out=tmp_path / "cut")
    assert runs.calls[0] == 8 and sum(runs.calls) == 8 + 2 * 2 * 2  # second feature batch, then the forks
    assert_same_tables(whole, resumed)


def test_alignment_resume_collects_only_missing_models(tmp_path):
    a, b = ls.load("zoo:vae"), ls.load("zoo:gan")
    st = al.Settings(n=16, metrics=("linear_cka",), k=3, n_boot=20, permutations=20, controls=("render",))
    whole = al.run([a, b], st, out=tmp_path / "whole")
    undo = fail_after(b, 0)
    with pytest.raises(Killed):
        al.run([a, b], st, out=tmp_path / "cut")
    undo()
    with CountRuns(a) as ra, CountRuns(b) as rb:
        resumed = al.run([a, b], st, out=tmp_path / "cut")
    assert ra.calls == [] and rb.calls
    assert_same_tables(whole, resumed)


def test_a_damaged_cell_is_named_and_recomputed(tmp_path):
    model = ls.load("zoo:dit")
    kw = dict(layers=["transformer_blocks.0"], windows=("all", "late"), num_inference_steps=3)
    pairs = inj.shapes_pairs(1)
    first = inj.run_injection(model, pairs, out=tmp_path, **kw)
    part = next((tmp_path / CELLS).glob("*late.injection.parquet"))
    part.write_bytes(part.read_bytes()[:20])  # truncated
    notes = []
    with CountRuns(model) as runs:
        again = inj.run_injection(model, pairs, out=tmp_path, notify=notes.append, **kw)
    assert len(runs.calls) == 1 and any(part.name in n and "recomputing" in n for n in notes)
    pd.testing.assert_frame_equal(first, again)


def test_a_folder_holds_one_study(tmp_path):
    gan, vae = ls.load("zoo:gan"), ls.load("zoo:vae")
    pr.run(gan, PROPS, out=tmp_path / "p")
    with pytest.raises(ls.StoreMismatchError, match="properties results of zoo:gan, not properties results of zoo:vae"):
        pr.run(vae, PROPS, out=tmp_path / "p")
    with pytest.raises(ls.StoreMismatchError, match=r"other settings \(differs in: n\)"):
        pr.run(gan, pr.Settings(n=9, pairs=4, n_boot=20), out=tmp_path / "p")
    dit = ls.load("zoo:dit")
    with pytest.raises(ls.StoreMismatchError, match="not injection results"):
        inj.run(dit, inj.Settings(random_pairs=1, layers=["transformer_blocks.0"], steps=2), out=tmp_path / "p")
    stranger = tmp_path / "s"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ls.StoreMismatchError, match="holds no layerscope study"):
        pr.run(gan, PROPS, out=stranger)
    assert json.loads((tmp_path / "p" / MANIFEST).read_text())["models"] == ["zoo:gan"]


def test_a_folder_in_use_is_refused_at_once(tmp_path):
    gan = ls.load("zoo:gan")
    gan.layer_map()  # the (cached) shape trace is not part of the experiment
    with folders.lock(tmp_path / "p"):
        with CountRuns(gan) as runs, pytest.raises(FolderInUseError, match=r"in use by pid \d+"):
            pr.run(gan, PROPS, out=tmp_path / "p")
    assert runs.calls == []
    pr.run(gan, PROPS, out=tmp_path / "p")  # released: the run goes ahead


def test_a_bad_out_is_refused_before_any_work(tmp_path):
    gan = ls.load("zoo:gan")
    gan.layer_map()
    file = tmp_path / "f"
    file.write_text("x")
    with CountRuns(gan) as runs, pytest.raises(ls.ConfigError, match="is an existing file"):
        pr.run(gan, PROPS, out=file)
    assert runs.calls == []
    res = CliRunner().invoke(command(), ["properties", "zoo:gan", "--out", str(file)])
    assert res.exit_code == 2 and "existing file" in " ".join(res.output.split())
    res = CliRunner().invoke(command(), ["abstractions", "tiny:sd", "--labels", str(tmp_path / "missing.csv")])
    assert res.exit_code == 2 and "does not exist" in " ".join(res.output.split())


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, 2**64 + 5, True])
def test_seeds_outside_int64_are_refused(seed):
    gan = ls.load("zoo:gan")
    with pytest.raises(ls.ConfigError, match=r"\[0, 2\*\*63\)"):
        gan.generate([None], seeds=[seed])
    with pytest.raises(ls.ConfigError, match="seed"):
        ls.injection_sweep(gan, None, None, seeds=(0, seed) if not isinstance(seed, bool) else seed)


def test_injection_sweep_needs_one_seed_or_a_pair():
    gan = ls.load("zoo:gan")
    with pytest.raises(ls.ConfigError, match=r"\(O, E\) pair of two"):
        ls.injection_sweep(gan, None, None, seeds=(0,))


@pytest.mark.parametrize(
    "settings, match",
    [
        (pr.Settings(n=8, pairs=4, steps=0), "steps"),
        (pr.Settings(n=8, pairs=4, max_batch=0), "max_batch"),
        (pr.Settings(n=8, pairs=4, generation={"guidance_scale": math.nan}), "finite"),
        (pr.Settings(n=8, pairs=4, scorer="oracle", spaces=("noise",)), "no oracle reads"),
    ],
)
def test_numbers_and_names_are_checked(settings, match):
    model = ls.load("tiny:sd")
    model.layer_map()
    with CountRuns(model) as runs, pytest.raises(ls.ConfigError, match=match):
        pr.run(model, settings)
    assert runs.calls == []


def test_injection_checks_metrics_and_batch():
    dit = ls.load("zoo:dit")
    with pytest.raises(ls.ConfigError, match="apply to the images scorer"):
        inj.run(dit, inj.Settings(random_pairs=1, metrics=("bogus",), steps=2))
    with pytest.raises(ls.ConfigError, match="max_batch"):
        inj.run(dit, inj.Settings(random_pairs=1, max_batch=0, steps=2))
    with pytest.raises(ls.ConfigError, match="guidance_scale must be a finite"):
        inj.run(dit, inj.Settings(random_pairs=1, guidance=math.nan, steps=2))


@pytest.mark.parametrize(
    "args, match",
    [
        (["abstractions", "zoo:unet", "--steps", "0"], "steps"),
        (["properties", "zoo:gan", "--steps", "0"], "steps"),
        (["sweep", "zoo:dit", "--random-pairs", "1", "--max-batch", "0"], "max_batch"),
        (["sweep", "zoo:dit", "--random-pairs", "1", "--guidance", "nan"], "finite"),
        (["sweep", "zoo:dit", "--random-pairs", "1", "--seeds", "-1"], r"\[0, 2\*\*63\)"),
        (["sweep", "zoo:dit", "--random-pairs", "1", "--metrics", "bogus"], "images scorer"),
    ],
)
def test_the_cli_refuses_bad_numbers_in_one_sentence(tmp_path, args, match):
    res = CliRunner().invoke(command(), [*args, "--out", str(tmp_path / "o")])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "Traceback" not in res.output and re.search(match, text), res.output
