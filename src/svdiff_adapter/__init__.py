"""svdiff-adapter: SVDiff spectral shifts as a diffusers-native, PEFT-compatible adapter format.

Importing the package registers the `SPECTRAL_SHIFT` tuner type with PEFT. The public API is listed in `__all__`
and documented in docs/api.md; docs/architecture.md maps the modules.
"""

from .format import (
    DEFAULT_WEIGHT_NAME,
    FORMAT_VERSION,
    SpectralFactorMismatchError,
    SpectralShiftFile,
    SpectralShiftFormatError,
    WrongBaseModelError,
    load_shift_file,
    save_shift_file,
)
from .loaders import (
    PIPELINE_EXPORTS,
    SpectralShiftNotFoundError,
    add_spectral_shift,
    enable_spectral_switch_cache,
    get_spectral_shift_state_dict,
    hotswap_spectral_shift,
    load_spectral_shift,
    load_spectral_shift_adapter,
    load_spectral_shift_into_model,
    pipeline_attribute,
    save_spectral_shift,
    set_spectral_build_dtype,
    set_spectral_factor_location,
    set_spectral_shift_build_dtype,
    spectral_adapter_names,
    unload_spectral_shift,
)
from .svd import SpectralFactors, SVDCache, TruncatedSVD, compute_factors
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
    "SpectralFactorMismatchError",
    "SpectralFactors",
    "SpectralShiftConfig",
    "SpectralShiftFile",
    "SpectralShiftFormatError",
    "SpectralShiftLayer",
    "SpectralShiftModel",
    "SpectralShiftNotFoundError",
    "SpectralShiftPeftType",
    "ToolError",
    "TruncatedSVD",
    "WrongBaseModelError",
    "add_spectral_shift",
    "compute_factors",
    "enable_spectral_switch_cache",
    "export_lora",
    "extract_shift",
    "get_spectral_shift_state_dict",
    "hotswap_spectral_shift",
    "inspect_shift",
    "load_shift_file",
    "load_spectral_shift",
    "load_spectral_shift_adapter",
    "load_spectral_shift_into_model",
    "merge_shifts",
    "offload_spectral_layers",
    "pull_shift",
    "push_shift",
    "register_spectral_shift",
    "save_shift_file",
    "save_spectral_shift",
    "set_spectral_build_dtype",
    "set_spectral_factor_location",
    "set_spectral_shift_build_dtype",
    "spectral_adapter_names",
    "svd_options",
    "svdiff_pytorch_to_v1",
    "unload_spectral_shift",
    "v1_to_svdiff_pytorch",
    *PIPELINE_EXPORTS,
]


def __getattr__(name):
    return pipeline_attribute(__name__, name)
