"""Full SVD vs our seeded randomized top-k SVD (`svd.truncated_decompose`) on large matrices, one thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/truncated_svd.py      # ~2-3 min on one CPU thread

Two float32 matrices with a known, decaying spectrum σⱼ = 1/(1 + j) (built as U·diag(σ)·Vᵀ from QR-orthonormalised
Gaussian matrices, seed 0): 3072 × 3072 (a DiT attention projection) and 3072 × 12288 (an MLP projection). For each:
the time of `torch.linalg.svd` (full thin SVD; the engine decomposes wide matrices through the transpose, so that is
what is timed), of ours for k ∈ {16, 64} (p = 16, q = 4: the defaults), and of `torch.svd_lowrank(q=k+16, niter=4)`
for reference; the largest error of the top-k singular values (relative to σ₁), the residual ‖W − U_k·U_kᵀ·W‖_F
relative to the best any rank-k basis can do (√(Σ_{j≥k} σⱼ²); 1 is optimal), and the smallest cosine of the
principal angles between U_k and the exact top-k left singular subspace (set by the last kept direction, whose σ
is within 1/k of the next one). Times are single runs: on a machine shared with other jobs they vary by tens of
percent, the ratios less.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from svdiff_adapter.svd import TruncatedSVD, truncated_decompose

SHAPES = ((3072, 3072), (3072, 12288))
RANKS = (16, 64)


def decaying_matrix(rows: int, cols: int, seed: int = 0):
    """W = U·diag(σ)·Vᵀ with σⱼ = 1/(1 + j), and the exact U, σ."""
    generator = torch.Generator().manual_seed(seed)
    size = min(rows, cols)
    left = torch.linalg.qr(torch.randn(rows, size, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(cols, size, generator=generator)).Q
    sigma = 1.0 / (1.0 + torch.arange(size, dtype=torch.float32))
    return (left * sigma) @ right.T, left, sigma


def seconds(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def full_svd(matrix):
    # The engine's `decompose`: wide matrices through the transpose (LAPACK is several times faster on tall ones).
    if matrix.shape[0] < matrix.shape[1]:
        return torch.linalg.svd(matrix.T, full_matrices=False)
    return torch.linalg.svd(matrix, full_matrices=False)


def residual_ratio(matrix, U, sigma, rank) -> float:
    """‖W − U·Uᵀ·W‖_F / √(Σ_{j≥k} σⱼ²) (float64): ‖W‖² − ‖UᵀW‖² over the tail energy."""
    W, U = matrix.double(), U.double()
    residual = float(W.pow(2).sum() - (U.T @ W).pow(2).sum())
    return math.sqrt(max(residual, 0.0) / float(sigma[rank:].double().pow(2).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    print("| matrix | method | time | vs full SVD | max σ error / σ₁ (top k) | residual / optimal | "
          "min cos ∠(U_k, exact) |")
    print("|---|---|---|---|---|---|---|")
    for rows, cols in SHAPES:
        matrix, left, sigma = decaying_matrix(rows, cols)
        full_time, (_, full_sigma, _) = seconds(lambda: full_svd(matrix))
        name = f"{rows} × {cols}"
        error = float((full_sigma[:max(RANKS)] - sigma[:max(RANKS)]).abs().max() / sigma[0])
        print(f"| {name} | `torch.linalg.svd` (full) | {full_time:.2f} s | 1 | {error:.1e} | 1 | 1 |")
        for rank in RANKS:
            ours_time, factors = seconds(lambda: truncated_decompose(matrix, TruncatedSVD(rank), torch.float32))
            error = float((factors.S - sigma[:rank]).abs().max() / sigma[0])
            cosine = float(torch.linalg.svdvals(factors.U.double().T @ left[:, :rank].double()).min())
            print(f"| {name} | ours, k = {rank} | {ours_time:.2f} s | {ours_time / full_time:.3f} | {error:.1e} | "
                  f"{residual_ratio(matrix, factors.U, sigma, rank):.4f} | {cosine:.4f} |")
            torch.manual_seed(0)
            low_time, (U, S, _) = seconds(lambda: torch.svd_lowrank(matrix, q=rank + 16, niter=4))
            error = float((S[:rank] - sigma[:rank]).abs().max() / sigma[0])
            cosine = float(torch.linalg.svdvals(U[:, :rank].double().T @ left[:, :rank].double()).min())
            print(f"| {name} | `torch.svd_lowrank`, k = {rank} | {low_time:.2f} s | {low_time / full_time:.3f} | "
                  f"{error:.1e} | {residual_ratio(matrix, U[:, :rank], sigma, rank):.4f} | {cosine:.4f} |")


if __name__ == "__main__":
    main()
