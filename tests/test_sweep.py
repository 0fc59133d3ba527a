"""Batched injection sweep: equals separate patched generations, O row equals plain O, full injection gives E."""

import pytest
import torch
from conftest import GEN, CountRuns, prompts_for, tiny

import layerscope as ls

FAMILIES = ["sd", "sd2", "sdxl", "kandinsky22", "sd3", "flux", "pixart"]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_injection_from_first_step_reproduces_e(family):
    model = tiny(family)
    o, e = prompts_for(model, ["a red cube", "a blue ball"])
    every = tuple(model.layer_map().names())  # every layer and space, noise included
    res = ls.injection_sweep(model, o, e, [every], seeds=(0, 1), **GEN)
    out = res.injected["+".join(every)]
    torch.testing.assert_close(out, res.edit, atol=1e-5, rtol=0)
    assert not torch.allclose(res.original, res.edit, atol=1e-3)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_batched_sweep_equals_separate_generations(family):
    model = tiny(family)
    o, e = prompts_for(model, ["a red cube", "a blue ball"])
    layers = [x.name for x in model.layer_map().layers][::2] + ["text_embeds", "noise"]
    with CountRuns(model) as runs:
        res = ls.injection_sweep(model, o, e, layers, seeds=(0, 1), max_batch=64, **GEN)
    assert runs.calls == [len(layers) + 2]  # one generation of batch k+2
    plain = model.generate([o, e], seeds=[0, 1], **GEN).images
    assert torch.equal(res.original, plain[0]) or torch.allclose(res.original, plain[0], atol=1e-6)
    for name in layers:
        sep = model.generate(
            [o, e], seeds=[0, 1], interventions=[ls.replace(name, ls.Row(1), targets=[0])], **GEN
        ).images[0]
        torch.testing.assert_close(res.injected[name], sep, atol=1e-5, rtol=0, msg=name)
    moved = sum(not torch.allclose(res.injected[n], res.original, atol=1e-4) for n in layers)
    assert moved >= len(layers) // 2


def test_sweep_chunking_windows_and_branches(sd):
    layers = ["down_blocks.0", "mid_block", "up_blocks.1", "noise", "text_embeds"]
    one = ls.injection_sweep(sd, "a red cube", "a blue ball", layers, seeds=0, **GEN)
    with CountRuns(sd) as runs:
        chunked = ls.injection_sweep(sd, "a red cube", "a blue ball", layers, seeds=0, max_batch=4, **GEN)
    assert runs.calls == [4, 4, 3]
    for name in layers:
        torch.testing.assert_close(chunked.injected[name], one.injected[name], atol=1e-5, rtol=0)
    late = ls.injection_sweep(sd, "a red cube", "a blue ball", ["mid_block"], seeds=0, steps="late", **GEN)
    assert not torch.allclose(late.injected["mid_block"], one.injected["mid_block"], atol=1e-5)
    cond = ls.injection_sweep(sd, "a red cube", "a blue ball", ["mid_block"], seeds=0, branches=["cond"], **GEN)
    assert not torch.allclose(cond.injected["mid_block"], one.injected["mid_block"], atol=1e-5)
    glob = ls.injection_sweep(sd, "a red cube", "a blue ball", "up_blocks.1.*", seeds=0, **GEN)
    assert list(glob.injected) == [e.name for e in sd.layers("up_blocks.1.*")]


def test_sweep_bad_inputs(sd):
    with pytest.raises(ls.LayerNameError, match="closest"):
        ls.injection_sweep(sd, "a", "b", ["mid_blocks"], **GEN)
    with pytest.raises(ls.ConfigError, match="max_batch"):
        ls.injection_sweep(sd, "a", "b", ["mid_block"], max_batch=2, **GEN)
    with pytest.raises(ls.ConfigError, match="outside"):
        ls.injection_sweep(sd, "a", "b", ["mid_block"], steps=[7], **GEN)


def test_sweep_progress_callback(sd):
    seen = []
    ls.injection_sweep(sd, "a", "b", "up_blocks.1.*", max_batch=4, progress=lambda d, t: seen.append((d, t)), **GEN)
    n = len(sd.layers("up_blocks.1.*"))
    assert seen[-1] == (n, n) and len(seen) == -(-n // 2)
