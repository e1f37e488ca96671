"""The SVD engine: correct factors, the on-disk cache (never stale, self-healing, safe under concurrency)."""

import os

import pytest
import torch

from svdiff_adapter.spectral import weight_matrix
from svdiff_adapter.svd import FACTOR_DTYPE, SVDCache, compute_factors, decompose, resolve_cache, weight_key


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
    assert SVDCache(tmp_path).get(weight_key(weight), weight) is not None  # healed on disk


def _interrupted_save(tensors, path, metadata=None):
    """safetensors' save_file that dies halfway: half the bytes of the real file, then an interruption."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    raise KeyboardInterrupt


def test_an_interrupted_cache_write_leaves_the_entry_as_it_was(tmp_path, monkeypatch):
    """A writer killed mid-write must never leave a partial entry under the entry's name."""
    cache = SVDCache(tmp_path)
    weight = torch.randn(64, 48)
    good = compute_factors({"w": weight}, cache=cache)["w"]
    entry = cache._path(weight_key(weight))
    before = entry.read_bytes()
    monkeypatch.setattr("svdiff_adapter.atomic.save_file", _interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        cache.put(weight_key(weight), good)
    assert entry.read_bytes() == before
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary file left behind
    monkeypatch.undo()
    assert torch.equal(SVDCache(tmp_path).get(weight_key(weight), weight).U, good.U)


def test_an_entry_must_belong_to_the_weight_it_is_read_for(tmp_path, caplog):
    """An entry copied over another same-shaped weight's entry is rejected and the right factors recomputed."""
    cache = SVDCache(tmp_path)
    first, second = torch.randn(20, 30), torch.randn(20, 30)
    compute_factors({"a": first, "b": second}, cache=cache)
    path_first, path_second = cache._path(weight_key(first)), cache._path(weight_key(second))
    path_first.write_bytes(path_second.read_bytes())
    factors = compute_factors({"a": first}, cache=cache)["a"]
    assert torch.allclose(factors.S.double(), torch.linalg.svdvals(first.double()), rtol=1e-5)
    assert "another weight" in caplog.text


def test_factors_of_another_weight_are_rejected_even_under_the_right_key(tmp_path):
    """The recorded key is not enough: the factors themselves must fit the weight (W·v₁ = σ₁·u₁)."""
    cache = SVDCache(tmp_path)
    generator = torch.Generator().manual_seed(7)
    first, second = torch.randn(300, 40, generator=generator), torch.randn(300, 40, generator=generator)
    cache.put(weight_key(first), decompose(second))  # written under first's key, with first's key recorded
    assert cache.get(weight_key(first), first) is None
    cache.put(weight_key(first), decompose(first))
    assert cache.get(weight_key(first), first) is not None


def _unusable_cache(tmp_path, kind):
    cache = SVDCache(tmp_path / "cache")
    weight = torch.randn(20, 30)
    if kind == "a file in place of the folder":
        (tmp_path / "cache").write_text("not a folder")
    elif kind == "a folder in place of the entry":
        cache._path(weight_key(weight)).mkdir(parents=True)
    elif kind == "a FIFO in place of the entry":
        cache._path(weight_key(weight)).parent.mkdir(parents=True)
        os.mkfifo(cache._path(weight_key(weight)))
    return cache, weight


@pytest.mark.parametrize("kind", ["a file in place of the folder", "a folder in place of the entry",
                                  "a FIFO in place of the entry"])
def test_an_unusable_cache_costs_a_warning_not_the_result(tmp_path, caplog, kind):
    cache, weight = _unusable_cache(tmp_path, kind)
    factors = compute_factors({"w": weight}, cache=cache)["w"]  # a FIFO must not be opened (it would block)
    assert torch.allclose(factors.S.double(), torch.linalg.svdvals(weight.double()), rtol=1e-5)
    assert str(cache.directory) in caplog.text or "not a regular file" in caplog.text


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
