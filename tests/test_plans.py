"""Study plans (--dry-run): each experiment's plan counts exactly the images and batches a real run generates."""

import pytest
from click.testing import CliRunner
from conftest import CountRuns, tiny

import layerscope as ls
from layerscope.cli import command
from layerscope.experiments import abstractions as ab
from layerscope.experiments import alignment as al
from layerscope.experiments import injection as inj
from layerscope.experiments import properties as pr
from layerscope.experiments.plans import parse_bytes

runner = CliRunner()


def _counted(model, run):
    model.layer_map()  # the trace generation is not part of the study
    with CountRuns(model) as c:
        run()
    return c.calls


def _check(plan, calls):
    assert plan.images == sum(calls)
    assert max(calls) <= max(r.batch for r in plan.rows)
    assert sum(r.calls for r in plan.rows) <= len(calls)  # a call of max_batch rows may run as several batches


def test_injection_plan_counts_what_runs(tmp_path):
    sd = tiny("sd")
    st = inj.Settings(
        pairs=(("a red cat", "a blue dog"), ("a tree", "a car")),
        layers=("down_blocks.0", "down_blocks.1", "mid_block"),
        windows=("all", "late"),
        steps=3,
        max_batch=4,
        sanity=True,
        metrics=("hist",),
    )
    plan = inj.plan(sd, st)
    calls = _counted(sd, lambda: inj.run(sd, st, out=tmp_path / "inj"))
    _check(plan, calls)
    assert plan.rows[0].calls == len(calls) - 2  # cells x chunks, plus the two sanity calls
    k = 3  # layer sets: 2 chunks of 2 rows each (max_batch 4 less O and E)
    assert plan.stored == 4 * (k + 2) * 3 * 32 * 32  # 2 pairs x 2 windows x (O, E, k sets) uint8 images of 32x32


def test_properties_plan_counts_what_runs():
    sd = tiny("sd")
    st = pr.Settings(spaces=("noise", "mid_block"), n=4, pairs=2, steps=2, n_boot=50, max_batch=8)
    plan = pr.plan(sd, st)
    _check(plan, _counted(sd, lambda: pr.run(sd, st)))
    assert plan.rows[0].captured == sd.capture_bytes(
        ls.Capture(layers=["noise", "mid_block"], branches=["cond"]), n_samples=4, num_inference_steps=2
    )


def test_abstractions_plan_counts_what_runs():
    unet = ls.load("zoo:unet")
    st = ab.Settings(n=ab.MIN_SAMPLES, steps=3, layers=("mid_block",), forks=2, fork_prompts=2, taus=(0, 1))
    plan = ab.plan(unet, st)
    _check(plan, _counted(unet, lambda: ab.run(unet, st)))


def test_alignment_plan_counts_what_runs():
    a, b = tiny("sd"), tiny("sd2")
    # the untrained copies' generations are counted on the copies, not on a and b: this test counts the models'
    st = al.Settings(n=al.MIN_SCENES, steps=2, layers=("mid_block",), k=3, n_boot=20, permutations=20, controls=())
    plans = al.plan([a, b], st)
    calls = {}
    for m in (a, b):
        m.layer_map()
    with CountRuns(a) as ca, CountRuns(b) as cb:
        al.run([a, b], st)
        calls = {a.spec: ca.calls, b.spec: cb.calls}
    for p in plans:
        _check(p, calls[p.model])


def test_budgets_parse():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("24 GB") == 24 * 10**9
    assert parse_bytes("1024") == 1024
    with pytest.raises(ls.ConfigError, match="memory budget"):
        parse_bytes("lots")


def test_cli_dry_run_on_a_full_size_architecture(tmp_path):
    args = ["sweep", "arch:sd14", "--pair", "a cat", "a dog", "--recipe", "pnp", "--steps", "50", "--dry-run"]
    res = runner.invoke(command(), [*args, "--budget", "80GiB"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "nothing generated" in res.output and "fits: yes" in res.output
    assert "images: 3" in res.output  # O, E and the recipe's one layer set
    res = runner.invoke(command(), [*args, "--budget", "1GiB"], env={"COLUMNS": "200"})
    assert res.exit_code == 1 and "fits: NO" in res.output  # 4 GiB of float32 weights alone
    res = runner.invoke(command(), ["sweep", "arch:sd14", "--pair", "a", "b", "--recipe", "sdxl-style", "--dry-run"])
    assert res.exit_code == 2 and "the recipe is for arch:sdxl" in res.output
    res = runner.invoke(command(), ["recipes"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "blora-style" in res.output
