"""The SVD engine: factors of weight matrices, computed once, kept small, optionally cached on disk.

Only weights are known here, never adapters. A weight of any shape is seen as a matrix (`spectral.weight_matrix`):
conv kernels c_out × c_in × kh × kw as c_out × (c_in·kh·kw), 1-D norm weights γ as 1 × C.

What is kept per matrix (m × n, k = min(m, n)) and why:
- U (m × k) and Vᵀ (k × n) in float16 by default: spectral shifts are applied in delta form
  W_δ = W + U·diag(ReLU(σ+δ) − σ)·Vᵀ, so a factor's rounding error (≤ 2⁻¹¹ relative; entries of orthonormal
  columns never overflow float16) only scales the *change* |ReLU(σ+δ) − σ|, never W itself. Half the memory of
  float32 factors, which `factor_dtype=torch.float32` keeps instead (docs/performance.md compares the two).
- σ (k) in float32: it decides where the ReLU clips and is tiny.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .atomic import atomic_save_safetensors


logger = logging.getLogger(__name__)

FACTOR_DTYPE = torch.float16  # the default; `factor_dtype=torch.float32` is the other choice
FACTOR_DTYPES = (torch.float16, torch.float32)
# Bump when the factor computation or the cache layout changes: old entries then never match.
ENGINE_VERSION = "2"
CACHE_ENV = "SVDIFF_SVD_CACHE"
CACHE_DIR_ENV = "SVDIFF_CACHE_DIR"
# Below this many weight elements a progress bar is noise.
_PROGRESS_MIN_ELEMENTS = 50_000_000
SMALL_MATRIX = 512 * 512  # elements; see one_thread_if_small
_IO_WORKERS = 2
_SVD_WORKERS = 4


@dataclass
class SpectralFactors:
    """Thin SVD of a weight matrix: W ≈ U · diag(S) · Vh, S descending."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def to(self, device) -> "SpectralFactors":
        return SpectralFactors(self.U.to(device), self.S.to(device), self.Vh.to(device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.U, self.S, self.Vh))


def factor_dtype_of(dtype: Union[torch.dtype, str, None]) -> torch.dtype:
    """`torch.float16` (the default, for `None`) or `torch.float32`, from a dtype or its name."""
    if dtype is None:
        return FACTOR_DTYPE
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if resolved not in FACTOR_DTYPES:
        raise ValueError(f"`factor_dtype` should be torch.float16 or torch.float32 but the value passed is {dtype!r}.")
    return resolved


def decompose(matrix: torch.Tensor, factor_dtype: torch.dtype = FACTOR_DTYPE) -> SpectralFactors:
    """Thin SVD in float32 (float64 stays float64) on the matrix's device; wide matrices through the transpose.

    Accepts a matrix or a batch of same-shaped matrices (leading dimensions). LAPACK's gesdd is several times
    faster on tall matrices than on wide ones (docs/performance.md): W = (V S Uᵀ)ᵀ gives the same factors.
    """
    work = matrix.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    with one_thread_if_small(work.shape[-1] * work.shape[-2], work.device):
        if work.shape[-2] < work.shape[-1]:
            V, S, Uh = torch.linalg.svd(work.mT, full_matrices=False)
            U, Vh = Uh.mT, V.mT
        else:
            U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    return SpectralFactors(
        U=U.to(factor_dtype).contiguous(), S=S.to(torch.float32).contiguous(), Vh=Vh.to(factor_dtype).contiguous()
    )


@contextlib.contextmanager
def one_thread_if_small(numel: int, device: Union[str, torch.device] = "cpu"):
    """Run the math of one small matrix on one CPU thread.

    OpenMP threads only add overhead on small matrices, and on a busy machine their spin-waits dominate (measured
    in docs/performance.md).
    """
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or numel > SMALL_MATRIX or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    data = tensor.detach().contiguous()
    if data.device.type != "cpu":
        data = data.cpu()
    return memoryview(data.reshape(-1).view(torch.uint8).numpy())


def weight_key(matrix: torch.Tensor, factor_dtype: torch.dtype = FACTOR_DTYPE) -> str:
    """Content key of a weight's factors: a 128-bit xxh3 hash of its bytes, shape and dtype, and the factor dtype.

    xxh3 is an order of magnitude faster than sha256, which made hashing the main cost of a cached load; an
    accidental collision between two different weights has probability ~2⁻¹²⁸.
    """
    digest = xxhash.xxh3_128()
    digest.update(f"{ENGINE_VERSION}|{tuple(matrix.shape)}|{matrix.dtype}|{factor_dtype}".encode())
    digest.update(_tensor_bytes(matrix))
    return digest.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """A 64-bit xxh3 digest of a tensor's bytes (to notice that a tensor was changed, not for security)."""
    return xxhash.xxh3_64_hexdigest(_tensor_bytes(tensor))


def _factors_checksum(factors: SpectralFactors) -> str:
    """Detects corrupt cache entries (the entry's name, a hash of the weight, is what makes a hit correct)."""
    digest = xxhash.xxh3_64()
    for tensor in (factors.U, factors.S, factors.Vh):
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """`$SVDIFF_CACHE_DIR`, else `$XDG_CACHE_HOME/svdiff_adapter/svd`, else `~/.cache/svdiff_adapter/svd`."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "svdiff_adapter" / "svd"


class SVDCache:
    """On-disk cache of factors keyed by the weight's content.

    - Never stale: the key is a 128-bit hash of the weight's bytes, shape and dtype, so a different weight cannot hit.
    - An entry proves it belongs to the weight it is read for: it records its key, and its leading singular pair must
      satisfy W·v₁ = σ₁·u₁ for that weight (checked on a few rows). An entry copied from another weight is rejected.
    - A corrupt entry (unreadable file, wrong shapes, checksum mismatch, wrong weight) is reported, deleted and
      rebuilt; a path that is not a regular file (a folder, a FIFO) is ignored without being opened.
    - Writers go through a temporary file and an atomic rename, so concurrent writers cannot corrupt an entry
      (they write identical content; the last rename wins).
    """

    def __init__(self, directory: Union[str, os.PathLike, None] = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, key: str, matrix: torch.Tensor) -> Optional[SpectralFactors]:
        """The factors of `matrix` stored under `key`, or None (absent, unusable or not this matrix's)."""
        path = self._path(key)
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return None
        if not stat.S_ISREG(mode):
            logger.warning("Ignoring SVD cache entry %s: not a regular file.", path)
            return None
        try:
            tensors = load_file(str(path))
            factors = SpectralFactors(tensors["U"], tensors["S"], tensors["Vh"])
            rank = min(matrix.shape)
            expected = {"U": (matrix.shape[0], rank), "S": (rank,), "Vh": (rank, matrix.shape[1])}
            if any(tuple(tensors[name].shape) != dims for name, dims in expected.items()):
                raise ValueError("factor shapes do not match the weight")
            with open(path, "rb") as handle:
                header_size = int.from_bytes(handle.read(8), "little")
                metadata = json.loads(handle.read(header_size)).get("__metadata__", {})
            if metadata.get("checksum") != _factors_checksum(factors):
                raise ValueError("checksum mismatch")
            if metadata.get("weight_key") != key or not _leading_pair_fits(matrix, factors):
                raise ValueError("the entry holds the factors of another weight")
        except (SafetensorError, OSError, KeyError, ValueError) as error:
            logger.warning("Ignoring corrupt SVD cache entry %s (%s); it will be rebuilt.", path, error)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return factors

    def put(self, key: str, factors: SpectralFactors) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        cpu_factors = factors.to("cpu")
        tensors = {"U": cpu_factors.U, "S": cpu_factors.S, "Vh": cpu_factors.Vh}
        metadata = {"engine_version": ENGINE_VERSION, "checksum": _factors_checksum(cpu_factors), "weight_key": key}
        atomic_save_safetensors(tensors, path, metadata)


def _leading_pair_fits(matrix: torch.Tensor, factors: SpectralFactors, rows: int = 64) -> bool:
    """W·v₁ = σ₁·u₁ up to the factors' rounding, on the first `rows` rows: a product with a sliver of the weight
    proves the factors are this weight's (another weight's leading pair misses by O(σ₁) on any rows) without reading
    the whole weight again, which the key's hash has just done."""
    if factors.S.numel() == 0:
        return True
    v = factors.Vh[0].to(device=matrix.device, dtype=torch.float32)
    u = factors.U[:rows, 0].to(device=matrix.device, dtype=torch.float32)
    sigma = float(factors.S[0])
    residual = float((matrix[:rows].detach().to(torch.float32) @ v - sigma * u).norm())
    # float16 factors move W·v₁ and σ₁·u₁ by about 2⁻¹¹·σ₁ each.
    return residual <= 1e-2 * sigma * max(float(u.norm()), 1e-3) + 1e-6


def resolve_cache(cache: Union[bool, str, os.PathLike, SVDCache, None]) -> Optional[SVDCache]:
    """`True`/`None`: the default cache unless `$SVDIFF_SVD_CACHE=0`; `False`: none; a path or `SVDCache`: that."""
    if isinstance(cache, SVDCache):
        return cache
    if cache is False:
        return None
    if cache is None or cache is True:
        if os.environ.get(CACHE_ENV, "1").lower() in ("0", "false", "off", "no"):
            return None
        return SVDCache()
    return SVDCache(cache)


def compute_factors(
    matrices: Mapping[str, torch.Tensor],
    cache: Union[bool, str, os.PathLike, SVDCache, None] = None,
    progress: Optional[bool] = None,
    desc: str = "SVD",
    factor_dtype: Union[torch.dtype, str, None] = None,
) -> dict[str, SpectralFactors]:
    """Factors of each matrix (see `weight_matrix`), on the matrix's device, U and Vᵀ in `factor_dtype`
    (default float16).

    CPU matrices are decomposed by up to 4 worker threads side by side, torch's intra-op threads shared among them
    (one LAPACK thread each on up to 4 cores): gesdd's bidiagonalisation scales poorly across threads, so SVDs side
    by side beat the same SVDs one after the other on all threads (docs/performance.md).
    Same-shaped CUDA matrices go through one batched call. With a cache, two more threads hash weights and read
    entries ahead of the decompositions and write new entries behind them (hashing, file I/O and LAPACK all release
    the GIL). An interrupted run keeps every entry already computed. A cache that cannot be written (read-only, a
    file in its place, a full disk) costs a warning, not the result.
    """
    factor_dtype = factor_dtype_of(factor_dtype)
    svd_cache = resolve_cache(cache)
    total = sum(m.numel() for m in matrices.values())
    show = progress if progress is not None else total >= _PROGRESS_MIN_ELEMENTS
    results: dict[str, SpectralFactors] = {}
    io_pool = ThreadPoolExecutor(max_workers=_IO_WORKERS) if svd_cache is not None else None
    lookups = {
        name: io_pool.submit(_lookup, svd_cache, m, factor_dtype) for name, m in matrices.items()
    } if io_pool else {}
    threads = torch.get_num_threads()
    workers = min(threads, _SVD_WORKERS)  # each holds one SVD workspace: bounded memory on many-core machines
    svd_pool = ThreadPoolExecutor(max_workers=workers)
    cpu_jobs: dict[str, Future] = {}
    writes = []
    keys: dict[str, str] = {}

    unwritable: list[OSError] = []

    def write(key: str, factors: SpectralFactors) -> None:
        if unwritable:
            return
        try:
            svd_cache.put(key, factors)
        except OSError as error:
            unwritable.append(error)
            logger.warning("The SVD cache %s cannot be written (%s); computing without it.", svd_cache.directory,
                           error)

    def store(name: str, factors: SpectralFactors) -> None:
        results[name] = factors
        if io_pool is not None:
            writes.append(io_pool.submit(write, keys[name], factors))

    torch.set_num_threads(max(1, threads // workers))  # per LAPACK call; the workers run side by side
    try:
        with tqdm(total=total, desc=desc, unit="w", unit_scale=True, disable=not show) as bar:
            cuda_misses = []
            for name, matrix in matrices.items():
                if io_pool is not None:
                    keys[name], cached = lookups[name].result()
                    if cached is not None:
                        results[name] = cached.to(matrix.device)
                        bar.update(matrix.numel())
                        continue
                if matrix.device.type == "cuda":
                    cuda_misses.append(name)
                else:
                    cpu_jobs[name] = svd_pool.submit(decompose, matrix, factor_dtype)
            for name, job in cpu_jobs.items():
                store(name, job.result())
                bar.update(matrices[name].numel())
            for group in _same_shape_groups(cuda_misses, matrices):
                stacked = decompose(torch.stack([matrices[n].detach() for n in group]), factor_dtype)
                for index, name in enumerate(group):
                    store(name, SpectralFactors(stacked.U[index], stacked.S[index], stacked.Vh[index]))
                bar.update(sum(matrices[n].numel() for n in group))
    finally:
        # After an interruption: skip work not started, finish and cache what was being computed.
        for future in [*lookups.values(), *cpu_jobs.values()]:
            future.cancel()
        svd_pool.shutdown(wait=True)
        torch.set_num_threads(threads)
        for name, job in cpu_jobs.items():
            if name not in results and job.done() and not job.cancelled() and job.exception() is None:
                store(name, job.result())
        if io_pool is not None:
            io_pool.shutdown(wait=True)
    for pending in writes:
        pending.result()  # errors other than an unwritable cache are bugs: surface them
    return {name: results[name] for name in matrices}


def _lookup(svd_cache: SVDCache, matrix: torch.Tensor, factor_dtype: torch.dtype):
    key = weight_key(matrix, factor_dtype)
    return key, svd_cache.get(key, matrix)


def _same_shape_groups(names: list[str], matrices: Mapping[str, torch.Tensor]) -> list[list[str]]:
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name in names:
        matrix = matrices[name]
        groups[(tuple(matrix.shape), matrix.dtype, matrix.device)].append(name)
    return list(groups.values())
