"""Half precision as diffusers users run it: bfloat16 pipelines, captures in the model's dtype or float32, safe
interventions, byte estimates that follow the dtype (CPU, tiny pipelines)."""

import functools

import pytest
import torch

import layerscope as ls

GEN = dict(num_inference_steps=3, guidance_scale=4.0)


@functools.cache
def bf16(family: str = "sd") -> ls.Generator:
    return ls.load(f"tiny:{family}", torch_dtype=torch.bfloat16)


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_bfloat16_pipelines_generate_and_capture_in_either_dtype(family):
    m = bf16(family)
    assert m.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for c in m.modules() for p in c.parameters())
    layer = m.layers()[len(m.layers()) // 2].name
    own = m.generate(["a red cat"], seeds=[0], capture=ls.Capture([layer], dtype="model"), **GEN)
    f32 = m.generate(["a red cat"], seeds=[0], capture=ls.Capture([layer]), **GEN)
    assert own.capture[layer].dtype == torch.bfloat16 and f32.capture[layer].dtype == torch.float32
    assert torch.equal(own.capture[layer].float(), f32.capture[layer])  # the same bf16 values, stored two ways
    assert torch.equal(own.images, f32.images) and torch.isfinite(own.images).all()
    # byte estimates follow the storage dtype
    assert m.capture_bytes(ls.Capture([layer], dtype="model"), **GEN) * 2 == m.capture_bytes(ls.Capture([layer]), **GEN)


def test_bfloat16_interventions_cast_safely():
    m = bf16()
    layer = "mid_block"
    base = m.generate(["a red cat"], seeds=[0], capture=ls.Capture([layer]), **GEN)
    # its own float32 capture (every step and branch) put back into the bf16 run
    same = m.generate(["a red cat"], seeds=[0], interventions=[ls.replace(layer, ls.Stored(base.capture))], **GEN)
    assert (same.images - base.images).abs().max() < 1e-5  # its own value, cast back to bf16: nothing changes
    zeroed = m.generate(["a red cat"], seeds=[0], interventions=[ls.zero(layer)], **GEN)
    assert torch.isfinite(zeroed.images).all() and (zeroed.images - base.images).abs().max() > 1e-3
    sweep = ls.injection_sweep(m, "a red cat", "a blue dog", ["mid_block", "up_blocks.1"], seeds=0, **GEN)
    plain = m.generate(["a red cat"], seeds=[0], **GEN).images[0]
    # in float32 the sweep's O row equals a plain generation exactly; in bfloat16 a batch of 4 rows rounds
    # differently from a batch of 1 (other matmul blockings), by a few bf16 steps at most
    assert (sweep.original - plain).abs().max() <= 4 / 256
    assert torch.isfinite(sweep.stack()).all()


def test_dtype_errors():
    m = bf16()
    with pytest.raises(ls.ConfigError, match="cannot hold bfloat16"):
        m.generate(["a"], capture=ls.Capture(["mid_block"], dtype="model", store="x.zarr"), **GEN)
    with pytest.raises(ls.ConfigError, match="unknown capture dtype"):
        m.capture_bytes(ls.Capture(["mid_block"], dtype="half-ish"))
    with pytest.raises(ls.SpecError, match="not both"):
        ls.load("tiny:sd", dtype=torch.float16, torch_dtype=torch.float16)
    with pytest.raises(ls.SpecError, match="unknown dtype"):
        ls.load("tiny:sd", dtype="int8")
