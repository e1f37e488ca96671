"""File format v1: round trips, svdiff-pytorch files, and bad input (clear error, model unchanged)."""

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

import svdiff_adapter as sa
from svdiff_adapter import SpectralShiftConfig, SpectralShiftFormatError
from svdiff_adapter.format import DEFAULT_WEIGHT_NAME, load_shift_file, parse_state_dict
from svdiff_adapter.tuner import spectral_layers
from svdiff_adapter.tuner.layer import find_spectral_layer

from .tiny_models import (
    Mixed,
    assert_unchanged,
    mixed_inputs,
    state_snapshot,
    text_inputs,
    tiny_text_encoder,
    tiny_unet,
    unet_output,
)


def trained_shift(tmp_path, dtype=None, kinds=("linear", "conv2d", "norm")):
    """A tiny UNet with a random shift, saved; returns (unet, path, output with the shift)."""
    unet = tiny_unet()
    sa.add_spectral_shift(unet, SpectralShiftConfig(target_kinds=list(kinds)), "a", svd_cache=False)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, layer in spectral_layers(unet):
            layer.spectral_delta["a"].copy_(torch.randn(layer.shift_size, generator=generator) * 0.3)
    path = tmp_path / DEFAULT_WEIGHT_NAME
    sa.save_spectral_shift(path, {"unet": unet}, "a", base_model="tests/tiny-unet", dtype=dtype)
    return unet, path, unet_output(unet)


def test_round_trip_gives_identical_outputs(tmp_path):
    _, path, expected = trained_shift(tmp_path)
    fresh = tiny_unet()
    sa.load_spectral_shift({"unet": fresh}, path, "b", svd_cache=False)
    assert torch.equal(unet_output(fresh), expected)
    loaded = load_shift_file(path)
    assert loaded.base_model == "tests/tiny-unet"
    assert loaded.components == ["unet"] and loaded.source == "v1"
    assert loaded.configs["unet"] == {"norm_mode": "elementwise", "target_kinds": ["linear", "conv2d", "norm"]}
    assert all(key.endswith(".spectral_delta") and "lora" not in key for key in _keys(path))
    assert all(key.startswith("unet.") for key in _keys(path))


def _keys(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())


def test_metadata_is_json_in_the_safetensors_header(tmp_path):
    _, path, _ = trained_shift(tmp_path)
    with open(path, "rb") as handle:
        header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))["__metadata__"]
    assert header["format"] == "svdiff-adapter" and header["format_version"] == "1"
    fingerprint = json.loads(header["fingerprint"])["unet"]
    assert len(fingerprint["conv_in"]) == 4


@pytest.mark.parametrize("local", [
    lambda tmp: tmp / "base",  # a pipeline loaded from a pathlib.Path reports its name_or_path as a Path
    lambda tmp: str(tmp / "base"),
    lambda tmp: "./models/sd15",
    lambda tmp: "~/models/sd15",
])
def test_a_local_base_model_path_is_not_recorded(tmp_path, local):
    """A path says nothing on another machine (and leaks the user's folders); the fingerprints identify the base."""
    _, path, _ = trained_shift(tmp_path)
    shift = load_shift_file(path)
    shift.base_model, shift.base_revision = local(tmp_path), "main"
    sa.save_shift_file(shift, tmp_path / "copy.safetensors")
    copy = load_shift_file(tmp_path / "copy.safetensors")
    assert copy.base_model is None and copy.base_revision is None
    shift.base_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    sa.save_shift_file(shift, tmp_path / "copy.safetensors")
    copy = load_shift_file(tmp_path / "copy.safetensors")
    assert copy.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5" and copy.base_revision == "main"


def test_float16_storage_error_is_bounded(tmp_path):
    unet, path32, _ = trained_shift(tmp_path)
    path16 = tmp_path / "half.safetensors"
    sa.save_spectral_shift(path16, {"unet": unet}, "a", dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(str(path16), "pt") as handle:
        assert all(handle.get_tensor(key).dtype == torch.float16 for key in handle.keys())
    full, half = load_shift_file(path32).deltas["unet"], load_shift_file(path16).deltas["unet"]
    for name in full:
        assert (full[name] - half[name]).abs().max() <= 2**-11 * full[name].abs().max() + 1e-7


def test_text_encoder_and_unet_in_one_file(tmp_path):
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    sa.add_spectral_shift(unet, SpectralShiftConfig(), "a", svd_cache=False)
    sa.add_spectral_shift(text_encoder, SpectralShiftConfig(target_kinds=["linear", "embedding", "norm"]), "a",
                          svd_cache=False)
    with torch.no_grad():
        for model in (unet, text_encoder):
            for _, layer in spectral_layers(model):
                layer.spectral_delta["a"].normal_(0, 0.1)
        expected = text_encoder(text_inputs()).last_hidden_state
    path = tmp_path / "both.safetensors"
    sa.save_spectral_shift(path, {"unet": unet, "text_encoder": text_encoder}, "a")
    assert set(load_shift_file(path).components) == {"unet", "text_encoder"}
    fresh_unet, fresh_text = tiny_unet(), tiny_text_encoder()
    sa.load_spectral_shift({"unet": fresh_unet, "text_encoder": fresh_text}, path, "a", svd_cache=False)
    with torch.no_grad():
        assert torch.equal(fresh_text(text_inputs()).last_hidden_state, expected)
    assert torch.equal(unet_output(fresh_unet), unet_output(unet))


# ----------------------------------------------------------------------------------- svdiff-pytorch files
def test_svdiff_pytorch_file_gives_its_formula(tmp_path):
    """Keys `<module>.delta`, no metadata, one scalar per norm; weights U·diag(ReLU(S+δ))·Vh and γ·ReLU(‖γ‖+δ)/‖γ‖."""
    model = Mixed()
    generator = torch.Generator().manual_seed(9)
    tensors = {}
    for name, module in model.named_modules():
        if name in ("proj", "conv3", "embed"):
            k = min(module.weight.reshape(module.weight.shape[0], -1).shape)
            tensors[f"{name}.delta"] = torch.randn(k, generator=generator) * 0.5
        elif name in ("norm", "group_norm"):
            tensors[f"{name}.delta"] = torch.tensor([-0.4])
    path = tmp_path / "spectral_shifts.safetensors"
    save_file(tensors, str(path))
    shift_file = load_shift_file(path)
    assert shift_file.source == "svdiff-pytorch" and shift_file.configs["unet"]["norm_mode"] == "scalar"
    sa.load_spectral_shift({"unet": model}, path, "legacy", svd_cache=False)
    for name in ("proj", "conv3", "embed"):
        layer = find_spectral_layer(model.get_submodule(name))
        W = layer.base_layer.weight.double()
        U, S, Vh = torch.linalg.svd(W.reshape(W.shape[0], -1), full_matrices=False)
        expected = (U @ torch.diag(torch.relu(S + tensors[f"{name}.delta"].double())) @ Vh).reshape(W.shape)
        assert (layer.effective_weight().double() - expected).abs().max() < 2e-3 * float(S.max())
    for name in ("norm", "group_norm"):
        layer = find_spectral_layer(model.get_submodule(name))
        gamma = layer.base_layer.weight.double()
        expected = gamma * torch.relu(gamma.norm() - 0.4) / gamma.norm()
        assert torch.allclose(layer.effective_weight().double(), expected, atol=1e-4)


def test_svdiff_pytorch_text_encoder_prefix_is_stripped(tmp_path):
    text_encoder = tiny_text_encoder()
    layer_name = "encoder.layers.0.self_attn.q_proj"
    path = tmp_path / "spectral_shifts_te.safetensors"
    save_file({f"text_model.{layer_name}.delta": torch.full((32,), 0.1)}, str(path))
    shift_file = load_shift_file(path)
    assert shift_file.deltas == {"text_encoder": {layer_name: shift_file.deltas["text_encoder"][layer_name]}}
    sa.load_spectral_shift({"text_encoder": text_encoder}, shift_file, "legacy", svd_cache=False)
    assert find_spectral_layer(text_encoder.get_submodule(layer_name)) is not None


# ------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def saved(tmp_path):
    return trained_shift(tmp_path)


def _expect_rejected(model, action, match):
    snapshot = state_snapshot(model)
    with pytest.raises((SpectralShiftFormatError, ValueError, FileNotFoundError), match=match):
        action()
    assert_unchanged(model, snapshot)


def test_pickle_files_are_never_unpickled(tmp_path):
    model = Mixed()
    for name in ("adapter.bin", "adapter.pt", "disguised.safetensors"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"proj.delta": [1.0, 2.0]}))
        _expect_rejected(model, lambda p=path: sa.load_spectral_shift({"unet": model}, p), "pickle")
    torch_save = tmp_path / "zip.safetensors"
    torch.save({"proj.delta": torch.zeros(3)}, torch_save)
    _expect_rejected(model, lambda: sa.load_spectral_shift({"unet": model}, torch_save), "pickle")


def test_truncated_or_corrupt_file(saved, tmp_path):
    _, path, _ = saved
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    unet = tiny_unet()
    for bad in (truncated, garbage):
        _expect_rejected(unet, lambda b=bad: sa.load_spectral_shift({"unet": unet}, b), "corrupt or truncated")


def test_unknown_format_version(saved, tmp_path):
    unet, path, _ = saved
    shift_file = load_shift_file(path)
    tensors = {f"unet.{k}.spectral_delta": v for k, v in shift_file.deltas["unet"].items()}
    future = tmp_path / "future.safetensors"
    save_file(tensors, str(future), metadata={"format": "svdiff-adapter", "format_version": "7",
                                              "components": '["unet"]'})
    fresh = tiny_unet()
    _expect_rejected(fresh, lambda: sa.load_spectral_shift({"unet": fresh}, future), "format version '7'")


def test_nan_and_inf_are_rejected(saved, tmp_path):
    _, path, _ = saved
    shift_file = load_shift_file(path)
    first = next(iter(shift_file.deltas["unet"]))
    shift_file.deltas["unet"][first][0] = float("nan")
    fresh = tiny_unet()
    _expect_rejected(fresh, lambda: sa.load_spectral_shift({"unet": fresh}, shift_file), "NaN or inf")
    with pytest.raises(SpectralShiftFormatError, match="NaN or inf"):
        sa.save_shift_file(shift_file, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()


def test_shape_mismatch_and_missing_modules(saved):
    _, path, _ = saved
    shift_file = load_shift_file(path)
    deltas = shift_file.deltas["unet"]
    deltas["conv_in"] = torch.zeros(3)
    fresh = tiny_unet()
    _expect_rejected(fresh, lambda: sa.load_spectral_shift({"unet": fresh}, shift_file), r"conv_in: shift has shape \(3,\)")
    deltas.pop("conv_in")
    deltas["down_blocks.9.nothing"] = torch.zeros(4)
    _expect_rejected(fresh, lambda: sa.load_spectral_shift({"unet": fresh}, shift_file), "no such module")


def test_wrong_base_model_is_detected_by_fingerprint(saved):
    _, path, _ = saved
    other = tiny_unet()
    with torch.no_grad():
        for name, parameter in other.named_parameters():
            if name.startswith("down_blocks.0") and parameter.ndim > 1:
                parameter.mul_(1.1)  # a "community fine-tune"
    _expect_rejected(other, lambda: sa.load_spectral_shift({"unet": other}, path), "Wrong base model")


def test_adapter_name_in_use_and_unknown_names(saved):
    unet, path, _ = saved
    _expect_rejected(unet, lambda: sa.load_spectral_shift({"unet": unet}, path, "a"), "already in use")
    _expect_rejected(unet, lambda: sa.unload_spectral_shift(unet, ["nope"]), "Unknown spectral adapter")
    with pytest.raises(ValueError, match="nope"):
        unet.set_adapter("nope")


def test_lora_file_is_pointed_to_load_lora_weights(tmp_path):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.conv_in.lora_A.weight": torch.zeros(2, 4)}, str(path))
    with pytest.raises(SpectralShiftFormatError, match="load_lora_weights"):
        load_shift_file(path)


def test_missing_file_and_empty_state_dict(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_shift_file(tmp_path / "nope.safetensors")
    with pytest.raises(SpectralShiftFormatError, match="no tensors"):
        parse_state_dict({})


def test_failed_load_into_a_model_with_adapters_keeps_them(saved):
    unet, path, expected = saved
    shift_file = load_shift_file(path)
    shift_file.deltas["unet"]["conv_out"] = torch.zeros(2)  # wrong length, found after other checks pass
    _expect_rejected(unet, lambda: sa.load_spectral_shift({"unet": unet}, shift_file, "b"), "conv_out")
    assert sa.spectral_adapter_names(unet) == ["a"]
    assert torch.equal(unet_output(unet), expected)


def test_save_leaves_no_temporary_files_and_gives_the_usual_permissions(saved, tmp_path):
    """(Atomicity itself: tests/test_atomic.py kills a writer mid-write.)"""
    unet, path, _ = saved
    before = sorted(p.name for p in tmp_path.iterdir())
    sa.save_spectral_shift(path, {"unet": unet}, "a")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # The temporary file's private 0600 mode must not leak into the result: files get the umask's permissions.
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_model_level_round_trip_on_a_bare_model(tmp_path):
    model = Mixed()
    sa.add_spectral_shift(model, SpectralShiftConfig(target_kinds=["linear", "embedding"]), "a", svd_cache=False)
    with torch.no_grad():
        for _, layer in spectral_layers(model):
            layer.spectral_delta["a"].normal_(0, 0.2)
        expected = model(mixed_inputs())
    path = tmp_path / "bare.safetensors"
    sa.save_spectral_shift(path, model, "a")
    assert load_shift_file(path).components == [""]
    fresh = Mixed()
    sa.load_spectral_shift(fresh, path, "a", svd_cache=False)
    with torch.no_grad():
        assert torch.equal(fresh(mixed_inputs()), expected)


# ------------------------------------------------------------------------------- metadata and tensor types
def _rewrite(tmp_path, path, name="edited.safetensors", tensors=None, **metadata_changes):
    """A copy of a saved file with some metadata fields (or tensors) replaced."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        original = {key: handle.get_tensor(key) for key in handle.keys()}
    for key, value in metadata_changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    target = tmp_path / name
    save_file(tensors if tensors is not None else original, str(target), metadata=metadata)
    return target, original


@pytest.mark.parametrize("field, value, message", [
    ("components", '{"unet": 1}', "'components' should be a JSON list"),
    ("components", "[1, 2]", "'components' should be a list of names"),
    ("config", "[]", "'config' should be a JSON dict"),
    ("config", '{"unet": "elementwise"}', "'config' of 'unet' should be an object"),
    ("config", '{"unet": {"norm_mode": 3}}', "'norm_mode' should be a str"),
    ("fingerprint", '"abc"', "'fingerprint' should be a JSON dict"),
    ("fingerprint", '{"unet": {"conv_in": "big"}}', "conv_in' should be a list of numbers"),
    ("fingerprint", '{"unet": []}', "'fingerprint' of 'unet' should be an object"),
    ("format_version", "²", "format version '²'"),
    ("format_version", "", "format version ''"),
])
def test_metadata_of_the_wrong_type_names_the_field(saved, tmp_path, field, value, message):
    _, path, _ = saved
    edited, _ = _rewrite(tmp_path, path, **{field: value})
    with pytest.raises(SpectralShiftFormatError, match=message):
        load_shift_file(edited)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8, torch.float8_e4m3fn, torch.complex64])
def test_shifts_of_a_non_float_dtype_are_refused(saved, tmp_path, dtype):
    _, path, _ = saved
    _, original = _rewrite(tmp_path, path)
    first = sorted(original)[0]
    tensors = dict(original)
    tensors[first] = torch.ones_like(original[first]).to(dtype)
    edited, _ = _rewrite(tmp_path, path, tensors=tensors)
    with pytest.raises(SpectralShiftFormatError, match=rf"{first!r} has dtype {dtype}"):
        load_shift_file(edited)


def test_only_float_storage_dtypes_are_written(saved, tmp_path):
    unet, path, _ = saved
    with pytest.raises(ValueError, match="torch.float32, torch.float16 or torch.bfloat16, not torch.int8"):
        sa.save_spectral_shift(tmp_path / "int8.safetensors", {"unet": unet}, "a", dtype=torch.int8)
    assert not (tmp_path / "int8.safetensors").exists()
    sa.save_spectral_shift(tmp_path / "bf16.safetensors", {"unet": unet}, "a", dtype=torch.bfloat16)
    assert load_shift_file(tmp_path / "bf16.safetensors").num_parameters == load_shift_file(path).num_parameters


def test_a_file_without_fingerprints_is_refused_but_its_state_dict_loads_unchecked(saved, tmp_path):
    """Without fingerprints nothing could tell another base model; the user can still load the tensors knowingly."""
    _, path, expected = saved
    for edit in ({"fingerprint": None}, {"fingerprint": '{"unet": {"conv_in": [1.0, 1.0, 1.0, 1.0]}}'}):
        edited, tensors = _rewrite(tmp_path, path, **edit)
        fresh = tiny_unet()
        _expect_rejected(fresh, lambda: sa.load_spectral_shift({"unet": fresh}, edited),
                         "records no base-model fingerprint")
    fresh = tiny_unet()
    pipe_like = {"unet": fresh}
    from svdiff_adapter.format import parse_in_memory

    sa.load_spectral_shift(pipe_like, parse_in_memory(tensors), "a", svd_cache=False)
    assert torch.allclose(unet_output(fresh), expected, atol=1e-6)


def test_a_subset_of_components_loads_on_request(tmp_path):
    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    for model in (unet, text_encoder):
        sa.add_spectral_shift(model, SpectralShiftConfig(init_scale=0.1), "a", svd_cache=False)
    path = tmp_path / "both.safetensors"
    sa.save_spectral_shift(path, {"unet": unet, "text_encoder": text_encoder}, "a")
    fresh = tiny_unet()
    with pytest.raises(SpectralShiftFormatError, match="components="):
        sa.load_spectral_shift_adapter({"unet": fresh}, path)
    sa.load_spectral_shift_adapter(fresh, path, components=["unet"], svd_cache=False)
    assert torch.allclose(unet_output(fresh), unet_output(unet), atol=1e-6)
    with pytest.raises(SpectralShiftFormatError, match="no component"):
        sa.load_spectral_shift_adapter(tiny_unet(), path, components=["vae"])
