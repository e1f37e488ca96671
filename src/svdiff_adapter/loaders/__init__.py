"""Loading and saving spectral shifts (model level; the pipeline mixin builds on these)."""

from .model import (
    add_spectral_shift,
    enable_spectral_switch_cache,
    get_spectral_shift_state_dict,
    load_spectral_shift,
    load_spectral_shift_into_model,
    save_spectral_shift,
    set_spectral_build_dtype,
    spectral_adapter_names,
    to_shift_file,
    unload_spectral_shift,
)

__all__ = [
    "add_spectral_shift",
    "enable_spectral_switch_cache",
    "get_spectral_shift_state_dict",
    "load_spectral_shift",
    "load_spectral_shift_into_model",
    "save_spectral_shift",
    "set_spectral_build_dtype",
    "spectral_adapter_names",
    "to_shift_file",
    "unload_spectral_shift",
]

# Pipeline-level API (imports diffusers' pipelines, so it is loaded on first use).
_PIPELINE_EXPORTS = (
    "SpectralShiftLoaderMixin",
    "patch_diffusers",
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
)
__all__ += list(_PIPELINE_EXPORTS)


def __getattr__(name):
    if name in _PIPELINE_EXPORTS:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
