"""The model-agnostic engine: capture, intervention, stores, batched injection sweeps.

Phases: :mod:`.plan` (validate and size before any work), :mod:`.hooks` (the only code registering forward hooks)
and :mod:`.paths` (tensors inside module inputs/outputs), :mod:`.handler` (what happens at a site in a step),
:mod:`.execute` (chunks, stores, the shape trace). The engine talks to models only through :class:`.Backend`.
"""

from ..progress import ProgressArg, progress_callback
from .backend import Backend
from .execute import GenerationResult, execute, trace_shapes
from .hooks import meta_inputs
from .plan import estimate_bytes, fmt_bytes, plan_capture
from .spec import Capture, Intervention, PerTarget, Row, Stored, add, blend, replace, reweight, zero
from .steps import WINDOWS, StepSel, resolve_steps, window
from .store import ActivationStore, CaptureResult, StoreIntegrityError
from .stream import StoreWriteError
from .sweep import SweepResult, injection_sweep, layer_sets

__all__ = [
    "WINDOWS",
    "ActivationStore",
    "Backend",
    "Capture",
    "CaptureResult",
    "GenerationResult",
    "Intervention",
    "PerTarget",
    "ProgressArg",
    "Row",
    "StepSel",
    "StoreIntegrityError",
    "StoreWriteError",
    "Stored",
    "SweepResult",
    "add",
    "blend",
    "estimate_bytes",
    "execute",
    "fmt_bytes",
    "injection_sweep",
    "layer_sets",
    "meta_inputs",
    "plan_capture",
    "progress_callback",
    "replace",
    "reweight",
    "resolve_steps",
    "trace_shapes",
    "window",
    "zero",
]
