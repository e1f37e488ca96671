"""Toy world: a procedural shapes world, a tiny text-to-image latent diffusion model trained on it, and a judge.

>>> from svdiff_adapter import toyworld as tw
>>> batch = tw.make_batch(8, seed=0)                 # images, labels, prompts
>>> pipe = tw.load_toyworld_pipeline()              # svdiff_adapter.StableDiffusionPipeline (bundled assets)
>>> images = tw.generate(pipe, ["a red star on a blue background"], seed=0)
>>> tw.judge_images(images)                          # {"shape": [...], "color": [...], ...}

The bundled assets live in ``svdiff_adapter/toyworld/assets/`` (see ``docs/toyworld.md`` for how they are built):
``pipeline/`` (a ``StableDiffusionPipeline`` folder, fp16 storage), ``dit/`` (a ``StableDiffusion3Pipeline`` folder:
a small MMDiT trained with rectified flow on the same world, sharing the VAE, tokenizer and text encoder; load it with
``load_toyworld_pipeline(DIT_DIR)``) and ``judge.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

from .world import (
    BACKGROUNDS,
    COLORS,
    IMAGE_SIZE,
    PAIR_WIDTH,
    PATTERNS,
    SHAPES,
    SUBJECTS,
    Batch,
    PairSpec,
    Spec,
    Subject,
    get_subject,
    make_batch,
    make_pair_batch,
    pair_prompt,
    plain_combinations,
    prompt_for,
    render_pairs,
    render_specs,
    sample_specs,
    to_tensor,
)
from .tokenizer import IDENTIFIERS, load_tokenizer

__all__ = [
    "ASSETS_DIR",
    "PIPELINE_DIR",
    "DIT_DIR",
    "JUDGE_PATH",
    "AssetsMissingError",
    "assets_available",
    "load_toyworld_pipeline",
    "load_judge",
    "generate",
    "judge_images",
    "judge_pairs",
    "recommended_sampling",
    # world
    "IMAGE_SIZE",
    "PAIR_WIDTH",
    "SHAPES",
    "COLORS",
    "BACKGROUNDS",
    "PATTERNS",
    "SUBJECTS",
    "IDENTIFIERS",
    "Batch",
    "PairSpec",
    "Spec",
    "Subject",
    "get_subject",
    "make_batch",
    "make_pair_batch",
    "pair_prompt",
    "render_pairs",
    "plain_combinations",
    "prompt_for",
    "render_specs",
    "sample_specs",
    "to_tensor",
    "load_tokenizer",
]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
PIPELINE_DIR = ASSETS_DIR / "pipeline"
DIT_DIR = ASSETS_DIR / "dit"
JUDGE_PATH = ASSETS_DIR / "judge.safetensors"

_BUILD_HINT = (
    "Build the toy-world assets with\n"
    "  python examples/toyworld/train_judge.py --out src/svdiff_adapter/toyworld/assets\n"
    "  python examples/toyworld/train_base_model.py --out OUT --judge src/svdiff_adapter/toyworld/assets/judge.safetensors\n"
    "  cp -r OUT/pipeline src/svdiff_adapter/toyworld/assets/pipeline\n"
    "(see docs/toyworld.md)."
)


class AssetsMissingError(FileNotFoundError):
    """A bundled toy-world asset (pipeline or judge) has not been built."""


def assets_available() -> dict[str, bool]:
    return {"pipeline": (PIPELINE_DIR / "model_index.json").is_file(), "judge": JUDGE_PATH.is_file()}


def load_toyworld_pipeline(path: Union[str, Path, None] = None, device: str = "cpu", dtype=None):
    """Load a toy-world pipeline (default: the bundled UNet one; ``DIT_DIR`` for the bundled DiT) in float32 unless
    ``dtype``: an ``svdiff_adapter.StableDiffusionPipeline`` (or ``StableDiffusion3Pipeline`` for a DiT folder,
    loaded without T5 as diffusers documents), so ``pipe.load_spectral_shift(...)`` works on it."""
    import torch

    from ..loaders.pipelines import StableDiffusion3Pipeline, StableDiffusionPipeline

    path = Path(path) if path is not None else PIPELINE_DIR
    if not (path / "model_index.json").is_file():
        raise AssetsMissingError(f"no toy-world pipeline at {path}. {_BUILD_HINT}")
    if json.loads((path / "model_index.json").read_text()).get("_class_name") == "StableDiffusion3Pipeline":
        pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None,
                                                        dtype=dtype or torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)
    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype or torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_judge(path: Union[str, Path, None] = None, device: str = "cpu"):
    """Load the toy-world judge (default: the bundled one)."""
    from .judge import load_judge_file

    path = Path(path) if path is not None else JUDGE_PATH
    if not path.is_file():
        raise AssetsMissingError(f"no toy-world judge at {path}. {_BUILD_HINT}")
    return load_judge_file(path, device=device)


def recommended_sampling(path: Union[str, Path, None] = None) -> dict:
    """``{"guidance_scale": ..., "num_inference_steps": ...}`` recorded by training (defaults 3.0 / 25)."""
    path = Path(path) if path is not None else PIPELINE_DIR
    f = path / "toyworld.json"
    rec = {"guidance_scale": 3.0, "num_inference_steps": 25}
    if f.is_file():
        rec.update(json.loads(f.read_text()))
    return rec


def generate(
    pipe,
    prompts: Union[str, Sequence[str]],
    *,
    seed: int = 0,
    guidance_scale: Optional[float] = None,
    num_inference_steps: Optional[int] = None,
    batch_size: int = 50,
    width: Optional[int] = None,
):
    """Images for ``prompts`` as a float tensor in [-1, 1] of shape ``(n, 3, 64, width or 64)`` (deterministic per
    seed); ``width=PAIR_WIDTH`` for two-object scenes."""
    from .evaluate import generate_images

    if isinstance(prompts, str):
        prompts = [prompts]
    rec = recommended_sampling(Path(pipe.config._name_or_path) if getattr(pipe.config, "_name_or_path", None) else None)
    return generate_images(
        pipe,
        prompts,
        guidance_scale=rec["guidance_scale"] if guidance_scale is None else guidance_scale,
        num_inference_steps=rec["num_inference_steps"] if num_inference_steps is None else num_inference_steps,
        seed=seed,
        batch_size=batch_size,
        width=width,
    )


def judge_images(images, judge=None, names: bool = True) -> dict[str, list]:
    """Judge predictions per head for images (float tensor in [-1, 1] ``(n, 3, 64, 64)``, or uint8 ``(n, 64, 64, 3)``,
    or a list of PIL images). Returns class names (or indices with ``names=False``)."""
    import numpy as np

    from .judge import HEADS, predict

    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    if isinstance(images, np.ndarray):
        images = to_tensor(images)
    judge = judge if judge is not None else load_judge()
    pred = predict(judge, images.float().cpu())
    if not names:
        return {k: v.tolist() for k, v in pred.items()}
    return {k: [HEADS[k][i] for i in v.tolist()] for k, v in pred.items()}


def judge_pairs(images, judge=None) -> dict[str, dict[str, list]]:
    """Judge each half of two-object scenes (float ``(n, 3, 64, 128)`` in [-1, 1] or uint8 ``(n, 64, 128, 3)``):
    ``{"left": {"shape": [...], ...}, "right": {...}}``."""
    import numpy as np

    if isinstance(images, np.ndarray):
        images = to_tensor(images)
    judge = judge if judge is not None else load_judge()
    return {"left": judge_images(images[..., :IMAGE_SIZE], judge),
            "right": judge_images(images[..., IMAGE_SIZE:], judge)}
