"""layerscope: find where a generative image model keeps its representations.

>>> import layerscope as ls
>>> model = ls.load("tiny:sd")                      # or "hf:/path/to/pipeline", "torch:pkg.mod:factory"
>>> [l.name for l in model.layers("up_blocks.1.*")][:2]
['up_blocks.1.resnets.0', 'up_blocks.1.attentions.0']
"""

from ._version import __version__
from .config import GenerationConfig
from .engine import (
    ActivationStore,
    Capture,
    CaptureResult,
    GenerationResult,
    Intervention,
    PerTarget,
    Row,
    Stored,
    SweepResult,
    add,
    blend,
    injection_sweep,
    replace,
    window,
    zero,
)
from .errors import (
    BudgetError,
    ConfigError,
    LayerNameError,
    LayerscopeError,
    ShapeError,
    SpecError,
    StoreMismatchError,
)
from .layers import LayerInfo, LayerMap, Site
from .models.base import Generator
from .specs import load

__all__ = [
    "ActivationStore", "BudgetError", "Capture", "CaptureResult", "ConfigError", "GenerationConfig",
    "GenerationResult", "Generator", "Intervention", "LayerInfo", "LayerMap", "LayerNameError", "LayerscopeError",
    "PerTarget", "Row", "ShapeError", "Site", "SpecError", "Stored", "StoreMismatchError", "SweepResult", "__version__", "add",
    "blend", "injection_sweep", "load", "replace", "window", "zero",
]
