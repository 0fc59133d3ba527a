"""layerscope: find where a generative image model keeps its representations.

>>> import layerscope as ls
>>> model = ls.load("tiny:sd")                      # or "hf:/path/to/pipeline", "torch:pkg.mod:factory"
>>> [l.name for l in model.layers("up_blocks.1.*")][:2]
['up_blocks.1.resnets.0', 'up_blocks.1.attentions.0']
"""

from . import recipes
from ._version import __version__
from .config import GenerationConfig
from .controls import untrained
from .engine import (
    ActivationStore,
    Capture,
    CaptureResult,
    GenerationResult,
    Intervention,
    PerTarget,
    Row,
    Stored,
    StoreIntegrityError,
    SweepResult,
    add,
    blend,
    injection_sweep,
    replace,
    reweight,
    window,
    zero,
)
from .errors import (
    BudgetError,
    ConfigError,
    DamagedError,
    GenerationError,
    LayerNameError,
    LayerscopeError,
    ShapeError,
    SpecError,
    StoreMismatchError,
)
from .layers import LayerInfo, LayerMap, Site
from .loading import Source, load, register_adapter, register_scheme
from .models.base import Capabilities, Generator

__all__ = [
    "recipes",
    "ActivationStore",
    "BudgetError",
    "Capabilities",
    "Capture",
    "CaptureResult",
    "ConfigError",
    "DamagedError",
    "GenerationConfig",
    "GenerationResult",
    "GenerationError",
    "Generator",
    "Intervention",
    "LayerInfo",
    "LayerMap",
    "LayerNameError",
    "LayerscopeError",
    "PerTarget",
    "Row",
    "ShapeError",
    "Site",
    "SpecError",
    "Source",
    "Stored",
    "StoreIntegrityError",
    "StoreMismatchError",
    "SweepResult",
    "__version__",
    "add",
    "blend",
    "injection_sweep",
    "load",
    "register_adapter",
    "register_scheme",
    "replace",
    "reweight",
    "untrained",
    "window",
    "zero",
]
