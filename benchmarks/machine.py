"""What the benchmarks print about the machine they ran on (shared by the bench_*.py scripts)."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def n_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def fs_op_us(folder: str | Path, n: int = 50) -> tuple[float, float]:
    """Microseconds per ``mkdir`` and per file creation in a fresh folder under ``folder`` (median of ``n``): what
    a store's folders and chunk files cost there. On the benchmarks' 2-core VM these took about 750 us under /tmp
    and about 20 us under /var/tmp, on the same ext4 disk."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="ls_fsprobe_", dir=folder))
    mk, cr = [], []
    try:
        for i in range(n):
            t = time.perf_counter()
            os.mkdir(root / f"d{i}")
            t1 = time.perf_counter()
            os.close(os.open(root / f"d{i}" / "f", os.O_WRONLY | os.O_CREAT, 0o644))
            mk.append(t1 - t)
            cr.append(time.perf_counter() - t1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return statistics.median(mk) * 1e6, statistics.median(cr) * 1e6


def git_head() -> str:
    try:  # read-only
        out = subprocess.run(
            ["git", "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class CpuShare:
    """Busy CPU time of the whole machine (/proc/stat) minus this process's, over an interval.

    ``other`` is the mean number of cores other processes kept busy; 0 on an idle machine.
    """

    def __init__(self) -> None:
        self.other: float | None = None
        self.ours: float | None = None
        self.wall = 0.0

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        vals = [int(x) for x in fields]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        steal = vals[7] if len(vals) > 7 else 0
        guest = sum(vals[8:10]) if len(vals) > 9 else 0  # already counted in user/nice
        return (sum(vals) - idle - steal - guest) / os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self._t0 = time.perf_counter()
        self._b0 = self._busy()
        t = os.times()
        self._c0 = t.user + t.system
        return self

    def __exit__(self, *exc):
        self.wall = wall = time.perf_counter() - self._t0
        b1 = self._busy()
        t = os.times()
        ours = t.user + t.system - self._c0
        self.ours = ours / wall if wall > 0 else None
        if self._b0 is not None and b1 is not None and wall > 0:
            self.other = max(0.0, (b1 - self._b0 - ours) / wall)


def combine(shares: "list[CpuShare]") -> CpuShare:
    """One CpuShare for several intervals: ``other`` and ``ours`` averaged with the intervals' wall times as weights,
    ``wall`` their sum."""
    out = CpuShare()
    out.wall = sum(s.wall for s in shares)
    for name in ("other", "ours"):
        vals = [(getattr(s, name), s.wall) for s in shares]
        if out.wall > 0 and all(v is not None for v, _ in vals):
            setattr(out, name, sum(v * w for v, w in vals) / out.wall)
    return out


def replace_section(results: Path, header: str, body: str) -> None:
    """Put ``body`` (starting with the ``header`` line) into RESULTS.md in place of that section, or append it."""
    text = results.read_text() if results.exists() else ""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == header), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n\n" + body
    else:
        end, fence = len(lines), False
        for i in range(start + 1, len(lines)):
            if lines[i].startswith("```"):
                fence = not fence
            elif not fence and re.match(r"^#{1,2} ", lines[i]):
                end = i
                break
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + body + ("\n\n" + tail if tail else "")
    results.write_text(new.rstrip("\n") + "\n")


def median_time(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function over ``repeats`` runs after one warm-up of each, the order rotated from
    repeat to repeat (so no variant always runs first after the warm-up)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for k in names:  # warm-up
        fns[k]()
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
