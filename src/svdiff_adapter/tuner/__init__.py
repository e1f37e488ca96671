"""Spectral shifts as a PEFT tuner type (`SPECTRAL_SHIFT`)."""

from .config import SpectralShiftConfig, SpectralShiftPeftType
from .layer import Conv2d, Embedding, GroupNorm, LayerNorm, Linear, SpectralShiftLayer
from .model import SpectralShiftModel, remove_spectral_layers, resolve_targets, spectral_layers, svd_options
from .offload import SpectralOffloadHook, offload_spectral_layers
from .registration import register_spectral_shift


register_spectral_shift()

__all__ = [
    "Conv2d",
    "Embedding",
    "GroupNorm",
    "LayerNorm",
    "Linear",
    "SpectralOffloadHook",
    "SpectralShiftConfig",
    "SpectralShiftLayer",
    "SpectralShiftModel",
    "SpectralShiftPeftType",
    "offload_spectral_layers",
    "register_spectral_shift",
    "remove_spectral_layers",
    "resolve_targets",
    "spectral_layers",
    "svd_options",
]
