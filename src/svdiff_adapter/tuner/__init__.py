"""Spectral shifts as a PEFT tuner type (`SPECTRAL_SHIFT`)."""

from .config import SpectralShiftConfig, SpectralShiftPeftType
from .layer import Conv2d, Embedding, GroupNorm, LayerNorm, Linear, SpectralShiftLayer
from .model import SpectralShiftModel, remove_spectral_layers, spectral_layers, svd_options
from .offload import SpectralOffloadHook, offload_spectral_layers
from .registration import register_spectral_shift
from .targets import ShiftDoesNotFitError, ShiftTarget, fit_shifts, module_kind, resolve_targets


register_spectral_shift()

__all__ = [
    "Conv2d",
    "Embedding",
    "GroupNorm",
    "LayerNorm",
    "Linear",
    "ShiftDoesNotFitError",
    "ShiftTarget",
    "SpectralOffloadHook",
    "SpectralShiftConfig",
    "SpectralShiftLayer",
    "SpectralShiftModel",
    "SpectralShiftPeftType",
    "fit_shifts",
    "module_kind",
    "offload_spectral_layers",
    "register_spectral_shift",
    "remove_spectral_layers",
    "resolve_targets",
    "spectral_layers",
    "svd_options",
]
