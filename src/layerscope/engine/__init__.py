"""The model-agnostic engine: capture, intervention, stores, batched injection sweeps."""

from .run import GenerationResult, estimate_bytes, execute, plan_capture, trace_shapes
from .spec import Capture, Intervention, PerTarget, Row, Stored, add, blend, replace, zero
from .steps import resolve_steps, window
from .store import ActivationStore, CaptureResult
from .sweep import SweepResult, injection_sweep

__all__ = [
    "ActivationStore", "Capture", "CaptureResult", "GenerationResult", "Intervention", "PerTarget", "SweepResult",
    "injection_sweep", "Row", "Stored", "add",
    "blend", "estimate_bytes", "execute", "plan_capture", "replace", "resolve_steps", "trace_shapes", "window", "zero",
]
