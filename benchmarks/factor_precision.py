"""Float16 vs float32 SVD factors: how far each is from the float64 formula and from svdiff-pytorch, and what it
costs in memory.

    python benchmarks/factor_precision.py            # ~1 min on 2 CPU cores; prints a markdown table

Rows:
- svdiff-pytorch fixture (tests/fixtures/svdiff_pytorch/: a tiny SD-style UNet and CLIP text encoder with a shift
  whose values clip by up to 3σ, and the weights/outputs svdiff-pytorch 0.2.0 computed for it): the largest weight
  error relative to the module's σ_max, and the UNet / text-encoder output error relative to the output range.
- the toy world's shipped shift (a real trained shift on the bundled 9.8 MB model): the UNet output error against a
  float64 recomposition W + U·diag(ReLU(σ+δ) − σ)·Vᵀ from a float64 SVD, relative to the shift's own effect
  ‖out_shift − out_base‖.
- factor memory of the Stable Diffusion 1.5 UNet (Linear + Conv2d, counted from its config's shapes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

import svdiff_adapter as sa
from svdiff_adapter import spectral
from svdiff_adapter.tuner import spectral_layers

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "svdiff_pytorch"
DTYPES = ("float16", "float32")


def fixture_errors(factor_dtype: str) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(FIXTURE / "base" / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(FIXTURE / "base" / "text_encoder").eval()
    components = {"unet": unet, "text_encoder": text_encoder}
    for name in ("spectral_shifts.safetensors", "spectral_shifts_te.safetensors"):
        sa.load_spectral_shift_adapter(components, FIXTURE / name, "legacy", svd_cache=False,
                                       factor_dtype=factor_dtype)
    reference = load_file(str(FIXTURE / "reference_scale1.safetensors"))
    sigma = load_file(str(FIXTURE / "svd_sigma.safetensors"))
    inputs = load_file(str(FIXTURE / "inputs.safetensors"))
    worst = 0.0
    for component, model in components.items():
        prefix = "text_model." if component == "text_encoder" else ""
        for name, layer in spectral_layers(model):
            with torch.no_grad():
                error = (layer.effective_weight() - reference[f"{component}.effective.{prefix}{name}.weight"]).abs()
            worst = max(worst, float(error.max()) / float(sigma[f"{component}.{prefix}{name}"].max()))
    with torch.no_grad():
        sample = unet(inputs["unet.sample"], inputs["unet.timestep"], inputs["unet.encoder_hidden_states"]).sample
        hidden = text_encoder(inputs["text_encoder.input_ids"]).last_hidden_state
    expected_sample, expected_hidden = reference["unet.out.sample"], reference["text_encoder.out.last_hidden_state"]
    return {
        "weight": worst,
        "unet": float((sample - expected_sample).abs().max() / expected_sample.abs().max()),
        "text_encoder": float((hidden - expected_hidden).abs().max() / expected_hidden.abs().max()),
        "factor_bytes": sum(layer.spectral_U.nbytes + layer.spectral_Vh.nbytes
                            for model in components.values() for _, layer in spectral_layers(model)
                            if layer.uses_factors),
    }


def toyworld_error(factor_dtype: str) -> float:
    from svdiff_adapter import toyworld

    pipe = toyworld.load_toyworld_pipeline()
    unet = pipe.unet.eval()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    states = torch.randn(2, 16, unet.config.cross_attention_dim, generator=generator)
    timestep = torch.tensor([500, 200])
    with torch.no_grad():
        base = unet(sample, timestep, states).sample
    shift_file = sa.load_shift_file(toyworld.ASSETS_DIR / "shifts" / "dotted_square" / sa.DEFAULT_WEIGHT_NAME)
    # The float64 reference: every shifted weight rebuilt from a float64 SVD of the base weight.
    reference_unet = toyworld.load_toyworld_pipeline().unet.eval().double()
    norm_mode = shift_file.configs["unet"]["norm_mode"]
    with torch.no_grad():
        for name, delta in shift_file.deltas["unet"].items():
            module = reference_unet.get_submodule(name)
            weight = module.weight
            if weight.ndim == 1 and norm_mode == "elementwise":
                module.weight.add_(delta.double())
                continue
            U, S, Vh = torch.linalg.svd(spectral.weight_matrix(weight), full_matrices=False)
            change = spectral.spectral_change(S, delta.double())
            module.weight.add_(((U * change) @ Vh).reshape(weight.shape))
        expected = reference_unet(sample.double(), timestep, states.double()).sample
    sa.load_spectral_shift_adapter(unet, shift_file, "shift", components=["unet"], svd_cache=False,
                                   factor_dtype=factor_dtype)
    with torch.no_grad():
        shifted = unet(sample, timestep, states).sample
    return float((shifted.double() - expected).norm() / (expected - base.double()).norm())


def sd15_factor_gib(factor_dtype: str) -> float:
    """U (m × k) and Vᵀ (k × n) of every Linear / Conv2d weight of the SD1.5 UNet, built on the meta device."""
    from diffusers import UNet2DConditionModel

    config = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
              "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    size = torch.finfo(getattr(torch, factor_dtype)).bits // 8
    total = 0
    for module in unet.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            m, n = spectral.weight_matrix(module.weight).shape
            total += (m + n) * min(m, n) * size
    return total / 2**30


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.set_num_threads(1)
    rows = {dtype: {**fixture_errors(dtype), "toyworld": toyworld_error(dtype), "sd15": sd15_factor_gib(dtype)}
            for dtype in DTYPES}
    print("| factor dtype | weight error vs svdiff-pytorch (/ σ_max) | UNet output vs svdiff-pytorch (/ range) | "
          "text encoder output vs svdiff-pytorch | toy-world UNet vs float64 formula (/ shift's effect) | "
          "SD1.5 UNet factors |")
    print("|---|---|---|---|---|---|")
    for dtype, row in rows.items():
        print(f"| {dtype} | {row['weight']:.2e} | {row['unet']:.2e} | {row['text_encoder']:.2e} | "
              f"{row['toyworld']:.2e} | {row['sd15']:.2f} GiB |")


if __name__ == "__main__":
    main()
