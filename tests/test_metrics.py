"""Open-domain image metrics of injection studies: properties of each metric, baseline subtraction, bootstrap CIs,
and the local CLIP embedder on a tiny random checkpoint."""

import warnings

import cv2
import numpy as np
import pytest
import torch

from layerscope.metrics import (
    CLIP_ENV,
    METRICS,
    ClipEmbedder,
    clip_notice,
    injection_scores,
    similarity,
)
from layerscope.stats import mean_ci, median_ci

CHEAP = ("ssim", "sift", "hist", "lbp")


# ------------------------------------------------------------------------------------------------ test images
def gradient(s: int) -> np.ndarray:
    """Smooth colour ramp (3, s, s)."""
    y, x = np.mgrid[0:s, 0:s] / (s - 1)
    return np.stack([x, y, np.full_like(x, 0.5)]).astype(np.float32)


def texture(s: int, seed: int = 0) -> np.ndarray:
    """Random blobs: coarse random colours upsampled bicubically (SIFT finds corners and blobs in it)."""
    coarse = np.random.default_rng(seed).random((s // 4, s // 4, 3)).astype(np.float32)
    return cv2.resize(coarse, (s, s), interpolation=cv2.INTER_CUBIC).clip(0, 1).transpose(2, 0, 1)


def noise(s: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((3, s, s)).astype(np.float32)


def checkerboard(s: int, k: int = 4) -> np.ndarray:
    y, x = np.mgrid[0:s, 0:s]
    c = ((x // k + y // k) % 2).astype(np.float32)
    return np.stack([c, 0.3 + 0.4 * c, 1 - c])


def hue_rotated(img: np.ndarray) -> np.ndarray:
    """RGB -> GBR: every hue turned by 120 degrees, same layout."""
    return img[[1, 2, 0]].copy()


def shifted(img: np.ndarray, d: int = 2) -> np.ndarray:
    return np.roll(img, d, axis=2)


# ------------------------------------------------------------------------------------------------ similarity
@pytest.mark.parametrize("s", [32, 64])
@pytest.mark.parametrize("metric", CHEAP)
def test_every_metric_is_one_for_an_image_against_itself(metric, s):
    imgs = np.stack([texture(s, 0), texture(s, 1), noise(s, 2)])
    sim = similarity(imgs, imgs.copy(), metric)
    assert sim.shape == (3,) and sim.dtype == np.float64
    assert np.all(sim > 0.99), sim


def test_ssim_and_hist_drop_under_a_hue_rotation_lbp_does_not():
    img = texture(32)
    rot = hue_rotated(img)
    assert similarity(img, rot, "ssim")[0] < 0.6
    assert similarity(img, rot, "hist")[0] < 0.6
    assert similarity(img, rot, "lbp")[0] > 0.8  # texture is colour-blind


def test_a_small_spatial_shift_keeps_the_histogram_but_not_the_structure():
    for img in (texture(32), checkerboard(32), noise(64)):
        moved = shifted(img)
        assert similarity(img, moved, "hist")[0] > 0.99
        assert similarity(img, moved, "ssim")[0] < 0.7


def test_lbp_tells_a_smooth_gradient_from_a_noisy_texture():
    assert similarity(gradient(32), gradient(32), "lbp")[0] == pytest.approx(1.0)
    assert similarity(gradient(32), noise(32), "lbp")[0] < 0.3
    assert similarity(noise(32, 0), noise(32, 1), "lbp")[0] > 0.9  # same texture statistics


def test_sift_matches_a_textured_image_with_itself_not_with_an_unrelated_one():
    for s in (32, 64):
        img = texture(s, 0)
        same = similarity(img, img, "sift")[0]
        other = similarity(img, texture(s, 7), "sift")[0]
        assert same > 0.9
        assert other < 0.2
        assert 0.0 <= other <= 1.0
    assert similarity(img, shifted(img), "sift")[0] > 0.5  # keypoints survive a translation


def test_sift_is_zero_without_keypoints():
    flat = np.full((3, 32, 32), 0.5, np.float32)
    assert similarity(flat, texture(32), "sift")[0] == 0.0
    assert similarity(flat, flat, "sift")[0] == 0.0


def test_similarity_broadcasts_a_single_image_and_accepts_torch():
    batch = torch.from_numpy(np.stack([texture(32, i) for i in range(4)]))
    one = batch[2]
    for metric in CHEAP:
        sim = similarity(batch, one, metric)
        assert sim.shape == (4,)
        assert sim[2] == pytest.approx(sim.max()) and sim[2] > 0.99
        assert np.allclose(sim, similarity(batch.numpy(), one[None].numpy(), metric))


def test_ssim_window_fits_tiny_images():
    img = texture(32)[:, :6, :5]  # 6x5: window 5
    assert similarity(img, img, "ssim")[0] == pytest.approx(1.0)
    assert similarity(img, hue_rotated(img), "ssim")[0] < 1.0


def test_unknown_metric_and_bad_shapes_are_clear_errors():
    img = texture(32)
    with pytest.raises(ValueError, match="valid metrics are ssim, sift, hist, lbp, clip"):
        similarity(img, img, "psnr")
    with pytest.raises(ValueError, match="n, 3, H, W"):
        similarity(img[:2], img[:2], "ssim")
    with pytest.raises(ValueError, match="same number of images"):
        similarity(np.stack([img] * 3), np.stack([img] * 2), "hist")
    with pytest.raises(ValueError, match="ClipEmbedder"):
        similarity(img, img, "clip")
    with pytest.raises(ValueError, match="valid metrics"):
        injection_scores(img, img, img[None], metrics=("ssim", "fid"))


# ------------------------------------------------------------------------------------------- injection scores
def test_injection_scores_point_at_the_image_the_injection_resembles():
    o, e = texture(32, 1), texture(32, 2)
    c = np.stack([e, o, 0.5 * (o + e)])
    out = injection_scores(o, e, c)
    assert set(out) == {f"{m}_{k}" for m in CHEAP for k in ("to_E", "to_O", "baseline")}
    for m in CHEAP:
        to_e, to_o, base = out[f"{m}_to_E"], out[f"{m}_to_O"], out[f"{m}_baseline"]
        assert to_e.shape == to_o.shape == base.shape == (3,)
        assert np.all(base == base[0]) and base[0] == pytest.approx(similarity(o, e, m)[0])
        assert np.all(to_e >= 0) and np.all(to_o >= 0)  # clipped at the baseline
        # C == E: towards E, nothing towards O beyond the O-E baseline; C == O: the opposite
        assert to_o[0] == pytest.approx(0.0, abs=1e-9) and to_e[0] > 0.01, m
        assert to_e[1] == pytest.approx(0.0, abs=1e-9) and to_o[1] > 0.01, m
    assert out["ssim_to_E"][0] == pytest.approx(1.0 - out["ssim_baseline"][0])


def test_injection_scores_are_zero_when_the_edit_changed_nothing():
    o = texture(32, 3)
    out = injection_scores(o, o.copy(), np.stack([o, noise(32)]), metrics=("hist", "ssim"))
    for v in out.values():
        assert np.all(np.isfinite(v))
    for k in ("hist_to_E", "hist_to_O", "ssim_to_E", "ssim_to_O"):  # nothing can beat sim(O, E) = 1
        assert np.allclose(out[k], 0.0, atol=1e-6), k


# ------------------------------------------------------------------------------------------------ bootstrap CIs
def test_median_ci_covers_the_true_median():
    x = np.random.default_rng(1).normal(loc=3.0, size=1000)
    med, lo, hi = median_ci(x)
    assert lo < 3.0 < hi and lo <= med <= hi
    assert hi - lo < 0.25
    assert median_ci(x) == (med, lo, hi)  # seeded
    assert median_ci(x, confidence=0.5)[2] - median_ci(x, confidence=0.5)[1] < hi - lo


def test_mean_ci_of_a_share():
    x = (np.random.default_rng(2).random(400) < 0.3).astype(float)
    m, lo, hi = mean_ci(x)
    assert m == pytest.approx(x.mean())
    assert lo < 0.3 < hi and 0 <= lo < m < hi <= 1


def test_ci_degenerate_cases():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert median_ci([0.4] * 20) == (0.4, 0.4, 0.4)
        assert mean_ci(np.zeros(10)) == (0.0, 0.0, 0.0)
        assert mean_ci([0.1] * 7) == (0.1, 0.1, 0.1)
        m, lo, hi = median_ci([2.0])
        assert m == 2.0 and np.isnan(lo) and np.isnan(hi)
        assert all(np.isnan(v) for v in median_ci([]))
        assert all(np.isnan(v) for v in mean_ci([np.nan, np.nan]))
        m, lo, hi = median_ci([np.nan, 1.0, 2.0, 3.0, np.nan, 4.0, 5.0])
        assert m == 3.0 and lo <= 3.0 <= hi
        m, lo, hi = median_ci([0, 0, 0, 0, 0, 0, 1])  # ties: BCa degenerates, falls back to percentile
        assert m == 0.0 and np.isfinite(lo) and np.isfinite(hi) and lo <= m <= hi
    with pytest.raises(ValueError, match="confidence"):
        median_ci([1.0, 2.0], confidence=95)


# ------------------------------------------------------------------------------------------------------ CLIP
VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    projection_dim=16,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny CLIP is faster on one thread (and not hurt by a busy machine); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vision_ckpt(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip-vision")
    CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).save_pretrained(path)
    return path


def test_clip_embedder_from_a_tiny_vision_checkpoint(vision_ckpt, monkeypatch):
    monkeypatch.delenv(CLIP_ENV, raising=False)
    emb = ClipEmbedder.from_local(vision_ckpt)
    assert emb is not None and emb.processor is None and emb.image_size == 32
    imgs = np.stack([texture(64, i) for i in range(5)])
    z = emb.embed(imgs)
    assert z.shape == (5, 16) and not z.requires_grad
    assert torch.allclose(z.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert np.allclose(similarity(imgs, imgs, "clip", clip=emb), 1.0, atol=1e-5)
    emb.batch_size = 2  # batching does not change the numbers
    assert torch.allclose(emb.embed(torch.from_numpy(imgs)), z, atol=1e-5)
    sim = similarity(imgs, imgs[0], "clip", clip=emb)
    assert sim.shape == (5,) and sim[0] == pytest.approx(1.0, abs=1e-5) and np.all(sim <= 1 + 1e-5)
    out = injection_scores(imgs[0], imgs[1], imgs, metrics=("clip",), clip=emb)
    assert out["clip_to_E"][1] > 0 or out["clip_baseline"][0] > 1 - 1e-5
    assert clip_notice(emb) is None


def test_clip_embedder_full_clip_model_with_processor(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    text = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16)).save_pretrained(tmp_path)
    Processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    emb = ClipEmbedder.from_local(str(tmp_path))
    assert emb is not None and emb.processor is not None
    imgs = torch.from_numpy(np.stack([texture(32, 0), noise(32, 1), gradient(32)]))
    z = emb.embed(imgs)
    assert z.shape == (3, 16)
    assert torch.allclose(z.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(z @ z.T, (z @ z.T).T) and torch.allclose(torch.diag(z @ z.T), torch.ones(3), atol=1e-5)


def test_clip_from_local_never_downloads(vision_ckpt, tmp_path, monkeypatch):
    monkeypatch.delenv(CLIP_ENV, raising=False)
    assert ClipEmbedder.from_local(None) is None
    assert ClipEmbedder.from_local() is None
    assert ClipEmbedder.from_local(tmp_path / "missing") is None
    assert clip_notice(None) == (
        f"CLIP metric skipped: no local CLIP checkpoint (set {CLIP_ENV}=/path/to/clip-vit-base-patch32)"
    )
    monkeypatch.setenv(CLIP_ENV, str(tmp_path / "missing"))
    assert ClipEmbedder.from_local() is None
    assert "is not a folder" in clip_notice(None)
    monkeypatch.setenv(CLIP_ENV, str(vision_ckpt))
    assert ClipEmbedder.from_local() is not None


def test_metrics_constant():
    assert METRICS == ("ssim", "sift", "hist", "lbp", "clip")
