"""Spectral shifts as a PEFT tuner type (`SPECTRAL_SHIFT`)."""

from .config import SpectralShiftConfig, SpectralShiftPeftType
from .layer import Conv2d, Embedding, GroupNorm, LayerNorm, Linear, SpectralShiftLayer
from .model import SpectralShiftModel, remove_spectral_layers, resolve_targets, spectral_layers, svd_options
from .registration import register_spectral_shift


register_spectral_shift()

__all__ = [
    "Conv2d",
    "Embedding",
    "GroupNorm",
    "LayerNorm",
    "Linear",
    "SpectralShiftConfig",
    "SpectralShiftLayer",
    "SpectralShiftModel",
    "SpectralShiftPeftType",
    "register_spectral_shift",
    "remove_spectral_layers",
    "resolve_targets",
    "spectral_layers",
    "svd_options",
]
