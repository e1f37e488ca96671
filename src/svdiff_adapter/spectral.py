"""The spectral math of SVDiff, in one place (Han et al., "SVDiff: Compact Parameter Space for Diffusion
Fine-Tuning", ICCV 2023, §3.2).

A weight W (conv kernels c_out × c_in × kh × kw seen as c_out × (c_in·kh·kw), §3.1 after FSGAN) has the SVD
W = U·diag(σ)·Vᵀ. The paper's three equations, and how this module writes them:

- spectral shift (§3.2, "Spectral shifts"):      W_δ = U·diag(ReLU(σ + δ))·Vᵀ
- addition (§3.2, "Combining spectral shifts"):  Σ_δ' = diag(ReLU(σ + δ₁ + δ₂))
- interpolation (same paragraph), 0 ≤ α ≤ 1:      Σ_δ' = diag(ReLU(σ + α·δ₁ + (1 − α)·δ₂))

Both combinations are one shift s = Σᵢ wᵢ·δᵢ inside the ReLU (`combine_shifts`). Every consumer (the layers, the
tools, `merge`) applies s in *delta form*

    W_δ = W + U·diag(c)·Vᵀ,    c = ReLU(σ + s) − σ                                  (`spectral_change`)

which equals the paper's W_δ up to the SVD's round-off, gives W bit for bit at s = 0, and lets the factors be stored
in low precision: their rounding only scales the change c, never W.

Two identities the rest of the package relies on:
- c = s + ReLU(−(σ + s)): the change is linear in s except on the singular values the ReLU clips
  (`clipped_amount`), which makes interpolation sweeps cheap (the layers' switch cache).
- dL/dcⱼ = uⱼᵀ·G·vⱼ for a weight gradient G (`diagonal_projection`): the backward of ΔW, and the least-squares
  projection of a weight change onto shifts (`svdiff extract`).

1-D norm weights γ are shifted either elementwise (γ + s, no SVD; the paper's "1-D" parameters of Table 1) or, as
svdiff-pytorch does, as a 1 × C matrix whose single singular value is ‖γ‖.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The matrix whose singular values a weight's shift moves (a view): (m, n) as is, conv kernels as
    c_out × (c_in·kh·kw), 1-D norm weights γ as 1 × C."""
    if weight.ndim == 1:
        return weight.reshape(1, -1)
    return weight.reshape(weight.shape[0], -1)


def shift_length(weight_shape: torch.Size, decomposed: bool, rank: Optional[int] = None) -> int:
    """Values in one shift: k = min(m, n) singular values of `weight_matrix` (k' = min(rank, m, n) with a truncated
    spectrum), or every element of a weight shifted elementwise (`decomposed=False`)."""
    numel = 1
    for size in weight_shape:
        numel *= size
    if not decomposed:
        return numel
    rows = 1 if len(weight_shape) == 1 else weight_shape[0]
    return min(rows, numel // rows, rank or numel)


def combine_shifts(weighted_shifts: Iterable[tuple[torch.Tensor, float]], length: int,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """s = Σᵢ wᵢ·δᵢ in float32, accumulated in the order given (addition and interpolation both are this sum).

    The layers and `svdiff merge` both call this, so a merged file reproduces `set_adapters` bit for bit. No
    shifts give s = 0 of `length` values.
    """
    combined = None
    for shift, weight in weighted_shifts:
        term = shift.to(torch.float32) * weight
        combined = term if combined is None else combined + term
    if combined is None:
        return torch.zeros(length, dtype=torch.float32, device=device)
    return combined


def spectral_change(singular_values: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """c = ReLU(σ + s) − σ: how much each singular value moves (delta form of the spectral shift)."""
    return torch.relu(singular_values + shift) - singular_values


def clipped_amount(singular_values: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """ReLU(−(σ + s)): what the ReLU adds back where σ + s < 0, so that c = s + clipped_amount."""
    return torch.relu(-(singular_values + shift))


def factor_product(U: torch.Tensor, Vh: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                   columns: Optional[torch.Tensor] = None) -> torch.Tensor:
    """U·diag(scale)·Vᵀ as an m × n matrix, its product computed in `dtype`; `columns` restricts it to some
    singular values (U[:, J]·diag(scale)·Vᵀ[J])."""
    if columns is not None:
        U, Vh = U[:, columns], Vh[columns]
    return (U.to(dtype) * scale.to(dtype)) @ Vh.to(dtype)


def add_factor_product(matrix: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor, scale: torch.Tensor,
                       dtype: torch.dtype = torch.float32, columns: Optional[torch.Tensor] = None) -> torch.Tensor:
    """matrix (m × n) + U·diag(scale)·Vᵀ with the product in `dtype`; in the matrix's own dtype one BLAS call
    (addmm) that never forms a separate m × n product."""
    if dtype != matrix.dtype:
        return matrix + factor_product(U, Vh, scale, dtype, columns)
    if columns is not None:
        U, Vh = U[:, columns], Vh[columns]
    return torch.addmm(matrix, U.to(dtype) * scale.to(dtype), Vh.to(dtype))


def diagonal_projection(U: torch.Tensor, Vh: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """diag(Uᵀ·M·V), through whichever intermediate (k × n or m × k) is smaller; in M's dtype."""
    U, Vh = U.to(matrix.dtype), Vh.to(matrix.dtype)
    if U.shape[0] >= Vh.shape[1]:
        return ((U.T @ matrix) * Vh).sum(dim=1)
    return ((matrix @ Vh.T) * U).sum(dim=0)


class SpectralDeltaWeight(torch.autograd.Function):
    """ΔW = U·diag(c)·Vᵀ, differentiable in c only (U and Vᵀ are frozen), with a backward dL/dc = diag(Uᵀ·G·V)
    that never forms a k × k or an extra m × n tensor."""

    @staticmethod
    def forward(ctx, U: torch.Tensor, Vh: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(U, Vh)
        return (U.to(change.dtype) * change) @ Vh.to(change.dtype)

    @staticmethod
    def backward(ctx, grad_delta: torch.Tensor):
        U, Vh = ctx.saved_tensors
        return None, None, diagonal_projection(U, Vh, grad_delta.to(torch.float32))


def delta_weight(U: Optional[torch.Tensor], S: Optional[torch.Tensor], Vh: Optional[torch.Tensor],
                 shift: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """ΔW (float32, the weight's shape) for a combined shift, differentiable in the shift. Without factors (an
    elementwise norm shift) ΔW is the shift itself."""
    if S is None:
        return shift.reshape(weight_shape)
    return SpectralDeltaWeight.apply(U, Vh, spectral_change(S, shift)).reshape(weight_shape)


def shifted_weight(weight: torch.Tensor, U: Optional[torch.Tensor], S: Optional[torch.Tensor],
                   Vh: Optional[torch.Tensor], shift: torch.Tensor,
                   build_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_δ = W + ΔW in W's dtype, summed in float32 (float64 for float64 weights); without gradients through a
    fused addmm whose products run in `build_dtype` (a lower one rounds only ΔW, never W)."""
    if S is not None and not (torch.is_grad_enabled() and shift.requires_grad):
        work = torch.promote_types(weight.dtype, torch.float32)
        matrix = weight_matrix(weight).to(work)
        change = spectral_change(S.to(work), shift.to(work))
        fused = add_factor_product(matrix, U, Vh, change, work if build_dtype == torch.float32 else build_dtype)
        return fused.reshape(weight.shape).to(weight.dtype)
    delta = delta_weight(U, S, Vh, shift, weight.shape)
    if weight.dtype == torch.float32:
        return weight + delta
    return (weight.to(torch.float32) + delta).to(weight.dtype)
