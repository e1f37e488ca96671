"""Drop-in pipeline classes with `SpectralShiftLoaderMixin`, and `patch_diffusers()` for diffusers' own classes."""

from __future__ import annotations

import diffusers
from diffusers.loaders.lora_base import LoraBaseMixin

from .pipeline import SpectralShiftLoaderMixin


def _drop_in(base: type) -> type:
    """`class <Name>(SpectralShiftLoaderMixin, diffusers.<Name>)`, documented and importable from this module."""
    return type(base.__name__, (SpectralShiftLoaderMixin, base), {
        "__doc__": f"diffusers' `{base.__name__}` with `SpectralShiftLoaderMixin`.", "__module__": __name__,
    })


# UNet pipelines (text-to-image, img2img, inpaint) and the text-to-image pipeline of each transformer family the
# tests cover; `patch_diffusers()` gives every other diffusers pipeline with a LoRA loader the same methods.
PIPELINE_CLASS_NAMES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusion3Pipeline",
    "FluxPipeline",
    "Flux2Pipeline",
    "QwenImagePipeline",
    "WanPipeline",
    "SanaPipeline",
)
DROP_IN_CLASSES = tuple(_drop_in(getattr(diffusers, name)) for name in PIPELINE_CLASS_NAMES)
globals().update({cls.__name__: cls for cls in DROP_IN_CLASSES})  # `from .pipelines import FluxPipeline`


def diffusers_pipeline_name(cls: type) -> str:
    """The name of the diffusers pipeline class a (drop-in, patched or user) pipeline class derives from."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("diffusers.pipelines.") and issubclass(klass, diffusers.DiffusionPipeline):
            return klass.__name__
    return "DiffusionPipeline"


def lora_pipeline_classes() -> list[type]:
    """Every diffusers pipeline class with a LoRA loader: the public ones (importing each, ~2 s) and any subclass
    already defined (user classes included)."""
    classes = []
    for name in dir(diffusers):
        if name.endswith("Pipeline"):
            try:
                value = getattr(diffusers, name)
            except (ImportError, AttributeError):  # optional dependencies diffusers reports as missing
                continue
            if isinstance(value, type) and issubclass(value, LoraBaseMixin):
                classes.append(value)
    pending = [LoraBaseMixin]
    while pending:
        for sub in pending.pop().__subclasses__():
            pending.append(sub)
            if issubclass(sub, diffusers.DiffusionPipeline):
                classes.append(sub)
    return list(dict.fromkeys(classes))


def _mixin_attributes() -> dict[str, object]:
    """Every method of the mixin and its bases, the most derived first (what `patch_diffusers` copies)."""
    attributes: dict[str, object] = {}
    for klass in SpectralShiftLoaderMixin.__mro__[:-1]:  # without `object`
        for name, value in klass.__dict__.items():
            if not (name.startswith("__") and name.endswith("__")):
                attributes.setdefault(name, value)
    return attributes


def patch_diffusers(*extra_classes: type) -> list[type]:
    """Give diffusers' own pipeline classes the mixin's methods (idempotent); returns the classes patched now.

    Patches every diffusers pipeline class with a LoRA loader mixin (Stable Diffusion, SDXL, SD3, Flux, Flux.2,
    Qwen-Image, Wan, Sana, ... — each one's components are its `_lora_loadable_modules`), every already defined
    subclass of them, and `extra_classes`. The methods are set on the classes, so pipelines built before the call get
    them too. `isinstance(pipe, SpectralShiftLoaderMixin)` stays False for patched diffusers classes; test
    `hasattr(pipe, "load_spectral_shift")`.
    """
    attributes = _mixin_attributes()
    patched = []
    for cls in dict.fromkeys(lora_pipeline_classes() + list(extra_classes)):
        if issubclass(cls, SpectralShiftLoaderMixin) or cls.__dict__.get("_svdiff_patched"):
            continue
        for name, value in attributes.items():
            setattr(cls, name, value)
        cls._svdiff_patched = True
        patched.append(cls)
    return patched
