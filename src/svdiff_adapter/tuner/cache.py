"""`SpectralWeightCache`: what a spectral layer keeps between inference calls, and what it was built from."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch


class SpectralWeightCache:
    """What a layer keeps between inference calls, and what it was built from.

    Attributes:
        weight: W_δ of the active adapters (None when nothing is cached), refreshed in place when shape, dtype and
            device allow: a compiled graph reads it as an input, so swapping shifts does not recompile.
        key: the identity of everything `weight` depends on (each active δ's version and storage, the weights wᵢ,
            the base weight's storage, version, device and dtype, the build dtype); another key means rebuild.
        scales: the (adapter, wᵢ) pairs `weight` was built with, which a compiled graph can compare.
        switch_enabled / adapter_matrices: the switch cache, adapter → (its key, Dᵢ = U·diag(δᵢ)·Vᵀ).
    """

    def __init__(self) -> None:
        self.weight: Optional[torch.Tensor] = None
        self.key: Any = None
        self.scales: Optional[tuple] = None
        self.switch_enabled = False
        self.adapter_matrices: dict[str, tuple[Any, torch.Tensor]] = {}

    def clear(self, adapter_matrices: bool = False) -> None:
        """Forget the cached weight (and, if asked, the per-adapter matrices): the one place memory is released."""
        self.weight, self.key, self.scales = None, None, None
        if adapter_matrices:
            self.adapter_matrices.clear()

    def store(self, fresh: torch.Tensor, key: Any, scales: tuple) -> torch.Tensor:
        current = self.weight
        if current is not None and (current.shape, current.dtype, current.device) == (
            fresh.shape, fresh.dtype, fresh.device
        ):
            current.copy_(fresh)
        else:
            self.weight = fresh
        self.key, self.scales = key, scales
        return self.weight

    def adapter_matrix(self, adapter: str, key: Any, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        cached = self.adapter_matrices.get(adapter)
        if cached is None or cached[0] != key:
            cached = (key, build())
            self.adapter_matrices[adapter] = cached
        return cached[1]
