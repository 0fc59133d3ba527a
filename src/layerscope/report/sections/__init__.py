"""Report sections, one module per experiment, in report order (see :mod:`layerscope.report`)."""

from . import abstractions, injection, properties

SECTIONS = (injection, abstractions, properties)

__all__ = ["SECTIONS"]
