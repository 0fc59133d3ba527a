"""Report sections, one module per experiment, in report order (see :mod:`layerscope.report`), and before them
:data:`LEADING`: sections of no experiment of their own (``EXPERIMENT = None``), rendered at the top of the page
from the other sections' saved Results (the claims table)."""

from . import abstractions, alignment, claims, injection, properties

SECTIONS = (injection, abstractions, properties, alignment)
LEADING = (claims,)

__all__ = ["LEADING", "SECTIONS"]
