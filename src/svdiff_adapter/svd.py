"""The SVD engine: factors of weight matrices, computed once, kept small, optionally cached on disk.

Only weights are known here, never adapters. A weight of any shape is seen as a matrix: conv kernels
c_out × c_in × kh × kw as c_out × (c_in·kh·kw), 1-D norm weights γ as 1 × C.

What is kept per matrix (m × n, k = min(m, n)) and why:
- U (m × k) and Vᵀ (k × n) in float16: spectral shifts are applied in delta form
  W_δ = W + U·diag(ReLU(σ+δ) − σ)·Vᵀ, so a factor's rounding error (≤ 2⁻¹¹ relative; entries of orthonormal
  columns never overflow float16) only scales the *change* |ReLU(σ+δ) − σ|, never W itself. Half the memory of
  float32 factors.
- σ (k) in float32: it decides where the ReLU clips and is tiny.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm


logger = logging.getLogger(__name__)

FACTOR_DTYPE = torch.float16
# Bump when the factor computation or the cache layout changes: old entries then never match.
ENGINE_VERSION = "1"
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


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """View a weight as the matrix whose singular values are shifted (a view, no copy)."""
    if weight.ndim == 1:
        return weight.reshape(1, -1)
    return weight.reshape(weight.shape[0], -1)


def decompose(matrix: torch.Tensor) -> SpectralFactors:
    """Thin SVD in float32 (float64 stays float64) on the matrix's device; wide matrices through the transpose.

    Accepts a matrix or a batch of same-shaped matrices (leading dimensions). LAPACK is several times faster on
    tall matrices (method.md §9): W = (V S Uᵀ)ᵀ gives the same factors.
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
        U=U.to(FACTOR_DTYPE).contiguous(), S=S.to(torch.float32).contiguous(), Vh=Vh.to(FACTOR_DTYPE).contiguous()
    )


@contextlib.contextmanager
def one_thread_if_small(numel: int, device: Union[str, torch.device] = "cpu"):
    """Run the math of one small matrix on one CPU thread.

    OpenMP threads only add overhead on small matrices, and on a busy machine their spin-waits dominate: a 64 × 64
    SVD measured 0.49 s with 2 threads vs 0.75 ms with 1; extracting shifts from a tiny UNet 13.7 s vs 0.18 s.
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


def weight_key(matrix: torch.Tensor) -> str:
    """Content key of a weight: a 128-bit xxh3 hash of its bytes, shape and dtype.

    xxh3 hashes at ~15 GB/s here (sha256: 1.2 GB/s, which made hashing the main cost of a cached load); an
    accidental collision between two different weights has probability ~2⁻¹²⁸.
    """
    digest = xxhash.xxh3_128()
    digest.update(f"{ENGINE_VERSION}|{tuple(matrix.shape)}|{matrix.dtype}|{FACTOR_DTYPE}".encode())
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
    - A corrupt entry (unreadable file, wrong shapes, checksum mismatch) is reported, deleted and rebuilt.
    - Writers go through a temporary file and an atomic rename, so concurrent writers cannot corrupt an entry
      (they write identical content; the last rename wins).
    """

    def __init__(self, directory: Union[str, os.PathLike, None] = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, key: str, shape: tuple[int, int]) -> Optional[SpectralFactors]:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            tensors = load_file(str(path))
            factors = SpectralFactors(tensors["U"], tensors["S"], tensors["Vh"])
            rank = min(shape)
            expected = {"U": (shape[0], rank), "S": (rank,), "Vh": (rank, shape[1])}
            if any(tuple(tensors[name].shape) != dims for name, dims in expected.items()):
                raise ValueError("factor shapes do not match the weight")
            with open(path, "rb") as handle:
                header_size = int.from_bytes(handle.read(8), "little")
                metadata = json.loads(handle.read(header_size)).get("__metadata__", {})
            if metadata.get("checksum") != _factors_checksum(factors):
                raise ValueError("checksum mismatch")
        except (SafetensorError, OSError, KeyError, ValueError) as error:
            logger.warning("Ignoring corrupt SVD cache entry %s (%s); it will be rebuilt.", path, error)
            path.unlink(missing_ok=True)
            return None
        return factors

    def put(self, key: str, factors: SpectralFactors) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        cpu_factors = factors.to("cpu")
        tensors = {"U": cpu_factors.U, "S": cpu_factors.S, "Vh": cpu_factors.Vh}
        metadata = {"engine_version": ENGINE_VERSION, "checksum": _factors_checksum(cpu_factors)}
        atomic_save_safetensors(tensors, path, metadata)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: Union[str, os.PathLike], metadata=None):
    """Write a safetensors file through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(dict(tensors), temporary, metadata=metadata)
        os.chmod(temporary, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
) -> dict[str, SpectralFactors]:
    """Factors of each matrix (see `weight_matrix`), on the matrix's device.

    CPU matrices are decomposed by up to 4 worker threads side by side, torch's intra-op threads shared among them
    (one LAPACK thread each on up to 4 cores): gesdd's bidiagonalisation scales poorly across threads, and two
    single-threaded SVDs side by side measured 0.89× the time of the same SVDs one after the other on two threads
    (2-core CPU, SD1.5 shapes).
    Same-shaped CUDA matrices go through one batched call. With a cache, two more threads hash weights and read
    entries ahead of the decompositions and write new entries behind them (hashing, file I/O and LAPACK all release
    the GIL). An interrupted run keeps every entry already computed.
    """
    svd_cache = resolve_cache(cache)
    total = sum(m.numel() for m in matrices.values())
    show = progress if progress is not None else total >= _PROGRESS_MIN_ELEMENTS
    results: dict[str, SpectralFactors] = {}
    io_pool = ThreadPoolExecutor(max_workers=_IO_WORKERS) if svd_cache is not None else None
    lookups = {name: io_pool.submit(_lookup, svd_cache, m) for name, m in matrices.items()} if io_pool else {}
    threads = torch.get_num_threads()
    workers = min(threads, _SVD_WORKERS)  # each holds one SVD workspace: bounded memory on many-core machines
    svd_pool = ThreadPoolExecutor(max_workers=workers)
    cpu_jobs: dict[str, Future] = {}
    writes = []
    keys: dict[str, str] = {}

    def store(name: str, factors: SpectralFactors) -> None:
        results[name] = factors
        if io_pool is not None:
            writes.append(io_pool.submit(svd_cache.put, keys[name], factors))

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
                    cpu_jobs[name] = svd_pool.submit(decompose, matrix)
            for name, job in cpu_jobs.items():
                store(name, job.result())
                bar.update(matrices[name].numel())
            for group in _same_shape_groups(cuda_misses, matrices):
                stacked = decompose(torch.stack([matrices[n].detach() for n in group]))
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
    for write in writes:
        write.result()  # surface write errors (e.g. a read-only cache folder)
    return {name: results[name] for name in matrices}


def _lookup(svd_cache: SVDCache, matrix: torch.Tensor) -> tuple[str, Optional[SpectralFactors]]:
    key = weight_key(matrix)
    return key, svd_cache.get(key, tuple(matrix.shape))


def _same_shape_groups(names: list[str], matrices: Mapping[str, torch.Tensor]) -> list[list[str]]:
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name in names:
        matrix = matrices[name]
        groups[(tuple(matrix.shape), matrix.dtype, matrix.device)].append(name)
    return list(groups.values())
