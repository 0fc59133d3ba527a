"""Tiny random-weight pipelines: every family builds offline, runs in a few steps on CPU, and is deterministic."""

from __future__ import annotations

import pytest
import torch

from layerscope.testing.pipelines import (
    DEFAULT_SIZE,
    FAMILIES,
    KANDINSKY22_IMAGE_EMBED_DIM,
    build_tiny_pipeline,
    tiny_call_kwargs,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("tiny-tokenizers")


@pytest.fixture(scope="module")
def pipes(cache_dir):
    built: dict[str, object] = {}

    def get(family: str):
        if family not in built:
            built[family] = build_tiny_pipeline(family, seed=0, cache_dir=cache_dir)
        return built[family]

    return get


def _state(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            out.update({f"{name}.{k}": v for k, v in comp.state_dict().items()})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_and_is_deterministic(family, pipes):
    pipe = pipes(family)
    side = DEFAULT_SIZE[family]
    assert all(p.dtype == torch.float32 for p in _state(pipe).values() if p.is_floating_point())
    assert not any(m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module))

    a = pipe(**tiny_call_kwargs(family, num_inference_steps=2, seed=0), output_type="pt").images
    b = pipe(**tiny_call_kwargs(family, num_inference_steps=2, seed=0), output_type="pt").images
    assert a.shape == (1, 3, side, side)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    c = pipe(**tiny_call_kwargs(family, num_inference_steps=2, seed=1), output_type="pt").images
    assert not torch.equal(a, c)


@pytest.mark.parametrize("family", FAMILIES)
def test_runs_at_64(family, pipes):
    pipe = pipes(family)
    out = pipe(**tiny_call_kwargs(family, size=64, num_inference_steps=1), output_type="np").images
    assert out.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_weights(family, pipes, cache_dir):
    ref = _state(pipes(family))
    again = _state(build_tiny_pipeline(family, seed=0, cache_dir=cache_dir))
    other = _state(build_tiny_pipeline(family, seed=1, cache_dir=cache_dir))
    assert ref.keys() == again.keys() == other.keys()
    assert all(torch.equal(ref[k], again[k]) for k in ref)
    assert any(not torch.equal(ref[k], other[k]) for k in ref)


def test_build_leaves_global_rng_alone(cache_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline("sd", cache_dir=cache_dir)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_family_names_valid_ones():
    with pytest.raises(ValueError) as err:
        build_tiny_pipeline("sd4")
    assert all(f in str(err.value) for f in FAMILIES)
    with pytest.raises(ValueError):
        tiny_call_kwargs("nope")


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux", "pixart"])
def test_tokenizers_match_encoders_and_take_any_text(family, pipes):
    pipe = pipes(family)
    prompt = "A Weird prompt: zebras & quokkas (café, 42%) — naïve 🐱 " * 3
    pairs = [(k, k.replace("tokenizer", "text_encoder")) for k in pipe.components if k.startswith("tokenizer")]
    assert pairs
    for tok_name, enc_name in pairs:
        tok, enc = pipe.components[tok_name], pipe.components[enc_name]
        assert len(tok) == enc.config.vocab_size
        ids = tok(prompt, padding="max_length", max_length=64, truncation=True, return_tensors="pt").input_ids
        assert ids.shape == (1, 64) and int(ids.max()) < enc.config.vocab_size
        if "CLIP" in type(tok).__name__:  # byte-level BPE: nothing is unknown, common words are single tokens
            assert tok.model_max_length == 77
            assert tok.convert_tokens_to_ids("cat</w>") in tok("a red cat").input_ids
            assert tok.unk_token_id not in ids[0, 1:40].tolist()
    assert pipe(**tiny_call_kwargs(family, prompt=prompt, num_inference_steps=1), output_type="latent").images.ndim >= 3


def test_cache_dir_holds_vocab_files(pipes, cache_dir):
    pipes("sd3")  # uses both tokenizer kinds
    assert (cache_dir / "clip_tokenizer" / "vocab.json").is_file()
    assert (cache_dir / "clip_tokenizer" / "merges.txt").is_file()
    assert (cache_dir / "t5_tokenizer" / "tokenizer.json").is_file()


def test_kandinsky_embeds_and_batching(pipes):
    pipe = pipes("kandinsky22")
    kw = tiny_call_kwargs("kandinsky22", batch_size=2, num_inference_steps=1)
    assert kw["image_embeds"].shape == (2, KANDINSKY22_IMAGE_EMBED_DIM)
    assert pipe(**kw, output_type="pt").images.shape == (2, 3, 32, 32)
