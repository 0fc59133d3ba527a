"""Open-domain image-comparison metrics of an injection study (Schaerf 2025 companion study).

An injected image C is scored against the original O and the edit E. Every metric is a similarity (1 = same
image) computed with the field's libraries on images (n, 3, H, W) in [0, 1]:

- ``ssim``: structural similarity (scikit-image ``structural_similarity``) on RGB, data_range 1, uniform 7x7
  window shrunk (odd) to fit small images; in [-1, 1], layout- and contrast-sensitive;
- ``sift``: OpenCV SIFT keypoints on grayscale upscaled (bicubic) to a short side >= 128 px, brute-force 2-NN
  matching with Lowe's ratio test 0.75; share of keypoints with a distinct good match,
  ``good / min(#kp_a, #kp_b)``, 0 when either image has no keypoint; in [0, 1], local-feature reuse;
- ``hist``: correlation (``cv2.compareHist`` CORREL) of 30 hue x 32 saturation HSV histograms; in [-1, 1],
  colour palette regardless of layout;
- ``lbp``: correlation of the histograms of uniform local binary patterns (scikit-image, P=8, R=1, 10 codes)
  on grayscale; in [-1, 1], micro-texture regardless of layout and colour;
- ``clip``: cosine similarity of CLIP image embeddings (a local checkpoint through :class:`ClipEmbedder`);
  in [-1, 1], semantic content.

Scores are baseline-subtracted (:func:`injection_scores`) and summarised with a bootstrap CI
(:func:`layerscope.stats.median_ci`, :func:`layerscope.stats.mean_ci`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from skimage.color import rgb2gray
from skimage.feature import local_binary_pattern
from skimage.metrics import structural_similarity
from skimage.util import img_as_ubyte

METRICS = ("ssim", "sift", "hist", "lbp", "clip")
DEFAULT_METRICS = ("ssim", "sift", "hist", "lbp")
CLIP_ENV = "LAYERSCOPE_CLIP"

SSIM_WIN = 7
SIFT_MIN_SIDE = 128
SIFT_RATIO = 0.75
HIST_BINS = (30, 32)  # hue x saturation
LBP_P, LBP_R = 8, 1.0

ImageLike = torch.Tensor | np.ndarray


# ---------------------------------------------------------------------------------------------- image handling
def _as_batch(images: ImageLike, name: str = "images") -> np.ndarray:
    """Images (n, 3, H, W) or (3, H, W) in [0, 1] -> float32 array (n, H, W, 3) clipped to [0, 1]."""
    if isinstance(images, torch.Tensor):
        arr = images.detach().to("cpu", torch.float32).numpy()
    else:
        arr = np.asarray(images, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape (n, 3, H, W) or (3, H, W), got {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(arr.shape)})")
    return np.ascontiguousarray(np.clip(arr.transpose(0, 2, 3, 1), 0.0, 1.0))


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """One float image (H, W, 3) in [0, 1] -> uint8 RGB (rounded)."""
    return (img * 255.0 + 0.5).astype(np.uint8)


def _pairs(a: np.ndarray, b: np.ndarray) -> tuple[list[int], list[int]]:
    """Row indices of a and b paired row-wise; a single image on either side is broadcast."""
    na, nb = len(a), len(b)
    if na == nb:
        return list(range(na)), list(range(nb))
    if nb == 1:
        return list(range(na)), [0] * na
    if na == 1:
        return [0] * nb, list(range(nb))
    raise ValueError(f"a and b must hold the same number of images or one of them a single image, got {na} and {nb}")


def _correl(h1: np.ndarray, h2: np.ndarray) -> float:
    """Pearson correlation of two histograms (cv2 CORREL); undefined for a constant one: 1 if both are, else 0."""
    h1, h2 = np.asarray(h1, np.float32), np.asarray(h2, np.float32)
    c1, c2 = bool(np.ptp(h1) == 0), bool(np.ptp(h2) == 0)
    if c1 or c2:  # correlation undefined (OpenCV would answer 1 whatever the other histogram)
        return 1.0 if c1 and c2 else 0.0
    return float(cv2.compareHist(h1, h2, cv2.HISTCMP_CORREL))


# ------------------------------------------------------------------------------------------------------ metrics
def _ssim_score(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two images (H, W, 3), the window (odd, <= 7) shrunk to fit small images."""
    h, w = a.shape[:2]
    if b.shape[:2] != (h, w):
        raise ValueError(f"ssim needs images of the same size, got {h}x{w} and {b.shape[0]}x{b.shape[1]}")
    side = min(h, w, SSIM_WIN)
    win = side if side % 2 else side - 1
    if win < 3:
        raise ValueError(f"ssim needs images of at least 3x3 pixels, got {h}x{w}")
    return float(structural_similarity(a, b, win_size=win, data_range=1.0, channel_axis=-1))


_SIFT: Any = None


def _sift_features(img: np.ndarray) -> tuple[int, np.ndarray | None]:
    """(#keypoints, descriptors) of SIFT on the grayscale image upscaled so its short side is >= 128 px."""
    global _SIFT
    if _SIFT is None:
        _SIFT = cv2.SIFT_create()
    gray = cv2.cvtColor(_to_uint8(img), cv2.COLOR_RGB2GRAY)
    short = min(gray.shape)
    if short < SIFT_MIN_SIDE:
        f = SIFT_MIN_SIDE / short
        size = (max(SIFT_MIN_SIDE, round(gray.shape[1] * f)), max(SIFT_MIN_SIDE, round(gray.shape[0] * f)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_CUBIC)
    kps, desc = _SIFT.detectAndCompute(gray, None)
    return len(kps), desc


def _sift_score(fa: tuple[int, np.ndarray | None], fb: tuple[int, np.ndarray | None]) -> float:
    (ka, da), (kb, db) = fa, fb
    if ka == 0 or kb == 0 or da is None or db is None:
        return 0.0
    matches = cv2.BFMatcher(cv2.NORM_L2).knnMatch(da, db, k=2)
    good = set()
    for m in matches:
        # Lowe's ratio test; with a single candidate in b there is no rival, the match stands
        if len(m) == 1 or (len(m) == 2 and m[0].distance < SIFT_RATIO * m[1].distance):
            good.add(m[0].trainIdx)  # distinct b keypoints: the score cannot exceed 1
    return min(1.0, len(good) / min(ka, kb))


def _hist_features(img: np.ndarray) -> np.ndarray:
    hsv = cv2.cvtColor(_to_uint8(img), cv2.COLOR_RGB2HSV)  # uint8: hue in [0, 180), saturation in [0, 256)
    hist = cv2.calcHist([hsv], [0, 1], None, list(HIST_BINS), [0, 180, 0, 256])
    return hist / max(float(hist.sum()), 1.0)


def _lbp_features(img: np.ndarray) -> np.ndarray:
    gray = img_as_ubyte(rgb2gray(img))  # integer input: LBP on floats is sensitive to rounding noise
    codes = local_binary_pattern(gray, LBP_P, LBP_R, method="uniform").astype(np.int64)
    hist = np.bincount(codes.ravel(), minlength=LBP_P + 2).astype(np.float32)
    return hist / hist.sum()


def _check_metrics(metrics: Sequence[str]) -> None:
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown image metric {', '.join(map(repr, bad))}; valid metrics are {', '.join(METRICS)}")


def _features(metric: str, x: np.ndarray, clip: ClipEmbedder | None) -> list[Any]:
    """What ``metric`` compares, per image of a batch (n, H, W, 3): computed once, scored against many."""
    if metric == "ssim":
        return list(x)
    if metric == "sift":
        return [_sift_features(img) for img in x]
    if metric == "hist":
        return [_hist_features(img) for img in x]
    if metric == "lbp":
        return [_lbp_features(img) for img in x]
    if clip is None:
        raise ValueError(
            "the clip metric needs a ClipEmbedder (ClipEmbedder.from_local(path) or "
            f"{CLIP_ENV}=/path/to/clip-checkpoint); none was given"
        )
    return list(clip.embed(x.transpose(0, 3, 1, 2)).double().numpy())


_SCORES: dict[str, Callable[[Any, Any], float]] = {
    "ssim": _ssim_score,
    "sift": _sift_score,
    "hist": _correl,
    "lbp": _correl,
    "clip": lambda u, v: float(np.dot(u, v)),  # unit vectors: the cosine
}


def similarity(a: ImageLike, b: ImageLike, metric: str, clip: ClipEmbedder | None = None) -> np.ndarray:
    """Row-wise similarity (n,) of a[i] with b[i] under ``metric``; a single image b is compared with every a[i]."""
    _check_metrics([metric])
    xa = _as_batch(a, "a")
    xb = xa if b is a else _as_batch(b, "b")
    ia, ib = _pairs(xa, xb)  # validates the batch sizes before any work
    fa = _features(metric, xa, clip)
    fb = fa if xb is xa else _features(metric, xb, clip)
    score = _SCORES[metric]
    return np.array([score(fa[i], fb[j]) for i, j in zip(ia, ib)], dtype=np.float64)


def injection_scores(
    original: ImageLike,
    edit: ImageLike,
    injected: ImageLike,
    metrics: Sequence[str] = DEFAULT_METRICS,
    clip: ClipEmbedder | None = None,
) -> dict[str, np.ndarray]:
    """Baseline-subtracted similarity of each injected image C to the edit E and to the original O.

    For each metric m: ``m_to_E`` = max(0, sim(C, E) - sim(O, E)), ``m_to_O`` = max(0, sim(C, O) - sim(O, E)) and
    ``m_baseline`` = sim(O, E) repeated (n,). The baseline is how alike O and E already are: only similarity beyond
    it is evidence that the injection moved C towards E (or kept it at O).
    """
    _check_metrics(metrics)
    o, e, c = _as_batch(original, "original"), _as_batch(edit, "edit"), _as_batch(injected, "injected")
    if len(o) != 1 or len(e) != 1:
        raise ValueError(f"original and edit must be single images (3, H, W), got batches of {len(o)} and {len(e)}")
    out: dict[str, np.ndarray] = {}
    for m in metrics:
        score = _SCORES[m]
        if o.shape == e.shape:
            fo, fe = _features(m, np.concatenate([o, e]), clip)  # one CLIP batch for both
        else:
            (fo,), (fe,) = _features(m, o, clip), _features(m, e, clip)
        fc = _features(m, c, clip)
        base = score(fo, fe)
        to_e = np.array([score(f, fe) for f in fc], dtype=np.float64)
        to_o = np.array([score(f, fo) for f in fc], dtype=np.float64)
        out[f"{m}_to_E"] = np.maximum(0.0, to_e - base)
        out[f"{m}_to_O"] = np.maximum(0.0, to_o - base)
        out[f"{m}_baseline"] = np.full(len(c), base, dtype=np.float64)
    return out


# -------------------------------------------------------------------------------------------------------- CLIP
class ClipEmbedder:
    """L2-normalised CLIP image embeddings from a local checkpoint folder (never downloads)."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any = None,
        image_size: int = 224,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        path: str | Path | None = None,
    ) -> None:
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        self.model = model.to(device).eval()
        self.processor = processor
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean if mean is not None else OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(std if std is not None else OPENAI_CLIP_STD).view(1, 3, 1, 1)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.path = Path(path) if path is not None else None

    @classmethod
    def from_local(
        cls, path: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 64
    ) -> ClipEmbedder | None:
        """Load the checkpoint at ``path`` (else $LAYERSCOPE_CLIP); None if none is set or the folder is missing."""
        path = path if path is not None else os.environ.get(CLIP_ENV) or None
        if path is None or not Path(path).expanduser().is_dir():
            return None
        path = Path(path).expanduser()
        from transformers import CLIPModel, CLIPVisionModelWithProjection

        cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        kind = CLIPModel if cfg.get("model_type") == "clip" else CLIPVisionModelWithProjection
        model = kind.from_pretrained(path, local_files_only=True)
        vcfg = getattr(model.config, "vision_config", model.config)
        processor = None
        if (path / "preprocessor_config.json").is_file():
            try:  # transformers >= 5 without torchvision: the PIL backend (same numbers, no warning)
                from transformers import CLIPImageProcessorPil as Processor
            except ImportError:
                from transformers import CLIPImageProcessor as Processor
            processor = Processor.from_pretrained(path, local_files_only=True)
        return cls(model, processor, image_size=vcfg.image_size, device=device, batch_size=batch_size, path=path)

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        """A batch (b, 3, H, W) in [0, 1] -> CLIP pixel values (b, 3, S, S)."""
        if self.processor is not None:
            u8 = (x.permute(0, 2, 3, 1) * 255 + 0.5).to(torch.uint8).numpy()
            return self.processor(images=list(u8), return_tensors="pt")["pixel_values"]
        # CLIP's own recipe: shortest side to image_size (bicubic), centre crop, normalise
        s = self.image_size
        h, w = x.shape[-2:]
        f = s / min(h, w)
        size = (max(s, round(h * f)), max(s, round(w * f)))
        x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(
            0, 1
        )
        top, left = (size[0] - s) // 2, (size[1] - s) // 2
        x = x[..., top : top + s, left : left + s]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def embed(self, images: ImageLike) -> torch.Tensor:
        """Unit-norm image embeddings (n, d) on the CPU, computed in batches without gradients."""
        x = torch.from_numpy(_as_batch(images).transpose(0, 3, 1, 2).copy())
        dtype = next(self.model.parameters()).dtype
        out = []
        for i in range(0, len(x), self.batch_size):
            pix = self._pixels(x[i : i + self.batch_size]).to(self.device, dtype)
            pooled = self.model.vision_model(pixel_values=pix).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def clip_notice(embedder: ClipEmbedder | None) -> str | None:
    """The one-line notice to show when the CLIP metric is skipped, None when an embedder is loaded."""
    if embedder is not None:
        return None
    configured = os.environ.get(CLIP_ENV)
    if configured:
        return f"CLIP metric skipped: {CLIP_ENV}={configured} is not a folder"
    return f"CLIP metric skipped: no local CLIP checkpoint (set {CLIP_ENV}=/path/to/clip-vit-base-patch32)"
