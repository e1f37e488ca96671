"""Noise injection for large structural edits (CoSINE, SVDiff paper): spherical interpolation of the inverted latent
towards fresh Gaussian noise."""

from __future__ import annotations

import torch


def slerp(alpha: float, latents: torch.Tensor, noise: torch.Tensor, *, threshold: float = 1e-6) -> torch.Tensor:
    """slerp(α, z, ε) = sin((1 − α)φ)/sin φ · z + sin(αφ)/sin φ · ε, with cos φ = ⟨z, ε⟩ / (‖z‖‖ε‖).

    Each sample of the batch (dimension 0) has its own angle φ. `alpha = 0` gives `latents`, `alpha = 1` gives
    `noise`; for ‖z‖ = ‖ε‖ every result keeps that norm and lies at the angle αφ from z. Where sin φ < `threshold`
    (z and ε parallel, anti-parallel or zero) the arc is undefined and the result is the linear interpolation
    (1 − α)·z + α·ε.

    Args:
        alpha (`float`): interpolation weight in [0, 1]; larger values inject more noise.
        latents (`torch.Tensor`): z, e.g. the DDIM-inverted latents z_T, shape (B, ...).
        noise (`torch.Tensor`): ε, the same shape (usually drawn from N(0, I)).
        threshold (`float`, *optional*, defaults to 1e-6): below this sin φ, interpolate linearly.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` should be in [0, 1] but the value passed is {alpha}.")
    if latents.shape != noise.shape:
        raise ValueError(f"`latents` and `noise` should have the same shape, got {tuple(latents.shape)} and "
                         f"{tuple(noise.shape)}.")
    # Angles in float64: for latents of 10⁴–10⁵ elements, cos φ in float32 loses the digits sin φ is made of.
    z, eps = latents.reshape(latents.shape[0], -1).double(), noise.reshape(noise.shape[0], -1).double()
    norms = z.norm(dim=1) * eps.norm(dim=1)
    cos_phi = ((z * eps).sum(dim=1) / norms.clamp_min(torch.finfo(torch.float64).tiny)).clamp(-1.0, 1.0)
    phi = torch.arccos(cos_phi)
    sin_phi = torch.sin(phi)
    linear = (sin_phi < threshold) | (norms == 0)
    safe_sin = torch.where(linear, torch.ones_like(sin_phi), sin_phi)
    weight_latents = torch.where(linear, torch.full_like(phi, 1.0 - alpha), torch.sin((1.0 - alpha) * phi) / safe_sin)
    weight_noise = torch.where(linear, torch.full_like(phi, alpha), torch.sin(alpha * phi) / safe_sin)
    shape = (-1,) + (1,) * (latents.ndim - 1)
    mixed = weight_latents.view(shape) * latents.double() + weight_noise.view(shape) * noise.double()
    return mixed.to(latents.dtype)
