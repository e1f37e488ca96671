"""DDIM inversion and DDIM sampling of latents with the pipeline's UNet and noise schedule (SD 1.x/2.x, SDXL).

Both loops build their schedulers from the pipeline's scheduler config (whatever its class: PNDM, Euler, DDIM,
...), so the noise schedule, timestep spacing and prediction type are the pipeline's. Inversion step k runs the
sampling step k backwards: where sampling maps z_t → z_{t−Δ} with ε(z_t, t), inversion maps z_{t−Δ} → z_t with
ε(z_{t−Δ}, t). The two are exact inverses up to that one approximation, so inverting and then sampling with the
same prompt, guidance 1 and η = 0 gives back the starting latent closely (tests/test_editing.py).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from .conditioning import encode_prompts, predict_noise


logger = logging.getLogger(__name__)


def ddim_schedulers(config) -> tuple:
    """A `DDIMScheduler` and a `DDIMInverseScheduler` from a pipeline's scheduler config, with matching timesteps.

    Two settings are adjusted: `timestep_spacing` "linspace" (which the inverse scheduler lacks) becomes "leading"
    for both, and `clip_sample` defaults to False when the config does not set it (DDIM's default clips x̂₀ to
    [−1, 1], meant for pixel-space models, not latents).
    """
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    overrides = {"clip_sample": config.get("clip_sample", False)}
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in ("leading", "trailing"):
        logger.info("Timestep spacing %r is not available for DDIM inversion; using 'leading'.", spacing)
        overrides["timestep_spacing"] = "leading"
    return DDIMScheduler.from_config(config, **overrides), DDIMInverseScheduler.from_config(config, **overrides)


def _batch(latents: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    # One starting latent serves every prompt of a batch (the input image edited towards several targets).
    if latents.shape[0] == len(prompts):
        return latents
    if latents.shape[0] == 1:
        return latents.expand(len(prompts), *latents.shape[1:])
    raise ValueError(f"Got {latents.shape[0]} latents for {len(prompts)} prompts; give one latent or one per prompt.")


def _pixel_size(pipe, latents: torch.Tensor) -> tuple[int, int]:
    factor = pipe.vae_scale_factor
    return latents.shape[-2] * factor, latents.shape[-1] * factor


@torch.no_grad()
def ddim_invert(pipe, latents: torch.Tensor, prompts: Sequence[str], *, num_inference_steps: int = 50,
                guidance_scale: float = 1.0, progress: bool = True) -> torch.Tensor:
    """DDIM-invert clean latents z₀ to z_T, one row per prompt, with the pipeline's UNet as it is now (active
    adapters included).

    Args:
        pipe: a Stable Diffusion 1.x/2.x or SDXL pipeline.
        latents (`torch.Tensor`): scaled VAE latents, shape (1 or len(prompts), C, h, w).
        prompts (`list[str]`): the conditioning of each row (CoSINE: the *target* prompt).
        num_inference_steps (`int`, defaults to 50): use the same number when sampling from the result.
        guidance_scale (`float`, defaults to 1.0): 1 (no classifier-free guidance) is what makes inversion and
            sampling inverse to each other; the paper inverts at 1.
        progress (`bool`, defaults to `True`): show a progress bar.

    Returns:
        `torch.Tensor`: z_T in float32, shape (len(prompts), C, h, w).
    """
    _, inverse = ddim_schedulers(pipe.scheduler.config)
    return _run_ddim(pipe, inverse, latents, prompts, num_inference_steps, guidance_scale, "DDIM inversion", progress)


@torch.no_grad()
def ddim_sample(pipe, latents: torch.Tensor, prompts: Sequence[str], *, num_inference_steps: int = 50,
                guidance_scale: float = 7.5, eta: float = 0.0, generator: Optional[torch.Generator] = None,
                progress: bool = True) -> torch.Tensor:
    """DDIM sampling from z_T to z₀, one row per prompt, with the pipeline's UNet as it is now.

    Args:
        pipe: a Stable Diffusion 1.x/2.x or SDXL pipeline.
        latents (`torch.Tensor`): z_T, shape (1 or len(prompts), C, h, w).
        prompts (`list[str]`): the prompt of each row.
        num_inference_steps (`int`, defaults to 50): denoising steps.
        guidance_scale (`float`, defaults to 7.5): classifier-free guidance (off at 1).
        eta (`float`, defaults to 0.0): DDIM's η; 0 is deterministic, η > 0 adds fresh noise at every step
            (drawn from `generator`), 1 is DDPM-like.
        generator (`torch.Generator`, *optional*): makes η > 0 reproducible.
        progress (`bool`, defaults to `True`): show a progress bar.

    Returns:
        `torch.Tensor`: z₀ in float32 (decode with `decode_latents`).
    """
    if eta < 0:
        raise ValueError(f"`eta` should be >= 0 but the value passed is {eta}.")
    scheduler, _ = ddim_schedulers(pipe.scheduler.config)
    return _run_ddim(pipe, scheduler, latents, prompts, num_inference_steps, guidance_scale, "DDIM sampling", progress,
                     eta=eta, generator=generator)


def _run_ddim(pipe, scheduler, latents, prompts, num_inference_steps, guidance_scale, desc, progress, **step_kwargs):
    """The loop shared by inversion and sampling: only the scheduler (forward or inverse DDIM) differs."""
    from tqdm.auto import tqdm

    if num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` should be >= 1 but the value passed is {num_inference_steps}.")
    scheduler.set_timesteps(num_inference_steps, device=pipe.unet.device)
    latents = _batch(latents.to(pipe.unet.device, torch.float32), prompts)
    height, width = _pixel_size(pipe, latents)
    conditioning = encode_prompts(pipe, prompts, guided=guidance_scale > 1, height=height, width=width)
    for timestep in tqdm(scheduler.timesteps, desc=desc, disable=not progress):
        noise = predict_noise(pipe.unet, latents, timestep, conditioning, guidance_scale)
        latents = scheduler.step(noise, timestep, latents, **step_kwargs).prev_sample
    return latents
