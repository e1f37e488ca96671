"""Personalisation in the toy world: train a spectral shift on a few images of a subject, and measure it with the judge.

Shared by the quickstart (``examples/quickstart.py``), the tests and the quality benchmark, so that all three run the
same recipe through the real trainer (`svdiff_adapter.training.train`) and score the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image

from .world import BACKGROUNDS, Subject


@dataclass
class ShiftRecipe:
    """How a subject shift is trained (defaults: what the quickstart uses; measured in docs/toyworld.md).

    The toy model's singular values are O(1) and its weights are few, so a shift needs a larger learning rate than
    the paper's 1e-3 for Stable Diffusion to move within a few hundred steps. Prior preservation (λ = 1, 50 class
    images per background) keeps the class prompt from turning into the subject.
    """

    max_train_steps: int = 600
    learning_rate: float = 2e-2
    learning_rate_1d: float = 1e-6
    train_batch_size: int = 4
    train_text_encoder: bool = True
    num_images: int = 5
    backgrounds: tuple[str, ...] = ("white", "black", "gray")
    with_prior_preservation: bool = True
    num_class_images: int = 50
    seed: int = 0
    extra_args: list[str] = field(default_factory=list)


# The recipe on the toy DiT (`DIT_DIR`): the UNet recipe's rate, which personalises the DiT's split circle on every
# background in the quickstart (docs/toyworld.md); benchmarks/quality/dit.py sweeps it against the alternatives.
DIT_RECIPE = ShiftRecipe(learning_rate=2e-2)


def write_subject_images(subject: Subject, folder: Union[str, os.PathLike], num_images: int,
                         backgrounds: Sequence[str], seed: int = 0) -> list[Path]:
    """Render ``num_images`` images of ``subject`` (backgrounds cycling) as PNG files in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    batch = subject.images(num_images, seed=seed, backgrounds=backgrounds)
    paths = []
    for index, pixels in enumerate(batch.images):
        path = folder / f"{subject.name}-{index}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def train_subject_shift(
    subject: Subject,
    output_dir: Union[str, os.PathLike],
    *,
    pipeline_dir: Union[str, os.PathLike, None] = None,
    recipe: Optional[ShiftRecipe] = None,
    identifier: Optional[str] = None,
) -> Path:
    """Train a shift for ``subject`` with the package's trainer; returns the folder holding the shift file.

    Instance images are written to ``output_dir/instance/<background>/``, captioned
    "a <identifier> <shape> on a <background> background".
    """
    from ..training import parse_args, train
    from . import PIPELINE_DIR

    recipe = recipe or ShiftRecipe()
    output_dir = Path(output_dir)
    identifier = identifier or subject.identifier
    # One image folder per background, each with its own caption ("a sks circle on a white background"): the
    # background words then explain the background, so the identifier binds to the object alone. They are passed
    # as the trainer's subjects with Cut-Mix-Unmix off (it would cut one subject's images together).
    subject_specs = []
    for index, background in enumerate(recipe.backgrounds):
        count = len(range(index, recipe.num_images, len(recipe.backgrounds)))
        folder = output_dir / "instance" / background
        write_subject_images(subject, folder, count, [background], seed=recipe.seed + index)
        spec = f"dir={folder},prompt={subject.prompt(background, identifier)},class={subject.shape}"
        if recipe.with_prior_preservation:
            spec += f",class_dir={output_dir / 'class_images' / background}"
        subject_specs += ["--subject", spec]
    argv = [
        "--pretrained_model_name_or_path", str(pipeline_dir or PIPELINE_DIR),
        *subject_specs,
        "--cutmix_prob", "0",
        "--resolution", "64",
        "--train_batch_size", str(recipe.train_batch_size),
        "--max_train_steps", str(recipe.max_train_steps),
        "--learning_rate", str(recipe.learning_rate),
        "--learning_rate_1d", str(recipe.learning_rate_1d),
        "--output_dir", str(output_dir),
        "--checkpointing_steps", str(max(recipe.max_train_steps, 1)),
        "--checkpoints_total_limit", "1",
        "--seed", str(recipe.seed),
        "--report_to", "none",
        "--adapter_name", subject.name,
    ]
    if recipe.train_text_encoder:
        argv.append("--train_text_encoder")
    if recipe.with_prior_preservation:
        argv += ["--with_prior_preservation", "--num_class_images", str(recipe.num_class_images),
                 "--class_inference_steps", "25", "--sample_batch_size", "25"]
    train(parse_args(argv + list(recipe.extra_args)))
    return output_dir


def is_subject(judged: dict, index: int, subject: Subject) -> bool:
    """Whether sample `index` of a `judge_images` result is `subject`: its shape, pattern and both colours."""
    return (judged["shape"][index] == subject.shape and judged["pattern"][index] == subject.pattern
            and {judged["color"][index], judged["color2"][index]} == set(subject.colors))


def subject_scores(
    pipe,
    subject: Subject,
    *,
    backgrounds: Sequence[str] = BACKGROUNDS,
    per_background: int = 8,
    identifier: Optional[str] = None,
    seed: int = 1,
    judge=None,
) -> dict:
    """Judge ``per_background`` samples of "a <identifier> <shape> on a <bg> background" per background.

    Returns ``{"subject": {bg: rate}, "background": {bg: rate}, "subject_and_background": {bg: rate}}`` and the
    ``*_mean`` of each over the backgrounds: the rate of samples judged to be the subject (shape, pattern and both
    colours), the rate whose background is the requested one, and the rate where both hold.
    """
    from . import generate, judge_images

    identifier = identifier or subject.identifier
    prompts = [subject.prompt(bg, identifier) for bg in backgrounds for _ in range(per_background)]
    judged = judge_images(generate(pipe, prompts, seed=seed), judge=judge)
    result = {"subject": {}, "background": {}, "subject_and_background": {}}
    for k, bg in enumerate(backgrounds):
        rows = range(k * per_background, (k + 1) * per_background)
        result["subject"][bg] = sum(is_subject(judged, i, subject) for i in rows) / per_background
        result["background"][bg] = sum(judged["background"][i] == bg for i in rows) / per_background
        result["subject_and_background"][bg] = sum(
            is_subject(judged, i, subject) and judged["background"][i] == bg for i in rows) / per_background
    for key in ("subject", "background", "subject_and_background"):
        result[f"{key}_mean"] = sum(result[key].values()) / len(backgrounds)
    return result


def leakage(pipe, subject: Subject, *, background: str = "blue", samples: int = 16, seed: int = 2,
            judge=None) -> float:
    """Rate of samples of the class prompt ("a <shape> on a <bg> background") judged to show the subject's pattern."""
    from . import generate, judge_images

    judged = judge_images(generate(pipe, [subject.class_prompt(background)] * samples, seed=seed), judge=judge)
    return sum(pattern == subject.pattern for pattern in judged["pattern"]) / samples


def subject_probability(images: torch.Tensor, subject: Subject, judge=None) -> torch.Tensor:
    """Per image, the judge's probability of the subject's pattern times that of its first colour (a smooth score
    that rises as samples move towards the subject, for short runs that do not yet produce it)."""
    from . import load_judge
    from .judge import HEADS

    judge = judge if judge is not None else load_judge()
    judge.eval()
    with torch.no_grad():
        logits = judge(images.float())
    pattern = logits["pattern"].softmax(-1)[:, HEADS["pattern"].index(subject.pattern)]
    color = logits["color"].softmax(-1)[:, HEADS["color"].index(subject.colors[0])]
    return pattern * color
