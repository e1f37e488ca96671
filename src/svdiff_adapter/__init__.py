"""svdiff-adapter: SVDiff spectral shifts as a diffusers-native, PEFT-compatible adapter format.

Importing the package registers the `SPECTRAL_SHIFT` tuner type with PEFT.
"""

from .format import (
    DEFAULT_WEIGHT_NAME,
    FORMAT_VERSION,
    SpectralShiftFile,
    SpectralShiftFormatError,
    load_shift_file,
    save_shift_file,
)
from .loaders import (
    _PIPELINE_EXPORTS,
    add_spectral_shift,
    enable_spectral_switch_cache,
    get_spectral_shift_state_dict,
    load_spectral_shift,
    load_spectral_shift_into_model,
    save_spectral_shift,
    set_spectral_build_dtype,
    spectral_adapter_names,
    unload_spectral_shift,
)
from .svd import SpectralFactors, SVDCache, compute_factors
from .tools import (
    ToolError,
    export_lora,
    extract_shift,
    inspect_shift,
    merge_shifts,
    pull_shift,
    push_shift,
    svdiff_pytorch_to_v1,
    v1_to_svdiff_pytorch,
)
from .tuner import (
    SpectralShiftConfig,
    SpectralShiftLayer,
    SpectralShiftModel,
    SpectralShiftPeftType,
    offload_spectral_layers,
    register_spectral_shift,
    svd_options,
)


__version__ = "0.1.0.dev0"

__all__ = [
    "DEFAULT_WEIGHT_NAME",
    "FORMAT_VERSION",
    "SVDCache",
    "SpectralFactors",
    "SpectralShiftConfig",
    "SpectralShiftFile",
    "SpectralShiftFormatError",
    "SpectralShiftLayer",
    "SpectralShiftModel",
    "SpectralShiftPeftType",
    "ToolError",
    "add_spectral_shift",
    "compute_factors",
    "enable_spectral_switch_cache",
    "export_lora",
    "extract_shift",
    "get_spectral_shift_state_dict",
    "inspect_shift",
    "load_shift_file",
    "load_spectral_shift",
    "load_spectral_shift_into_model",
    "merge_shifts",
    "offload_spectral_layers",
    "pull_shift",
    "push_shift",
    "register_spectral_shift",
    "save_shift_file",
    "save_spectral_shift",
    "set_spectral_build_dtype",
    "spectral_adapter_names",
    "svd_options",
    "svdiff_pytorch_to_v1",
    "unload_spectral_shift",
    "v1_to_svdiff_pytorch",
]
# Pipelines load on first use (importing diffusers' pipelines takes seconds): `SpectralShiftLoaderMixin`,
# `patch_diffusers()` and the drop-in `StableDiffusionPipeline`, `StableDiffusionXLPipeline`, img2img / inpaint variants.
__all__ += list(_PIPELINE_EXPORTS)


def __getattr__(name):
    if name in _PIPELINE_EXPORTS:
        from . import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
