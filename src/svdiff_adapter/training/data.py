"""Training batches: instance images and prompts of one or several subjects, prior-preservation samples, and
Cut-Mix-Unmix samples (with probability `cutmix_prob`).

All randomness comes from the generator given to `DreamBoothData.sample`, so a run seeded per step is
reproducible and resumes to the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from PIL import Image

from .cutmix import cut_mix, cut_mix_prompt, draw_pair
from .images import ImageTransform, TrainingDataError, load_images
from .subjects import Subject


@dataclass
class Batch:
    """`pixel_values` (N, C, H, W) in [-1, 1] and `prompts`: the first `num_instance` rows are instance samples, the
    rest (if any) their prior-preservation samples in the same order. For the instance rows, `pairs[b]` is the
    (first, second) identifiers of a Cut-Mix sample or None, and `masks[b]` (2, H, W) their regions (zeros if
    None)."""

    pixel_values: torch.Tensor
    prompts: list[str]
    num_instance: int
    pairs: list[Optional[tuple[str, str]]] = field(default_factory=list)
    masks: Optional[torch.Tensor] = None

    @property
    def has_cutmix(self) -> bool:
        return any(pair is not None for pair in self.pairs)


class DreamBoothData:
    """Images of the subjects (read once, converted to RGB) and the rules for drawing a batch.

    Args:
        subjects (`list[Subject]`): the subjects; Cut-Mix needs two or more, each with an identifier and a class.
        transform (`ImageTransform`): resolution, crop and flip.
        cutmix_prob (`float`, defaults to 0.6): probability that an instance sample is a Cut-Mix of two subjects.
        with_prior_preservation (`bool`): add one class sample per instance sample (made the same way).
        class_images (`list[list[PIL.Image]]`, *optional*): class images per subject (required with prior).
        instance_images (`list[list[PIL.Image]]`, *optional*): instance images per subject, already read (default:
            read from each subject's folder).
    """

    def __init__(self, subjects: Sequence[Subject], transform: ImageTransform, cutmix_prob: float = 0.6,
                 with_prior_preservation: bool = False,
                 class_images: Optional[Sequence[Sequence[Image.Image]]] = None,
                 instance_images: Optional[Sequence[Sequence[Image.Image]]] = None) -> None:
        if not subjects:
            raise TrainingDataError("No subjects to train on: give --instance_data_dir or --subject.")
        if not 0.0 <= cutmix_prob <= 1.0:
            raise ValueError(f"`cutmix_prob` should be in [0, 1] but the value passed is {cutmix_prob}.")
        self.subjects = list(subjects)
        self.transform = transform
        self.cutmix_prob = cutmix_prob if len(self.subjects) > 1 else 0.0
        if self.cutmix_prob > 0:
            missing = [s.instance_data_dir for s in self.subjects if not s.token or not s.class_name]
            if missing:
                raise TrainingDataError(
                    f"Cut-Mix-Unmix composes prompts from each subject's identifier and class; subject(s) {missing} "
                    "lack one (give class=dog and an identifier in the prompt, or set --cutmix_prob 0)."
                )
        if instance_images is None:
            instance_images = [load_images(s.instance_data_dir, what="instance image") for s in self.subjects]
        if len(instance_images) != len(self.subjects):
            raise ValueError(f"Got instance images for {len(instance_images)} subjects, expected {len(self.subjects)}.")
        self.instance_images = [list(images) for images in instance_images]
        self.with_prior_preservation = with_prior_preservation
        self.class_images = [list(images) for images in class_images] if class_images is not None else None
        if with_prior_preservation:
            if self.class_images is None or len(self.class_images) != len(self.subjects):
                raise ValueError("Prior preservation needs class images for every subject.")
            empty = [s.instance_data_dir for s, imgs in zip(self.subjects, self.class_images) if not imgs]
            if empty:
                raise TrainingDataError(f"No class images for subject(s) {empty}.")

    def _pick(self, images: Sequence[Image.Image], generator) -> torch.Tensor:
        index = int(torch.randint(0, len(images), (1,), generator=generator))
        return self.transform(images[index], generator)

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Batch:
        """Draw `batch_size` instance samples (+ as many prior samples)."""
        images, prompts, pairs, masks, prior_images, prior_prompts = [], [], [], [], [], []
        height = width = self.transform.resolution
        for _ in range(batch_size):
            if self.cutmix_prob > 0 and float(torch.rand(1, generator=generator)) < self.cutmix_prob:
                first, second = draw_pair(len(self.subjects), generator)
                layout = "left-right" if float(torch.rand(1, generator=generator)) < 0.5 else "top-bottom"
                reversed_wording = float(torch.rand(1, generator=generator)) < 0.5
                a, b = self.subjects[first], self.subjects[second]
                mixed = cut_mix(self._pick(self.instance_images[first], generator),
                                self._pick(self.instance_images[second], generator), layout)
                images.append(mixed.image)
                masks.append(mixed.masks)
                prompts.append(cut_mix_prompt(a.label, b.label, layout, reversed_wording))
                pairs.append((a.token, b.token))
                if self.with_prior_preservation:
                    prior = cut_mix(self._pick(self.class_images[first], generator),
                                    self._pick(self.class_images[second], generator), layout)
                    prior_images.append(prior.image)
                    prior_prompts.append(cut_mix_prompt(a.class_name, b.class_name, layout, reversed_wording))
                continue
            index = int(torch.randint(0, len(self.subjects), (1,), generator=generator))
            subject = self.subjects[index]
            images.append(self._pick(self.instance_images[index], generator))
            prompts.append(subject.instance_prompt)
            pairs.append(None)
            masks.append(torch.zeros(2, height, width))
            if self.with_prior_preservation:
                prior_images.append(self._pick(self.class_images[index], generator))
                prior_prompts.append(subject.class_prompt)
        return Batch(pixel_values=torch.stack(images + prior_images), prompts=prompts + prior_prompts,
                     num_instance=batch_size, pairs=pairs, masks=torch.stack(masks))
