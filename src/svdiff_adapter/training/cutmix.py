"""Cut-Mix-Unmix samples (SVDiff paper, §3): two subjects cut and joined into one image and prompt.

Each subject keeps the central strip of its (already cropped) image: for a left/right join the strip of half the
width, for a top/bottom join the strip of half the height. A strip is placed in its half; region masks say which
pixels belong to which subject, for the unmix regularisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


LAYOUTS = ("left-right", "top-bottom")
_PLACES = {"left-right": ("on the left", "on the right"), "top-bottom": ("at the top", "at the bottom")}


@dataclass
class CutMixSample:
    image: torch.Tensor          # (C, H, W)
    masks: torch.Tensor          # (2, H, W) float: region of the first and of the second subject
    layout: str


def cut_mix(first: torch.Tensor, second: torch.Tensor, layout: str = "left-right") -> CutMixSample:
    """Join the central half-strips of two (C, H, W) images: `first` left/top, `second` right/bottom."""
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` should be one of {list(LAYOUTS)} but the value passed is {layout!r}.")
    if first.shape != second.shape:
        raise ValueError(
            f"Images to cut-mix must have the same shape, got {tuple(first.shape)} and {tuple(second.shape)}."
        )
    _, height, width = first.shape
    image = torch.empty_like(first)
    masks = torch.zeros(2, height, width, dtype=torch.float32)
    if layout == "left-right":
        half = width // 2
        start = (width - half) // 2
        image[:, :, :half] = first[:, :, start:start + half]
        rest = width - half
        start = (width - rest) // 2
        image[:, :, half:] = second[:, :, start:start + rest]
        masks[0, :, :half] = 1
        masks[1, :, half:] = 1
    else:
        half = height // 2
        start = (height - half) // 2
        image[:, :half] = first[:, start:start + half]
        rest = height - half
        start = (height - rest) // 2
        image[:, half:] = second[:, start:start + rest]
        masks[0, :half] = 1
        masks[1, half:] = 1
    return CutMixSample(image=image, masks=masks, layout=layout)


def cut_mix_prompt(first: str, second: str, layout: str = "left-right", reversed_wording: bool = False,
                   prefix: str = "photo of") -> str:
    """``"photo of a sks dog on the left and a zwx sculpture on the right"``; `reversed_wording` names the second
    subject first (``"photo of a zwx sculpture on the right and a sks dog on the left"``). `first` is always the
    subject placed left/top."""
    place_first, place_second = _PLACES[layout]
    parts = [f"{_article(first)} {place_first}", f"{_article(second)} {place_second}"]
    if reversed_wording:
        parts.reverse()
    return f"{prefix} {parts[0]} and {parts[1]}"


def _article(label: str) -> str:
    return f"an {label}" if label[:1].lower() in "aeiou" else f"a {label}"


def draw_pair(num_subjects: int, generator: Optional[torch.Generator] = None) -> tuple[int, int]:
    """Two different subject indices, drawn without replacement."""
    if num_subjects < 2:
        raise ValueError("Cut-Mix-Unmix needs at least two subjects.")
    order = torch.randperm(num_subjects, generator=generator)
    return int(order[0]), int(order[1])
