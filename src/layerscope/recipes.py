"""Recipes: the layers published work names, as layer sets every experiment takes (``--recipe sdxl-style``).

Each recipe says which model the work used (an ``arch:`` spec), which layers it names and what it found there, and
what stage and kind each layer must have in layerscope's map; :func:`resolve` checks all of that on a model before
any work (``tests/test_arch.py`` checks every recipe on its own architecture, at full size on the meta device).
A recipe resolves on any model whose map has its layers (SD 1.4 and SD 1.5 share one architecture).

>>> import layerscope as ls
>>> ls.recipes.resolve("pnp", ls.load("arch:sd14"))[:3]
['up_blocks.1.resnets.1', 'up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q', 'up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_k']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import LayerNameError, close_matches
from .layers import LayerMap


@dataclass(frozen=True)
class Recipe:
    """Layers published work names on a model.

    ``layers``: (name, stage, kind) of each layer, checked when the recipe resolves. ``skips_from``: also every
    skip tensor produced in this encoder block (its ``source`` metadata), for recipes that name skip connections.
    ``model``: the ``arch:`` spec of the model the work used; ``found``: what it reports there; ``cite``: where.
    """

    name: str
    model: str
    found: str
    cite: str
    layers: tuple[tuple[str, str, str], ...] = ()
    skips_from: str | None = None

    def names(self, lmap: LayerMap) -> list[str]:
        """The recipe's entries in ``lmap`` (map order), after checking each exists with its stage and kind."""
        wrong = []
        for name, stage, kind in self.layers:
            if name not in lmap:
                near = ", ".join(close_matches(name, [e.name for e in lmap.all()]))
                raise LayerNameError(
                    f"recipe {self.name!r} names {name!r}, which {lmap.model} does not have (closest: {near}); "
                    f"the recipe is for {self.model}"
                )
            e = lmap[name]
            if (e.stage, e.kind) != (stage, kind):
                wrong.append(f"{name} is {e.kind} in {e.stage}, the recipe expects {kind} in {stage}")
        if wrong:
            raise LayerNameError(f"recipe {self.name!r} does not fit {lmap.model}: {'; '.join(wrong)}")
        chosen = {name for name, _, _ in self.layers}
        if self.skips_from is not None:
            skips = [e.name for e in lmap.spaces if e.role == "skip" and e.source.startswith(self.skips_from + ".")]
            if not skips:
                raise LayerNameError(
                    f"recipe {self.name!r} takes the skip tensors produced in {self.skips_from}, and {lmap.model} "
                    f"has none there; the recipe is for {self.model}"
                )
            chosen.update(skips)
        return [e.name for e in lmap.all() if e.name in chosen]


_R = Recipe
_PNP_ATTN = ((1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2))
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        _R(
            "sd14-content",
            "arch:sd14",
            "content and semantic edits live in the bottleneck (h-space: the mid-block's output)",
            "Kwon et al. 2023, 'Diffusion Models Already Have a Semantic Latent Space' (h-space); layer names as "
            "issue 18 lists them",
            (("mid_block.resnets.1", "bottleneck", "resnet"), ("mid_block.attentions.0", "bottleneck", "attention")),
        ),
        _R(
            "sd2-content",
            "arch:sd21",
            "content in the third encoder block",
            "as issue 18's literature list gives it",
            (
                ("down_blocks.2.attentions.1", "encoder", "attention"),
                ("down_blocks.2.resnets.1", "encoder", "resnet"),
            ),
        ),
        _R(
            "sd2-style",
            "arch:sd21",
            "style in the second decoder block's first resnets",
            "as issue 18's literature list gives it",
            (("up_blocks.1.resnets.0", "decoder", "resnet"), ("up_blocks.1.resnets.1", "decoder", "resnet")),
        ),
        _R(
            "sdxl-content",
            "arch:sdxl",
            "content in the bottleneck",
            "as issue 18's literature list gives it",
            (("mid_block", "bottleneck", "block"),),
        ),
        _R(
            "sdxl-style",
            "arch:sdxl",
            "style in the first decoder block's first attention and resnet",
            "as issue 18's literature list gives it",
            (("up_blocks.0.attentions.0", "decoder", "attention"), ("up_blocks.0.resnets.0", "decoder", "resnet")),
        ),
        _R(
            "blora-content",
            "arch:sdxl",
            "LoRA on this block alone learns an image's content",
            "Frenkel et al. 2024, 'Implicit Style-Content Separation using B-LoRA'",
            (("up_blocks.0.attentions.0", "decoder", "attention"),),
        ),
        _R(
            "blora-style",
            "arch:sdxl",
            "LoRA on this block alone learns an image's style (colour and texture)",
            "Frenkel et al. 2024, 'Implicit Style-Content Separation using B-LoRA'",
            (("up_blocks.0.attentions.1", "decoder", "attention"),),
        ),
        _R(
            "instantstyle-style",
            "arch:sdxl",
            "injecting the style image's features into this block alone transfers style without its content",
            "Wang et al. 2024, 'InstantStyle: Free Lunch towards Style-Preserving in Text-to-Image Generation'",
            (("up_blocks.0.attentions.1", "decoder", "attention"),),
        ),
        _R(
            "kandinsky22-encoder",
            "arch:kandinsky22",
            "the third encoder block's later resnets (named by issue 18's literature list)",
            "as issue 18's literature list gives it",
            (("down_blocks.2.resnets.1", "encoder", "resnet"), ("down_blocks.2.resnets.2", "encoder", "resnet")),
        ),
        _R(
            "skipinject",
            "arch:sd21",
            "the skip connections out of the third encoder block carry an image's content: injected alone they "
            "transfer it to another image",
            "Schaerf et al. 2025, 'Training-Free Style and Content Transfer by Leveraging U-Net Skip Connections in "
            "Stable Diffusion' (SkipInject), arXiv:2501.14524",
            skips_from="down_blocks.2",
        ),
        _R(
            "pnp",
            "arch:sd14",
            "the spatial features of this decoder resnet and the self-attention of decoder layers 4-11 (their queries "
            "and keys, i.e. their maps) carry the structure that Plug-and-Play injects from a source image",
            "Tumanyan et al. 2023, 'Plug-and-Play Diffusion Features for Text-Driven Image-to-Image Translation' "
            "(their code: up_blocks[1].resnets[1]; attn1 of up_blocks[1].attentions[1, 2], up_blocks[2, 3]"
            ".attentions[0, 1, 2])",
            (("up_blocks.1.resnets.1", "decoder", "resnet"),)
            + tuple(
                (f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1.to_{p}", "decoder", p)
                for b, a in _PNP_ATTN
                for p in ("q", "k")
            ),
        ),
        _R(
            "styleid",
            "arch:sd21",
            "a style image's self-attention keys and values, injected into decoder layers 7-11, transfer its style "
            "while the content image's queries keep its layout",
            "Chung et al. 2024, 'Style Injection in Diffusion: A Training-free Approach for Adapting Large-scale "
            "Diffusion Models for Style Transfer' (CVPR; their code's default injection_layers 7-11 of the 12 "
            "decoder layers, SD 2.1-base)",
            tuple(
                (f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1.to_{p}", "decoder", p)
                for b, a in ((2, 1), (2, 2), (3, 0), (3, 1), (3, 2))
                for p in ("k", "v")
            ),
        ),
    )
}


def get(name: str) -> Recipe:
    """The recipe called ``name`` (the error lists the valid ones)."""
    if name not in RECIPES:
        near = close_matches(name, list(RECIPES))
        raise LayerNameError(f"unknown recipe {name!r}; closest: {', '.join(near)} (all: {', '.join(RECIPES)})")
    return RECIPES[name]


def resolve(name: str, model: Any, **size: Any) -> list[str]:
    """The layer names recipe ``name`` takes on ``model`` (a loaded generator), checked against its layer map."""
    return get(name).names(model.layer_map(size.get("height"), size.get("width")))
