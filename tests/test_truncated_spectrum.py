"""A truncated spectrum (`spectral_rank`): the seeded randomized SVD, layers holding top-k factors, files that rebuild
the same factors at load (and refuse factors that come out differently), the cache, and training."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import svdiff_adapter as sa
from svdiff_adapter.format import (
    FACTOR_FINGERPRINT_TOLERANCE,
    SpectralFactorMismatchError,
    SpectralShiftFormatError,
    WrongBaseModelError,
    check_factor_fingerprints,
    factor_fingerprint,
)
from svdiff_adapter.spectral import weight_matrix
from svdiff_adapter.svd import SVDCache, TruncatedSVD, compute_factors, decompose, truncated_decompose, weight_key
from svdiff_adapter.tuner import spectral_layers
from svdiff_adapter.tuner.targets import ShiftDoesNotFitError

from .tiny_models import assert_unchanged, state_snapshot

RANK = 8
# Oversampling 8: a sketch of 16 columns stays below min(m, n) = 40 of the test matrices (randomized, not exact).
CONFIG = dict(spectral_rank=RANK, spectral_oversampling=8)


def spectrum_matrix(rows, cols, sigma, seed=0):
    """U·diag(σ)·Vᵀ (float64) with random orthonormal U, V; returns it and the exact U, V."""
    generator = torch.Generator().manual_seed(seed)
    size = min(rows, cols)
    left = torch.linalg.qr(torch.randn(rows, size, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(cols, size, generator=generator, dtype=torch.float64)).Q
    return (left * sigma[:size]) @ right.T, left, right


def decaying(rows, cols, seed=0, ratio=0.8):
    return spectrum_matrix(rows, cols, ratio ** torch.arange(min(rows, cols), dtype=torch.float64), seed)


def flat(rows, cols, seed=0):
    spread = torch.rand(min(rows, cols), generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    return spectrum_matrix(rows, cols, (1 + 1e-3 * spread).sort(descending=True).values, seed)


def principal_cosines(a, b):
    return torch.linalg.svdvals(a.double().T @ b.double())


class Stack(nn.Module):
    """An embedding, two linears and a conv, all 40-wide (min(m, n) = 40), with chosen spectra."""

    def __init__(self, spectrum=decaying):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, 40)
        self.proj = nn.Linear(40, 72)
        self.conv = nn.Conv2d(8, 40, 3, padding=1)  # 40 × 72 as a matrix
        self.out = nn.Linear(40, 56)
        with torch.no_grad():
            for seed, module in enumerate((self.embed, self.proj, self.conv, self.out)):
                matrix = spectrum(*weight_matrix(module.weight).shape, seed=seed)[0]
                module.weight.copy_(matrix.reshape(module.weight.shape).float())

    def forward(self, tokens):
        hidden = self.proj(self.embed(tokens))  # (B, 64, 72)
        image = self.conv(hidden.reshape(-1, 8, 24, 24))
        return self.out(image.mean(dim=(2, 3)))


def stack_inputs():
    return torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(3))


def shifted_stack(spectrum=decaying, scale=0.3, **config):
    model = Stack(spectrum)
    sa.add_spectral_shift(model, sa.SpectralShiftConfig(target_kinds=["linear", "conv2d", "embedding"],
                                                         **{**CONFIG, **config}), svd_cache=False)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in spectral_layers(model):
            delta = layer.spectral_delta["default"]
            delta.copy_(torch.randn(delta.shape, generator=generator) * scale * layer.spectral_S)
    return model


def rewrite(path, target, edit):
    """Copy a shift file, editing its metadata dict with `edit`."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    edit(metadata)
    save_file(tensors, str(target), metadata=metadata)
    return target


def edit_json(field, change):
    def edit(metadata):
        value = json.loads(metadata[field])
        change(value)
        metadata[field] = json.dumps(value)
    return edit


# ------------------------------------------------------------------------------------------- the randomized SVD
@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_randomized_svd_matches_the_exact_svd_on_a_decaying_spectrum(shape):
    matrix, left, right = decaying(*shape)
    exact_sigma = torch.linalg.svdvals(matrix)
    factors = truncated_decompose(matrix.float(), TruncatedSVD(16), torch.float32)
    assert factors.U.shape == (shape[0], 16) and factors.S.shape == (16,) and factors.Vh.shape == (16, shape[1])
    assert float((factors.S.double() - exact_sigma[:16]).abs().max()) < 1e-6 * float(exact_sigma[0])
    # σ falls by 20 % per index: every kept vector is determined, and the kept subspaces are the exact ones.
    assert float(principal_cosines(factors.U, left[:, :16]).min()) > 1 - 1e-6
    assert float(principal_cosines(factors.Vh.T, right[:, :16]).min()) > 1 - 1e-6
    per_vector = (factors.U.double() * left[:, :16]).sum(dim=0).abs()
    assert float(per_vector.min()) > 1 - 1e-5
    # What holds whatever the sketch's accuracy: Wᵀ·U = V·diag(σ) (to float32 round-off).
    residual = matrix.float().T @ factors.U - factors.Vh.T * factors.S
    assert float(residual.abs().max()) < 1e-5


def test_on_a_flat_spectrum_the_values_agree_but_the_vectors_need_not():
    matrix, left, _ = flat(300, 200)
    factors = truncated_decompose(matrix.float(), TruncatedSVD(16), torch.float32)
    exact_sigma = torch.linalg.svdvals(matrix)
    assert float((factors.S.double() - exact_sigma[:16]).abs().max()) < 2e-3  # all σ lie within 1e-3 of each other
    orthonormal = factors.U.double().T @ factors.U.double()
    assert torch.allclose(orthonormal, torch.eye(16, dtype=torch.float64), atol=1e-5)
    # Any 16 of 200 near-equal directions are "top-16": the sketch picks its own (documented in docs/format.md),
    # which is why a load must rebuild these very factors and check them.
    assert float(principal_cosines(factors.U, left[:, :16]).min()) < 0.5


def test_factors_are_bit_identical_for_the_same_weight_and_depend_on_the_seed():
    matrix = flat(120, 90)[0].float()
    first = truncated_decompose(matrix, TruncatedSVD(RANK), torch.float32)
    again = truncated_decompose(matrix.clone(), TruncatedSVD(RANK), torch.float32)
    assert all(torch.equal(a, b) for a, b in [(first.U, again.U), (first.S, again.S), (first.Vh, again.Vh)])
    assert first.truncation == TruncatedSVD(RANK) and first.computed_on == "cpu"
    other_seed = truncated_decompose(matrix, TruncatedSVD(RANK, seed=1), torch.float32)
    assert not torch.equal(other_seed.U, first.U)
    assert check_factor_fingerprints({"m": factor_fingerprint(first.U, first.Vh)},
                                     {"m": factor_fingerprint(other_seed.U, other_seed.Vh)}) == ["m"]


def test_a_rank_that_covers_the_spectrum_gives_the_exact_factors():
    matrix = torch.randn(30, 20)
    full = decompose(matrix)
    covered = compute_factors({"w": matrix}, cache=False, truncation=TruncatedSVD(20))["w"]
    assert covered.truncation is None and torch.equal(covered.U, full.U) and torch.equal(covered.S, full.S)
    # k + p ≥ min(m, n): the sketch would be as wide as the matrix, so the exact SVD's top k are returned.
    top = compute_factors({"w": matrix}, cache=False, truncation=TruncatedSVD(8))["w"]
    assert top.truncation == TruncatedSVD(8) and top.S.shape == (8,)
    assert torch.equal(top.U, full.U[:, :8]) and torch.equal(top.S, full.S[:8]) and torch.equal(top.Vh, full.Vh[:8])


def test_float64_arithmetic_is_optional_and_agrees_with_float32():
    matrix = decaying(200, 120)[0].float()
    single = truncated_decompose(matrix, TruncatedSVD(16), torch.float32)
    double = truncated_decompose(matrix, TruncatedSVD(16, dtype="float64"), torch.float32)
    assert torch.allclose(single.S, double.S, rtol=1e-5)
    assert float(principal_cosines(single.U, double.U).min()) > 1 - 1e-6


@pytest.mark.parametrize("options, name", [
    ({"spectral_rank": 0}, "spectral_rank"), ({"spectral_rank": -4}, "spectral_rank"),
    ({"spectral_rank": 2.5}, "spectral_rank"), ({"spectral_rank": True}, "spectral_rank"),
    ({"spectral_rank": "16"}, "spectral_rank"), ({"spectral_oversampling": -1}, "spectral_oversampling"),
    ({"spectral_power_iterations": 1.5}, "spectral_power_iterations"), ({"spectral_seed": -1}, "spectral_seed"),
    ({"spectral_svd_dtype": "float16"}, "spectral_svd_dtype"),
])
def test_bad_truncation_options_are_refused_at_config_time(options, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        sa.SpectralShiftConfig(**options)


def test_config_defaults_and_truncated_svd():
    assert sa.SpectralShiftConfig().spectral_rank is None and sa.SpectralShiftConfig().truncated_svd is None
    config = sa.SpectralShiftConfig(spectral_rank=16, spectral_seed=3, spectral_svd_dtype=torch.float64)
    assert config.truncated_svd == TruncatedSVD(16, oversampling=16, power_iterations=4, seed=3, dtype="float64")


# ---------------------------------------------------------------------------------------------------- layers
def test_layers_hold_top_k_factors_and_apply_the_delta_form_exactly():
    model = shifted_stack(factor_dtype="float32")
    for name, layer in spectral_layers(model):
        weight = weight_matrix(layer.base_layer.weight).double()
        assert layer.spectral_U.shape == (weight.shape[0], RANK) and layer.shift_size == RANK
        assert layer.spectral_truncation == TruncatedSVD(RANK, oversampling=8)
        # U_k spans the exact top-k subspace (a decaying spectrum), in float32.
        exact_U = torch.linalg.svd(weight, full_matrices=False).U[:, :RANK]
        assert float(principal_cosines(layer.spectral_U, exact_U).min()) > 1 - 1e-5, name
        # W_δ = W + U_k·diag(ReLU(σ_k + δ) − σ_k)·V_kᵀ in float64 from the factors the layer holds.
        U, S, Vh = (t.double() for t in (layer.spectral_U, layer.spectral_S, layer.spectral_Vh))
        delta = layer.spectral_delta["default"].detach().double()
        reference = weight + (U * (torch.relu(S + delta) - S)) @ Vh
        with torch.no_grad():
            built = weight_matrix(layer.effective_weight()).double()
        assert float((built - reference).abs().max()) < 1e-5 * float(S[0]), name


def test_zero_shift_reproduces_the_base_model_bit_exactly():
    base = Stack()
    inputs = stack_inputs()
    with torch.no_grad():
        expected = base(inputs)
    model = Stack()
    sa.add_spectral_shift(model, sa.SpectralShiftConfig(target_kinds=["linear", "conv2d", "embedding"], **CONFIG),
                          svd_cache=False)
    with torch.no_grad():
        assert torch.equal(model(inputs), expected)


def test_adapters_of_one_module_must_share_its_spectrum():
    model = Stack()
    kinds = ["linear", "conv2d", "embedding"]
    sa.add_spectral_shift(model, sa.SpectralShiftConfig(target_kinds=kinds, **CONFIG), "a", svd_cache=False)
    sa.add_spectral_shift(model, sa.SpectralShiftConfig(target_kinds=kinds, **CONFIG), "b", svd_cache=False)
    for other in ({"spectral_rank": 16, "spectral_oversampling": 8}, {"spectral_rank": None},
                  {**CONFIG, "spectral_seed": 1}):
        snapshot = state_snapshot(model)
        with pytest.raises(ValueError, match="share them"):
            sa.add_spectral_shift(model, sa.SpectralShiftConfig(target_kinds=kinds, **other), "c", svd_cache=False)
        assert_unchanged(model, snapshot)


# ------------------------------------------------------------------------------------------------------ files
def test_save_load_round_trip_rebuilds_the_same_factors_and_outputs(tmp_path):
    model = shifted_stack()
    inputs = stack_inputs()
    with torch.no_grad():
        expected = model(inputs)
    path = sa.save_spectral_shift(tmp_path / "shift.safetensors", model)
    shift_file = sa.load_shift_file(path)
    config = shift_file.configs[""]
    assert {key: config[key] for key in ("spectral_rank", "spectral_oversampling", "spectral_power_iterations",
                                         "spectral_seed", "spectral_svd_dtype", "spectral_factor_devices")} == {
        "spectral_rank": RANK, "spectral_oversampling": 8, "spectral_power_iterations": 4, "spectral_seed": 0,
        "spectral_svd_dtype": "float32", "spectral_factor_devices": ["cpu"]}
    assert all(delta.shape == (RANK,) for delta in shift_file.deltas[""].values())
    assert set(shift_file.factor_fingerprints[""]) == set(shift_file.deltas[""])
    assert all(len(values) == 4 + RANK for values in shift_file.factor_fingerprints[""].values())
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["format_version"] == "1"
    # The file's rank and parameters rebuild the factors, whatever the caller's defaults: cold, then cached.
    for cache in (False, tmp_path / "cache", tmp_path / "cache"):
        fresh = Stack()
        sa.load_spectral_shift(fresh, path, svd_cache=cache)
        with torch.no_grad():
            assert torch.equal(fresh(inputs), expected)
        assert all(layer.shift_size == RANK for _, layer in spectral_layers(fresh))
        assert fresh.peft_config["default"].spectral_oversampling == 8


def test_a_full_spectrum_file_records_no_truncation(tmp_path):
    model = Stack()
    sa.add_spectral_shift(model, sa.SpectralShiftConfig(), svd_cache=False)
    path = sa.save_spectral_shift(tmp_path / "full.safetensors", model)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert "factor_fingerprint" not in metadata and "spectral_rank" not in json.loads(metadata["config"])[""]
    assert all(delta.numel() == 40 for delta in sa.load_shift_file(path).deltas[""].values())


def test_the_cache_never_mixes_ranks_or_full_and_truncated_factors(tmp_path):
    cache = SVDCache(tmp_path)
    matrix = flat(120, 90)[0].float()

    def entries():
        return len(list(tmp_path.rglob("*.safetensors")))

    full = compute_factors({"w": matrix}, cache=cache)["w"]
    low = compute_factors({"w": matrix}, cache=cache, truncation=TruncatedSVD(8))["w"]
    high = compute_factors({"w": matrix}, cache=cache, truncation=TruncatedSVD(16))["w"]
    seeded = compute_factors({"w": matrix}, cache=cache, truncation=TruncatedSVD(8, seed=1))["w"]
    assert entries() == 4
    assert (full.S.numel(), low.S.numel(), high.S.numel()) == (90, 8, 16)
    keys = {weight_key(matrix), *(weight_key(matrix, truncation=TruncatedSVD(k)) for k in (8, 16)),
            weight_key(matrix, truncation=TruncatedSVD(8, seed=1)), weight_key(matrix, truncation=TruncatedSVD(8, 4))}
    assert len(keys) == 5
    again = compute_factors({"w": matrix}, cache=cache, truncation=TruncatedSVD(8))["w"]
    assert entries() == 4 and torch.equal(again.U, low.U) and again.truncation == TruncatedSVD(8)
    assert again.computed_on == "cpu"
    # A full SVD's entry placed under a truncated key is not served: wrong shapes, rejected and rebuilt.
    full_entry = cache._path(weight_key(matrix))
    cache._path(weight_key(matrix, truncation=TruncatedSVD(16))).write_bytes(full_entry.read_bytes())
    rebuilt = compute_factors({"w": matrix}, cache=cache, truncation=TruncatedSVD(16))["w"]
    assert rebuilt.S.numel() == 16 and torch.equal(rebuilt.U, high.U)


def test_a_tampered_factor_fingerprint_is_refused_and_the_model_is_unchanged(tmp_path):
    path = sa.save_spectral_shift(tmp_path / "shift.safetensors", shifted_stack())

    def bump(value):
        value[""]["conv"][6] += 0.05

    tampered = rewrite(path, tmp_path / "tampered.safetensors", edit_json("factor_fingerprint", bump))
    model = Stack()
    snapshot = state_snapshot(model)
    with pytest.raises(SpectralFactorMismatchError, match=r"'conv'") as raised:
        sa.load_spectral_shift_adapter(model, tampered, svd_cache=False)
    assert isinstance(raised.value, WrongBaseModelError) and "Load it on a machine" in str(raised.value)
    assert_unchanged(model, snapshot)


def test_a_file_whose_factors_would_come_out_differently_is_refused(tmp_path):
    # Flat spectra: another seed recorded in the file gives other top-k vectors, so the δ would move other
    # directions; the factor fingerprints (not the σ ones, which agree) catch it.
    path = sa.save_spectral_shift(tmp_path / "shift.safetensors", shifted_stack(flat))

    def reseed(value):
        value[""]["spectral_seed"] = 1

    reseeded = rewrite(path, tmp_path / "reseeded.safetensors", edit_json("config", reseed))
    model = Stack(flat)
    with pytest.raises(SpectralFactorMismatchError, match="4 module"):
        sa.load_spectral_shift_adapter(model, reseeded, svd_cache=False)
    assert not list(spectral_layers(model))


def test_factors_that_differ_on_the_first_device_are_rebuilt_on_the_cpu(tmp_path, monkeypatch):
    model = shifted_stack(flat)
    inputs = stack_inputs()
    with torch.no_grad():
        expected = model(inputs)
    path = sa.save_spectral_shift(tmp_path / "shift.safetensors", model)
    from svdiff_adapter.loaders import model as loaders_model

    real = loaders_model.compute_factors
    calls = []

    def other_device(matrices, **options):
        # Stands for an accelerator whose round-off rotates the near-equal singular vectors: another seed's factors,
        # labelled as computed elsewhere. The retry on the CPU (the reference) gets the real ones.
        calls.append(sorted(matrices))
        if len(calls) > 1:
            return real(matrices, **options)
        truncation = options["truncation"]
        other = TruncatedSVD(truncation.rank, truncation.oversampling, truncation.power_iterations, seed=7)
        made = real(matrices, **{**options, "truncation": other})
        return {name: sa.SpectralFactors(f.U, f.S, f.Vh, truncation, "cuda") for name, f in made.items()}

    monkeypatch.setattr(loaders_model, "compute_factors", other_device)
    fresh = Stack(flat)
    sa.load_spectral_shift_adapter(fresh, path, svd_cache=False)
    assert len(calls) == 2 and calls[1] == calls[0]  # every module mismatched, and was rebuilt once on the CPU
    assert {layer.spectral_factors_computed_on for _, layer in spectral_layers(fresh)} == {"cpu"}
    with torch.no_grad():
        assert torch.equal(fresh(inputs), expected)


def test_truncated_files_without_factor_fingerprints_or_parameters_are_refused(tmp_path):
    path = sa.save_spectral_shift(tmp_path / "shift.safetensors", shifted_stack())
    unfingerprinted = rewrite(path, tmp_path / "a.safetensors", lambda metadata: metadata.pop("factor_fingerprint"))
    with pytest.raises(SpectralShiftFormatError, match="no factor fingerprint"):
        sa.load_spectral_shift_adapter(Stack(), unfingerprinted, svd_cache=False)
    for key, value, message in [("spectral_seed", None, "missing: \\['spectral_seed'\\]"),
                                ("spectral_rank", True, "'spectral_rank' should be a int"),
                                ("spectral_rank", "8", "'spectral_rank' should be a int"),
                                ("spectral_rank", 0, "needs to be >= 1"),
                                ("spectral_factor_devices", "cpu", "should be a list")]:
        def change(config, key=key, value=value):
            if value is None:
                del config[""][key]
            else:
                config[""][key] = value

        edited = rewrite(path, tmp_path / "b.safetensors", edit_json("config", change))
        with pytest.raises(SpectralShiftFormatError, match=message):
            sa.load_shift_file(edited)
    broken = rewrite(path, tmp_path / "c.safetensors", lambda m: m.update(factor_fingerprint='{"": {"conv": "x"}}'))
    with pytest.raises(SpectralShiftFormatError, match="'factor_fingerprint' of 'conv'"):
        sa.load_shift_file(broken)


def test_shifts_of_the_wrong_length_are_refused_naming_the_rank():
    model = Stack()
    deltas = {"proj": torch.zeros(40)}  # a full-spectrum δ for a rank-8 config
    with pytest.raises(ShiftDoesNotFitError, match=r"proj: shift has shape \(40,\), the module needs \(8,\)"):
        sa.load_spectral_shift_into_model(model, deltas, {**CONFIG, "target_kinds": ["linear"]})
    sa.load_spectral_shift_into_model(model, {"proj": torch.zeros(8)}, {**CONFIG, "target_kinds": ["linear"]},
                                      svd_cache=False)
    assert model.proj.shift_size == RANK


def test_hotswap_needs_the_same_spectrum(tmp_path):
    source = shifted_stack()
    path = sa.save_spectral_shift(tmp_path / "shift.safetensors", source)
    model = Stack()
    sa.load_spectral_shift_adapter(model, path, svd_cache=False)
    with torch.no_grad():
        for _, layer in spectral_layers(model):
            layer.spectral_delta["default"].zero_()
    sa.hotswap_spectral_shift(model, sa.load_shift_file(path), "default")
    with torch.no_grad():
        assert torch.equal(model(stack_inputs()), source(stack_inputs()))
    other = shifted_stack(spectral_seed=1)
    other_path = sa.save_spectral_shift(tmp_path / "other.safetensors", other)
    with pytest.raises(ValueError, match="spectrum"):
        sa.hotswap_spectral_shift(model, sa.load_shift_file(other_path), "default")


# ------------------------------------------------------------------------------------------------ fingerprints
def test_the_fingerprint_tolerance_separates_round_off_from_rotations():
    """Float16 storage and float64 arithmetic stay far inside the tolerance; sign flips change nothing; a rotation
    of two kept vectors by 0.1 rad is caught."""
    def distance(first, second):
        return max(abs(a - b) for a, b in zip(factor_fingerprint(first.U, first.Vh),
                                              factor_fingerprint(second.U, second.Vh)))

    worst_storage = worst_arithmetic = 0.0
    for seed in range(3):
        matrix = decaying(160, 120, seed=seed, ratio=0.97)[0].float()
        single = truncated_decompose(matrix, TruncatedSVD(16), torch.float32)
        half = truncated_decompose(matrix, TruncatedSVD(16), torch.float16)
        double = truncated_decompose(matrix, TruncatedSVD(16, dtype="float64"), torch.float32)
        worst_storage = max(worst_storage, distance(single, half))
        worst_arithmetic = max(worst_arithmetic, distance(single, double))
        signs = torch.where(torch.arange(16) % 3 == 0, -1.0, 1.0)
        flipped = sa.SpectralFactors(single.U * signs, single.S, single.Vh * signs[:, None])
        assert distance(single, flipped) == 0
        rotated_U, rotated_V = single.U.double().clone(), single.Vh.double().T.clone()
        for basis in (rotated_U, rotated_V):
            first, second = basis[:, 5].clone(), basis[:, 6].clone()
            basis[:, 5] = math.cos(0.1) * first + math.sin(0.1) * second
            basis[:, 6] = -math.sin(0.1) * first + math.cos(0.1) * second
        assert distance(single, sa.SpectralFactors(rotated_U, single.S, rotated_V.T)) > FACTOR_FINGERPRINT_TOLERANCE
    assert worst_storage < FACTOR_FINGERPRINT_TOLERANCE / 3, worst_storage
    assert worst_arithmetic < FACTOR_FINGERPRINT_TOLERANCE / 20, worst_arithmetic
    assert check_factor_fingerprints({"m": [0.0, 1.0]}, {"m": [0.004, 1.0]}) == []
    assert check_factor_fingerprints({"m": [0.0, 1.0]}, {"m": [0.006, 1.0]}) == ["m"]


def test_a_file_saved_with_float32_factors_loads_with_float16_factors(tmp_path):
    path = sa.save_spectral_shift(tmp_path / "shift.safetensors", shifted_stack(factor_dtype="float32"))
    model = Stack()
    sa.load_spectral_shift_adapter(model, path, svd_cache=False, factor_dtype=torch.float16)
    assert {layer.spectral_U.dtype for _, layer in spectral_layers(model)} == {torch.float16}


# ---------------------------------------------------------------------------------------------------- training
def test_training_changes_only_k_values_per_matrix_and_the_loss_falls():
    model = Stack()
    sa.add_spectral_shift(model, sa.SpectralShiftConfig(target_kinds=["linear", "conv2d", "embedding"], **CONFIG),
                          svd_cache=False)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 4 and all(p.shape == (RANK,) for p in trainable.values())
    inputs = stack_inputs()
    with torch.no_grad():
        target = shifted_stack(scale=0.5)(inputs)  # reachable: another shift of the same top-k factors
    optimizer = torch.optim.Adam(trainable.values(), lr=3e-2)
    losses = []
    for _ in range(25):
        loss = nn.functional.mse_loss(model(inputs), target)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for name, layer in spectral_layers(model):
        with torch.no_grad():
            change = weight_matrix(layer.effective_weight() - layer.base_layer.weight).double()
        U = layer.spectral_U.double()
        assert float(change.abs().max()) > 0
        # The change lives in span(U_k) ⊗ span(V_k): nothing outside the kept singular vectors moved.
        outside = change - U @ (U.T @ change)
        assert float(outside.abs().max()) < 1e-3 * float(change.abs().max()), name


def test_svdiff_train_takes_spectral_rank(tmp_path):
    import numpy as np
    from PIL import Image

    from svdiff_adapter.training import parse_args, train
    from svdiff_cli.train_options import check_train_arguments

    from .tiny_models import tiny_pipeline

    with pytest.raises(ValueError, match="--spectral_rank"):
        check_train_arguments(parse_args(["--pretrained_model_name_or_path", "x", "--spectral_rank", "0"]))
    model_dir, images = tmp_path / "tiny-sd", tmp_path / "dog"
    tiny_pipeline().save_pretrained(model_dir)
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{index}.png")
    args = parse_args(["--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "out"),
                       "--instance_data_dir", str(images), "--instance_prompt", "a photo of sks dog",
                       "--resolution", "32", "--max_train_steps", "2", "--seed", "7", "--report_to", "none",
                       "--spectral_rank", "4", "--svd_cache", "none"])
    result = train(args)
    shift_file = sa.load_shift_file(result["weights"])
    assert shift_file.configs["unet"]["spectral_rank"] == 4
    matrices = [d for name, d in shift_file.deltas["unet"].items() if "norm" not in name]
    assert matrices and all(d.numel() <= 4 for d in matrices)
