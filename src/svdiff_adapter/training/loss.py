"""The SVDiff training loss (docs/method.md §2, §4): the diffusion loss on instance samples, λ · the same loss on
prior-preservation samples, and the unmix regularisation on Cut-Mix samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from .attention import CrossAttentionStore, identifier_token_weights
from .data import Batch


@dataclass
class Frozen:
    """The parts of the pipeline that only feed the UNet (the text encoder may carry trainable shifts)."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    return ids, text_encoder(ids.to(device))[0]


def training_loss(
    unet: torch.nn.Module,
    frozen: Frozen,
    batch: Batch,
    generator: Optional[torch.Generator] = None,
    *,
    prior_loss_weight: float = 1.0,
    unmix_weight: float = 0.0,
    store: Optional[CrossAttentionStore] = None,
    train_text_encoder: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One forward pass; returns the total loss and its parts (floats) for logging.

    Noise, timesteps and the VAE's latent sample are drawn from `generator` (on the CPU), so a step is determined
    by the batch and the generator.
    """
    vae, noise_scheduler = frozen.vae, frozen.noise_scheduler
    device = next(p for p in unet.parameters()).device
    with torch.no_grad():
        pixels = batch.pixel_values.to(device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator=generator) * vae.config.scaling_factor
    latents = latents.float()
    noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    with torch.set_grad_enabled(train_text_encoder):
        input_ids, hidden = encode_prompts(frozen.tokenizer, frozen.text_encoder, batch.prompts, device)
    use_unmix = unmix_weight > 0 and store is not None and batch.has_cutmix
    if use_unmix:
        weights = identifier_token_weights(frozen.tokenizer, input_ids[: batch.num_instance], batch.pairs)
        store.start(weights, batch.masks)
    try:
        prediction = unet(noisy, timesteps, hidden.to(unet.dtype if hasattr(unet, "dtype") else hidden.dtype)).sample
        unmix = store.loss() if use_unmix else None
    finally:
        if use_unmix:
            store.stop()
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {prediction_type!r}.")
    prediction = prediction.float()
    n = batch.num_instance
    instance_loss = F.mse_loss(prediction[:n], target[:n])
    loss = instance_loss
    parts = {"instance_loss": float(instance_loss.detach())}
    if prediction.shape[0] > n:
        prior_loss = F.mse_loss(prediction[n:], target[n:])
        loss = loss + prior_loss_weight * prior_loss
        parts["prior_loss"] = float(prior_loss.detach())
    if unmix is not None:
        loss = loss + unmix_weight * unmix
        parts["unmix_loss"] = float(unmix.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts
