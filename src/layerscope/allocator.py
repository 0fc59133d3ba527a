"""Keep large CPU tensors in glibc's heap instead of fresh ``mmap`` pages, once per process.

On Linux, torch's CPU allocator asks glibc's ``malloc`` for each tensor. glibc serves a request from its heap when a
free chunk there is large enough; otherwise, above its ``mmap`` threshold, it maps fresh pages for the request and
unmaps them on ``free``. Every first touch of a fresh page is a page fault that zeroes 4 KiB in the kernel. The
threshold adapts by itself, but only up to 32 MiB, and whether a request finds a large enough free chunk depends on
what else was allocated before it. A generation's large activations (a feed-forward projection of batch 54 on
``tiny:sd`` at 64x64 is 54 MiB) are therefore served from the heap in one run and from fresh pages in another.

Measured on ``tiny:sd`` (64x64, 10 steps, CFG, 1 thread; ``benchmarks/RESULTS.md``): a batched injection sweep over
25 layers took 2.1 million page faults (3.1 s of kernel time in a 27 s run), while a plain generation of the same
batch took a few thousand. The hooks' out-of-place copies change which free chunks the heap has. With the
thresholds below, the sweep took 30,000 faults and the plain generation 10, and the sweep ran within 1% of the plain
generation (23.58 s against 23.37 s on one thread; 0.99 of it on two, ``benchmarks/bench_engine.py``).

:func:`tune_cpu_allocator` sets glibc's ``M_MMAP_THRESHOLD`` to 1 GiB and ``M_TRIM_THRESHOLD`` to 1 GiB: requests up
to 1 GiB come from the heap, and the heap keeps up to 1 GiB of free memory at its top instead of returning it to the
system after each step. It is called before a generation with a denoiser on the CPU (the engine), before a probe
grid on the CPU (:func:`layerscope.stats.probes.fit_probe_grid`) and by the zoo's ``pick_device`` for CPU training
and evaluation. It is process-wide, which is why it is done at most once, is logged, and can be switched off: set
``LAYERSCOPE_MALLOC=system`` to keep glibc's defaults. Where ``mallopt`` is missing or refuses (macOS, Windows, musl)
it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

ENV = "LAYERSCOPE_MALLOC"
THRESHOLD = 1 << 30  # bytes: requests up to this size come from the heap, and this much free heap is kept
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3

log = logging.getLogger(__name__)
_state: dict[str, bool] = {}


def tune_cpu_allocator() -> bool:
    """Once per process, on glibc: keep allocations up to 1 GiB in the heap (see the module's docstring).

    Returns True when the thresholds are set (now or by an earlier call); False when switched off with
    ``LAYERSCOPE_MALLOC=system``, or not on glibc."""
    if "tuned" in _state:
        return _state["tuned"]
    _state["tuned"] = ok = _tune()
    return ok


def _tune() -> bool:
    choice = os.environ.get(ENV, "").strip().lower()
    if choice == "system":
        log.debug("%s=system: glibc's malloc thresholds left as they are", ENV)
        return False
    if choice not in ("", "tuned"):
        log.warning("%s=%r is not 'system' or 'tuned'; using 'tuned'", ENV, choice)
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # no C library with mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, THRESHOLD))
    if ok:
        log.debug(
            "glibc malloc: mmap and trim thresholds set to %d bytes (%s=system to keep the defaults)", THRESHOLD, ENV
        )
    return ok
