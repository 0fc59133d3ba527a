"""Prompts of the Shapes world and the word-level tokenizer shipped with it.

Every factor combination has one prompt in a small fixed vocabulary::

    a small red cube on an orange floor in front of a blue wall, seen from 13 degrees left

Hue bins are colour names, scales size words (smallest to largest), orientations a direction and a rounded angle
("seen from the front" at 0 degrees). The tokenizer is a real ``tokenizers`` word-level model wrapped in
``transformers.PreTrainedTokenizerFast``, so text-conditioned zoo models receive prompts the way Stable Diffusion
does: ``<bos> words <eos> <pad>...`` padded to :data:`MAX_LENGTH`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from .factors import FACTORS, SHAPES, VALUES, check_factors

COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "lime", "green", "cyan", "azure", "blue", "purple", "pink")
SIZES_WORDS: tuple[str, ...] = ("tiny", "small", "little", "medium", "big", "large", "huge", "giant")
ANGLES: tuple[int, ...] = tuple(int(round(abs(a))) for a in VALUES["orientation"])  # 30 26 21 17 13 9 4 0 4 ...
MAX_LENGTH = 24
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_FILLER = (
    "a",
    "an",
    "on",
    "floor",
    "in",
    "front",
    "of",
    "wall",
    ",",
    "seen",
    "from",
    "the",
    "degrees",
    "left",
    "right",
)


def orientation_phrase(i: int) -> str:
    deg = float(VALUES["orientation"][i])
    if abs(deg) < 1e-6:
        return "seen from the front"
    # negative angles turn the camera so the corner moves right: the view is from the left
    return f"seen from {ANGLES[i]} degrees {'left' if deg < 0 else 'right'}"


def prompt_for(factors: Sequence[int] | np.ndarray) -> str:
    """The prompt of one combination (six factor indices)."""
    fl, wa, ob, sc, sh, ori = (int(x) for x in check_factors(factors)[0])
    return (
        f"a {SIZES_WORDS[sc]} {COLOURS[ob]} {SHAPES[sh]} on {_a(COLOURS[fl])} floor in front of "
        f"{_a(COLOURS[wa])} wall, {orientation_phrase(ori)}"
    )


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def prompts_for(factors: np.ndarray | torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
    """Prompts of many combinations (n, 6)."""
    return [prompt_for(row) for row in check_factors(factors)]


_PATTERN = re.compile(
    r"^a (?P<scale>\w+) (?P<object_hue>\w+) (?P<shape>\w+) on an? (?P<floor_hue>\w+) floor in front of an? "
    r"(?P<wall_hue>\w+) wall, seen from (?:the front|(?P<deg>\d+) degrees (?P<side>left|right))$"
)


def factors_from_prompt(prompt: str) -> np.ndarray:
    """The six factor indices a prompt asks for (the inverse of :func:`prompt_for`)."""
    m = _PATTERN.match(prompt.strip())
    if m is None:
        raise ValueError(f"not a Shapes-world prompt: {prompt!r} (expected e.g. {prompt_for([0, 0, 0, 0, 0, 7])!r})")
    try:
        out = {
            "floor_hue": COLOURS.index(m["floor_hue"]),
            "wall_hue": COLOURS.index(m["wall_hue"]),
            "object_hue": COLOURS.index(m["object_hue"]),
            "scale": SIZES_WORDS.index(m["scale"]),
            "shape": SHAPES.index(m["shape"]),
        }
    except ValueError as exc:
        raise ValueError(f"unknown word in prompt {prompt!r}: {exc}") from exc
    if m["deg"] is None:
        out["orientation"] = 7
    else:
        cands = [
            i
            for i, a in enumerate(ANGLES)
            if a == int(m["deg"]) and a != 0 and (VALUES["orientation"][i] < 0) == (m["side"] == "left")
        ]
        if not cands:
            raise ValueError(f"no orientation of {m['deg']} degrees in the grid (valid: {sorted(set(ANGLES))})")
        out["orientation"] = cands[0]
    return np.array([out[f] for f in FACTORS], dtype=np.int64)


def vocabulary() -> list[str]:
    """Every token the tokenizer knows, specials first (ids are positions in this list)."""
    words = list(SPECIALS) + list(_FILLER) + list(COLOURS) + list(SIZES_WORDS) + list(SHAPES)
    words += [str(a) for a in sorted(set(ANGLES)) if a != 0]
    return list(dict.fromkeys(words))


@lru_cache(maxsize=1)
def tokenizer():
    """The world's word-level tokenizer as a ``transformers.PreTrainedTokenizerFast`` (same calls as CLIP's)."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_LENGTH,
        padding_side="right",
    )


def encode(prompts: Sequence[str]) -> torch.Tensor:
    """Token ids (n, MAX_LENGTH) of prompts, padded like Stable Diffusion's text input."""
    return tokenizer()(
        list(prompts), padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
