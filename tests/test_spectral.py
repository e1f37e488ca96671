"""The spectral math (`svdiff_adapter.spectral`) against float64 references written from the paper's equations:
W_δ = U·diag(ReLU(σ + δ))·Vᵀ, addition ReLU(σ + δ₁ + δ₂), interpolation ReLU(σ + α·δ₁ + (1 − α)·δ₂)."""

import pytest
import torch

from svdiff_adapter import spectral


def _svd(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(*shape, generator=generator, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(spectral.weight_matrix(weight), full_matrices=False)
    return weight, U, S, Vh


def _paper(U, S, Vh, shift, weight_shape):
    """The paper's recomposition, float64: U·diag(ReLU(σ + s))·Vᵀ."""
    return (U @ torch.diag(torch.relu(S + shift)) @ Vh).reshape(weight_shape)


def _clipping_shift(S, seed):
    generator = torch.Generator().manual_seed(seed)
    shift = torch.randn(S.shape, generator=generator, dtype=torch.float64) * S.mean()
    shift[:2] = -1.5 * S[:2]  # the ReLU clips these
    return shift


@pytest.mark.parametrize("shape", [(12, 7), (5, 20), (6, 3, 3, 3), (1, 9)])
def test_delta_form_is_the_papers_shift(shape):
    weight, U, S, Vh = _svd(shape)
    shift = _clipping_shift(S, 1)
    ours = spectral.shifted_weight(weight, U, S, Vh, shift)
    assert ours.shape == weight.shape and ours.dtype == torch.float64
    assert torch.allclose(ours, _paper(U, S, Vh, shift, weight.shape), atol=1e-12)
    assert spectral.shift_length(weight.shape, True) == S.numel()


def test_addition_and_interpolation_happen_inside_the_relu():
    weight, U, S, Vh = _svd((10, 8))
    dog, cat = _clipping_shift(S, 2), _clipping_shift(S, 3)
    for weights in [(1.0, 1.0), (0.3, 0.7), (0.0, 1.0)]:
        combined = spectral.combine_shifts([(dog, weights[0]), (cat, weights[1])], S.numel())
        assert combined.dtype == torch.float32  # the sum enters the ReLU in float32, in the order given
        expected = _paper(U, S, Vh, weights[0] * dog + weights[1] * cat, weight.shape)
        ours = spectral.shifted_weight(weight, U, S, Vh, combined.double())
        assert torch.allclose(ours, expected, atol=1e-5)
        outside = weight + sum(w * (_paper(U, S, Vh, d, weight.shape) - weight) for d, w in zip((dog, cat), weights))
        if weights != (0.0, 1.0):
            assert (ours - outside).abs().max() > 1e-3  # combining outputs (as LoRA does) is something else
    assert torch.equal(spectral.combine_shifts([], 4), torch.zeros(4))


def test_zero_shift_gives_the_weight_bit_for_bit_in_any_dtype():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        weight, U, S, Vh = _svd((9, 6))
        low = weight.to(dtype)
        zero = torch.zeros(S.numel())
        assert torch.equal(spectral.shifted_weight(low, U.half(), S.float(), Vh.half(), zero), low)


def test_change_is_linear_except_where_the_relu_clips():
    _, _, S, _ = _svd((8, 8))
    shift = _clipping_shift(S, 4)
    change = spectral.spectral_change(S, shift)
    assert torch.allclose(change, shift + spectral.clipped_amount(S, shift))
    assert torch.equal(spectral.clipped_amount(S, shift) > 0, S + shift < 0)


def test_products_and_the_diagonal_projection():
    weight, U, S, Vh = _svd((7, 11))
    scale = torch.randn(S.numel(), dtype=torch.float64)
    full = U @ torch.diag(scale) @ Vh
    assert torch.allclose(spectral.factor_product(U, Vh, scale, torch.float64), full)
    columns = torch.tensor([0, 3])
    part = U[:, columns] @ torch.diag(scale[columns]) @ Vh[columns]
    assert torch.allclose(spectral.factor_product(U, Vh, scale[columns], torch.float64, columns), part)
    base = torch.randn(7, 11)
    assert torch.allclose(spectral.add_factor_product(base, U, Vh, scale), base + full.float(), atol=1e-5)
    gradient = torch.randn(7, 11, dtype=torch.float64)
    for matrix in (gradient, gradient.T.contiguous().T):  # both branches (tall and wide intermediate)
        assert torch.allclose(spectral.diagonal_projection(U, Vh, matrix), torch.diag(U.T @ matrix @ Vh.T))
    tall_U, tall_Vh = torch.linalg.svd(torch.randn(11, 7, dtype=torch.float64), full_matrices=False)[::2]
    matrix = torch.randn(11, 7, dtype=torch.float64)
    assert torch.allclose(spectral.diagonal_projection(tall_U, tall_Vh, matrix), torch.diag(tall_U.T @ matrix @ tall_Vh.T))


def test_gradient_of_the_change_matches_autograd_on_the_papers_formula():
    weight, U, S, Vh = _svd((6, 9))
    shift = _clipping_shift(S, 5).requires_grad_(True)
    target = torch.randn(6, 9, dtype=torch.float64)
    (spectral.delta_weight(U, S, Vh, shift, weight.shape) * target).sum().backward()
    ours = shift.grad.clone()
    reference_shift = shift.detach().clone().requires_grad_(True)
    ((_paper(U, S, Vh, reference_shift, weight.shape) - weight) * target).sum().backward()
    assert torch.allclose(ours, reference_shift.grad)


def test_elementwise_norm_shifts_add_to_the_weight():
    gamma = torch.randn(5, dtype=torch.float64)
    shift = torch.randn(5, dtype=torch.float64)
    assert torch.allclose(spectral.shifted_weight(gamma, None, None, None, shift), gamma + shift)
    assert spectral.shift_length(gamma.shape, False) == 5 and spectral.shift_length(gamma.shape, True) == 1
