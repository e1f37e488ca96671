"""Files written by svdiff-pytorch give the weights and outputs svdiff-pytorch itself computes.

Reference tensors in tests/fixtures/svdiff_pytorch/ were produced by svdiff-pytorch 0.2.0 in its own
environment (see the README there). Tolerance: our factors are stored in float16 and applied in delta form, so
the error scales with the size of the change |ReLU(σ+δ) − σ| (the fixture clips values by up to 3σ); we allow
2⁻¹¹ of the module's largest singular value (measured: 1.5·10⁻⁴), and 0.5 % of the output range (measured
0.13 % UNet, 0.23 % text encoder; the unshifted model is off by 630 %). A wrong formula (outside-ReLU scale,
per-element norm shifts, missing clip) is off by O(σ).
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import svdiff_adapter as sa
from svdiff_adapter.tuner import spectral_layers

FIXTURE = Path(__file__).parent / "fixtures" / "svdiff_pytorch"


@pytest.fixture(scope="module")
def models():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(FIXTURE / "base" / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(FIXTURE / "base" / "text_encoder").eval()
    components = {"unet": unet, "text_encoder": text_encoder}
    sa.load_spectral_shift(components, FIXTURE / "spectral_shifts.safetensors", "legacy", svd_cache=False)
    sa.load_spectral_shift(components, FIXTURE / "spectral_shifts_te.safetensors", "legacy", svd_cache=False)
    return components


@pytest.mark.parametrize("scale", ["1", "0.5"])
def test_weights_and_outputs_match_svdiff_pytorch(models, scale):
    reference = load_file(str(FIXTURE / f"reference_scale{scale}.safetensors"))
    sigma = load_file(str(FIXTURE / "svd_sigma.safetensors"))
    inputs = load_file(str(FIXTURE / "inputs.safetensors"))
    checked = 0
    for component, model in models.items():
        model.set_adapters(["legacy"], weights=[float(scale)]) if component == "unet" else [
            layer.set_scale("legacy", float(scale)) for _, layer in spectral_layers(model)
        ]
        prefix = "text_model." if component == "text_encoder" else ""
        for name, layer in spectral_layers(model):
            expected = reference[f"{component}.effective.{prefix}{name}.weight"]
            tolerance = 2**-11 * float(sigma[f"{component}.{prefix}{name}"].max()) + 2e-5
            with torch.no_grad():
                assert (layer.effective_weight() - expected).abs().max() <= tolerance, name
            checked += 1
    assert checked == 116 + 19  # every shifted module of both files
    with torch.no_grad():
        sample = models["unet"](inputs["unet.sample"], inputs["unet.timestep"],
                                inputs["unet.encoder_hidden_states"]).sample
        hidden = models["text_encoder"](inputs["text_encoder.input_ids"]).last_hidden_state
    assert (sample - reference["unet.out.sample"]).abs().max() < 5e-3 * reference["unet.out.sample"].abs().max()
    expected_hidden = reference["text_encoder.out.last_hidden_state"]
    assert (hidden - expected_hidden).abs().max() < 5e-3 * expected_hidden.abs().max()


def test_scale_half_is_not_a_blend_of_outputs(models):
    """svdiff-pytorch's scale multiplies δ inside the ReLU; halfway between base and scale 1 is something else."""
    inputs = load_file(str(FIXTURE / "inputs.safetensors"))
    half = load_file(str(FIXTURE / "reference_scale0.5.safetensors"))["unet.out.sample"]
    full = load_file(str(FIXTURE / "reference_scale1.safetensors"))["unet.out.sample"]
    blend = 0.5 * (inputs["plain.unet.sample"] + full)
    models["unet"].set_adapters(["legacy"], weights=[0.5])
    with torch.no_grad():
        ours = models["unet"](inputs["unet.sample"], inputs["unet.timestep"], inputs["unet.encoder_hidden_states"]).sample
    assert (ours - half).abs().max() < (ours - blend).abs().max() / 5


def test_float32_factors_reproduce_svdiff_pytorch_to_float32_round_off():
    """`factor_dtype=torch.float32` trades twice the factor memory for svdiff-pytorch's own precision: weights
    within 2⁻¹⁶ of σ_max (float16 factors: 2⁻¹¹) and outputs within 1e-5 of the range (float16: 5e-3)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(FIXTURE / "base" / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(FIXTURE / "base" / "text_encoder").eval()
    components = {"unet": unet, "text_encoder": text_encoder}
    for name in ("spectral_shifts.safetensors", "spectral_shifts_te.safetensors"):
        sa.load_spectral_shift_adapter(components, FIXTURE / name, "legacy", svd_cache=False,
                                       factor_dtype=torch.float32)
    reference = load_file(str(FIXTURE / "reference_scale1.safetensors"))
    sigma = load_file(str(FIXTURE / "svd_sigma.safetensors"))
    inputs = load_file(str(FIXTURE / "inputs.safetensors"))
    for component, model in components.items():
        prefix = "text_model." if component == "text_encoder" else ""
        for name, layer in spectral_layers(model):
            assert layer.factor_dtype in (torch.float32, None)
            with torch.no_grad():
                error = (layer.effective_weight() - reference[f"{component}.effective.{prefix}{name}.weight"]).abs()
            assert error.max() <= 2**-16 * float(sigma[f"{component}.{prefix}{name}"].max()) + 1e-6, name
    with torch.no_grad():
        sample = unet(inputs["unet.sample"], inputs["unet.timestep"], inputs["unet.encoder_hidden_states"]).sample
        hidden = text_encoder(inputs["text_encoder.input_ids"]).last_hidden_state
    for ours, expected in ((sample, reference["unet.out.sample"]),
                           (hidden, reference["text_encoder.out.last_hidden_state"])):
        assert (ours - expected).abs().max() < 1e-5 * expected.abs().max()
