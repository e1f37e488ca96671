"""Text conditioning and noise prediction for the UNets of Stable Diffusion 1.x/2.x and SDXL.

SDXL's UNet takes, besides the text embeddings, pooled text embeddings and six "time ids" (original size, crop
corner, target size); `encode_prompts` builds them so the inversion and sampling loops drive both families alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..training.loss import sdxl_time_ids


def is_sdxl(pipe) -> bool:
    """Whether the pipeline's UNet expects SDXL's added conditioning (pooled text embeddings and time ids)."""
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


@dataclass
class PromptConditioning:
    """Encoded prompts (one row per sample) and, with classifier-free guidance, the unconditional rows.

    `pooled` / `negative_pooled` and `time_ids` are set for SDXL only."""

    embeds: torch.Tensor
    negative_embeds: Optional[torch.Tensor] = None
    pooled: Optional[torch.Tensor] = None
    negative_pooled: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None

    @property
    def guided(self) -> bool:
        return self.negative_embeds is not None

    def unet_kwargs(self) -> dict:
        """Keyword arguments of the UNet call; with guidance the batch is [unconditional, conditional]."""
        embeds = torch.cat([self.negative_embeds, self.embeds]) if self.guided else self.embeds
        kwargs = {"encoder_hidden_states": embeds}
        if self.time_ids is not None:
            pooled = torch.cat([self.negative_pooled, self.pooled]) if self.guided else self.pooled
            time_ids = torch.cat([self.time_ids] * 2) if self.guided else self.time_ids
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        return kwargs


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], *, guided: bool, height: int, width: int) -> PromptConditioning:
    """Encode `prompts` with the pipeline's own `encode_prompt` (empty negative prompts when `guided`).

    `height` and `width` (pixels) are SDXL's original and target size; the crop corner is (0, 0).
    """
    prompts = list(prompts)
    device = pipe.unet.device
    if not is_sdxl(pipe):
        embeds, negative = pipe.encode_prompt(prompts, device, 1, guided)
        return PromptConditioning(embeds, negative if guided else None)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided)
    time_ids = sdxl_time_ids(height, width, len(prompts), device).to(embeds.dtype)
    # The same check as diffusers' SDXL pipeline: a refiner (aesthetic-score ids) or a broken config fails clearly.
    # The size comes from the config: an adapter may wrap the embedding's layers.
    expected = pipe.unet.config.projection_class_embeddings_input_dim
    given = pipe.unet.config.addition_time_embed_dim * time_ids.shape[-1] + pooled.shape[-1]
    if expected != given:
        raise ValueError(f"The UNet expects added conditioning of size {expected}, but SDXL's time ids and pooled "
                         f"text embeddings make {given}; only SDXL base-style pipelines are supported.")
    if not guided:
        return PromptConditioning(embeds, pooled=pooled, time_ids=time_ids)
    return PromptConditioning(embeds, negative, pooled, negative_pooled, time_ids)


def predict_noise(unet, latents: torch.Tensor, timestep, conditioning: PromptConditioning,
                  guidance_scale: float) -> torch.Tensor:
    """The UNet's output for `latents` at `timestep` (float32), with classifier-free guidance when the conditioning
    holds unconditional rows: ε_u + g·(ε_c − ε_u)."""
    model_input = torch.cat([latents] * 2) if conditioning.guided else latents
    output = unet(model_input.to(unet.dtype), timestep, **conditioning.unet_kwargs(), return_dict=False)[0].float()
    if not conditioning.guided:
        return output
    unconditional, conditional = output.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)
