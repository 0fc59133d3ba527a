"""Every scheduler diffusers ships with SD pipelines generates, captures, intervenes and sweeps, including those that
call the denoiser more than once per step (PNDM: SD 1.x's own, Heun, KDPM2): each call is mapped to its step as
diffusers' progress bar counts steps; a step is captured at its first call and intervened at every call."""

import diffusers
import pytest
import torch

import layerscope as ls

STEPS = 4
GEN = dict(num_inference_steps=STEPS, guidance_scale=4.0)
PROMPTS = ["a red cube", "a blue ball"]
SCHEDULERS = [
    ("DDIMScheduler", {}),
    ("PNDMScheduler", {"skip_prk_steps": True}),  # SD 1.x's scheduler_config
    ("PNDMScheduler", {}),  # with Runge-Kutta warm-up steps
    ("HeunDiscreteScheduler", {}),
    ("KDPM2DiscreteScheduler", {}),
    ("KDPM2AncestralDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("LMSDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverSinglestepScheduler", {}),
    ("UniPCMultistepScheduler", {}),
    ("DEISMultistepScheduler", {}),
    ("DDPMScheduler", {}),
    ("DPMSolverSDEScheduler", {}),  # needs torchsde (a test extra)
]


def with_scheduler(name: str, extra: dict) -> ls.Generator:
    model = ls.load("tiny:sd")
    model.pipe.scheduler = getattr(diffusers, name).from_config(model.pipe.scheduler.config, **extra)
    model.layer_map()  # the shape trace runs before any hook of these tests is registered
    return model


def calls_of(model, layer="mid_block"):
    """Record every denoiser call's output of ``layer`` (a plain forward hook, registered before layerscope's)."""
    seen = []
    handle = model.pipe.unet.get_submodule(layer).register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    return seen, handle


@pytest.mark.parametrize(
    "name, extra", SCHEDULERS, ids=[f"{n}{'-prk' if n == 'PNDMScheduler' and not e else ''}" for n, e in SCHEDULERS]
)
def test_every_scheduler_generates_captures_and_sweeps(name, extra):
    model = with_scheduler(name, extra)
    seen, handle = calls_of(model)
    try:
        res = model.generate(PROMPTS, seeds=[0, 1], capture=ls.Capture(["mid_block"]), **GEN)
    finally:
        handle.remove()
    cap = res.capture["mid_block"]  # (sample, step, branch, ...)
    assert cap.shape[1] == STEPS and len(res.timesteps) == STEPS
    steps = model.call_steps() or list(range(STEPS))
    assert len(seen) == len(steps) and sorted(set(steps)) == list(range(STEPS))
    first = [steps.index(k) for k in range(STEPS)]  # each step's first denoiser call
    for k, call in enumerate(first):
        # the call's batch is [uncond rows; cond rows]; the capture is (sample, step, branch)
        got = torch.stack([cap[:, k, 0], cap[:, k, 1]])
        want = seen[call].reshape(2, len(PROMPTS), *seen[call].shape[1:])
        assert torch.equal(got, want), (name, k)
    sweep = ls.injection_sweep(
        model, PROMPTS[0], PROMPTS[1], ["mid_block", "up_blocks.1"], seeds=0, steps="late", **GEN
    )
    plain = model.generate([PROMPTS[0]], seeds=[0], **GEN).images[0]
    assert torch.allclose(sweep.original, plain, atol=1e-5)


def test_a_window_intervenes_at_every_call_of_its_steps():
    """Heun evaluates steps 0-2 twice and the last once: zeroing mid_block at step 1 zeroes calls 2 and 3."""
    model = with_scheduler("HeunDiscreteScheduler", {})
    res = model.generate(PROMPTS, seeds=[0, 1], interventions=[ls.zero("mid_block", steps=[1])], **GEN)
    assert model.call_steps() == [0, 0, 1, 1, 2, 2, 3]
    calls = []

    def zero_calls(_m, _a, out):
        calls.append(len(calls))
        return torch.zeros_like(out) if calls[-1] in (2, 3) else None

    handle = model.pipe.unet.mid_block.register_forward_hook(zero_calls)
    try:
        manual = model.generate(PROMPTS, seeds=[0, 1], **GEN)
    finally:
        handle.remove()
    assert len(calls) == 7 and torch.equal(res.images, manual.images)


def test_pndm_timesteps_are_each_steps_first_call():
    model = with_scheduler("PNDMScheduler", {"skip_prk_steps": True})
    res = model.generate(PROMPTS[:1], seeds=[0], **GEN)
    assert model.call_steps() == [0, 0, 1, 2, 3]  # PLMS evaluates its first step twice
    ts = [float(t) for t in model.pipe.scheduler.timesteps]
    assert res.timesteps == [ts[0], ts[2], ts[3], ts[4]]


def test_forks_of_a_two_call_stochastic_scheduler_share_their_past():
    """KDPM2 ancestral (two calls per step, fresh noise per step): forks at step 2 share steps 0-1 exactly."""
    model = with_scheduler("KDPM2AncestralDiscreteScheduler", {})
    res = model.generate(
        [""] * 3,
        [7] * 3,
        fork_at=2,
        fork_seeds=[1, 2, 3],
        capture=ls.Capture(["mid_block"]),
        num_inference_steps=4,
        guidance_scale=1.0,
    )
    cap = res.capture["mid_block"]
    for k in (0, 1, 2):  # step 2's first call still reads the shared state; its scheduler step draws new noise
        assert torch.equal(cap[0, k], cap[1, k]) and torch.equal(cap[0, k], cap[2, k])
    assert not torch.equal(cap[0, 3], cap[1, 3]) and not torch.equal(res.images[0], res.images[1])


def test_sde_noise_is_per_row_and_forking_it_is_refused():
    """DPMSolverSDE draws from Brownian trees: one per row, seeded by the row's seed (O in a batch equals O alone,
    which the sweep test checks); a run is reproducible, and forking is refused with the reason."""
    model = with_scheduler("DPMSolverSDEScheduler", {})
    a = model.generate(PROMPTS, seeds=[0, 1], **GEN).images
    torch.testing.assert_close(a, model.generate(PROMPTS, seeds=[0, 1], **GEN).images)
    torch.testing.assert_close(a[1:], model.generate(PROMPTS[1:], seeds=[1], **GEN).images)
    with pytest.raises(ls.ConfigError, match="Brownian trees"):
        model.generate(PROMPTS, seeds=[0, 1], fork_at=1, fork_seeds=5, **GEN)
