"""Process memory on Linux, without dependencies: shared by the project's benchmarks and the anchor scripts that run
in other virtual environments (they put this folder on sys.path)."""

from __future__ import annotations

import resource
from typing import Optional


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
