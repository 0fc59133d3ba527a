"""Report sections, one module per experiment, in report order (see :mod:`layerscope.report`)."""

from . import abstractions, alignment, injection, properties

SECTIONS = (injection, abstractions, properties, alignment)

__all__ = ["SECTIONS"]
