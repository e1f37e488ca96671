"""Quantized and float8-stored base weights (`tuner.targets.quantized_weight_reason`): bitsandbytes 4-bit / 8-bit,
torchao int8, GGUF, and diffusers' layerwise casting to float8.

A shift needs the float weight for its SVD and its forward, so these modules are refused by explicit targets
(`ValueError` naming the module), skipped by a catch-all, and a file naming them is refused before anything changes.
The modules that stay shiftable are checked against a float64 recomputation of W + U·diag(ReLU(σ + δ) − σ)·Vᵀ.
"""

import pytest
import torch
from torch import nn

import svdiff_adapter as sa
from svdiff_adapter import SpectralShiftConfig
from svdiff_adapter.format import SpectralShiftFormatError
from svdiff_adapter.tuner import spectral_layers

from .tiny_models import assert_unchanged, state_snapshot, tiny_unet, unet_output


def plain_snapshot(model):
    """`state_snapshot` with tensor subclasses (torchao's, which implement no `torch.equal`) split into the plain
    tensors they hold (`__tensor_flatten__`)."""
    tensors = {}
    for key, value in model.state_dict().items():
        if not hasattr(value, "__tensor_flatten__"):  # plain tensors, bitsandbytes' and GGUF's parameters
            tensors[key] = value.detach().clone()
        else:
            for inner in value.__tensor_flatten__()[0]:
                tensors[f"{key}.{inner}"] = getattr(value, inner).detach().clone()
    return tensors, {name: type(module) for name, module in model.named_modules()}


def assert_plain_unchanged(model, snapshot):
    now, _ = plain_snapshot(model)
    tensors, types = snapshot
    assert set(now) == set(tensors) and all(torch.equal(now[k], v) for k, v in tensors.items())
    assert {name: type(module) for name, module in model.named_modules()} == types



class TwoLinears(nn.Module):
    """A plain float layer beside a layer whose weight the test replaces (`quantized`)."""

    def __init__(self, quantized: nn.Module):
        super().__init__()
        torch.manual_seed(0)
        self.plain = nn.Linear(32, 16)
        self.quantized = quantized

    def forward(self, x):
        return self.plain(x), self.quantized(x)


def float_twin() -> TwoLinears:
    torch.manual_seed(0)
    return TwoLinears(nn.Linear(32, 16))


def reference_shifted(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + U·diag(ReLU(σ + δ) − σ)·Vᵀ in float64, from a fresh SVD."""
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return weight.double() + U @ torch.diag(torch.relu(S + delta.double()) - S) @ Vh


def check_refused_everywhere(model: TwoLinears, origin: str, tmp_path):
    """Explicit target → ValueError naming the module; catch-all → only `plain`, exactly; a file naming the quantized
    module → refused, the model unchanged (the plain module of the same file not shifted either)."""
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    snapshot = plain_snapshot(model)
    with pytest.raises(ValueError, match=rf"'quantized'.*{origin}.*svdiff export-lora"):
        sa.add_spectral_shift(model, SpectralShiftConfig(target_modules=["quantized"]), "a", svd_cache=False)
    assert_plain_unchanged(model, snapshot)

    twin = float_twin()  # the same module names in float: a file that shifts both layers
    sa.add_spectral_shift(twin, SpectralShiftConfig(init_scale=0.3), "a", svd_cache=False)
    sa.save_spectral_shift(tmp_path / "both.safetensors", twin, "a")
    with pytest.raises(SpectralShiftFormatError, match=rf"quantized: .*{origin}"):
        sa.load_spectral_shift(model, tmp_path / "both.safetensors", "a", svd_cache=False)
    assert_plain_unchanged(model, snapshot)

    # float32 factors: the layer then reproduces the float64 formula to float32 round-off (docs/api.md).
    sa.add_spectral_shift(model, SpectralShiftConfig(init_scale=0.3, factor_dtype="float32"), "b", svd_cache=False)
    assert [name for name, _ in spectral_layers(model)] == ["plain"]
    (_, layer), = spectral_layers(model)
    expected = reference_shifted(layer.base_layer.weight.detach(), layer.spectral_delta["b"].detach())
    with torch.no_grad():
        got = model(x)[0]
    reference = x.double() @ expected.T + layer.base_layer.bias.double()
    assert torch.allclose(got.double(), reference, atol=1e-5), (got.double() - reference).abs().max()
    assert not torch.allclose(got.double(), x.double() @ layer.base_layer.weight.double().T
                              + layer.base_layer.bias.double(), atol=1e-3)  # the shift does something


def test_bitsandbytes_4bit_and_8bit_layers_are_refused(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    for quantized in (bnb.nn.Linear4bit(32, 16, quant_type="nf4"), bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=False)):
        quantized.load_state_dict(nn.Linear(32, 16).state_dict())
        model = TwoLinears(quantized).to("cpu")  # bitsandbytes quantizes on the device move
        assert isinstance(model.quantized, nn.Linear) and not model.quantized.weight.is_floating_point()
        check_refused_everywhere(model, "bitsandbytes", tmp_path)


def test_torchao_int8_weights_are_refused(tmp_path):
    """torchao's weight is a tensor subclass whose dtype still reads float32: the dtype alone would not tell."""
    quantization = pytest.importorskip("torchao.quantization")
    model = TwoLinears(nn.Linear(32, 16))
    quantization.quantize_(model.quantized, quantization.Int8WeightOnlyConfig())
    assert model.quantized.weight.dtype == torch.float32 and type(model.quantized.weight) is not nn.Parameter
    check_refused_everywhere(model, "torchao", tmp_path)


def test_gguf_layers_are_refused(tmp_path):
    gguf = pytest.importorskip("gguf")
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    quantized = GGUFLinear(32, 16, compute_dtype=torch.float32)
    blocks = gguf.quants.quantize(torch.randn(16, 32).numpy(), gguf.GGMLQuantizationType.Q8_0)
    quantized.weight = GGUFParameter(torch.from_numpy(blocks), quant_type=gguf.GGMLQuantizationType.Q8_0)
    model = TwoLinears(quantized)
    assert model.quantized.weight.shape == (16, 34)  # GGML blocks, not a 16 × 32 matrix
    check_refused_everywhere(model, "diffusers GGUFParameter", tmp_path)


def test_layerwise_float8_casting_is_refused_and_uncast_modules_still_shift(tmp_path):
    """diffusers' `enable_layerwise_casting` stores linear/conv weights in float8 and upcasts them per forward; norms
    stay float32 (its default skip patterns). Float8 modules are refused; the norms take shifts and the cast model
    then computes exactly what the same cast model with γ + δ written into its norms computes."""
    shifted = tiny_unet()
    sa.add_spectral_shift(shifted, SpectralShiftConfig(target_kinds=["linear", "conv2d"], init_scale=0.3), "a",
                          svd_cache=False)
    sa.save_spectral_shift(tmp_path / "linear.safetensors", {"unet": shifted}, "a")

    unet = tiny_unet()
    unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    snapshot = state_snapshot(unet)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert unet.get_submodule(name).weight.dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match=rf"{name}.*float8_e4m3fn.*full-precision weight"):
        sa.add_spectral_shift(unet, SpectralShiftConfig(target_modules=[name]), "a", svd_cache=False)
    with pytest.raises(SpectralShiftFormatError, match="float8_e4m3fn"):
        sa.load_spectral_shift({"unet": unet}, tmp_path / "linear.safetensors", "a", svd_cache=False)
    assert_unchanged(unet, snapshot)

    sa.add_spectral_shift(unet, SpectralShiftConfig(target_kinds=["linear", "conv2d", "norm"], init_scale=0.3), "n",
                          svd_cache=False)
    layers = dict(spectral_layers(unet))
    assert layers and all(isinstance(layer.base_layer, (nn.LayerNorm, nn.GroupNorm)) for layer in layers.values())
    reference = tiny_unet()
    reference.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with torch.no_grad():
        for module_name, layer in layers.items():  # elementwise norm shifts: γ + δ
            reference.get_submodule(module_name).weight.add_(layer.spectral_delta["n"])
    got, want = unet_output(unet), unet_output(reference)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
