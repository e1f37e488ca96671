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
    add_spectral_shift,
    get_spectral_shift_state_dict,
    load_spectral_shift,
    load_spectral_shift_into_model,
    save_spectral_shift,
    spectral_adapter_names,
    unload_spectral_shift,
)
from .svd import SpectralFactors, SVDCache, compute_factors
from .tuner import (
    SpectralShiftConfig,
    SpectralShiftLayer,
    SpectralShiftModel,
    SpectralShiftPeftType,
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
    "add_spectral_shift",
    "compute_factors",
    "get_spectral_shift_state_dict",
    "load_shift_file",
    "load_spectral_shift",
    "load_spectral_shift_into_model",
    "register_spectral_shift",
    "save_shift_file",
    "save_spectral_shift",
    "spectral_adapter_names",
    "svd_options",
    "unload_spectral_shift",
]

# Pipelines (loaded on first use: importing diffusers' pipelines takes a while): `SpectralShiftLoaderMixin`,
# `patch_diffusers()` and drop-in `StableDiffusionPipeline`, `StableDiffusionXLPipeline`, img2img / inpaint variants.
from .loaders import _PIPELINE_EXPORTS  # noqa: E402

__all__ += list(_PIPELINE_EXPORTS)


def __getattr__(name):
    if name in _PIPELINE_EXPORTS:
        from .loaders import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Tools (issue 7): inspect, merge, convert, export to LoRA, extract, push/pull. CLI: `svdiff` (svdiff_adapter.cli).
from .tools import (  # noqa: E402
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

__all__ += [
    "ToolError",
    "export_lora",
    "extract_shift",
    "inspect_shift",
    "merge_shifts",
    "pull_shift",
    "push_shift",
    "svdiff_pytorch_to_v1",
    "v1_to_svdiff_pytorch",
]
