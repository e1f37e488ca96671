"""The SVDiff training loss (as in the SVDiff paper): the diffusion loss on instance samples, λ · the same loss on
prior-preservation samples, and the unmix regularisation on Cut-Mix samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from diffusers.utils.torch_utils import randn_tensor

from .attention import CrossAttentionStore, identifier_token_weights
from .data import Batch


@dataclass
class Frozen:
    """The parts of the pipeline that only feed the UNet (the text encoders may carry trainable shifts).

    SDXL pipelines also give `text_encoder_2` / `tokenizer_2`; the UNet then gets SDXL's added conditioning."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    text_encoder_2: Optional[torch.nn.Module] = None
    tokenizer_2: Optional[object] = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def trainable_text_encoders(self) -> tuple[str, ...]:
        """The encoders `--train_text_encoder` shifts (all of them, for UNet pipelines)."""
        return tuple(self.text_encoders)

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {name: model for name, model in (("text_encoder", self.text_encoder),
                                                ("text_encoder_2", self.text_encoder_2)) if model is not None}

    def pipeline_components(self) -> dict:
        """The frozen parts as pipeline components (for validation images)."""
        components = {"vae": self.vae, "tokenizer": self.tokenizer, "text_encoder": self.text_encoder}
        if self.is_sdxl:
            components.update(tokenizer_2=self.tokenizer_2, text_encoder_2=self.text_encoder_2)
        return components


@dataclass
class TextConditioning:
    """Encoded prompts: the first tokenizer's ids (for the unmix weights), the UNet's `encoder_hidden_states` and,
    for SDXL, the pooled embeddings of the second encoder."""

    input_ids: torch.Tensor
    hidden: torch.Tensor
    pooled: Optional[torch.Tensor] = None


def _token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def encode_prompts(frozen: Frozen, prompts: list[str], device) -> TextConditioning:
    """SD 1.x/2.x: the text encoder's last hidden states. SDXL, as diffusers' `StableDiffusionXLPipeline
    .encode_prompt` (clip_skip None): both encoders' penultimate hidden states side by side, and the second encoder's
    projected pooled output."""
    ids = _token_ids(frozen.tokenizer, prompts)
    if not frozen.is_sdxl:
        return TextConditioning(ids, frozen.text_encoder(ids.to(device))[0])
    ids_2 = _token_ids(frozen.tokenizer_2, prompts)
    first = frozen.text_encoder(ids.to(device), output_hidden_states=True)
    second = frozen.text_encoder_2(ids_2.to(device), output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return TextConditioning(ids, hidden, second[0])


def sdxl_time_ids(height: int, width: int, batch_size: int, device) -> torch.Tensor:
    """SDXL's six size conditions for uncropped training images: original size, crop corner (0, 0), target size."""
    return torch.tensor([[height, width, 0, 0, height, width]] * batch_size, dtype=torch.float32, device=device)


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
    by the batch and the generator. `train_text_encoder` keeps the graph through the text encoder(s).
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
        text = encode_prompts(frozen, batch.prompts, device)
    dtype = unet.dtype if hasattr(unet, "dtype") else text.hidden.dtype
    added_conditioning = {}
    if text.pooled is not None:
        height, width = batch.pixel_values.shape[-2:]
        added_conditioning["added_cond_kwargs"] = {
            "text_embeds": text.pooled.to(dtype),
            "time_ids": sdxl_time_ids(height, width, latents.shape[0], device).to(dtype)}
    use_unmix = unmix_weight > 0 and store is not None and batch.has_cutmix
    if use_unmix:
        weights = identifier_token_weights(frozen.tokenizer, text.input_ids[: batch.num_instance], batch.pairs)
        store.start(weights, batch.masks)
    try:
        prediction = unet(noisy, timesteps, text.hidden.to(dtype), **added_conditioning).sample
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
    per_sample = ((prediction.float() - target.float()) ** 2).flatten(1).mean(1)
    return combine_losses(per_sample, batch.num_instance, prior_loss_weight, unmix, unmix_weight)


def combine_losses(per_sample: torch.Tensor, num_instance: int, prior_loss_weight: float,
                   unmix: Optional[torch.Tensor] = None, unmix_weight: float = 0.0
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss from per-sample losses (instance rows first, then their prior rows): the instance mean,
    + λ · the prior mean, + the weighted unmix term; and its parts as floats."""
    instance_loss = per_sample[:num_instance].mean()
    loss = instance_loss
    parts = {"instance_loss": float(instance_loss.detach())}
    if per_sample.shape[0] > num_instance:
        prior_loss = per_sample[num_instance:].mean()
        loss = loss + prior_loss_weight * prior_loss
        parts["prior_loss"] = float(prior_loss.detach())
    if unmix is not None:
        loss = loss + unmix_weight * unmix
        parts["unmix_loss"] = float(unmix.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts
