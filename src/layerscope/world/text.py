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


# -- captions that leave factors open (zoo:ldm's training captions, the partial prompt pairs of injection) ---

PHRASES = ("object", "floor", "wall", "orientation")  # the canonical order (that of the full prompts)
_OBJECT = ("scale", "object_hue", "shape")
_IDX = {f: i for i, f in enumerate(FACTORS)}


def partial_prompt(
    factors: Sequence[int] | np.ndarray, named: Sequence[bool] | np.ndarray, order: Sequence[str] | None = None
) -> str:
    """A caption naming only the factors where ``named`` is true, phrases in ``order`` (default canonical).

    Phrases: the object (``a [size] [colour] [shape]``, only the named words; e.g. ``a cube``, ``an orange``,
    ``a small red``), the floor (``an orange floor``), the wall (``a blue wall``) and the view (``seen from the
    front``). After the object or the floor, the floor and the wall join as ``on ...`` and ``in front of ...``;
    everything else joins with a comma. With everything named in the canonical order it is exactly the full prompt
    (:func:`layerscope.world.text.prompt_for`). Nothing named gives ``""``."""
    f = [int(x) for x in np.asarray(factors).reshape(-1)]
    on = [bool(x) for x in np.asarray(named).reshape(-1)]
    if len(f) != len(FACTORS) or len(on) != len(FACTORS):
        raise ValueError(f"factors and named need {len(FACTORS)} entries, got {len(f)} and {len(on)}")
    words = {
        "scale": SIZES_WORDS[f[_IDX["scale"]]],
        "object_hue": COLOURS[f[_IDX["object_hue"]]],
        "shape": SHAPES[f[_IDX["shape"]]],
    }
    nouns: dict[str, str] = {}
    obj = [words[k] for k in _OBJECT if on[_IDX[k]]]
    if obj:
        nouns["object"] = _a(" ".join(obj))
    if on[_IDX["floor_hue"]]:
        nouns["floor"] = f"{_a(COLOURS[f[_IDX['floor_hue']]])} floor"
    if on[_IDX["wall_hue"]]:
        nouns["wall"] = f"{_a(COLOURS[f[_IDX['wall_hue']]])} wall"
    if on[_IDX["orientation"]]:
        nouns["orientation"] = orientation_phrase(f[_IDX["orientation"]])
    order = list(order) if order is not None else list(PHRASES)
    if sorted(order) != sorted(PHRASES):
        raise ValueError(f"order must be a permutation of {PHRASES}, got {order}")
    out, prev = "", None
    for kind in order:
        if kind not in nouns:
            continue
        if prev is None:
            out = nouns[kind]
        elif kind == "floor" and prev in ("object",):
            out += " on " + nouns[kind]
        elif kind == "wall" and prev in ("object", "floor"):
            out += " in front of " + nouns[kind]
        else:
            out += ", " + nouns[kind]
        prev = kind
    return out


def partial_captions(
    factors: np.ndarray,
    rng: np.random.Generator,
    p_name: float = 0.5,
    p_empty: float = 0.1,
    p_shuffle: float = 0.5,
) -> tuple[list[str], np.ndarray]:
    """Training captions of scenes (n, 6) that leave factors open, and which factors each names (n, 6) bool.

    Each factor is named independently with probability ``p_name``; a share ``p_empty`` of the captions is empty
    (for classifier-free guidance; it names nothing); the phrase order is canonical, or with probability
    ``p_shuffle`` a random permutation."""
    f = np.asarray(factors, dtype=np.int64).reshape(-1, len(FACTORS))
    n = len(f)
    named = rng.random((n, len(FACTORS))) < p_name
    empty = rng.random(n) < p_empty
    shuffle = rng.random(n) < p_shuffle
    perms = np.argsort(rng.random((n, len(PHRASES))), axis=1)
    named[empty] = False
    caps = []
    for i in range(n):
        order = [PHRASES[j] for j in perms[i]] if shuffle[i] else None
        caps.append(partial_prompt(f[i], named[i], order))
    return caps, named


_WORD = re.compile(r"\w+|[^\w\s]+")
_SKIP = {"a", "an", "on", "in", "front", "of", ","}


def factors_from_partial(prompt: str) -> np.ndarray:
    """The factor indices (6,) a (partial) prompt names, -1 where it leaves a factor open.

    Reads every caption of :func:`partial_captions` and the full prompts of
    :func:`layerscope.world.text.prompt_for` (for those it equals ``factors_from_prompt``). A colour word before
    ``floor`` / ``wall`` is the floor / wall hue, any other colour the object's; size and shape words are the
    object's; ``seen from the front`` / ``seen from N degrees left|right`` the orientation. Unknown words, and a
    factor named twice with different values, raise ``ValueError``."""
    words = _WORD.findall(prompt.strip().lower())
    out = np.full(len(FACTORS), -1, dtype=np.int64)

    def put(factor: str, value: int) -> None:
        j = _IDX[factor]
        if out[j] >= 0 and out[j] != value:
            raise ValueError(f"{factor} named twice with different values in {prompt!r}")
        out[j] = value

    i = 0
    while i < len(words):
        w = words[i]
        nxt = words[i + 1] if i + 1 < len(words) else None
        if w in COLOURS:
            if nxt in ("floor", "wall"):
                put(f"{nxt}_hue", COLOURS.index(w))
                i += 2
                continue
            put("object_hue", COLOURS.index(w))
        elif w in SIZES_WORDS:
            put("scale", SIZES_WORDS.index(w))
        elif w in SHAPES:
            put("shape", SHAPES.index(w))
        elif w == "seen":
            rest = words[i + 1 : i + 5]
            if rest[:3] == ["from", "the", "front"]:
                put("orientation", int(np.argmin(np.abs(VALUES["orientation"]))))
                i += 4
                continue
            if len(rest) == 4 and rest[0] == "from" and rest[1].isdigit() and rest[2] == "degrees":
                if rest[3] not in ("left", "right"):
                    raise ValueError(f"expected left or right after degrees in {prompt!r}")
                cands = [
                    k
                    for k, a in enumerate(ANGLES)
                    if a == int(rest[1]) and a != 0 and (VALUES["orientation"][k] < 0) == (rest[3] == "left")
                ]
                if not cands:
                    raise ValueError(f"no orientation of {rest[1]} degrees in the grid (valid: {sorted(set(ANGLES))})")
                put("orientation", cands[0])
                i += 5
                continue
            raise ValueError(
                f"malformed view phrase in {prompt!r} (expected 'seen from the front' or 'seen from N "
                "degrees left|right')"
            )
        elif w not in _SKIP:
            raise ValueError(f"unknown word {w!r} in prompt {prompt!r}")
        i += 1
    return out


def caption_words() -> set[str]:
    """Every word partial captions can use (all of them are in the world's tokenizer vocabulary)."""
    words = {"a", "an", "on", "in", "front", "of", ",", "floor", "wall", "seen", "from", "the", "degrees"}
    words |= {"left", "right", *COLOURS, *SIZES_WORDS, *SHAPES}
    words |= {str(a) for a in ANGLES if a != 0}
    return words
