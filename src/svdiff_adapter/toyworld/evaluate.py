"""Sample a toy-world pipeline on world prompts and score the images with the judge."""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from . import world as W
from .judge import HEADS, Judge, predict, score_predictions

__all__ = ["generate_images", "judge_specs", "evaluate_prompts", "evaluate_pair_prompts", "format_scores"]


@torch.no_grad()
def generate_images(
    pipe,
    prompts: Sequence[str],
    *,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 25,
    seed: int = 0,
    batch_size: int = 50,
    negative_prompt: Optional[str] = None,
    width: Optional[int] = None,
) -> torch.Tensor:
    """Images for ``prompts`` as float tensors in [-1, 1], shape ``(n, 3, 64, width or 64)``.

    Chunk ``k`` of ``batch_size`` prompts uses a generator seeded with ``seed + k``.
    """
    out = []
    prompts = list(prompts)
    for k, i in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[i : i + batch_size]
        gen = torch.Generator(device="cpu").manual_seed(int(seed) + k)
        res = pipe(
            chunk,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=gen,
            output_type="pt",
            negative_prompt=[negative_prompt] * len(chunk) if negative_prompt is not None else None,
            height=W.IMAGE_SIZE if width else None,  # diffusers ignores a width given alone
            width=width,
        )
        out.append(res.images.float().cpu() * 2.0 - 1.0)
    return torch.cat(out).clamp(-1, 1)


def judge_specs(judge: Judge, images: torch.Tensor, specs: Sequence[W.Spec]) -> dict[str, float]:
    """Per-head accuracy of ``images`` against ``specs`` plus ``all`` (shape, colour and background right)."""
    labels = {k: torch.tensor([s.labels()[k] for s in specs]) for k in HEADS}
    return score_predictions(predict(judge, images), labels)


def evaluate_prompts(
    pipe,
    judge: Judge,
    n: int = 200,
    *,
    seed: int = 2024,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 25,
    pattern_fraction: float = 0.0,
    backgrounds: Optional[Sequence[str]] = None,
    batch_size: int = 50,
) -> dict:
    """Sample one image for each of ``n`` random world prompts and judge them.

    Prompts are drawn with ``sample_specs(n, seed, pattern_fraction=...)`` (default: plain, seen prompts).
    Returns per-head accuracy, ``all`` (shape + colour + background right), ``all_with_pattern`` (pattern right
    too), ``n``, guidance, steps and seconds.
    """
    specs = W.sample_specs(n, seed, pattern_fraction=pattern_fraction, backgrounds=backgrounds)
    prompts = [W.prompt_for(s) for s in specs]
    t0 = time.time()
    images = generate_images(
        pipe, prompts, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, seed=seed,
        batch_size=batch_size,
    )
    sample_s = time.time() - t0
    scores = judge_specs(judge, images, specs)
    pred = predict(judge, images)
    ok = torch.ones(len(specs), dtype=torch.bool)
    for k in ("shape", "color", "background", "pattern"):
        ok &= pred[k] == torch.tensor([s.labels()[k] for s in specs])
    scores["all_with_pattern"] = ok.float().mean().item()
    scores.update(
        n=n, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, seed=seed,
        seconds=round(sample_s, 1),
    )
    return scores


def evaluate_pair_prompts(
    pipe,
    judge: Judge,
    n: int = 100,
    *,
    seed: int = 2025,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 25,
    pattern_fraction: float = 0.0,
    batch_size: int = 50,
) -> dict:
    """Sample one 64x128 image for each of ``n`` random two-object prompts ("a red star and a blue ring on a green
    background") and judge each half: ``left``/``right`` (shape, colour and background right on that half) and
    ``all`` (both halves right), plus per-head accuracies per side (``left_shape``, ...)."""
    pairs = W.sample_pair_specs(n, seed, pattern_fraction=pattern_fraction)
    t0 = time.time()
    images = generate_images(pipe, [W.pair_prompt(p) for p in pairs], guidance_scale=guidance_scale,
                             num_inference_steps=num_inference_steps, seed=seed, batch_size=batch_size,
                             width=W.PAIR_WIDTH)
    sample_s = time.time() - t0
    scores: dict = {}
    both = torch.ones(n, dtype=torch.bool)
    for side, half in (("left", images[..., :W.IMAGE_SIZE]), ("right", images[..., W.IMAGE_SIZE:])):
        specs = [getattr(p, side) for p in pairs]
        pred = predict(judge, half)
        ok = torch.ones(n, dtype=torch.bool)
        for k in ("shape", "color", "background", "pattern"):
            right = pred[k] == torch.tensor([s.labels()[k] for s in specs])
            scores[f"{side}_{k}"] = right.float().mean().item()
            if k != "pattern":
                ok &= right
        scores[side] = ok.float().mean().item()
        both &= ok
    scores["all"] = both.float().mean().item()
    scores.update(n=n, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, seed=seed,
                  seconds=round(sample_s, 1))
    return scores


def format_scores(scores: dict) -> str:
    keys = ("all", "shape", "color", "background", "pattern", "color2", "all_with_pattern", "left", "right")
    parts = [f"{k} {100 * scores[k]:.1f}%" for k in keys if k in scores]
    extra = [f"{k}={scores[k]}" for k in ("n", "guidance_scale", "num_inference_steps", "seconds") if k in scores]
    return ", ".join(parts) + " (" + ", ".join(extra) + ")"
