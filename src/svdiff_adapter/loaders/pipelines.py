"""Drop-in pipeline classes with `SpectralShiftLoaderMixin`, and `patch_diffusers()` for diffusers' own classes."""

from __future__ import annotations

import diffusers

from .pipeline import SpectralShiftLoaderMixin


class StableDiffusionPipeline(SpectralShiftLoaderMixin, diffusers.StableDiffusionPipeline):
    """diffusers' `StableDiffusionPipeline` with `SpectralShiftLoaderMixin`."""


class StableDiffusionImg2ImgPipeline(SpectralShiftLoaderMixin, diffusers.StableDiffusionImg2ImgPipeline):
    """diffusers' `StableDiffusionImg2ImgPipeline` with `SpectralShiftLoaderMixin`."""


class StableDiffusionInpaintPipeline(SpectralShiftLoaderMixin, diffusers.StableDiffusionInpaintPipeline):
    """diffusers' `StableDiffusionInpaintPipeline` with `SpectralShiftLoaderMixin`."""


class StableDiffusionXLPipeline(SpectralShiftLoaderMixin, diffusers.StableDiffusionXLPipeline):
    """diffusers' `StableDiffusionXLPipeline` with `SpectralShiftLoaderMixin`."""


class StableDiffusionXLImg2ImgPipeline(SpectralShiftLoaderMixin, diffusers.StableDiffusionXLImg2ImgPipeline):
    """diffusers' `StableDiffusionXLImg2ImgPipeline` with `SpectralShiftLoaderMixin`."""


class StableDiffusionXLInpaintPipeline(SpectralShiftLoaderMixin, diffusers.StableDiffusionXLInpaintPipeline):
    """diffusers' `StableDiffusionXLInpaintPipeline` with `SpectralShiftLoaderMixin`."""


DROP_IN_CLASSES = (
    StableDiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)
PIPELINE_CLASS_NAMES = tuple(cls.__name__ for cls in DROP_IN_CLASSES)


def drop_in_name(cls: type) -> str:
    """The name of the drop-in class a pipeline class corresponds to (for usage snippets)."""
    for klass in cls.__mro__:
        if klass.__name__ in PIPELINE_CLASS_NAMES:
            return klass.__name__
    return "StableDiffusionPipeline"


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

    Patches the Stable Diffusion / SDXL text-to-image, img2img and inpaint pipelines, every already imported subclass
    of diffusers' SD/SDXL LoRA loader mixins, and `extra_classes`. The methods are set on the classes, so pipelines
    built before the call get them too. `isinstance(pipe, SpectralShiftLoaderMixin)` stays False for patched
    diffusers classes; test `hasattr(pipe, "load_spectral_shift")`.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    classes = [getattr(diffusers, name) for name in PIPELINE_CLASS_NAMES] + list(extra_classes)
    pending = [StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin]
    while pending:
        for sub in pending.pop().__subclasses__():
            pending.append(sub)
            if issubclass(sub, diffusers.DiffusionPipeline):
                classes.append(sub)
    attributes = _mixin_attributes()
    patched = []
    for cls in dict.fromkeys(classes):
        if issubclass(cls, SpectralShiftLoaderMixin) or cls.__dict__.get("_svdiff_patched"):
            continue
        for name, value in attributes.items():
            setattr(cls, name, value)
        cls._svdiff_patched = True
        patched.append(cls)
    return patched
