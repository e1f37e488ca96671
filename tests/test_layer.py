"""The spectral-shift math against an independent reference: W_δ recomputed by hand from torch.linalg.svd."""

import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from torch import nn

from svdiff_adapter import (
    SpectralShiftConfig,
    SpectralShiftLayer,
    add_spectral_shift,
    set_spectral_build_dtype,
    unload_spectral_shift,
)
from svdiff_adapter.tuner import spectral_layers
from svdiff_adapter.tuner.layer import find_spectral_layer

from .tiny_models import Mixed, assert_unchanged, mixed_inputs, state_snapshot


ALL_KINDS = ["linear", "conv2d", "embedding", "norm"]


def reference_weight(weight, shift, norm_mode="matrix"):
    """U·diag(ReLU(σ + shift))·Vᵀ in float64 from a fresh SVD (γ + shift for elementwise norms)."""
    if norm_mode == "elementwise":
        return weight.double() + shift.double().reshape(weight.shape)
    matrix = weight.double().reshape(1, -1) if weight.ndim == 1 else weight.double().reshape(weight.shape[0], -1)
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return (U @ torch.diag(torch.relu(S + shift.double())) @ Vh).reshape(weight.shape)


def reference_forward(raw, x, weight):
    weight = weight.to(raw.weight.dtype)
    if isinstance(raw, nn.Linear):
        return F.linear(x, weight, raw.bias)
    if isinstance(raw, nn.Conv2d):
        return F.conv2d(x, weight, raw.bias, raw.stride, raw.padding, raw.dilation)
    if isinstance(raw, nn.Embedding):
        return F.embedding(x, weight)
    if isinstance(raw, nn.LayerNorm):
        return F.layer_norm(x, raw.normalized_shape, weight, raw.bias, raw.eps)
    return F.group_norm(x, raw.num_groups, weight, raw.bias, raw.eps)


def module_inputs():
    generator = torch.Generator().manual_seed(5)
    return {
        "embed": torch.randint(0, 50, (2, 16), generator=generator),
        "proj": torch.randn(2, 16, 12, generator=generator),
        "norm": torch.randn(2, 16, 24, generator=generator),
        "conv3": torch.randn(2, 6, 8, 8, generator=generator),
        "conv1": torch.randn(2, 10, 4, 4, generator=generator),
        "group_norm": torch.randn(2, 6, 4, 4, generator=generator),
    }


def set_shift(layer, adapter, values):
    with torch.no_grad():
        layer.spectral_delta[adapter].copy_(values)


def random_shift(layer, scale=0.5, clip_fraction=0.25, seed=0):
    """Random shifts where some singular values are pushed below zero, so the ReLU clips."""
    generator = torch.Generator().manual_seed(seed)
    size = layer.shift_size
    base = layer.spectral_S if layer.uses_factors else torch.ones(size)
    shift = torch.randn(size, generator=generator) * scale * base.mean()
    clipped = torch.rand(size, generator=generator) < clip_fraction
    return torch.where(clipped, -2.0 * base, shift)


@pytest.mark.parametrize("norm_mode", ["elementwise", "scalar"])
def test_every_module_kind_matches_hand_computed_svd(norm_mode):
    model = Mixed()
    add_spectral_shift(model, SpectralShiftConfig(target_kinds=ALL_KINDS, norm_mode=norm_mode), "a", svd_cache=False)
    inputs = module_inputs()
    for index, (name, layer) in enumerate(spectral_layers(model)):
        shift = random_shift(layer, seed=index)
        set_shift(layer, "a", shift)
        mode = "elementwise" if not layer.uses_factors else "matrix"
        expected = reference_forward(layer.base_layer, inputs[name], reference_weight(layer.base_layer.weight, shift, mode))
        with torch.no_grad():
            actual = layer(inputs[name])
        # float16 factors: the error scales with the size of the change, not of W.
        tolerance = 2e-3 * float(shift.abs().max()) * max(1.0, float(inputs[name].float().abs().max()))
        assert (actual.double() - expected.double()).abs().max() <= tolerance, name
    if norm_mode == "scalar":
        norm = find_spectral_layer(model.norm)
        assert norm.shift_size == 1
        gamma = norm.base_layer.weight.detach().double()
        shift = float(norm.spectral_delta["a"])
        expected = gamma * max(0.0, gamma.norm().item() + shift) / gamma.norm()  # svdiff-pytorch's norm formula
        assert torch.allclose(norm.effective_weight().double(), expected, atol=1e-5)


def test_zero_shift_reproduces_base_bit_exactly():
    model = Mixed()
    x = mixed_inputs()
    with torch.no_grad():
        base = model(x)
    add_spectral_shift(model, SpectralShiftConfig(target_kinds=ALL_KINDS), "a", svd_cache=False)
    with torch.no_grad():
        assert torch.equal(model(x), base)
    model.train()
    assert torch.equal(model(x).detach(), base)  # training path too


def _two_adapters():
    model = Mixed()
    config = SpectralShiftConfig(target_modules=["proj"])
    add_spectral_shift(model, config, "dog", svd_cache=False)
    add_spectral_shift(model, config, "cat", svd_cache=False)
    layer = find_spectral_layer(model.proj)
    dog, cat = random_shift(layer, seed=1), random_shift(layer, seed=2)
    # Make sure the ReLU clips where one adapter pulls a value below zero and the other pushes it back.
    dog[:4] = -1.5 * layer.spectral_S[:4]
    cat[:4] = 1.0 * layer.spectral_S[:4]
    set_shift(layer, "dog", dog)
    set_shift(layer, "cat", cat)
    return model, layer, dog, cat


@pytest.mark.parametrize("weights", [(0.3, 0.7), (1.0, 1.0), (0.5, 0.5)])
def test_composition_happens_inside_the_relu(weights):
    model, layer, dog, cat = _two_adapters()
    a, b = weights
    peft.tuners.tuners_utils.set_adapter(model, ["dog", "cat"])
    layer.set_scale("dog", a)
    layer.set_scale("cat", b)
    x = module_inputs()["proj"]
    W = layer.base_layer.weight
    paper = reference_forward(layer.base_layer, x, reference_weight(W, a * dog + b * cat))
    with torch.no_grad():
        ours = layer(x)
    assert (ours.double() - paper.double()).abs().max() < 2e-3 * float((a * dog + b * cat).abs().max())
    # LoRA-style: weighted sum of the per-adapter outputs (combination outside the ReLU) differs when it clips.
    lora_style = (
        F.linear(x, W, layer.base_layer.bias).double()
        + a * (reference_forward(layer.base_layer, x, reference_weight(W, dog)) - F.linear(x, W, layer.base_layer.bias)).double()
        + b * (reference_forward(layer.base_layer, x, reference_weight(W, cat)) - F.linear(x, W, layer.base_layer.bias)).double()
    )
    assert (ours.double() - lora_style).abs().max() > 1e-2


def test_gradients_match_autograd_on_explicit_recomposition():
    model, layer, dog, cat = _two_adapters()
    peft.tuners.tuners_utils.set_adapter(model, ["dog", "cat"])
    layer.set_scale("dog", 0.7)
    layer.set_scale("cat", 0.4)
    x = module_inputs()["proj"]
    target = torch.randn(2, 16, 24)

    loss = ((layer(x) - target) ** 2).mean()
    loss.backward()
    ours = {name: layer.spectral_delta[name].grad.clone() for name in ("dog", "cat")}

    U, S, Vh = layer.spectral_U.double(), layer.spectral_S.double(), layer.spectral_Vh.double()
    dog_ref = dog.double().clone().requires_grad_(True)
    cat_ref = cat.double().clone().requires_grad_(True)
    change = torch.relu(S + 0.7 * dog_ref + 0.4 * cat_ref) - S
    weight = layer.base_layer.weight.double() + U @ torch.diag(change) @ Vh
    ref_loss = ((F.linear(x.double(), weight, layer.base_layer.bias.double()) - target.double()) ** 2).mean()
    ref_loss.backward()
    assert torch.allclose(ours["dog"].double(), dog_ref.grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(ours["cat"].double(), cat_ref.grad, rtol=1e-4, atol=1e-7)
    assert layer.base_layer.weight.grad is None  # base frozen


def test_conv_gradients_match_autograd():
    model = Mixed()
    add_spectral_shift(model, SpectralShiftConfig(target_modules=["conv3"]), "a", svd_cache=False)
    layer = find_spectral_layer(model.conv3)
    shift = random_shift(layer)
    set_shift(layer, "a", shift)
    x = module_inputs()["conv3"]
    layer(x).square().mean().backward()
    U, S, Vh = layer.spectral_U.double(), layer.spectral_S.double(), layer.spectral_Vh.double()
    ref_shift = shift.double().clone().requires_grad_(True)
    W = layer.base_layer.weight
    weight = W.double() + (U @ torch.diag(torch.relu(S + ref_shift) - S) @ Vh).reshape(W.shape)
    F.conv2d(x.double(), weight, layer.base_layer.bias.double(), 2, 1).square().mean().backward()
    assert torch.allclose(layer.spectral_delta["a"].grad.double(), ref_shift.grad, rtol=1e-4, atol=1e-7)


def test_effective_weight_is_reused_until_something_changes():
    model, layer, dog, cat = _two_adapters()
    x = module_inputs()["proj"]
    with torch.no_grad():
        layer(x)
        weight = layer.effective_weight()
        version = weight._version
        layer(x)
        assert layer.effective_weight() is weight and weight._version == version  # no re-composition per call
        before = weight.clone()
        layer.set_scale("cat", 0.5)
        layer(x)
        assert weight._version > version and not torch.equal(weight, before)  # rebuilt in place
        version, before = weight._version, weight.clone()
        layer(x)
        assert weight._version == version
        layer.spectral_delta["cat"].add_(0.1)  # an in-place update (optimizer, load_state_dict, hotswap)
        layer(x)
        assert not torch.equal(weight, before)
        before = weight.clone()
        peft.tuners.tuners_utils.set_adapter(model, ["dog"])
        layer(x)
        expected = reference_weight(layer.base_layer.weight, dog)
        assert (layer.effective_weight().double() - expected).abs().max() < 2e-3 * float(dog.abs().max())


def test_compiled_model_swaps_shifts_without_recompiling():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = Mixed()
    add_spectral_shift(model, SpectralShiftConfig(init_scale=0.1), "a", svd_cache=False)
    x = mixed_inputs()
    with torch.no_grad():
        model(x)  # builds the inference weights eagerly, before compiling
    compiled = torch.compile(model)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        for step in range(2):  # hotswap: new δ copied in place, inference weights refreshed in place
            for _, layer in spectral_layers(model):
                layer.spectral_delta["a"].copy_(torch.randn(layer.shift_size) * 0.1)
                layer.refresh_spectral_weight()
            assert torch.allclose(compiled(x), model(x), atol=1e-5)
        assert counters["stats"]["unique_graphs"] == graphs
        assert not counters["graph_break"]
        for _, layer in spectral_layers(model):
            layer.set_scale("a", 0.5)  # a new weight: recompiles rather than reusing a stale buffer
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


def test_merge_unmerge_is_exact_over_1000_cycles():
    model, layer, dog, cat = _two_adapters()
    peft.tuners.tuners_utils.set_adapter(model, ["dog", "cat"])
    x = module_inputs()["proj"]
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged_out = layer(x)
    for _ in range(1000):
        layer.merge()
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
    layer.merge(safe_merge=True)
    with torch.no_grad():
        assert torch.allclose(layer(x), unmerged_out, atol=1e-6)
    assert layer.merged_adapters == ["dog", "cat"]
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


def test_merge_in_steps_combines_inside_the_relu():
    model, layer, dog, cat = _two_adapters()
    peft.tuners.tuners_utils.set_adapter(model, ["dog", "cat"])
    x = module_inputs()["proj"]
    with torch.no_grad():
        both = layer(x).clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge(adapter_names=["dog"])
        layer.merge(adapter_names=["cat"])
    with torch.no_grad():
        assert torch.allclose(layer(x), both, atol=1e-6)


def test_unload_restores_modules_and_weights_bit_exactly():
    model = Mixed()
    snapshot = state_snapshot(model)
    add_spectral_shift(model, SpectralShiftConfig(target_kinds=ALL_KINDS), "a", svd_cache=False)
    for index, (_, layer) in enumerate(spectral_layers(model)):
        set_shift(layer, "a", random_shift(layer, seed=index))
    for _, layer in spectral_layers(model):
        layer.merge()
    unload_spectral_shift(model)
    assert_unchanged(model, snapshot)
    assert not any(isinstance(m, SpectralShiftLayer) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    model = Mixed().to(dtype)
    x = mixed_inputs()
    with torch.no_grad():
        base = model(x)
    add_spectral_shift(model, SpectralShiftConfig(target_modules=["proj", "conv3"]), "a", svd_cache=False)
    layer = find_spectral_layer(model.proj)
    assert layer.spectral_U.dtype == torch.float16 and layer.spectral_S.dtype == torch.float32
    assert layer.spectral_delta["a"].dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(x), base)
    shift = random_shift(layer)
    set_shift(layer, "a", shift)
    expected = reference_weight(layer.base_layer.weight.float(), shift)
    assert (layer.effective_weight().double() - expected).abs().max() < 2e-2 * float(expected.abs().max())
    with torch.no_grad():
        assert model(x).dtype == dtype


def test_factors_follow_device_moves_but_keep_their_dtype():
    model = Mixed()
    add_spectral_shift(model, SpectralShiftConfig(target_modules=["proj"]), "a", svd_cache=False)
    layer = find_spectral_layer(model.proj)
    model.to(torch.float64)
    assert layer.spectral_U.dtype == torch.float16 and layer.spectral_S.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.float64
    model.to("meta")
    assert layer.spectral_U.device.type == "meta"


def test_factors_are_not_saved_in_state_dicts():
    model = Mixed()
    add_spectral_shift(model, SpectralShiftConfig(target_modules=["proj"]), "a", svd_cache=False)
    assert not any("spectral_U" in key or "spectral_S" in key for key in model.state_dict())
    assert "proj.spectral_delta.a" in model.state_dict()


def test_lora_and_spectral_share_a_module_and_shifts_stay_in_one_layer():
    model = Mixed()
    x = module_inputs()["proj"]
    add_spectral_shift(model, SpectralShiftConfig(target_modules=["proj"]), "dog", svd_cache=False)
    peft.inject_adapter_in_model(LoraConfig(target_modules=["proj"], r=2, init_lora_weights=False), model, "style")
    add_spectral_shift(model, SpectralShiftConfig(target_modules=["proj"]), "cat", svd_cache=False)
    chain = []
    module = model.proj
    while module is not None:
        chain.append(module)
        module = getattr(module, "base_layer", None)
    spectral = [m for m in chain if isinstance(m, SpectralShiftLayer)]
    assert len(spectral) == 1 and set(spectral[0].spectral_delta) == {"dog", "cat"}
    layer = spectral[0]
    set_shift(layer, "dog", random_shift(layer, seed=1))
    set_shift(layer, "cat", random_shift(layer, seed=2))
    peft.tuners.tuners_utils.set_adapter(model, ["dog", "cat", "style"])
    lora = model.proj
    with torch.no_grad():
        out = model.proj(x)
        spectral_only = layer(x)
        lora_term = lora.lora_B["style"](lora.lora_A["style"](x)) * lora.scaling["style"]
    assert torch.allclose(out, spectral_only + lora_term, atol=1e-5)
    # Unloading the shifts keeps the LoRA.
    unload_spectral_shift(model)
    assert not any(isinstance(m, SpectralShiftLayer) for m in model.modules())
    assert hasattr(model.proj, "lora_A")


def test_spectral_layer_goes_inside_an_existing_lora():
    model = Mixed()
    peft.inject_adapter_in_model(LoraConfig(target_modules=["proj"], r=2), model, "style")
    add_spectral_shift(model, SpectralShiftConfig(target_modules=["proj"]), "dog", svd_cache=False)
    assert hasattr(model.proj, "lora_A")
    assert isinstance(model.proj.base_layer, SpectralShiftLayer)


def test_grouped_convolution_is_refused_with_a_clear_error():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError, match="groups=2"):
        add_spectral_shift(model, SpectralShiftConfig(target_modules=["0"]), "a", svd_cache=False)
    assert_unchanged(model, snapshot)
    # A catch-all config skips it instead.
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1))
    add_spectral_shift(model, SpectralShiftConfig(), "a", svd_cache=False)
    assert not isinstance(model[0], SpectralShiftLayer) and isinstance(model[1], SpectralShiftLayer)


def test_scale_layer_and_unscale_layer():
    model, layer, dog, cat = _two_adapters()
    peft.tuners.tuners_utils.set_adapter(model, ["dog", "cat"])
    layer.set_scale("dog", 0.5)
    layer.scale_layer(0.5)
    assert layer.spectral_scaling == {"dog": 0.25, "cat": 0.5}
    layer.unscale_layer(0.5)
    assert layer.spectral_scaling == {"dog": 0.5, "cat": 1.0}
    layer.unscale_layer()
    assert layer.spectral_scaling == {"dog": 1.0, "cat": 1.0}
    layer.set_scale("not-here", 3.0)  # diffusers calls set_scale on every layer with every name
    assert "not-here" not in layer.spectral_scaling


def test_get_delta_weight_matches_reference():
    model, layer, dog, cat = _two_adapters()
    W = layer.base_layer.weight
    expected = reference_weight(W, dog) - W.double()
    assert (layer.get_delta_weight("dog").double() - expected).abs().max() < 2e-3 * float(dog.abs().max())


def test_effective_weight_memory_is_released_when_no_shift_applies():
    model, layer, dog, cat = _two_adapters()
    x = module_inputs()["proj"]
    with torch.no_grad():
        layer(x)
    assert layer.spectral_weight is not None
    peft.tuners.tuners_utils.set_adapter(model, [])
    assert layer.spectral_weight is None
    peft.tuners.tuners_utils.set_adapter(model, ["dog"])
    with torch.no_grad():
        layer(x)
    layer.enable_adapters(False)
    assert layer.spectral_weight is None


class _FewRows(nn.Module):
    """Wide layers seen by few rows: training takes the factored path (no m × n recomposition)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(192, 256)
        self.conv = nn.Conv2d(64, 48, 3, stride=2, padding=1, padding_mode="reflect")
        self.embed = nn.Embedding(300, 40)


@pytest.mark.parametrize("name, make_input", [
    ("linear", lambda g: torch.randn(4, 192, generator=g)),
    ("conv", lambda g: torch.randn(1, 64, 4, 4, generator=g)),
    ("embed", lambda g: torch.randint(0, 300, (3, 5), generator=g)),
])
def test_factored_training_path_matches_recomposition(name, make_input):
    model = _FewRows()
    add_spectral_shift(model, SpectralShiftConfig(target_kinds=ALL_KINDS), "a", svd_cache=False)
    layer = find_spectral_layer(model.get_submodule(name))
    shift = random_shift(layer)
    set_shift(layer, "a", shift)
    x = make_input(torch.Generator().manual_seed(1))
    assert layer._factored_is_cheaper(x)
    out = layer(x)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    ((out - target) ** 2).mean().backward()

    U, S, Vh = layer.spectral_U.double(), layer.spectral_S.double(), layer.spectral_Vh.double()
    ref_shift = shift.double().clone().requires_grad_(True)
    W = layer.base_layer.weight
    weight = (W.double() + (U @ torch.diag(torch.relu(S + ref_shift) - S) @ Vh).reshape(W.shape))
    raw = layer.base_layer
    if name == "linear":
        expected = F.linear(x.double(), weight, raw.bias.double())
    elif name == "conv":
        expected = F.conv2d(F.pad(x.double(), (1, 1, 1, 1), mode="reflect"), weight, raw.bias.double(), 2)
    else:
        expected = F.embedding(x, weight)
    ((expected - target.double()) ** 2).mean().backward()
    assert torch.allclose(out.double(), expected, atol=1e-4)
    assert torch.allclose(layer.spectral_delta["a"].grad.double(), ref_shift.grad, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        assert torch.allclose(layer(x), out, atol=1e-5)  # the inference path agrees


def test_factors_are_float32_while_training_and_come_back_bit_exact():
    model, layer, _, _ = _two_adapters()
    stored = layer.spectral_U.dtype, layer.spectral_U.clone(), layer.spectral_Vh.clone()
    assert stored[0] == torch.float16
    x = module_inputs()["proj"]
    layer(x).square().mean().backward()  # a training step: δ requires grad
    assert layer.spectral_U.dtype == torch.float32 and layer.spectral_Vh.dtype == torch.float32
    with torch.no_grad():
        inference = layer(x)  # building the inference weight returns the factors to their storage dtype
    assert layer.spectral_U.dtype == torch.float16
    assert torch.equal(layer.spectral_U, stored[1]) and torch.equal(layer.spectral_Vh, stored[2])
    with torch.no_grad():
        assert torch.equal(layer(x), inference)


def test_layers_expose_the_wrapped_modules_shape_attributes():
    """Code that reads a module's shape off whatever sits at its path (diffusers' SDXL pipeline reads
    `add_embedding.linear_1.in_features`) gets the base module's values."""
    model = Mixed()
    raw = {name: module for name, module in model.named_modules()}
    add_spectral_shift(model, SpectralShiftConfig(target_kinds=ALL_KINDS), svd_cache=False)
    # in_features / out_features as PEFT's own layers report them (PEFT's code and tests read them on every layer).
    expected_features = {
        nn.Linear: lambda m: (m.in_features, m.out_features),
        nn.Conv2d: lambda m: (m.in_channels, m.out_channels),
        nn.Embedding: lambda m: (m.num_embeddings, m.embedding_dim),
        nn.LayerNorm: lambda m: (m.normalized_shape[0], m.normalized_shape[0]),
        nn.GroupNorm: lambda m: (m.num_channels, m.num_channels),
    }
    checked, kinds = 0, set()
    for name, layer in spectral_layers(model):
        kind = type(raw[name])
        kinds.add(kind)
        assert (layer.in_features, layer.out_features) == expected_features[kind](raw[name]), name
        for attribute in layer.mirrored_attributes:
            assert getattr(layer, attribute) == getattr(raw[name], attribute), (name, attribute)
            checked += 1
    assert checked >= 8 and kinds == set(expected_features)


def test_bfloat16_build_rounds_only_the_change_and_keeps_the_exact_paths():
    model = Mixed()
    x = mixed_inputs()
    with torch.no_grad():
        base = model(x)
    snapshot = state_snapshot(model)
    add_spectral_shift(model, SpectralShiftConfig(target_modules=["proj", "conv3"]), "a", svd_cache=False)
    assert set_spectral_build_dtype(model, torch.bfloat16) == 2
    with torch.no_grad():
        assert torch.equal(model(x), base)  # δ = 0: ΔW is exactly zero in any precision
    for index, (_, layer) in enumerate(spectral_layers(model)):
        shift = random_shift(layer, seed=index)
        set_shift(layer, "a", shift)
        weight = layer.base_layer.weight
        change = reference_weight(weight, shift) - weight.double()
        with torch.no_grad():  # inference builds (training recomposes in float32)
            built = layer.effective_weight().clone()
        assert layer.spectral_weight.dtype == torch.float32
        # bfloat16 products: error ~2⁻⁸ of ΔW (float32 builds: ~2⁻¹¹, the float16 factors)
        error = (built.double() - weight.double() - change).abs().max()
        assert 1e-4 * change.abs().max() < error < 2e-2 * change.abs().max()
        layer.set_build_dtype(torch.float32)
        with torch.no_grad():
            float32_error = (layer.effective_weight().double() - weight.double() - change).abs().max()
        assert float32_error < error / 4
        layer.set_build_dtype(torch.bfloat16)
        original = weight.detach().clone()
        layer.merge()
        assert torch.equal(layer.base_layer.weight, built)
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, original)
    with pytest.raises(ValueError, match="build dtype"):
        set_spectral_build_dtype(model, torch.int8)
    unload_spectral_shift(model)
    assert_unchanged(model, snapshot)


def test_bfloat16_build_with_the_switch_cache_matches_the_direct_build():
    model, layer, dog, cat = _two_adapters()
    layer.set_build_dtype(torch.bfloat16)
    peft.tuners.tuners_utils.set_adapter(model, ["dog", "cat"])
    layer.set_scale("dog", 0.3)
    layer.set_scale("cat", 0.7)
    with torch.no_grad():
        direct = layer.effective_weight().clone()
        layer.enable_switch_cache(True)
        layer.reset_spectral_cache()
        switched = layer.effective_weight()
    change = (direct - layer.base_layer.weight).abs().max()
    assert (switched - direct).abs().max() < 2e-2 * change


@pytest.mark.parametrize("norm_mode", ["scalar", "elementwise"])
def test_switch_cache_with_norm_shifts_matches_the_reference(norm_mode):
    """Scalar-mode norms (how svdiff-pytorch files load) are 1 × C matrices; the switch cache once reshaped their
    weight as C × 1 and crashed on the first new weight."""
    model = Mixed()
    config = SpectralShiftConfig(target_kinds=["norm"], norm_mode=norm_mode)
    add_spectral_shift(model, config, "dog", svd_cache=False)
    add_spectral_shift(model, config, "cat", svd_cache=False)
    peft.tuners.tuners_utils.set_adapter(model, ["dog", "cat"])
    for index, (_, layer) in enumerate(spectral_layers(model)):
        set_shift(layer, "dog", random_shift(layer, seed=index))
        set_shift(layer, "cat", random_shift(layer, seed=index + 10))
        layer.enable_switch_cache(True)
    for weights in [(1.0, 0.0), (0.25, 0.75), (0.6, 0.4)]:
        for _, layer in spectral_layers(model):
            layer.set_scale("dog", weights[0])
            layer.set_scale("cat", weights[1])
            shift = weights[0] * layer.spectral_delta["dog"].detach() + weights[1] * layer.spectral_delta["cat"].detach()
            expected = reference_weight(layer.base_layer.weight, shift, "elementwise" if norm_mode == "elementwise"
                                        else "matrix")
            with torch.no_grad():
                built = layer.effective_weight()
            assert (built.double() - expected).abs().max() < 2e-3 * max(float(shift.abs().max()), 1e-3)


def test_factor_dtype_float32_reproduces_the_float64_formula_more_closely_at_twice_the_memory():
    def build(factor_dtype):
        model = Mixed()
        add_spectral_shift(model, SpectralShiftConfig(target_kinds=ALL_KINDS, norm_mode="scalar",
                                                      factor_dtype=factor_dtype), "a", svd_cache=False)
        return model

    half, full = build("float16"), build(torch.float32)
    errors, sizes = {}, {}
    for name, model in (("float16", half), ("float32", full)):
        worst, size = 0.0, 0
        for index, (_, layer) in enumerate(spectral_layers(model)):
            assert layer.factor_dtype == getattr(torch, name) and layer.spectral_Vh.dtype == getattr(torch, name)
            shift = random_shift(layer, seed=index)
            set_shift(layer, "a", shift)
            change = reference_weight(layer.base_layer.weight, shift) - layer.base_layer.weight.double()
            with torch.no_grad():
                error = (layer.effective_weight().double() - layer.base_layer.weight.double() - change).abs().max()
            worst = max(worst, float(error / change.abs().max()))
            size += layer.spectral_U.numel() * layer.spectral_U.element_size()
        errors[name], sizes[name] = worst, size
    assert errors["float32"] < 1e-5 < errors["float16"] < 2e-3
    assert sizes["float32"] == 2 * sizes["float16"]
    with pytest.raises(ValueError, match="factor_dtype"):
        add_spectral_shift(half, SpectralShiftConfig(target_kinds=ALL_KINDS, norm_mode="scalar",
                                                     factor_dtype="float32"), "b", svd_cache=False)
    with pytest.raises(ValueError, match="`factor_dtype` should be one of"):
        SpectralShiftConfig(factor_dtype="int8")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "0.5", None])
def test_non_finite_adapter_weights_are_refused_before_anything_changes(bad):
    model, layer, dog, cat = _two_adapters()
    peft.tuners.tuners_utils.set_adapter(model, ["dog"])
    before = dict(layer.spectral_scaling)
    with pytest.raises(ValueError, match="finite number"):
        layer.set_scale("dog", bad)
    with pytest.raises(ValueError, match="finite number"):
        layer.scale_layer(bad)
    assert layer.spectral_scaling == before
    with torch.no_grad():
        assert torch.isfinite(layer(module_inputs()["proj"])).all()


def test_an_adapter_loaded_after_a_merge_applies_on_top_inside_the_same_relu():
    """Merged shifts stay in the weight; an adapter activated later joins them inside the ReLU (as if both were
    active unmerged), and unmerge still restores W bit for bit."""
    model, layer, dog, cat = _two_adapters()
    original = layer.base_layer.weight.detach().clone()
    x = module_inputs()["proj"]
    layer.set_adapter(["dog"])
    layer.merge()
    layer.set_adapter(["dog", "cat"])  # what loading cat does after dog was fused
    with torch.no_grad():
        both = layer(x)
    expected = reference_forward(layer.base_layer, x, reference_weight(original, dog + cat))
    assert (both.double() - expected.double()).abs().max() < 2e-3 * float((dog + cat).abs().max())
    layer.set_adapter(["dog"])
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.base_layer.weight, layer.base_layer.bias))
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
