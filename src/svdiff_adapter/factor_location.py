"""Where a layer's SVD factors U, σ, Vᵀ live between the moments they are used (docs/performance.md, "Where the
factors live").

The factors are needed only to build W_δ (a load, `set_adapters`, a fuse, a hotswap) and while δ trains; an
inference forward reads the cached or fused weight. So they need not sit on the accelerator:

- `"device"`: with the weight, following `.to()`. Rebuilds never move data; costs device memory (full spectrum:
  float16 U and Vᵀ take about 1.25–1.4× a bfloat16 weight; `spectral_rank=64` about 2–4 % of it for 3072-wide
  matrices).
- `"cpu"`: in host memory. Each build copies one layer's factors to the weight's device and frees the copy after;
  training keeps float32 copies on the device while δ trains and drops them at the next inference build.
- `"disk"`: like `"cpu"`, but the host copy is the SVD cache's file, memory-mapped: clean pages the OS may drop
  and read again, for hosts whose memory cannot hold the factors either. Needs the SVD cache (an uncacheable
  entry falls back to `"cpu"`, with a warning).
- `"auto"` (the default): `"device"` for weights on the CPU (there the two are the same) and when all new factors
  of a load on an accelerator take at most half of its free memory; `"cpu"` otherwise.

Numerically the locations are identical: the same factor values enter the same products on the weight's device.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable, Mapping, Optional

import torch


logger = logging.getLogger(__name__)

FACTOR_LOCATIONS = ("auto", "device", "cpu", "disk")
# "auto" keeps the factors on an accelerator while they take at most this share of its free memory.
AUTO_DEVICE_SHARE = 0.5


def check_factor_location(location: str) -> None:
    if location not in FACTOR_LOCATIONS:
        raise ValueError(f"`factor_location` should be one of {list(FACTOR_LOCATIONS)}, got {location!r}.")


def factor_bytes(shape, kept: int, factor_dtype: torch.dtype) -> int:
    """Bytes of the factors of an m × n matrix keeping `kept` triplets: U (m × k) and Vᵀ (k × n) in
    `factor_dtype`, σ in float32."""
    rows, cols = shape[-2], shape[-1]
    return kept * (rows + cols) * torch.empty(0, dtype=factor_dtype).element_size() + 4 * kept


def free_device_bytes(device: torch.device) -> Optional[int]:
    """Free memory of an accelerator, or None where torch cannot tell."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return None


def resolve_factor_locations(location: str, devices: Mapping[str, torch.device], sizes: Mapping[str, int],
                             free_bytes: Callable[[torch.device], Optional[int]] = free_device_bytes
                             ) -> dict[str, str]:
    """The concrete location ("device", "cpu" or "disk") of each matrix's new factors: `devices` are the weights'
    devices and `sizes` the factors' bytes, by name; `free_bytes` tells an accelerator's free memory."""
    check_factor_location(location)
    if location != "auto":
        return {name: location for name in devices}
    wanted: dict[torch.device, int] = defaultdict(int)
    for name, device in devices.items():
        wanted[device] += sizes[name]
    fits = {}
    for device, total in wanted.items():
        free = free_bytes(device) if device.type != "cpu" else None
        fits[device] = device.type == "cpu" or free is None or total <= AUTO_DEVICE_SHARE * free
        if not fits[device]:
            logger.info("SVD factors (%.2f GiB) kept in CPU memory: they would take more than %d%% of the %.2f GiB "
                        "free on %s (factor_location='device' keeps them there).", total / 2**30,
                        AUTO_DEVICE_SHARE * 100, free / 2**30, device)
    return {name: "device" if fits[device] else "cpu" for name, device in devices.items()}
