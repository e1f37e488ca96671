"""Where the SVD factors live (`factor_location`: "device", "cpu", "disk", "auto"): the same weights, outputs and
training in every location, factors memory-mapped from the SVD cache for "disk", moves between locations all or
nothing, and bad input refused with the model unchanged.

This machine has no accelerator, so "device" and "cpu" hold the factors in the same memory here; what tells them
apart is where the factors stay when the weights move (`.to("meta")` stands in for an accelerator) and the
resolution of "auto" from an accelerator's free memory.
"""

import copy

import pytest
import torch
from torch import nn

import svdiff_adapter as sa
from svdiff_adapter.factor_location import factor_bytes, resolve_factor_locations
from svdiff_adapter.spectral import weight_matrix
from svdiff_adapter.tuner import spectral_layers
from svdiff_adapter.tuner.layer import find_spectral_layer

from .test_transformer_pipelines import _effect_error, _linear_names, _make_deltas, _reference
from .tiny_models import Mixed, assert_unchanged, mixed_inputs, state_snapshot
from .transformer_models import FAMILIES

KINDS = ["linear", "conv2d", "embedding", "norm"]


def mapped_file(tensor: torch.Tensor):
    """The file whose memory mapping holds the tensor's data (from /proc/self/maps), or None for anonymous memory."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            if start <= address < end:
                path = fields[5] if len(fields) > 5 else ""
                return path if path.startswith("/") else None  # "[heap]", "[anon:...]" and the like: no file
    return None


def factor_layers(model):
    return [layer for _, layer in spectral_layers(model) if layer.uses_factors]


def shifted_mixed(location, cache, seed=4):
    """Mixed with float32 factors kept in `location` and a shift big enough for the ReLU to clip some values."""
    model = Mixed()
    sa.add_spectral_shift(model, sa.SpectralShiftConfig(target_kinds=KINDS, factor_dtype="float32"),
                          svd_cache=cache, factor_location=location)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in spectral_layers(model):
            delta = layer.spectral_delta["default"]
            scale = layer.spectral_S if layer.uses_factors else 1.0
            delta.copy_(torch.randn(delta.shape, generator=generator) * 0.8 * scale)
    return model


@pytest.mark.parametrize("location", ["device", "cpu", "disk"])
def test_every_location_builds_the_float64_reference_weight(location, tmp_path):
    model = shifted_mixed(location, tmp_path / "cache")
    layers = factor_layers(model)
    assert len(layers) == 4 and all(layer.spectral_factor_location == location for layer in layers)
    for layer in layers:
        weight = weight_matrix(layer.base_layer.weight).double()
        svd = torch.linalg.svd(weight, full_matrices=False)
        delta = layer.spectral_delta["default"].detach().double()
        reference = (svd.U * torch.relu(svd.S + delta)) @ svd.Vh
        with torch.no_grad():
            built = weight_matrix(layer.effective_weight()).double()
        assert float((built - reference).abs().max()) < 1e-5 * float(svd.S[0])
        where = mapped_file(layer.spectral_U)
        if location == "disk":
            assert where is not None and where.startswith(str(tmp_path / "cache")), where
            assert mapped_file(layer.spectral_Vh) == where
        else:
            assert where is None  # computed here, held in ordinary memory


def test_outputs_and_training_are_identical_in_every_location(tmp_path):
    inputs = mixed_inputs()
    target = shifted_mixed("device", False, seed=9)(inputs).detach()
    runs = {}
    for location in ("device", "cpu", "disk"):
        model = shifted_mixed(location, tmp_path / location)
        resting = [(layer.spectral_U, layer.spectral_U.clone()) for layer in factor_layers(model)]
        with torch.no_grad():
            before = model(inputs)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(5):
            loss = nn.functional.mse_loss(model(inputs), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        with torch.no_grad():
            after = model(inputs)
        deltas = {name: layer.spectral_delta["default"].detach().clone() for name, layer in spectral_layers(model)}
        runs[location] = before, after, losses, deltas
        assert losses[-1] < losses[0]
        for layer, (tensor, values) in zip(factor_layers(model), resting):
            # Back at rest after training: the same tensors (a mapped file stays mapped), values untouched.
            assert layer.spectral_U is tensor and torch.equal(tensor, values)
            assert layer.spectral_U.dtype == torch.float32 and layer._resting_factors is None
    for location in ("cpu", "disk"):
        before, after, losses, deltas = runs[location]
        assert torch.equal(before, runs["device"][0]) and torch.equal(after, runs["device"][1])
        assert losses == runs["device"][2]
        assert all(torch.equal(delta, runs["device"][3][name]) for name, delta in deltas.items())


def test_factors_kept_off_the_device_stay_when_the_weights_move(tmp_path):
    for location, expected in (("device", "meta"), ("cpu", "cpu"), ("disk", "cpu")):
        model = shifted_mixed(location, tmp_path / "cache")
        model.to("meta")  # an accelerator's stand-in: every weight leaves the CPU
        for layer in factor_layers(model):
            assert layer.base_layer.weight.device.type == "meta"
            assert {t.device.type for t in (layer.spectral_U, layer.spectral_S, layer.spectral_Vh)} == {expected}
            # What a build uses is on the weight's device either way.
            assert {t.device.type for t in layer.working_factors()} == {"meta"}


def test_factors_move_between_locations_without_changing_outputs(tmp_path):
    model = shifted_mixed("device", False)
    inputs = mixed_inputs()
    with torch.no_grad():
        expected = model(inputs)
    originals = [layer.spectral_U.clone() for layer in factor_layers(model)]
    for location in ("disk", "cpu", "device", "disk"):
        assert sa.set_spectral_factor_location(model, location, svd_cache=tmp_path / "cache") == 4
        for layer, original in zip(factor_layers(model), originals):
            assert layer.spectral_factor_location == location and torch.equal(layer.spectral_U, original)
            assert (mapped_file(layer.spectral_U) is not None) == (location == "disk")
        with torch.no_grad():
            assert torch.equal(model(inputs), expected)


def test_a_failed_move_leaves_every_layer_as_it_was(tmp_path):
    model = shifted_mixed("device", False)
    before = [(layer.spectral_U, layer.spectral_factor_location) for layer in factor_layers(model)]
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(OSError):
        sa.set_spectral_factor_location(model, "disk", svd_cache=blocked)
    with pytest.raises(ValueError, match="cache is off"):
        sa.set_spectral_factor_location(model, "disk", svd_cache=False)
    for bad, match in (("auto", "chooses at load time"), ("gpu", "should be one of")):
        with pytest.raises(ValueError, match=match):
            sa.set_spectral_factor_location(model, bad)
    assert [(layer.spectral_U, layer.spectral_factor_location) for layer in factor_layers(model)] == before


@pytest.mark.parametrize("location, cache, match", [("disk", False, "cache is off"),
                                                    ("elsewhere", None, "should be one of")])
def test_a_load_with_a_bad_location_changes_nothing(location, cache, match, tmp_path):
    saved = sa.save_spectral_shift(tmp_path / "shift.safetensors", shifted_mixed("device", False))
    model = Mixed()
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError, match=match):
        sa.load_spectral_shift(model, saved, svd_cache=cache, factor_location=location)
    assert_unchanged(model, snapshot)
    assert not hasattr(model, "peft_config") or not model.peft_config


def test_auto_keeps_factors_with_the_weights_while_they_fit_half_the_free_memory():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    devices = {"a": gpu, "b": gpu, "c": cpu}
    sizes = {"a": 300, "b": 200, "c": 10**12}
    fits = resolve_factor_locations("auto", devices, sizes, free_bytes=lambda device: 1000)
    assert fits == {"a": "device", "b": "device", "c": "device"}  # 500 of 1000 free; the CPU always fits
    tight = resolve_factor_locations("auto", devices, sizes, free_bytes=lambda device: 999)
    assert tight == {"a": "cpu", "b": "cpu", "c": "device"}  # all or none of an accelerator's new factors
    unknown = resolve_factor_locations("auto", devices, sizes, free_bytes=lambda device: None)
    assert set(unknown.values()) == {"device"}
    assert resolve_factor_locations("disk", devices, sizes) == {"a": "disk", "b": "disk", "c": "disk"}
    # U (m × k) and Vᵀ (k × n) in the factor dtype, σ in float32.
    assert factor_bytes((3072, 12288), 64, torch.float16) == 64 * (3072 + 12288) * 2 + 64 * 4


@pytest.mark.parametrize("location", ["cpu", "disk"])
def test_a_pipeline_loads_fuses_and_unloads_with_factors_off_the_device(location, tmp_path):
    family = FAMILIES["flux"]
    prototype = family.pipeline(sa.FluxPipeline)
    pipe = copy.deepcopy(prototype)
    dog, cat = _make_deltas(prototype, 1), _make_deltas(prototype, 2, scale=0.3)
    pipe.load_spectral_shift(dog, "dog", factor_dtype=torch.float32, factor_location=location,
                             svd_cache=tmp_path / "cache")
    pipe.load_spectral_shift(cat, "cat", factor_dtype=torch.float32, svd_cache=tmp_path / "cache")
    layers = factor_layers(pipe.transformer)
    # The second load shares the first one's factors, where they are.
    assert layers and all(layer.spectral_factor_location == location for layer in layers)
    assert all((mapped_file(layer.spectral_U) is not None) == (location == "disk") for layer in layers)
    pipe.set_adapters(["dog", "cat"], weights=[0.6, 0.4])
    reference = _reference(prototype, [(0.6, dog), (0.4, cat)])
    assert _effect_error(family, pipe, reference, prototype) < 1e-4
    unfused = family.call(pipe)
    pipe.fuse_spectral_shift()
    assert torch.allclose(family.call(pipe), unfused, atol=1e-5, rtol=0)
    pipe.unfuse_spectral_shift()
    for name in _linear_names(prototype.transformer):
        restored = find_spectral_layer(pipe.transformer.get_submodule(name)).base_layer.weight
        assert torch.equal(restored, prototype.transformer.get_submodule(name).weight), name
    pipe.set_spectral_factor_location("device")
    assert all(layer.spectral_factor_location == "device" and mapped_file(layer.spectral_U) is None
               for layer in factor_layers(pipe.transformer))
    assert torch.equal(family.call(pipe), unfused)
    snapshot = state_snapshot(prototype.transformer)
    pipe.unload_spectral_shift()
    assert not factor_layers(pipe.transformer)
    assert_unchanged(pipe.transformer, snapshot)
