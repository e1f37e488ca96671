"""The SVD engine: factors of weight matrices, computed once, kept small, optionally cached on disk.

Only weights are known here, never adapters. A weight of any shape is seen as a matrix (`spectral.weight_matrix`):
conv kernels c_out × c_in × kh × kw as c_out × (c_in·kh·kw), 1-D norm weights γ as 1 × C.

What is kept per matrix (m × n, k = min(m, n)) and why:
- U (m × k) and Vᵀ (k × n) in float16 by default: spectral shifts are applied in delta form
  W_δ = W + U·diag(ReLU(σ+δ) − σ)·Vᵀ, so a factor's rounding error (≤ 2⁻¹¹ relative; entries of orthonormal
  columns never overflow float16) only scales the *change* |ReLU(σ+δ) − σ|, never W itself. Half the memory of
  float32 factors, which `factor_dtype=torch.float32` keeps instead (docs/performance.md compares the two).
- σ (k) in float32: it decides where the ReLU clips and is tiny.

With a `TruncatedSVD` (`SpectralShiftConfig(spectral_rank=k)`) only the top k' = min(k, min(m, n)) triplets are kept,
from a seeded randomized SVD (`truncated_decompose`): far cheaper than a full SVD for large matrices, and U_k, V_kᵀ
cost k'·(m + n) values instead of min(m, n)·(m + n).
"""

from __future__ import annotations

import contextlib
import json
import logging
import numbers
import os
import stat
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .atomic import atomic_save_safetensors
from .factor_location import factor_bytes, resolve_factor_locations


logger = logging.getLogger(__name__)

FACTOR_DTYPE = torch.float16  # the default; `factor_dtype=torch.float32` is the other choice
FACTOR_DTYPES = (torch.float16, torch.float32)
# Bump when the factor computation or the cache layout changes: old entries then never match.
ENGINE_VERSION = "2"
# Part of the cache key of truncated factors: bump when `truncated_decompose` changes its arithmetic.
RANDOMIZED_SVD_VERSION = "hmt1"
SVD_DTYPES = ("float32", "float64")
CACHE_ENV = "SVDIFF_SVD_CACHE"
CACHE_DIR_ENV = "SVDIFF_CACHE_DIR"
# Below this many weight elements a progress bar is noise.
_PROGRESS_MIN_ELEMENTS = 50_000_000
SMALL_MATRIX = 512 * 512  # elements; see one_thread_if_small
_IO_WORKERS = 2
_SVD_WORKERS = 4


@dataclass(frozen=True)
class TruncatedSVD:
    """How the top-k singular triplets of a matrix are computed (`truncated_decompose`).

    Attributes:
        rank: k. A matrix m × n keeps k' = min(k, min(m, n)) triplets; with k ≥ min(m, n) nothing is truncated and
            the exact full SVD is used (`truncation_for`).
        oversampling: p, extra columns of the Gaussian test matrix (a sketch of k' + p columns).
        power_iterations: q, products with Wᵀ and W that sharpen the sketch on slowly decaying spectra, each
            followed by a QR re-orthonormalisation (Halko, Martinsson & Tropp 2011, Algorithm 4.4).
        seed: seed of the test matrix, drawn by a CPU `torch.Generator` so that every device type uses the same one.
        dtype: `"float32"` (default) or `"float64"` arithmetic.

    The factors are a deterministic function of the weight and these values on one device type; files record them
    (docs/format.md) so that a load rebuilds the factors a shift was trained with.
    """

    rank: int
    oversampling: int = 16
    power_iterations: int = 4
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        check_count("rank", self.rank, minimum=1)
        check_count("oversampling", self.oversampling, minimum=0)
        check_count("power_iterations", self.power_iterations, minimum=0)
        check_count("seed", self.seed, minimum=0, maximum=2**63 - 1)
        if self.dtype not in SVD_DTYPES:
            raise ValueError(f"`dtype` should be one of {list(SVD_DTYPES)} but the value passed is {self.dtype!r}.")

    def kept(self, rows: int, cols: int) -> int:
        """k' = min(k, min(m, n)), the triplets a matrix of this shape keeps."""
        return min(self.rank, rows, cols)

    @property
    def key(self) -> str:
        """What the cache key of truncated factors adds (the algorithm's version and every parameter)."""
        return (f"{RANDOMIZED_SVD_VERSION}|rank={self.rank}|p={self.oversampling}|q={self.power_iterations}|"
                f"seed={self.seed}|{self.dtype}")


def check_count(name: str, value, minimum: int, maximum: Optional[int] = None) -> None:
    """A whole number (a Python or NumPy int, not a bool) within bounds, else a ValueError quoting it."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not whole or value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"`{name}` should be an integer {bounds} but the value passed is {value!r}.")


def truncation_for(shape: Sequence[int], truncation: Optional[TruncatedSVD]) -> Optional[TruncatedSVD]:
    """The truncation that applies to a matrix of this shape: None (the full SVD) without one or when
    k ≥ min(m, n) — then the top-k triplets are all of them, and the exact SVD gives them."""
    if truncation is None or truncation.rank >= min(shape[-2], shape[-1]):
        return None
    return truncation


@dataclass
class SpectralFactors:
    """Thin SVD of a weight matrix: W ≈ U · diag(S) · Vh, S descending.

    `truncation` is set for top-k factors (`truncated_decompose`), with `computed_on`, the device type that computed
    them (their values depend on it up to round-off); both are None for a full SVD. `location` says where a layer
    keeps them (`factor_location`: "device", with the weight; "cpu"; "disk", memory-mapped from the SVD cache).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    truncation: Optional[TruncatedSVD] = None
    computed_on: Optional[str] = None
    location: str = "device"

    def to(self, device, location: Optional[str] = None, copy: bool = False) -> "SpectralFactors":
        return SpectralFactors(self.U.to(device, copy=copy), self.S.to(device, copy=copy),
                               self.Vh.to(device, copy=copy), self.truncation, self.computed_on,
                               location or self.location)

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


def truncated_decompose(matrix: torch.Tensor, truncation: TruncatedSVD,
                        factor_dtype: torch.dtype = FACTOR_DTYPE) -> SpectralFactors:
    """Top k' = min(k, min(m, n)) singular triplets by a seeded randomized SVD, on the matrix's device.

    Halko, Martinsson & Tropp, "Finding structure with randomness", SIAM Review 2011: a range finder with a Gaussian
    test matrix Ω (n × l, l = k' + p) and q power iterations re-orthonormalised by QR after every product
    (Algorithm 4.4: Q = qr(W·Ω); q times Q = qr(W·qr(Wᵀ·Q))), then the exact SVD of the small B = Qᵀ·W
    (Algorithm 5.1): W ≈ (Q·Ũ)·diag(σ)·Vᵀ. Ω comes from a CPU generator seeded with `truncation.seed`, so it is the
    same on every device type; the result is bit-identical for the same weight, parameters and device type (and
    library build). The relation Wᵀ·U = V·diag(σ) holds to round-off whatever the sketch's accuracy (Bᵀ·Ũ = V·Σ),
    which the cache uses to prove an entry belongs to its weight.

    When the sketch would be as wide as the matrix (k' + p ≥ min(m, n)) the exact SVD is cheaper: its top k'
    triplets are returned. Accepts a matrix or a batch of same-shaped matrices (leading dimensions).
    """
    rows, cols = matrix.shape[-2], matrix.shape[-1]
    kept = truncation.kept(rows, cols)
    dtype = torch.float64 if truncation.dtype == "float64" else torch.float32
    work = matrix.detach().to(dtype)
    sketch = kept + truncation.oversampling
    with one_thread_if_small(rows * cols, work.device), _full_precision_matmuls():
        if sketch >= min(rows, cols):
            exact = decompose(work, factor_dtype=dtype)
            U, S, Vh = exact.U[..., :kept], exact.S[..., :kept], exact.Vh[..., :kept, :]
        else:
            generator = torch.Generator(device="cpu").manual_seed(truncation.seed)
            test = torch.randn(cols, sketch, generator=generator, dtype=torch.float32).to(work.device, dtype)
            basis = torch.linalg.qr(work @ test).Q  # m × l, an orthonormal basis of the sketched range
            for _ in range(truncation.power_iterations):
                # Re-orthonormalising after each product keeps the small singular directions from being lost to
                # round-off (powers of W alone would collapse onto the leading ones).
                basis = torch.linalg.qr(work.mT @ basis).Q  # n × l
                basis = torch.linalg.qr(work @ basis).Q  # m × l
            small = basis.mT @ work  # B = Qᵀ·W, l × n
            # The SVD of the tall Bᵀ (n × l) is the fast LAPACK case; B = (V·Σ·Ũᵀ)ᵀ.
            V, S, small_Uh = torch.linalg.svd(small.mT, full_matrices=False)
            U = basis @ small_Uh.mT[..., :kept]
            S, Vh = S[..., :kept], V.mT[..., :kept, :]
    return SpectralFactors(
        U=U.to(factor_dtype).contiguous(), S=S.to(torch.float32).contiguous(), Vh=Vh.to(factor_dtype).contiguous(),
        truncation=truncation, computed_on=work.device.type,
    )


@contextlib.contextmanager
def _full_precision_matmuls():
    """IEEE float32 products while truncated factors are computed: TF32 (GPUs) or bfloat16 (oneDNN) float32
    matmuls, if a user enabled them, would round the sketch to ~10⁻³ and make the factors depend on that setting."""
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


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


def weight_key(matrix: torch.Tensor, factor_dtype: torch.dtype = FACTOR_DTYPE,
               truncation: Optional[TruncatedSVD] = None, computed_on: Optional[str] = None) -> str:
    """Content key of a weight's factors: a 128-bit xxh3 hash of its bytes, shape and dtype, and the factor dtype;
    for truncated factors also every parameter of the truncation and the device type that computes them (their
    round-off differs between device types; default: the matrix's), so full and truncated factors, or two ranks,
    never share an entry.

    xxh3 is an order of magnitude faster than sha256, which made hashing the main cost of a cached load; an
    accidental collision between two different weights has probability ~2⁻¹²⁸.
    """
    digest = xxhash.xxh3_128()
    header = f"{ENGINE_VERSION}|{tuple(matrix.shape)}|{matrix.dtype}|{factor_dtype}"
    if truncation is not None:
        header += f"|{truncation.key}|{computed_on or matrix.device.type}"
    digest.update(header.encode())
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

    def get(self, key: str, matrix: torch.Tensor, kept: Optional[int] = None) -> Optional[SpectralFactors]:
        """The factors of `matrix` stored under `key`, or None (absent, unusable or not this matrix's); `kept`:
        the number of triplets of a truncated entry (default: all, min(m, n))."""
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
            rank = min(matrix.shape) if kept is None else kept
            expected = {"U": (matrix.shape[0], rank), "S": (rank,), "Vh": (rank, matrix.shape[1])}
            if any(tuple(tensors[name].shape) != dims for name, dims in expected.items()):
                raise ValueError("factor shapes do not match the weight")
            with open(path, "rb") as handle:
                header_size = int.from_bytes(handle.read(8), "little")
                metadata = json.loads(handle.read(header_size)).get("__metadata__", {})
            if metadata.get("checksum") != _factors_checksum(factors):
                raise ValueError("checksum mismatch")
            fits = _leading_pair_fits(matrix, factors, left=kept is not None)
            if metadata.get("weight_key") != key or not fits:
                raise ValueError("the entry holds the factors of another weight")
        except (SafetensorError, OSError, KeyError, ValueError) as error:
            logger.warning("Ignoring corrupt SVD cache entry %s (%s); it will be rebuilt.", path, error)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return factors

    def mapped(self, matrix: torch.Tensor, factors: SpectralFactors) -> SpectralFactors:
        """`factors` of `matrix` as this cache's memory-mapped entry (written first if absent), location "disk"."""
        key = weight_key(matrix, factors.U.dtype, factors.truncation, factors.computed_on)
        kept = factors.S.numel() if factors.truncation is not None else None
        entry = self.get(key, matrix, kept)
        if entry is None:
            self.put(key, factors)
            entry = self.get(key, matrix, kept)
        if entry is None:
            raise OSError(f"The SVD cache {self.directory} could not hold the factors.")
        return SpectralFactors(entry.U, entry.S, entry.Vh, factors.truncation, factors.computed_on, "disk")

    def put(self, key: str, factors: SpectralFactors) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        cpu_factors = factors.to("cpu")
        tensors = {"U": cpu_factors.U, "S": cpu_factors.S, "Vh": cpu_factors.Vh}
        metadata = {"engine_version": ENGINE_VERSION, "checksum": _factors_checksum(cpu_factors), "weight_key": key}
        atomic_save_safetensors(tensors, path, metadata)


def _leading_pair_fits(matrix: torch.Tensor, factors: SpectralFactors, left: bool = False, count: int = 64) -> bool:
    """W·v₁ = σ₁·u₁ on the first `count` rows (`left`: Wᵀ·u₁ = σ₁·v₁ on the first `count` columns), up to the
    factors' rounding. A product with a sliver of the weight proves the factors are this weight's (another weight's
    leading pair misses by O(σ₁)) without reading the whole weight again, which the key's hash has just done.
    Truncated factors satisfy the left identity to round-off even where the randomized sketch has not converged
    (the right one then need not hold)."""
    if factors.S.numel() == 0:
        return True
    as_float = dict(device=matrix.device, dtype=torch.float32)
    if left:
        sliver, probe, image = matrix[:, :count].mT, factors.U[:, 0], factors.Vh[0, :count]
    else:
        sliver, probe, image = matrix[:count], factors.Vh[0], factors.U[:count, 0]
    image = image.to(**as_float)
    sigma = float(factors.S[0])
    residual = float((sliver.detach().to(torch.float32) @ probe.to(**as_float) - sigma * image).norm())
    # float16 factors move both sides by about 2⁻¹¹·σ₁ each.
    return residual <= 1e-2 * sigma * max(float(image.norm()), 1e-3) + 1e-6


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
    truncation: Optional[TruncatedSVD] = None,
    factor_location: str = "device",
) -> dict[str, SpectralFactors]:
    """Factors of each matrix (see `weight_matrix`), U and Vᵀ in `factor_dtype` (default float16); with a
    `truncation`, the top-k triplets of `truncated_decompose` wherever k < min(m, n). They are computed on the
    matrix's device and kept where `factor_location` says (`factor_location.py`): on that device, in CPU memory
    (each moved there as soon as it is done, so an accelerator holds one matrix's factors, or one group of
    same-shape matrices decomposed together, at a time) or in the SVD cache's files, memory-mapped. Cache hits are
    read memory-mapped wherever they are kept on the CPU.

    CPU matrices are decomposed by up to 4 worker threads side by side, torch's intra-op threads shared among them
    (one LAPACK thread each on up to 4 cores): gesdd's bidiagonalisation scales poorly across threads, so SVDs side
    by side beat the same SVDs one after the other on all threads (docs/performance.md).
    Same-shaped CUDA matrices go through one batched call. With a cache, two more threads hash weights and read
    entries ahead of the decompositions and write new entries behind them (hashing, file I/O and LAPACK all release
    the GIL). An interrupted run keeps every entry already computed. A cache that cannot be written (read-only, a
    file in its place, a full disk) costs a warning, not the result. Truncated CUDA matrices are decomposed one by
    one: a batched product may round differently from a single one, and a matrix's factors must not depend on
    which other matrices share its shape.
    """
    factor_dtype = factor_dtype_of(factor_dtype)
    plans = {name: truncation_for(m.shape, truncation) for name, m in matrices.items()}
    svd_cache = resolve_cache(cache)
    kept = {name: plans[name].kept(*m.shape) if plans[name] else min(m.shape) for name, m in matrices.items()}
    locations = resolve_factor_locations(
        factor_location, {name: m.device for name, m in matrices.items()},
        {name: factor_bytes(m.shape, kept[name], factor_dtype) for name, m in matrices.items()})
    if svd_cache is None and "disk" in locations.values():
        raise ValueError("factor_location='disk' keeps the factors in the SVD cache's files, but the cache is off "
                         "(svd_cache=False or $SVDIFF_SVD_CACHE=0); turn it on or choose 'cpu'.")
    total = sum(m.numel() for m in matrices.values())
    show = progress if progress is not None else total >= _PROGRESS_MIN_ELEMENTS
    results: dict[str, SpectralFactors] = {}
    io_pool = ThreadPoolExecutor(max_workers=_IO_WORKERS) if svd_cache is not None else None
    lookups = {
        name: io_pool.submit(_lookup, svd_cache, m, factor_dtype, plans[name]) for name, m in matrices.items()
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

    def placed(name: str, factors: SpectralFactors) -> SpectralFactors:
        where = locations[name]
        return factors.to(matrices[name].device if where == "device" else "cpu", where)

    def store(name: str, factors: SpectralFactors) -> None:
        if locations[name] == "disk":
            write(keys[name], factors)  # now: the layer keeps the file's pages, not these tensors
            mapped = None if unwritable else svd_cache.get(keys[name], matrices[name],
                                                           kept=kept[name] if plans[name] else None)
            if mapped is None:
                logger.warning("Factors of %s kept in CPU memory: the SVD cache could not hold them.", name)
                locations[name] = "cpu"
            else:
                factors = SpectralFactors(mapped.U, mapped.S, mapped.Vh, factors.truncation, factors.computed_on)
        elif io_pool is not None:
            writes.append(io_pool.submit(write, keys[name], factors))
        results[name] = placed(name, factors)

    torch.set_num_threads(max(1, threads // workers))  # per LAPACK call; the workers run side by side
    precision = _full_precision_matmuls() if any(plans.values()) else contextlib.nullcontext()
    try:
        with precision, tqdm(total=total, desc=desc, unit="w", unit_scale=True, disable=not show) as bar:
            cuda_misses = []
            for name, matrix in matrices.items():
                if io_pool is not None:
                    keys[name], cached = lookups[name].result()
                    if cached is not None:
                        results[name] = placed(name, cached)  # read on the CPU, memory-mapped
                        bar.update(matrix.numel())
                        continue
                if plans[name] is not None and matrix.device.type != "cpu":
                    store(name, truncated_decompose(matrix, plans[name], factor_dtype))
                    bar.update(matrix.numel())
                elif plans[name] is not None:
                    cpu_jobs[name] = svd_pool.submit(truncated_decompose, matrix, plans[name], factor_dtype)
                elif matrix.device.type == "cuda":
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


def _lookup(svd_cache: SVDCache, matrix: torch.Tensor, factor_dtype: torch.dtype,
            truncation: Optional[TruncatedSVD]):
    key = weight_key(matrix, factor_dtype, truncation)
    if truncation is None:
        return key, svd_cache.get(key, matrix)
    cached = svd_cache.get(key, matrix, kept=truncation.kept(*matrix.shape))
    if cached is not None:  # the key says how and where they were computed
        cached = SpectralFactors(cached.U, cached.S, cached.Vh, truncation, matrix.device.type)
    return key, cached


def _same_shape_groups(names: list[str], matrices: Mapping[str, torch.Tensor]) -> list[list[str]]:
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name in names:
        matrix = matrices[name]
        groups[(tuple(matrix.shape), matrix.dtype, matrix.device)].append(name)
    return list(groups.values())
