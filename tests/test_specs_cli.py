"""Model specs, hf: loading from a local folder, clear errors, and the CLI."""

import pytest
import torch
from conftest import GEN
from typer.testing import CliRunner

import layerscope as ls
from layerscope.cli import app

runner = CliRunner()


def test_bad_specs():
    with pytest.raises(ls.SpecError, match="valid schemes"):
        ls.load("sd")
    with pytest.raises(ls.SpecError, match="unknown model scheme"):
        ls.load("foo:bar")
    with pytest.raises(ls.SpecError, match="valid: tiny:sd"):
        ls.load("tiny:sd5")
    with pytest.raises(ls.SpecError, match="valid: zoo:unet, zoo:dit"):
        ls.load("zoo:unet3")
    with pytest.raises(ls.SpecError, match="cannot import"):
        ls.load("torch:no_such_module_xyz:make")
    with pytest.raises(ls.SpecError, match="no callable"):
        ls.load("torch:toy_generators:nope")
    with pytest.raises(ls.ConfigError, match="latent_dim"):
        ls.load("torch:toy_generators:make_unsized")
    with pytest.raises(ls.SpecError, match="no local folder"):
        ls.load("hf:/nonexistent/folder/for/sure")
    with pytest.raises(ls.SpecError, match="could not load"):  # offline, not in the cache
        ls.load("hf:nobody-xyz/not-a-model")


def test_unsupported_pipeline_class_names_supported_ones():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(ls.SpecError, match="StableDiffusionPipeline.*FluxPipeline"):
        ls.load(pipe)


def test_hf_local_folder_roundtrip(sd, tmp_path):
    sd.pipe.save_pretrained(tmp_path / "pipe")
    loaded = ls.load(f"hf:{tmp_path / 'pipe'}")
    assert loaded.layer_map().names() == sd.layer_map().names()
    a = sd.generate("a cat", seeds=0, **GEN).images
    b = loaded.generate("a cat", seeds=0, **GEN).images
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_cli_layers():
    result = runner.invoke(app, ["layers", "tiny:sd"])
    assert result.exit_code == 0, result.output
    assert "up_blocks.1.resnets.0" in result.output and "skip.up_blocks" in result.output
    assert "h_space" in result.output
    sel = runner.invoke(app, ["layers", "tiny:sd", "--select", "mid_block*"])
    assert sel.exit_code == 0 and "up_blocks" not in sel.output


def test_cli_errors_exit_2():
    bad = runner.invoke(app, ["layers", "nonsense"])
    assert bad.exit_code == 2
    assert "valid schemes" in bad.output
    unknown = runner.invoke(app, ["layers", "tiny:sd", "--select", "mid_blok"])
    assert unknown.exit_code == 2 and "mid_block" in unknown.output
    assert runner.invoke(app, ["--help"]).exit_code == 0
    assert runner.invoke(app, ["layers", "--help"]).exit_code == 0
