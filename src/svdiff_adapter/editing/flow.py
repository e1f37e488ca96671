"""Inversion and sampling of flow-matching transformers (SD3 / SD3.5, Flux.1) for CoSINE editing.

These pipelines sample the flow ODE dx/dσ = v(x, σ) from σ = 1 (noise) to σ = 0 (the image) with Euler steps on
the σ schedule of their `FlowMatchEulerDiscreteScheduler` (with the resolution-dependent shift μ when the scheduler
uses dynamic shifting, as `FluxPipeline` and `StableDiffusion3Pipeline` compute it, diffusers 0.42). Sampling step i
maps x_i → x_{i+1} = x_i + (σ_{i+1} − σ_i)·v(x_i, σ_i). Inversion — the analogue of DDIM inversion — integrates the
same ODE backwards: step i maps x_{i+1} → x_i = x_{i+1} + (σ_i − σ_{i+1})·v(x_{i+1}, σ_i), the velocity taken at the
latent known at that point. The two are exact inverses except for that one approximation, v(x_{i+1}, σ_i) ≈
v(x_i, σ_i), a first-order error that shrinks with the step (tests/test_editing_flow.py).

Noise for larger edits (CoSINE, SVDiff paper §3.3): slerp of the inverted latent with Gaussian noise (`noise.slerp`),
and an η-like stochastic sampler: with the step's own predictions x̂₀ = x − σ·v and ε̂ = x + (1 − σ)·v, the next
latent is (1 − σ')·x̂₀ + σ'·(√(1 − η²)·ε̂ + η·ξ), ξ fresh Gaussian noise. The mixed noise keeps unit variance, so the
latent stays at noise level σ'; η = 0 is the Euler step exactly, η = 1 replaces the predicted noise entirely (as
DDIM's η interpolates between the deterministic sampler and fresh noise).

Guidance: SD3 uses classifier-free guidance (v_u + g·(v_c − v_u), empty negative prompt) when g > 1; Flux.1-dev's
distilled guidance takes g in its guidance embedding (Flux.1-schnell has none and ignores it). Inversion runs at
g = 1 (no classifier-free guidance; an embedding of 1 for Flux-dev).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

FLOW_TRANSFORMERS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def flow_family(pipe) -> Optional[str]:
    """"sd3" or "flux" when the pipeline's denoiser is an SD3 or Flux transformer, else None."""
    transformer = getattr(pipe, "transformer", None)
    return FLOW_TRANSFORMERS.get(type(transformer).__name__) if transformer is not None else None


def flow_sigmas(pipe, num_inference_steps: int, latent_height: int, latent_width: int) -> torch.Tensor:
    """The N + 1 σ of an N-step run (from 1 down to 0, float64), as the pipeline would use them for this size."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    if num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` should be >= 1 but the value passed is {num_inference_steps}.")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    config = scheduler.config
    options = {}
    if flow_family(pipe) == "flux":  # FluxPipeline passes its own linear σ before the shift
        options["sigmas"] = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    if config.get("use_dynamic_shifting", False):
        patch = 2 if flow_family(pipe) == "flux" else pipe.transformer.config.patch_size
        tokens = (latent_height // patch) * (latent_width // patch)
        options["mu"] = calculate_shift(tokens, config.get("base_image_seq_len", 256),
                                        config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                        config.get("max_shift", 1.15))
    scheduler.set_timesteps(num_inference_steps=None if "sigmas" in options else num_inference_steps, **options)
    return scheduler.sigmas.double()


class FlowVelocity:
    """v(x, σ) of the pipeline's transformer for fixed prompts and guidance, on unpacked latents (B, C, h, w)."""

    def __init__(self, pipe, prompts: Sequence[str], guidance_scale: float, height: int, width: int) -> None:
        self.pipe, self.family, self.guidance_scale = pipe, flow_family(pipe), guidance_scale
        self.height, self.width = height, width
        device = pipe.transformer.device
        prompts = list(prompts)
        with torch.no_grad():
            if self.family == "flux":
                self.embeds, self.pooled, self.text_ids = pipe.encode_prompt(prompts, prompts, device=device)
                self.guided = False
            else:
                self.guided = guidance_scale > 1
                embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                    prompts, prompts, prompts, device=device, do_classifier_free_guidance=self.guided)
                self.embeds = torch.cat([negative, embeds]) if self.guided else embeds
                self.pooled = torch.cat([negative_pooled, pooled]) if self.guided else pooled

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, sigma: float) -> torch.Tensor:
        from diffusers import FluxPipeline

        transformer = self.pipe.transformer
        dtype = transformer.dtype
        size, channels, height, width = latents.shape
        if self.family == "flux":
            packed = FluxPipeline._pack_latents(latents, size, channels, height, width)
            image_ids = FluxPipeline._prepare_latent_image_ids(size, height // 2, width // 2, latents.device, dtype)
            guidance = None
            if transformer.config.get("guidance_embeds", False):
                guidance = torch.full((size,), self.guidance_scale, device=latents.device, dtype=torch.float32)
            timestep = torch.full((size,), sigma, device=latents.device, dtype=dtype)  # Flux takes σ = t / 1000
            output = transformer(hidden_states=packed.to(dtype), timestep=timestep, guidance=guidance,
                                 pooled_projections=self.pooled.to(dtype), encoder_hidden_states=self.embeds.to(dtype),
                                 txt_ids=self.text_ids, img_ids=image_ids, return_dict=False)[0]
            return FluxPipeline._unpack_latents(output, self.height, self.width, self.pipe.vae_scale_factor).float()
        model_input = torch.cat([latents] * 2) if self.guided else latents
        timestep = torch.full((model_input.shape[0],), sigma * self.pipe.scheduler.config.num_train_timesteps,
                              device=latents.device, dtype=dtype)
        output = transformer(hidden_states=model_input.to(dtype), timestep=timestep,
                             encoder_hidden_states=self.embeds.to(dtype), pooled_projections=self.pooled.to(dtype),
                             return_dict=False)[0].float()
        if not self.guided:
            return output
        unconditional, conditional = output.chunk(2)
        return unconditional + self.guidance_scale * (conditional - unconditional)


def _start(pipe, latents: torch.Tensor, prompts: Sequence[str]):
    from .inversion import _batch

    latents = _batch(latents.to(pipe.transformer.device, torch.float32), prompts)
    factor = pipe.vae_scale_factor
    height, width = latents.shape[-2] * factor, latents.shape[-1] * factor
    return latents, height, width


@torch.no_grad()
def flow_invert(pipe, latents: torch.Tensor, prompts: Sequence[str], *, num_inference_steps: int = 50,
                guidance_scale: float = 1.0, progress: bool = True) -> torch.Tensor:
    """Integrate the flow ODE backwards from clean latents x₀ (σ = 0) to x₁ (σ = 1), one row per prompt, with the
    pipeline's transformer as it is now (active adapters included).

    Args:
        pipe: a `StableDiffusion3Pipeline` or `FluxPipeline`.
        latents (`torch.Tensor`): shifted and scaled VAE latents (`encode_image`), shape (1 or len(prompts), C, h, w).
        prompts (`list[str]`): the conditioning of each row (CoSINE: the *target* prompt).
        num_inference_steps (`int`, defaults to 50): use the same number when sampling from the result.
        guidance_scale (`float`, defaults to 1.0): 1 (no classifier-free guidance) is what makes inversion and
            sampling inverse to each other.
        progress (`bool`, defaults to `True`): show a progress bar.
    """
    from tqdm.auto import tqdm

    latents, height, width = _start(pipe, latents, prompts)
    sigmas = flow_sigmas(pipe, num_inference_steps, latents.shape[-2], latents.shape[-1])
    velocity = FlowVelocity(pipe, prompts, guidance_scale, height, width)
    for i in tqdm(reversed(range(len(sigmas) - 1)), total=len(sigmas) - 1, desc="Flow inversion",
                  disable=not progress):
        latents = latents + float(sigmas[i] - sigmas[i + 1]) * velocity(latents, float(sigmas[i]))
    return latents


@torch.no_grad()
def flow_sample(pipe, latents: torch.Tensor, prompts: Sequence[str], *, num_inference_steps: int = 50,
                guidance_scale: float = 3.5, eta: float = 0.0, generator: Optional[torch.Generator] = None,
                progress: bool = True) -> torch.Tensor:
    """Euler sampling of the flow ODE from x₁ (σ = 1) to x₀, one row per prompt; η in [0, 1] mixes fresh noise into
    the predicted noise at every step (module docstring), drawn from `generator`.

    Returns:
        `torch.Tensor`: x₀ in float32 (decode with `decode_latents`).
    """
    from tqdm.auto import tqdm

    if not (math.isfinite(eta) and 0.0 <= eta <= 1.0):
        raise ValueError(f"`eta` should be in [0, 1] for flow models but the value passed is {eta}.")
    latents, height, width = _start(pipe, latents, prompts)
    sigmas = flow_sigmas(pipe, num_inference_steps, latents.shape[-2], latents.shape[-1])
    velocity = FlowVelocity(pipe, prompts, guidance_scale, height, width)
    for i in tqdm(range(len(sigmas) - 1), desc="Flow sampling", disable=not progress):
        sigma, following = float(sigmas[i]), float(sigmas[i + 1])
        predicted = velocity(latents, sigma)
        if eta == 0:
            latents = latents + (following - sigma) * predicted
            continue
        clean = latents - sigma * predicted
        noise = latents + (1 - sigma) * predicted
        fresh = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        latents = (1 - following) * clean + following * (math.sqrt(1 - eta**2) * noise + eta * fresh)
    return latents
