"""Models conditioned on embeddings (the Kandinsky 2.2 decoder) from the CLI: embedding files stand for prompts in
--pair, --prompts and a labels CSV; bad files fail in one sentence."""

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny
from safetensors.numpy import save_file

import layerscope as ls
from layerscope.cli import command
from layerscope.embeds import load_ref, refs

runner = CliRunner()


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    d = tiny("kandinsky22")._embed_dim()
    path = tmp_path_factory.mktemp("emb") / "emb.npy"
    np.save(path, np.random.default_rng(0).normal(size=(16, d)).astype(np.float32))
    return path


def test_references_load_rows_and_bad_files_fail_in_one_sentence(emb, tmp_path):
    arr = np.load(emb)
    assert refs(emb) == [f"{emb}#{k}" for k in range(16)]
    torch.testing.assert_close(load_ref(f"{emb}#3"), torch.from_numpy(arr[3]))
    one = tmp_path / "one.safetensors"
    save_file({"image_embeds": arr[5]}, str(one))
    torch.testing.assert_close(load_ref(str(one)), torch.from_numpy(arr[5]))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    nan = arr.copy()
    nan[0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    save_file({"a": arr[0], "b": arr[1]}, str(tmp_path / "two.safetensors"))
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    for ref, said in [
        (str(tmp_path / "missing.npy"), "does not exist"),
        (f"{emb}#16", "row 16 does not exist"),
        (f"{emb}#x", "whole number"),
        (str(emb), "holds 16 embeddings"),
        (str(tmp_path / "obj.npy"), "cannot read embeddings"),
        (str(tmp_path / "nan.npy"), "NaN or infinite"),
        (str(tmp_path / "two.safetensors"), "holds 2 tensors"),
        (str(tmp_path / "junk.npy"), "cannot read embeddings"),
    ]:
        with pytest.raises(ls.ConfigError, match=said):
            load_ref(ref)


def test_an_embedding_file_is_the_same_as_the_tensor(emb):
    k = tiny("kandinsky22")
    arr = torch.from_numpy(np.load(emb))
    kw = dict(num_inference_steps=1)
    torch.testing.assert_close(
        k.generate([f"{emb}#0", f"{emb}#1"], **kw).images, k.generate([arr[0], arr[1]], **kw).images
    )
    with pytest.raises(ls.ConfigError, match="not text.*the text 'a cat'"):
        k.generate(["a cat"], **kw)


def test_kandinsky_from_the_cli(emb, tmp_path):
    args = ["--steps", "2", "-l", "up_blocks.1"]
    res = runner.invoke(
        command(),
        [
            "sweep",
            "tiny:kandinsky22",
            "--pair",
            f"{emb}#0",
            f"{emb}#1",
            "--metrics",
            "ssim",
            *args,
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert res.exit_code == 0, res.output
    table = pd.read_parquet(tmp_path / "s" / "injection.parquet")
    assert set(table["metric"]) == {"ssim_to_O", "ssim_to_E", "ssim_baseline"}
    res = runner.invoke(
        command(),
        [
            "properties",
            "tiny:kandinsky22",
            "--n",
            "4",
            "--pairs",
            "2",
            "--steps",
            "2",
            "--space",
            "noise",
            "--prompts",
            str(emb),
            "--out",
            str(tmp_path / "p"),
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(command(), ["properties", "tiny:kandinsky22", "--n", "20", "--prompts", str(emb)])
    assert res.exit_code == 2 and "holds 16 prompts" in " ".join(res.output.split())
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"prompt": refs(emb), "kind": ["a", "b"] * 8}).to_csv(labels, index=False)
    res = runner.invoke(
        command(),
        ["abstractions", "tiny:kandinsky22", "--labels", str(labels), "--n", "16", *args, "--out", str(tmp_path / "a")],
    )
    assert res.exit_code == 0, res.output
