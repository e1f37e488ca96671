"""Process memory on Linux and the timed-steps loop, without dependencies: shared by the project's benchmarks and the anchor scripts that run
in other virtual environments (they put this folder on sys.path)."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Callable, Optional


def status_bytes(field: str) -> Optional[int]:
    """A byte count from /proc/self/status (e.g. "VmRSS", "VmHWM"); None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_now() -> Optional[int]:
    """Current resident set size in bytes."""
    return status_bytes("VmRSS")


def max_rss() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``, kilobytes on Linux), in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux ≥ 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def time_steps(step: Callable[[int], float], warmup: int, steps: int, label: str, row: dict) -> dict:
    """Run `step(index)` for `warmup + steps` indices (it returns the loss); wall/CPU times, losses and peak RSS.

    `row` must hold "steps_peak_rss_reset" (from `reset_peak_rss()` just before) and "setup_peak_rss_bytes".
    """
    walls, cpus, losses = [], [], []
    for index in range(warmup + steps):
        wall, cpu = time.perf_counter(), time.process_time()
        losses.append(step(index))
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        print(f"[{label}] step {index}: {walls[-1]:.3f} s", file=sys.stderr, flush=True)
    return {
        "steps_peak_rss_bytes": status_bytes("VmHWM") if row["steps_peak_rss_reset"] else None,
        "peak_rss_bytes": max(row["setup_peak_rss_bytes"], max_rss()),
        "first_step_s": walls[0],
        "warmup_s": walls[:warmup],
        "step_s": statistics.median(walls[warmup:]),
        "step_all_s": walls[warmup:],
        "step_cpu_s": statistics.median(cpus[warmup:]),
        "losses": losses,
    }
