"""Generation settings shared by every adapter."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GenerationConfig:
    """How to generate: denoising steps, guidance, resolution (None = the model's default), negative prompt.

    ``extra`` holds family-specific keyword arguments passed through to the pipeline call.
    """

    num_inference_steps: int = 10
    guidance_scale: float = 5.0
    height: int | None = None
    width: int | None = None
    negative_prompt: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict:
        d = asdict(self)
        d["extra"] = {
            k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(type(v)))
            for k, v in self.extra.items()
        }
        return d
