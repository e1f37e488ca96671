"""The SVD engine: correct factors, the on-disk cache (never stale, self-healing, safe under concurrency)."""

import multiprocessing

import pytest
import torch

from svdiff_adapter.svd import FACTOR_DTYPE, SVDCache, compute_factors, decompose, resolve_cache, weight_key, weight_matrix


@pytest.mark.parametrize("shape", [(40, 40), (24, 90), (90, 24), (1, 17)])
def test_factors_reconstruct_the_matrix(shape):
    matrix = torch.randn(*shape)
    factors = decompose(matrix)
    k = min(shape)
    assert factors.U.shape == (shape[0], k) and factors.Vh.shape == (k, shape[1]) and factors.S.shape == (k,)
    assert factors.U.dtype == FACTOR_DTYPE and factors.S.dtype == torch.float32
    assert torch.all(factors.S[:-1] >= factors.S[1:])
    rebuilt = (factors.U.float() * factors.S) @ factors.Vh.float()
    assert (rebuilt - matrix).abs().max() < 2e-3 * matrix.abs().max()
    exact = torch.linalg.svdvals(matrix.double())
    assert torch.allclose(factors.S.double(), exact, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_decomposed_in_float32(dtype):
    matrix = torch.randn(30, 50).to(dtype)
    factors = decompose(matrix)
    assert torch.allclose(factors.S.double(), torch.linalg.svdvals(matrix.double()), rtol=1e-5)


def test_conv_kernels_and_norm_weights_as_matrices():
    assert weight_matrix(torch.zeros(8, 4, 3, 3)).shape == (8, 36)
    assert weight_matrix(torch.zeros(5)).shape == (1, 5)


def test_cache_hits_only_identical_weights(tmp_path):
    cache = SVDCache(tmp_path)
    weight = torch.randn(20, 30)
    first = compute_factors({"w": weight}, cache=cache)["w"]
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1
    again = compute_factors({"w": weight.clone()}, cache=cache)["w"]
    assert torch.equal(again.U, first.U) and torch.equal(again.S, first.S)
    changed = weight.clone()
    changed[3, 4] += 1e-6  # one element, one ulp-scale change: a different key
    assert weight_key(changed) != weight_key(weight)
    assert weight_key(weight.to(torch.float64)) != weight_key(weight)
    other = compute_factors({"w": changed}, cache=cache)["w"]
    assert torch.allclose(other.S.double(), torch.linalg.svdvals(changed.double()), rtol=1e-5)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2


def test_corrupt_cache_entry_is_ignored_and_rebuilt(tmp_path, caplog):
    cache = SVDCache(tmp_path)
    weight = torch.randn(20, 30)
    good = compute_factors({"w": weight}, cache=cache)["w"]
    (entry,) = tmp_path.rglob("*.safetensors")
    data = bytearray(entry.read_bytes())
    data[-8:] = b"\xff" * 8  # flip bytes inside the tensor data: the header still parses
    entry.write_bytes(bytes(data))
    rebuilt = compute_factors({"w": weight}, cache=cache)["w"]
    assert torch.equal(rebuilt.S, good.S)
    assert "corrupt" in caplog.text
    entry.write_bytes(b"garbage")
    assert torch.equal(compute_factors({"w": weight}, cache=cache)["w"].S, good.S)
    assert SVDCache(tmp_path).get(weight_key(weight), (20, 30)) is not None  # healed on disk


def _write_entry(directory, seed, barrier):
    torch.manual_seed(seed)
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    barrier.wait()
    for _ in range(20):
        SVDCache(directory).put(weight_key(weight), decompose(weight))


def test_concurrent_writers_do_not_corrupt_entries(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3)
    workers = [context.Process(target=_write_entry, args=(str(tmp_path), i, barrier)) for i in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(600)  # generous: spawning three torch processes is slow on a loaded machine
        assert worker.exitcode == 0
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    assert SVDCache(tmp_path).get(weight_key(weight), (64, 48)) is not None
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_cache_switches(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDIFF_SVD_CACHE", "0")
    assert resolve_cache(None) is None
    monkeypatch.setenv("SVDIFF_SVD_CACHE", "1")
    monkeypatch.setenv("SVDIFF_CACHE_DIR", str(tmp_path / "here"))
    assert resolve_cache(None).directory == tmp_path / "here"
    assert resolve_cache(False) is None
    assert resolve_cache(str(tmp_path)).directory == tmp_path


def test_parallel_decompositions_match_one_by_one_and_restore_the_thread_count():
    generator = torch.Generator().manual_seed(3)
    matrices = {f"m{i}": torch.randn(600 + 40 * i, 520, generator=generator) for i in range(5)}
    matrices["wide"] = torch.randn(300, 900, generator=generator)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        together = compute_factors(matrices, cache=False, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert list(together) == list(matrices)
    for name, matrix in matrices.items():
        exact = torch.linalg.svdvals(matrix.double())
        assert torch.allclose(together[name].S.double(), exact, rtol=1e-5)
        rebuilt = (together[name].U.float() * together[name].S) @ together[name].Vh.float()
        assert (rebuilt - matrix).abs().max() < 2e-3 * matrix.abs().max()
