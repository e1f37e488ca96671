"""The input image and the VAE: reading and sizing the image, latents in and out, the side-by-side strip, PNG files
written atomically."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..training.images import check_image_size, load_image, to_rgb


logger = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, Image.Image]


def prepare_image(image: ImageInput, multiple: int, resolution: Optional[int] = None) -> Image.Image:
    """The image to edit as RGB, with sides that are multiples of `multiple` (the VAE's downsampling factor).

    A path is read with EXIF rotation and any mode (L, P, RGBA, CMYK, 16-bit) converted to RGB; an unreadable file
    raises `TrainingDataError` naming it, and so does an image with more pixels than PIL's decompression-bomb limit or
    sides differing by more than `MAX_ASPECT_RATIO` (4×; the edit keeps the shape, so a 4000×2 image would be edited
    at 64000×32). With `resolution`, the shorter side is resized to it first (aspect kept). Sides that are not
    multiples of `multiple` are center-cropped down to one, with a warning that says so.
    """
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    else:
        check_image_size(image.size, "to edit")
        image = to_rgb(image)
    width, height = image.size
    if resolution is not None and min(width, height) != resolution:
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        logger.info("Resized the input image from %d×%d to %d×%d (shorter side %d).", width, height, *size, resolution)
        image = image.resize(size, Image.Resampling.LANCZOS)
        width, height = size
    new_width, new_height = width - width % multiple, height - height % multiple
    if new_width == 0 or new_height == 0:
        raise ValueError(f"The input image ({width}×{height}) is smaller than the VAE's factor {multiple}.")
    if (new_width, new_height) != (width, height):
        logger.warning("The image to edit is %d×%d; its sides must be multiples of %d (the VAE's downsampling factor): "
                       "center-cropped to %d×%d.", width, height, multiple, new_width, new_height)
        left, top = (width - new_width) // 2, (height - new_height) // 2
        image = image.crop((left, top, left + new_width, top + new_height))
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (1, 3, H, W) float32 tensor in [−1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [−1, 1] → PIL images."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(row) for row in array]


class _VaeInFloat32:
    """fp16 VAEs flagged `force_upcast` (SDXL's) overflow: run them in float32 for the call, as diffusers does."""

    def __init__(self, vae) -> None:
        self.vae = vae
        self.dtype = vae.dtype
        self.upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)

    def __enter__(self):
        if self.upcast:
            self.vae.to(torch.float32)
        return self.vae

    def __exit__(self, *exc) -> None:
        if self.upcast:
            self.vae.to(self.dtype)


def _shift_factor(vae) -> float:
    # SD3's and Flux's VAEs shift latents before scaling them; SD 1.x/2.x and SDXL VAEs have none.
    return getattr(vae.config, "shift_factor", None) or 0.0


def _latent_statistics(vae, like: torch.Tensor):
    config = vae.config
    if getattr(config, "latents_mean", None) is None or getattr(config, "latents_std", None) is None:
        return None
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(like.device, like.dtype)
    return mean, std


@torch.no_grad()
def encode_image(pipe, image: Image.Image) -> torch.Tensor:
    """The scaled VAE latent z₀ (float32, shape (1, C, H/f, W/f)) of an RGB image: the mean of the posterior, so the
    result is deterministic."""
    with _VaeInFloat32(pipe.vae) as vae:
        pixels = image_to_tensor(image).to(vae.device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.mean.float()
    statistics = _latent_statistics(pipe.vae, latents)
    if statistics is not None:
        mean, std = statistics
        return (latents - mean) * pipe.vae.config.scaling_factor / std
    return (latents - _shift_factor(pipe.vae)) * pipe.vae.config.scaling_factor


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Scaled VAE latents (B, C, h, w) → PIL images."""
    statistics = _latent_statistics(pipe.vae, latents)
    if statistics is not None:
        mean, std = statistics
        latents = latents * std / pipe.vae.config.scaling_factor + mean
    else:
        latents = latents / pipe.vae.config.scaling_factor + _shift_factor(pipe.vae)
    with _VaeInFloat32(pipe.vae) as vae:
        pixels = vae.decode(latents.to(vae.device, vae.dtype)).sample
    return tensor_to_images(pixels)


def side_by_side(images: Sequence[Image.Image]) -> Image.Image:
    """The images in one row, left to right (the input first, then each edit)."""
    width, height = sum(i.width for i in images), max(i.height for i in images)
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    left = 0
    for image in images:
        strip.paste(image, (left, 0))
        left += image.width
    return strip


def save_png(image: Image.Image, path: Union[str, os.PathLike]) -> Path:
    """Write a PNG atomically (a temporary file in the same folder, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
