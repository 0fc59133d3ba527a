"""The probe grid on real captures: features per layer x step (+ projected x_t), oracle labels, user CSV labels."""

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import layerscope as ls
from conftest import tiny
from layerscope.cli import command
from layerscope.experiments import abstractions as ab


@pytest.fixture(scope="module")
def dit():
    return ls.load("zoo:dit")


def test_collect_features_layers_steps_and_baseline(dit):
    feats = ab.collect_features(dit, [""] * 6, list(range(6)), steps=[0, 2], projection=16, guidance_scale=1.0,
                                num_inference_steps=3)
    n_layers = len(dit.layer_map().layers)
    assert feats.layers[0] == ab.BASELINE and len(feats.layers) == n_layers + 1
    assert feats.steps == [0, 2] and len(feats.timesteps) == 2 and feats.timesteps[0] > feats.timesteps[1]
    assert len(feats.cells) == (n_layers + 1) * 2
    assert feats.cells[(ab.BASELINE, 0)].shape == (6, 16)
    width = dit.layer_map()["transformer_blocks.0"].shape[-1]
    assert feats.cells[("transformer_blocks.0", 2)].shape == (6, width)  # pooled over tokens
    # the baseline at step 0 is a projection of the initial noise: independent of the model, fixed by the seeds
    again = ab.collect_features(dit, [""] * 6, list(range(6)), steps=[0], layers="transformer_blocks.0",
                                projection=16, guidance_scale=1.0, num_inference_steps=3)
    torch.testing.assert_close(again.cells[(ab.BASELINE, 0)], feats.cells[(ab.BASELINE, 0)])


def test_run_probes_table_on_the_zoo(dit):
    table, record = ab.run_probes(dit, n=48, num_inference_steps=3, layers="transformer_blocks.*")
    assert set(table["metric"]) == {"accuracy", "cross_entropy", "mi_bound"}
    assert set(table["factor"]) == {"floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation"}
    assert set(table["step"]) == {0, 1, 2} and ab.BASELINE in set(table["layer"])
    acc = table[table["metric"] == "accuracy"]["value"]
    assert ((acc >= 0) & (acc <= 1)).all()
    mi = table[table["metric"] == "mi_bound"]
    assert (mi["value"] >= 0).all()
    for f, h in record["entropy_bits"].items():
        assert (mi[mi["factor"] == f]["value"] <= h + 1e-6).all()
    assert record["samples"] == 48 and 0 <= record["in_distribution"] <= 1


def test_user_labels_from_csv_on_tiny_sd(tmp_path):
    """A label that is a function of the prompt is readable from the text-conditioned layers at the first step."""
    colours = ["red", "blue"]
    rows = [(f"a photo of a {colours[i % 2]} {'cube' if i % 3 else 'ball'} number {i}", colours[i % 2],
             "cube" if i % 3 else "ball") for i in range(48)]
    path = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=["prompt", "colour", "object"]).to_csv(path, index=False)
    prompts, labels, factors, sizes = ab.labels_from_csv(path)
    assert factors == ["colour", "object"] and sizes == [2, 2] and labels.shape == (48, 2)
    table, record = ab.run_probes_csv(tiny("sd"), path, layers="*attentions*", steps=[0], num_inference_steps=2,
                                      guidance_scale=4.0)
    best = table[(table["metric"] == "accuracy") & (table["layer"] != ab.BASELINE)].groupby("factor")["value"].max()
    assert best["colour"] >= 0.9 and best["object"] >= 0.9
    base = table[(table["metric"] == "accuracy") & (table["layer"] == ab.BASELINE) & (table["factor"] == "colour")]
    assert base["value"].max() <= 0.85  # the initial noise knows nothing of the prompt
    with pytest.raises(ls.ConfigError, match="'prompt' column"):
        bad = tmp_path / "bad.csv"
        bad.write_text("text,colour\na,red\n")
        ab.labels_from_csv(bad)


def test_readable_onsets():
    rows = []
    for step in range(4):
        for layer, acc in (("a", 0.2 + 0.25 * step), ("b", 0.95 if step >= 2 else 0.1), (ab.BASELINE, 1.0)):
            rows.append({"layer": layer, "step": step, "factor": "f", "metric": "accuracy", "value": acc})
    t = pd.DataFrame(rows)
    assert ab.readable_onsets(t, 0.9)["f"] == {"step": 2, "layer": "b", "value": 0.95}
    assert ab.readable_onsets(t, 0.99)["f"] is None


def test_cli_abstractions_errors():
    runner = CliRunner()
    res = runner.invoke(command(), ["abstractions", "tiny:sd"])
    assert res.exit_code == 2 and "--labels" in res.output
    res = runner.invoke(command(), ["abstractions", "zoo:dit", "--n", "3"])
    assert res.exit_code == 2 and "at least 8" in res.output
