"""Where a spectral layer keeps its SVD factors U, σ, Vᵀ, and their float32 copies while δ trains.

`factor_location` (docs/performance.md, "Where the factors live"): "device" keeps them with the weight, following
`.to()`; "cpu" and "disk" (memory-mapped from the SVD cache) keep them on the CPU, and every use copies them to the
weight's device for that use only. The values are the same wherever they rest, so outputs do not depend on it.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..svd import SpectralFactors


FACTOR_BUFFERS = ("spectral_U", "spectral_S", "spectral_Vh")


class SpectralFactorStorage:  # placed before nn.Module in the layer's bases
    """Mixin of `SpectralShiftLayer`: the factor buffers' placement, dtype while training, and moves.

    The layer sets `spectral_U/S/Vh` (buffers), `spectral_factor_location`, `_spectral_storage_dtype` (set while the
    factors are upcast for training) and `_resting_factors` (the resting tensors while float32 copies train, for
    factors kept off the device).
    """

    def move_factors(self, device: torch.device) -> None:
        """Move U, σ and Vᵀ (e.g. off the accelerator while none of the layer's adapters is used there); factors
        kept off the device (`factor_location` "cpu" / "disk") stay where they are."""
        if self.spectral_factor_location != "device":
            return
        if self.uses_factors and self.spectral_S.device != torch.device(device):
            self.spectral_U, self.spectral_S, self.spectral_Vh = (
                getattr(self, name).to(device) for name in FACTOR_BUFFERS
            )
        self.spectral_cache.clear(adapter_matrices=True)  # rebuilt where the factors are, when used

    def resting_factors(self) -> SpectralFactors:
        """The factors in their storage dtype where they rest (training copies dropped, exactly)."""
        self._float32_factors(False)
        return SpectralFactors(self.spectral_U, self.spectral_S, self.spectral_Vh, self.spectral_truncation,
                               self.spectral_factors_computed_on, self.spectral_factor_location)

    def set_factor_location(self, factors: SpectralFactors) -> None:
        """Keep these factors (the layer's own, moved: `loaders.set_spectral_factor_location`) where they are."""
        self._float32_factors(False)
        self.spectral_U, self.spectral_S, self.spectral_Vh = factors.U, factors.S, factors.Vh
        self.spectral_factor_location = factors.location
        self.spectral_cache.clear(adapter_matrices=True)

    def working_factors(self) -> tuple[Optional[torch.Tensor], ...]:
        """U, σ, Vᵀ on the weight's device: the resting ones, or copies of factors kept on the CPU (freed after use)."""
        device = self.base_layer.weight.device
        return tuple(None if t is None else t.to(device) for t in (self.spectral_U, self.spectral_S,
                                                                    self.spectral_Vh))

    def _float32_factors(self, training: bool) -> None:
        """Hold U and Vᵀ in float32 on the weight's device while δ trains, in their storage dtype (and resting place)
        otherwise.

        The maths runs in float32 either way; converting float16 factors on every training step cost a copy of all
        factors in the forward and again in the backward (seconds per step, and float32 copies kept alive for the
        backward). Both conversions are exact, so the factors come back bit for bit. Factors kept off the device
        rest where they are (a memory-mapped file stays one) while the copies train.
        """
        if not self.uses_factors:
            return
        if self.spectral_factor_location != "device":
            if training and self._resting_factors is None:
                self._resting_factors = tuple(getattr(self, name) for name in FACTOR_BUFFERS)
                self._spectral_storage_dtype = self.spectral_U.dtype
                device = self.base_layer.weight.device
                self.spectral_U, self.spectral_S, self.spectral_Vh = (
                    t.to(device, torch.float32) for t in self._resting_factors)
            elif not training and self._resting_factors is not None:
                self.spectral_U, self.spectral_S, self.spectral_Vh = self._resting_factors
                self._resting_factors, self._spectral_storage_dtype = None, None
            return
        if training and self.spectral_U.dtype != torch.float32:
            self._spectral_storage_dtype = self.spectral_U.dtype
            self.spectral_U, self.spectral_Vh = self.spectral_U.float(), self.spectral_Vh.float()
        elif not training and self._spectral_storage_dtype is not None:
            dtype, self._spectral_storage_dtype = self._spectral_storage_dtype, None
            self.spectral_U, self.spectral_Vh = self.spectral_U.to(dtype), self.spectral_Vh.to(dtype)

    def _apply(self, fn, recurse=True):
        """`nn.Module._apply` for everything else; the factors follow device moves (when kept with the weight) but
        keep their storage dtype: `.half()`/`.to(bf16)` would throw away precision and `.float()` would double their
        memory. The target device is probed with an empty tensor."""
        self.spectral_cache.clear(adapter_matrices=True)  # rebuilt on the new device/dtype at the next forward
        if self.spectral_factor_location != "device":
            self._float32_factors(False)  # drop training copies: made again where the weight goes
        factors = {name: self._buffers[name] for name in FACTOR_BUFFERS if self._buffers.get(name) is not None}
        for name in factors:
            self._buffers[name] = None
        result = super()._apply(fn, recurse)
        for name, tensor in factors.items():
            device = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device)).device
            self._buffers[name] = tensor.to(device) if self.spectral_factor_location == "device" else tensor
        return result
