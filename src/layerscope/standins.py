"""Stand-in tokenizers, built from tiny vocab files written in code: any text tokenizes, nothing is downloaded.

The tiny test pipelines (:mod:`layerscope.testing.pipelines`) use them as their real tokenizers; the ``arch:`` specs
(:mod:`layerscope.arch`) use them in place of the published CLIP / T5 vocabularies, which cannot be fetched: a
stand-in pads and truncates to the same lengths, so every shape the denoiser sees is the real one (token ids and the
end-of-sentence position of a given prompt differ from the real tokenizer's).
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Prompt words that get whole-word tokens (everything else is spelled out by characters / bytes).
_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "at",
    "with",
    "and",
    "by",
    "to",
    "from",
    "under",
    "over",
    "near",
    "is",
    "photo",
    "painting",
    "picture",
    "image",
    "drawing",
    "sketch",
    "portrait",
    "render",
    "close",
    "up",
    "cat",
    "dog",
    "horse",
    "bird",
    "fish",
    "person",
    "man",
    "woman",
    "child",
    "car",
    "house",
    "tree",
    "flower",
    "mountain",
    "river",
    "lake",
    "sea",
    "beach",
    "forest",
    "city",
    "street",
    "sky",
    "sun",
    "moon",
    "cloud",
    "field",
    "table",
    "chair",
    "cup",
    "apple",
    "squirrel",
    "burger",
    "astronaut",
    "castle",
    "boat",
    "road",
    "snow",
    "rain",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "orange",
    "purple",
    "pink",
    "brown",
    "gray",
    "golden",
    "big",
    "small",
    "old",
    "young",
    "happy",
    "cute",
    "dark",
    "bright",
    "sunny",
    "night",
    "day",
    "morning",
    "style",
    "oil",
    "watercolor",
    "digital",
    "art",
    "high",
    "quality",
    "detailed",
    "realistic",
    "cartoon",
    "blurry",
    "bad",
    "low",
    "ugly",
    "deformed",
    "eating",
    "sitting",
    "standing",
    "running",
    "riding",
    "flying",
)


# --------------------------------------------------------------------------------------------------- tokenizers ---


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte -> printable unicode table (position i holds the character of byte bs[i])."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _apply_bpe(syms: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge adjacent symbols by rank (lowest first) until no known pair is left, as a BPE tokenizer does."""
    while len(syms) > 1:
        pairs = [(ranks[p], i) for i, p in enumerate(zip(syms, syms[1:])) if p in ranks]
        if not pairs:
            break
        _, i = min(pairs)
        syms = [*syms[:i], syms[i] + syms[i + 1], *syms[i + 2 :]]
    return syms


def _write_clip_vocab(directory: Path) -> None:
    """Write a tiny byte-level CLIP BPE (vocab.json, merges.txt, tokenizer_config.json) into ``directory``.

    All 256 byte symbols and their ``</w>`` variants are in the vocab, so any text tokenizes without unknowns; the
    words of ``_WORDS`` get whole-word tokens through left-to-right merges. Special tokens come last, as in CLIP.
    """
    base = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for sym in base:
        vocab[sym] = len(vocab)
    for sym in base:
        vocab[sym + "</w>"] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    for word in _WORDS:
        # split the word with the merges so far, then append merges (lowest priority, so earlier words keep
        # their single tokens) that join what is left from left to right
        syms = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(syms) > 1:
            ranks.setdefault((syms[0], syms[1]), len(ranks))
            merged = syms[0] + syms[1]
            vocab.setdefault(merged, len(vocab))
            syms = [merged, *syms[2:]]
    merges = sorted(ranks, key=ranks.__getitem__)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _ensure_written(directory: Path, write: Callable[[Path], None]) -> Path:
    """Create ``directory`` with ``write`` unless it exists; atomic (temp folder + rename) for concurrent builders."""
    if directory.is_dir():
        return directory
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    write(tmp)
    try:
        os.rename(tmp, directory)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def clip_tokenizer(cache_dir: Path) -> Any:
    """Load (writing first if needed) the tiny CLIP tokenizer from ``cache_dir / 'clip_tokenizer'``."""
    from transformers import CLIPTokenizer

    directory = _ensure_written(cache_dir / "clip_tokenizer", _write_clip_vocab)
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=77, local_files_only=True)


def _t5_vocab() -> list[tuple[str, float]]:
    """Unigram pieces for the tiny T5 tokenizer: specials, whole words, single characters (case-sensitive)."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -4.0) for w in _WORDS]
    pieces += [("▁" + c, -8.5) for c in string.ascii_lowercase]
    pieces += [(c, -9.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return pieces


def t5_tokenizer(cache_dir: Path) -> Any:
    """Load (writing first if needed) the tiny T5 Unigram tokenizer from ``cache_dir / 't5_tokenizer'``.

    Characters outside ASCII letters, digits and punctuation map to ``<unk>`` (no byte fallback, like T5).
    """
    from transformers import T5Tokenizer

    def write(directory: Path) -> None:
        T5Tokenizer(vocab=_t5_vocab(), extra_ids=0, model_max_length=512).save_pretrained(str(directory))

    directory = _ensure_written(cache_dir / "t5_tokenizer", write)
    return T5Tokenizer.from_pretrained(str(directory), local_files_only=True)


def standin_dir() -> Path:
    """Where the stand-in vocab files are written once per machine (``LAYERSCOPE_CACHE`` or the temp folder)."""
    root = Path(os.environ.get("LAYERSCOPE_CACHE") or Path(tempfile.gettempdir()) / "layerscope-cache")
    path = root / "standin-tokenizers"
    path.mkdir(parents=True, exist_ok=True)
    return path
