"""Loading and saving spectral shifts (model level; the pipeline mixin builds on these)."""

from .model import (
    add_spectral_shift,
    get_spectral_shift_state_dict,
    load_spectral_shift,
    load_spectral_shift_into_model,
    save_spectral_shift,
    spectral_adapter_names,
    to_shift_file,
    unload_spectral_shift,
)

__all__ = [
    "add_spectral_shift",
    "get_spectral_shift_state_dict",
    "load_spectral_shift",
    "load_spectral_shift_into_model",
    "save_spectral_shift",
    "spectral_adapter_names",
    "to_shift_file",
    "unload_spectral_shift",
]
