"""The CPU allocator tuning (:mod:`layerscope.allocator`): large tensors reuse heap pages instead of faulting
in fresh ones, once per process, and ``LAYERSCOPE_MALLOC=system`` switches it off."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from layerscope import allocator

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only"
)

# 20 tensors of 54 MiB, each written and freed: above glibc's largest automatic mmap threshold (32 MiB), so by default
# every one gets fresh pages (about 14,000 page faults each); tuned, the heap keeps and reuses them
_FAULTS = textwrap.dedent(
    """
    import os, resource, sys, torch
    from layerscope.allocator import tune_cpu_allocator
    print(tune_cpu_allocator(), file=sys.stderr)
    torch.empty(54 << 18).fill_(1.0)  # the first one may fault in either case
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(54 << 18).fill_(1.0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(env_value: str | None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop(allocator.ENV, None)
    if env_value is not None:
        env[allocator.ENV] = env_value
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip()), out.stderr.strip().splitlines()[-1]


@glibc
def test_tuned_heap_reuses_large_tensors_and_system_keeps_glibc_defaults():
    tuned, said = _faults(None)
    assert said == "True"
    pages = (54 << 20) // 4096  # one tensor's worth of first touches
    assert tuned < 3 * pages, tuned  # measured: one tensor's pages (the heap grows once), then reuse
    system, said = _faults("system")
    assert said == "False"
    assert system > 15 * pages, system  # glibc's defaults: fresh pages for each of the 20 (measured: 20)


def test_once_per_process_and_switch(monkeypatch):
    monkeypatch.setattr(allocator, "_state", {})
    monkeypatch.setenv(allocator.ENV, "system")
    assert allocator.tune_cpu_allocator() is False
    monkeypatch.delenv(allocator.ENV)
    assert allocator.tune_cpu_allocator() is False  # decided once per process
