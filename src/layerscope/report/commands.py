"""Pieces of the CLI commands the report prints under each figure ("Reproduce: ..."), shared by the sections."""

from __future__ import annotations

from typing import Any


def size_flags(settings: dict[str, Any]) -> str:
    """``--height H --width W`` for the image size a job's ``generation`` keywords set (empty when they set none)."""
    gen = settings.get("generation") or {}
    return "".join(f" --{k} {gen[k]}" for k in ("height", "width") if gen.get(k) is not None)


def layer_flags(layers: Any) -> str:
    """``-l 'glob'`` per layer glob of a job (empty for the default, every layer)."""
    if not layers:
        return ""
    return "".join(f" -l '{g}'" for g in ([layers] if isinstance(layers, str) else layers))
