"""Loading and saving spectral shifts: model level (`model`, `hotswap`), the Hub (`hub`), and the pipeline mixin
(`pipeline`, `diffusers_methods`, `pipelines`), which builds on the model level."""

import importlib

from .hotswap import hotswap_spectral_shift
from .hub import SpectralShiftNotFoundError
from .model import (
    add_spectral_shift,
    enable_spectral_switch_cache,
    get_spectral_shift_state_dict,
    load_spectral_shift,
    load_spectral_shift_adapter,
    load_spectral_shift_into_model,
    save_spectral_shift,
    set_spectral_build_dtype,
    set_spectral_factor_location,
    set_spectral_shift_build_dtype,
    spectral_adapter_names,
    to_shift_file,
    unload_spectral_shift,
)

__all__ = [
    "SpectralShiftNotFoundError",
    "add_spectral_shift",
    "enable_spectral_switch_cache",
    "get_spectral_shift_state_dict",
    "hotswap_spectral_shift",
    "load_spectral_shift",
    "load_spectral_shift_adapter",
    "load_spectral_shift_into_model",
    "save_spectral_shift",
    "set_spectral_build_dtype",
    "set_spectral_factor_location",
    "set_spectral_shift_build_dtype",
    "spectral_adapter_names",
    "to_shift_file",
    "unload_spectral_shift",
]

# Pipeline-level API: importing diffusers' pipelines takes seconds, so these load on first use.
PIPELINE_EXPORTS = {
    "SpectralShiftLoaderMixin": "pipeline",
    "patch_diffusers": "pipelines",
    "StableDiffusionPipeline": "pipelines",
    "StableDiffusionImg2ImgPipeline": "pipelines",
    "StableDiffusionInpaintPipeline": "pipelines",
    "StableDiffusionXLPipeline": "pipelines",
    "StableDiffusionXLImg2ImgPipeline": "pipelines",
    "StableDiffusionXLInpaintPipeline": "pipelines",
    "StableDiffusion3Pipeline": "pipelines",
    "FluxPipeline": "pipelines",
    "Flux2Pipeline": "pipelines",
    "QwenImagePipeline": "pipelines",
    "WanPipeline": "pipelines",
    "SanaPipeline": "pipelines",
}
__all__ += list(PIPELINE_EXPORTS)


def pipeline_attribute(module_name: str, name: str):
    """A pipeline-level name, imported on first use (the `__getattr__` of this package and of the top level)."""
    if name in PIPELINE_EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{PIPELINE_EXPORTS[name]}"), name)
    raise AttributeError(f"module {module_name!r} has no attribute {name!r}")


def __getattr__(name):
    return pipeline_attribute(__name__, name)
