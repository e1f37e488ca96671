"""Reading training images (with clear errors) and turning them into tensors: resize, center/random crop, flip."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Longer side / shorter side. Training crops a square and editing keeps the shape at the shorter side's
# resolution, so a 4000×2 image would become 1,024,000×512 pixels (training) or 64,000×32 (editing).
MAX_ASPECT_RATIO = 4.0


class TrainingDataError(ValueError):
    """Training data that cannot be used: a missing or empty folder, an unreadable image, a bad prompt."""


def list_images(folder: Union[str, os.PathLike], *, what: str = "image", allow_empty: bool = False) -> list[Path]:
    """The image files of a folder (sorted, non-recursive); raises `TrainingDataError` for a missing/empty folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingDataError(f"The {what} folder {str(folder)!r} does not exist or is not a folder.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files and not allow_empty:
        others = sorted(p.name for p in folder.iterdir())[:5]
        raise TrainingDataError(
            f"The {what} folder {str(folder)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
            + (f"; found only {others}." if others else "; it is empty.")
        )
    return files


def check_image_size(size: tuple[int, int], name: str) -> None:
    """Refuse an image with more pixels than PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, about
    89 million by default) or an aspect ratio beyond `MAX_ASPECT_RATIO`; `name` says which image in the message."""
    width, height = size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise TrainingDataError(f"The image {name} is {width}×{height} ({width * height:,} pixels), more than the "
                                f"{limit:,} pixels allowed (PIL.Image.MAX_IMAGE_PIXELS); downscale it first.")
    if min(width, height) < 1:
        raise TrainingDataError(f"The image {name} is empty ({width}×{height}).")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise TrainingDataError(f"The image {name} is {width}×{height}; its sides may differ by a factor of at most "
                                f"{MAX_ASPECT_RATIO:g} (its shorter side is scaled to the resolution): crop it first.")


def _refuse_decompression_bomb(path, error: Exception) -> TrainingDataError:
    # PIL refuses before the size is known to us; its message says how many pixels the header declares.
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = f"{int(found.group(1)):,} pixels" if found else str(error)
    return TrainingDataError(f"The image {str(path)!r} is too large ({pixels}; at most {Image.MAX_IMAGE_PIXELS:,} "
                             "pixels are allowed, PIL.Image.MAX_IMAGE_PIXELS); downscale it first.")


def load_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Open an image as RGB: EXIF rotation applied; L, P, RGBA, CMYK, I;16 ... converted (alpha on white).

    Raises `TrainingDataError` naming the file when it cannot be read or its size is refused (`check_image_size`);
    the size is checked from the file's header, before the pixels are decoded.
    """
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1× and 2× its pixel limit and decodes anyway: refuse those as well.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                check_image_size(opened.size, repr(str(path)))
                opened.load()
                image = ImageOps.exif_transpose(opened)
    except TrainingDataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise _refuse_decompression_bomb(path, error) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise TrainingDataError(f"Cannot read image {str(path)!r}: {error}") from error
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as RGB: L, P, RGBA, CMYK, I;16 ... converted (alpha composited on white); RGB returned as is."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((array / scale * 255).clip(0, 255).astype(np.uint8))
    return image.convert("RGB") if image.mode != "RGB" else image


def load_images(folder: Union[str, os.PathLike], *, what: str = "image") -> list[Image.Image]:
    """All images of a folder as RGB, read once up front so that a bad file fails before training starts."""
    return [load_image(path) for path in list_images(folder, what=what)]


class ImageTransform:
    """Resize the shorter side to `resolution`, crop a square (center or random), flip (random), scale to [-1, 1].

    Randomness comes only from the `generator` passed to `__call__`, so a seeded run is reproducible and resumable.
    """

    def __init__(self, resolution: int, center_crop: bool = False, random_flip: bool = False) -> None:
        if resolution <= 0:
            raise ValueError(f"`resolution` should be a positive integer but the value passed is {resolution}.")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image: Image.Image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        size = self.resolution
        width, height = image.size
        scale = size / min(width, height)
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.BILINEAR)
        extra_x, extra_y = new_size[0] - size, new_size[1] - size
        if self.center_crop:
            left, top = extra_x // 2, extra_y // 2
        else:
            left = int(torch.randint(0, extra_x + 1, (1,), generator=generator))
            top = int(torch.randint(0, extra_y + 1, (1,), generator=generator))
        image = image.crop((left, top, left + size, top + size))
        if self.random_flip and float(torch.rand(1, generator=generator)) < 0.5:
            image = ImageOps.mirror(image)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()
