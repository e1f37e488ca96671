"""`svdiff app`: a web app to look at spectral shifts (docs/app.md). Needs the `app` extra
(`pip install svdiff-adapter[app]`, which brings Gradio).

>>> from svdiff_adapter.app import ShiftStudio, open_studio, build_app
>>> studio = open_studio()                  # the bundled toy-world pipeline and its shipped shift, offline
>>> studio.generate("a zwx square on a blue background", weights={"dotted_square": 1.0})
>>> build_app(studio).queue().launch()

`ShiftStudio` (no Gradio needed) is what the page does; `build_app` lays the page out around it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from .studio import AppInputError, Limits, ShiftStudio

TOY_PROMPT = "a zwx square on a blue background"

__all__ = ["AppInputError", "Limits", "ShiftStudio", "build_app", "open_studio"]


def open_studio(model: Union[str, Path, None] = None, shifts: Sequence[Union[str, Path]] = (), *,
                work_dir: Union[str, Path, None] = None, svd_cache=None, device: Optional[str] = None) -> ShiftStudio:
    """A `ShiftStudio` on `model` (a pipeline folder or Hub id; default: the bundled toy world) with `shifts` loaded
    (default for the toy world: its shipped dotted-square shift, "zwx").

    Any diffusers pipeline with a LoRA loader works (`patch_diffusers()` gives it the spectral-shift methods).
    """
    import torch

    from .. import toyworld
    from ..toyworld.personalize import ShiftRecipe

    if model is None:
        pipe = toyworld.load_toyworld_pipeline(device=device or "cpu")
        source, sampling = toyworld.PIPELINE_DIR, toyworld.recommended_sampling()
        # The toy model's singular values are O(1): its shifts train at the toy recipe's rate (docs/toyworld.md).
        learning_rate = ShiftRecipe.learning_rate
        shifts = list(shifts) or [toyworld.ASSETS_DIR / "shifts" / "dotted_square"]
    else:
        from diffusers import DiffusionPipeline

        from ..loaders.pipelines import patch_diffusers

        patch_diffusers()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        pipe = DiffusionPipeline.from_pretrained(str(model), dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        source, sampling, learning_rate = str(model), {"num_inference_steps": 30, "guidance_scale": 7.5}, 1e-3
    studio = ShiftStudio(pipe, model_source=source, sampling=sampling, work_dir=work_dir, svd_cache=svd_cache,
                         learning_rate=learning_rate)
    for shift in shifts:
        studio.load(shift)
    return studio


def build_app(studio: ShiftStudio, default_prompt: str = ""):
    """The Gradio `Blocks` of the app for a studio (docs/app.md)."""
    from .ui import build_app as build

    return build(studio, default_prompt)
