"""The Shapes world: layerscope's embedded default.

A procedural Shapes3D-like scene with six exactly known factors (:mod:`.factors`, :mod:`.render`), a prompt for
every combination and a word-level tokenizer (:mod:`.text`), a torch Dataset (:mod:`.data`), the oracle that reads
factors off images (:mod:`.oracle`), quality measures (:mod:`.quality`) and the zoo of small trained models
(:mod:`.zoo`, loaded as ``zoo:<name>`` specs).
"""

from .data import ShapesDataset
from .factors import (
    FACTORS,
    GROUPS,
    N_COMBINATIONS,
    SHAPES,
    SIZES,
    VALUES,
    from_index,
    is_held_out,
    sample_factors,
    to_index,
)
from .render import render
from .text import encode, factors_from_prompt, prompt_for, prompts_for, tokenizer, vocabulary

__all__ = [
    "FACTORS",
    "GROUPS",
    "N_COMBINATIONS",
    "SHAPES",
    "SIZES",
    "VALUES",
    "ShapesDataset",
    "encode",
    "factors_from_prompt",
    "from_index",
    "is_held_out",
    "prompt_for",
    "prompts_for",
    "render",
    "sample_factors",
    "to_index",
    "tokenizer",
    "vocabulary",
]
