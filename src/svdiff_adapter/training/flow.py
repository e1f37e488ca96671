"""The flow-matching loss of transformer (DiT) pipelines: Stable Diffusion 3 / 3.5 and Flux.1.

These models were trained with rectified flow (Esser et al., "Scaling Rectified Flow Transformers for High-Resolution
Image Synthesis", 2024, §2): x_σ = (1 − σ)·x₀ + σ·ε, the transformer predicts the velocity ε − x₀, squared error.
σ comes from the pipeline's `FlowMatchEulerDiscreteScheduler` table (its shift included) at the index ⌊u·N⌋, and the
*weighting scheme* — named as in diffusers' DreamBooth scripts for SD3 and Flux (examples/dreambooth/
train_dreambooth_sd3.py and train_dreambooth_flux.py, diffusers 0.42) — chooses u or weights the loss (SD3 paper
§3.1): "none" (u uniform, weight 1), "logit_normal" (u = sigmoid(n), n ~ N(logit_mean, logit_std²)), "mode" (u
uniform, then u ← 1 − u − s·(cos²(πu/2) − 1 + u), s = mode_scale), "cosmap" (weight 2 / (π(1 − 2σ + 2σ²))) and
"sigma_sqrt" (weight σ⁻²).

Prompts are encoded as the pipelines encode them (`StableDiffusion3Pipeline.encode_prompt`, `FluxPipeline
.encode_prompt`, diffusers 0.42) but through the encoders held here, so that DDP-wrapped CLIP encoders being trained
keep their gradient synchronisation. T5 is always frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from .attention import CrossAttentionStore
from .data import Batch
from .joint_attention import joint_identifier_weights
from .loss import combine_losses

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
# The pipelines' own default T5 lengths (`max_sequence_length` of their __call__), so training sees the padding that
# inference will use.
DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}


@dataclass
class FlowFrozen:
    """Everything but the transformer that a flow-matching training step needs, and how it samples σ.

    `family` is "sd3" (CLIP-L and CLIP-G with projections in `text_encoder` / `text_encoder_2`, T5 in
    `text_encoder_3`, which may be None as the pipeline allows) or "flux" (CLIP-L in `text_encoder`, T5 in
    `text_encoder_2`). `joint_attention_dim` and `guidance_embeds` are the transformer's config values (read once:
    the transformer may be wrapped for distributed training)."""

    family: str
    vae: torch.nn.Module
    noise_scheduler: object
    tokenizer: object
    text_encoder: torch.nn.Module
    tokenizer_2: object
    text_encoder_2: torch.nn.Module
    tokenizer_3: Optional[object] = None
    text_encoder_3: Optional[torch.nn.Module] = None
    joint_attention_dim: int = 4096
    guidance_embeds: bool = False
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 3.5
    max_sequence_length: Optional[int] = None

    def __post_init__(self) -> None:
        if self.family not in DEFAULT_MAX_SEQUENCE_LENGTH:
            raise ValueError(f"Unknown flow-matching family {self.family!r}; known: sd3, flux.")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"Unknown weighting scheme {self.weighting_scheme!r}; known: {WEIGHTING_SCHEMES}.")

    @property
    def trainable_text_encoders(self) -> tuple[str, ...]:
        """The CLIP encoders, which `--train_text_encoder` shifts; T5 stays frozen."""
        return ("text_encoder", "text_encoder_2") if self.family == "sd3" else ("text_encoder",)

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def pipeline_components(self) -> dict:
        """The frozen parts as pipeline components (for validation images)."""
        names = ("vae", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3")
        return {name: getattr(self, name) for name in names if self.family == "sd3" or not name.endswith("_3")}


def flow_frozen(family: str, components, **options) -> FlowFrozen:
    """A `FlowFrozen` from a pipeline's components (a pipeline, or its `.components` dict): σ from a fresh
    `FlowMatchEulerDiscreteScheduler` of its scheduler's config, the transformer's config values, `options` (the
    weighting scheme and the rest)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    get = components.get if isinstance(components, dict) else lambda name: getattr(components, name, None)
    transformer = get("transformer")
    return FlowFrozen(
        family=family, vae=get("vae"), noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(
            get("scheduler").config),
        tokenizer=get("tokenizer"), text_encoder=get("text_encoder"), tokenizer_2=get("tokenizer_2"),
        text_encoder_2=get("text_encoder_2"), tokenizer_3=get("tokenizer_3"), text_encoder_3=get("text_encoder_3"),
        joint_attention_dim=transformer.config.joint_attention_dim,
        guidance_embeds=bool(transformer.config.get("guidance_embeds", False)), **options)


@dataclass
class FlowConditioning:
    """Encoded prompts: the joint-attention text sequence, the pooled CLIP vector and (Flux) the text positions."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    text_ids: Optional[torch.Tensor] = None


def _token_ids(tokenizer, prompts: list[str], max_length: int, device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_flow_prompts(frozen: FlowFrozen, prompts: list[str], device) -> FlowConditioning:
    """SD3: both CLIPs' penultimate hidden states side by side, zero-padded to T5's width, then T5's sequence (zeros
    without T5); pooled = both projected CLIP outputs. Flux: T5's sequence, CLIP's pooled output, zero text ids."""
    t5_length = frozen.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[frozen.family]
    if frozen.family == "flux":
        clip_ids = _token_ids(frozen.tokenizer, prompts, frozen.tokenizer.model_max_length, device)
        pooled = frozen.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = _token_ids(frozen.tokenizer_2, prompts, t5_length, device)
        with torch.no_grad():
            hidden = frozen.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return FlowConditioning(hidden, pooled, torch.zeros(hidden.shape[1], 3, device=device, dtype=hidden.dtype))
    outputs = [encoder(_token_ids(tokenizer, prompts, tokenizer.model_max_length, device), output_hidden_states=True)
               for tokenizer, encoder in ((frozen.tokenizer, frozen.text_encoder),
                                          (frozen.tokenizer_2, frozen.text_encoder_2))]
    clip_hidden = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
    pooled = torch.cat([output[0] for output in outputs], dim=-1)
    if frozen.text_encoder_3 is None:
        t5 = torch.zeros(len(prompts), t5_length, frozen.joint_attention_dim, device=device, dtype=clip_hidden.dtype)
    else:
        with torch.no_grad():
            t5 = frozen.text_encoder_3(_token_ids(frozen.tokenizer_3, prompts, t5_length, device))[0]
    clip_hidden = F.pad(clip_hidden, (0, t5.shape[-1] - clip_hidden.shape[-1]))
    return FlowConditioning(torch.cat([clip_hidden, t5.to(clip_hidden.dtype)], dim=-2), pooled)


def sample_sigmas(frozen: FlowFrozen, batch_size: int, generator: Optional[torch.Generator]):
    """(timesteps, sigmas) of `batch_size` samples from the scheduler's training table, u drawn by the scheme."""
    if frozen.weighting_scheme == "logit_normal":
        u = torch.sigmoid(torch.normal(frozen.logit_mean, frozen.logit_std, (batch_size,), generator=generator))
    else:
        u = torch.rand(batch_size, generator=generator)
        if frozen.weighting_scheme == "mode":
            u = 1 - u - frozen.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    table = frozen.noise_scheduler
    count = len(table.timesteps)
    indices = (u * count).long().clamp(0, count - 1)
    return table.timesteps[indices], table.sigmas[indices]


def loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights of the scheme (1 unless "cosmap" or "sigma_sqrt")."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return torch.ones_like(sigmas, dtype=torch.float32)


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def flow_matching_loss(
    transformer: torch.nn.Module,
    frozen: FlowFrozen,
    batch: Batch,
    generator: Optional[torch.Generator] = None,
    *,
    prior_loss_weight: float = 1.0,
    unmix_weight: float = 0.0,
    store: Optional[CrossAttentionStore] = None,
    train_text_encoder: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One forward pass of the SD3 or Flux transformer; returns the total loss (instance + λ · prior + the weighted
    unmix term on Cut-Mix samples, recorded by `install_joint_attention_recorders`) and its parts.

    The VAE's latent sample, the noise and σ are drawn from `generator` (on the CPU), so a step is determined by
    the batch and the generator, as in `training_loss`."""
    vae = frozen.vae
    device = next(p for p in transformer.parameters()).device
    with torch.no_grad():
        pixels = batch.pixel_values.to(device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator=generator)
        latents = (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    latents = latents.float()
    noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    timesteps, sigmas = sample_sigmas(frozen, latents.shape[0], generator)
    timesteps, sigmas = timesteps.to(device), sigmas.to(device)
    sigma = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
    noisy = (1 - sigma) * latents + sigma * noise
    with torch.set_grad_enabled(train_text_encoder):
        text = encode_flow_prompts(frozen, batch.prompts, device)
    dtype = transformer.dtype if hasattr(transformer, "dtype") else text.hidden.dtype
    use_unmix = unmix_weight > 0 and store is not None and batch.has_cutmix
    if use_unmix:
        n = batch.num_instance
        t5_length = frozen.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[frozen.family]
        store.start(joint_identifier_weights(frozen, batch.prompts[:n], batch.pairs, t5_length), batch.masks)
    try:
        prediction = _predict(transformer, frozen, noisy, timesteps, text, dtype)
        unmix = store.loss() if use_unmix else None
    finally:
        if use_unmix:
            store.stop()
    target = noise - latents
    weights = loss_weights(frozen.weighting_scheme, sigmas).view(-1, 1, 1, 1)
    per_sample = (weights * (prediction.float() - target) ** 2).flatten(1).mean(1)
    return combine_losses(per_sample, batch.num_instance, prior_loss_weight, unmix, unmix_weight)


def _predict(transformer, frozen: FlowFrozen, noisy: torch.Tensor, timesteps: torch.Tensor, text: FlowConditioning,
             dtype) -> torch.Tensor:
    """The transformer's velocity for unpacked latents, called as the pipeline calls it."""
    from diffusers import FluxPipeline

    device = noisy.device
    if frozen.family == "flux":
        size, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, size, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(size, height // 2, width // 2, device, dtype)
        guidance = torch.full((size,), frozen.guidance_scale, device=device) if frozen.guidance_embeds else None
        prediction = transformer(hidden_states=packed.to(dtype), timestep=timesteps / 1000, guidance=guidance,
                                 pooled_projections=text.pooled.to(dtype), encoder_hidden_states=text.hidden.to(dtype),
                                 txt_ids=text.text_ids, img_ids=image_ids, return_dict=False)[0]
        scale = vae_scale_factor(frozen.vae)
        return FluxPipeline._unpack_latents(prediction, height * scale, width * scale, scale)
    return transformer(hidden_states=noisy.to(dtype), timestep=timesteps, encoder_hidden_states=text.hidden.to(dtype),
                       pooled_projections=text.pooled.to(dtype), return_dict=False)[0]
