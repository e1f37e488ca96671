"""CoSINE single-image editing (issue 5) on tiny random pipelines: slerp against hand-computed values, DDIM inversion
against an independent reference, η noise, the end-to-end edit (API and `svdiff edit`), SDXL, input errors."""

import logging
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import svdiff_adapter as sa
from svdiff_adapter.cli import main as cli_main
from svdiff_adapter.editing import (
    ddim_invert,
    ddim_sample,
    ddim_schedulers,
    edit_image,
    prepare_image,
    slerp,
)
from svdiff_adapter.training import TrainingDataError

from .tiny_models import tiny_pipeline, tiny_sdxl_pipeline


def random_latents(shape=(1, 4, 16, 16), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def random_image(width=32, height=32, seed=0, mode="RGB"):
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array).convert(mode)


def ignore_latent_input(pipe):
    """Zero the UNet's input convolution: its prediction then depends on the timestep and the prompt only, so the one
    approximation of DDIM inversion, ε(z_{t−Δ}, t) ≈ ε(z_t, t), holds exactly."""
    with torch.no_grad():
        pipe.unet.conv_in.weight.zero_()
    return pipe


# ------------------------------------------------------------------------------------------------ slerp
def test_slerp_endpoints_are_the_inputs_exactly():
    z, eps = random_latents((3, 4, 8, 8), 0), random_latents((3, 4, 8, 8), 1)
    assert torch.equal(slerp(0.0, z, eps), z)
    assert torch.equal(slerp(1.0, z, eps), eps)


def test_slerp_matches_the_formula_computed_by_hand():
    # z = (1, 0), ε = (0, 2): φ = π/2, so slerp(α) = (sin((1−α)π/2), 2·sin(απ/2)).
    z = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    eps = torch.tensor([0.0, 2.0]).view(1, 2, 1, 1)
    for alpha in (0.25, 0.5, 1 / 3):
        expected = [math.sin((1 - alpha) * math.pi / 2), 2 * math.sin(alpha * math.pi / 2)]
        assert torch.allclose(slerp(alpha, z, eps).flatten(), torch.tensor(expected), atol=1e-6)
    # A batch: every sample has its own angle.
    z, eps = random_latents((3, 4, 8, 8), 2), random_latents((3, 4, 8, 8), 3)
    eps[1] = 0.5 * z[1] + eps[1]  # a smaller angle for sample 1
    mixed = slerp(0.3, z, eps)
    for index in range(3):
        a, b = z[index].flatten().double().numpy(), eps[index].flatten().double().numpy()
        phi = math.acos(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        expected = math.sin(0.7 * phi) / math.sin(phi) * a + math.sin(0.3 * phi) / math.sin(phi) * b
        assert np.allclose(mixed[index].flatten().numpy(), expected, atol=1e-5), index


def test_slerp_norms_follow_the_formula():
    z, eps = random_latents((1, 4, 8, 8), 4), random_latents((1, 4, 8, 8), 5)
    eps_same_norm = eps * z.norm() / eps.norm()
    cos_phi = float((z * eps).sum() / (z.norm() * eps.norm()))
    phi = math.acos(cos_phi)
    for alpha in (0.1, 0.5, 0.9):
        # Equal norms: the result stays on the sphere, at the angle αφ from z ...
        mixed = slerp(alpha, z, eps_same_norm)
        assert math.isclose(float(mixed.norm()), float(z.norm()), rel_tol=1e-5)
        angle = math.acos(float((mixed * z).sum() / (mixed.norm() * z.norm())))
        assert math.isclose(angle, alpha * phi, rel_tol=1e-4)
        # ... unlike the linear interpolation, which shrinks towards the chord's midpoint.
        assert float(((1 - alpha) * z + alpha * eps_same_norm).norm()) < 0.99 * float(z.norm())
        # Unequal norms: ‖a·z + b·ε‖² = a²‖z‖² + b²‖ε‖² + 2ab⟨z, ε⟩ with a, b of the formula.
        a, b = math.sin((1 - alpha) * phi) / math.sin(phi), math.sin(alpha * phi) / math.sin(phi)
        nz, ne = float(z.norm()), float(eps.norm())
        expected = math.sqrt(a * a * nz * nz + b * b * ne * ne + 2 * a * b * cos_phi * nz * ne)
        assert math.isclose(float(slerp(alpha, z, eps).norm()), expected, rel_tol=1e-5)


def test_slerp_degenerate_angles_fall_back_to_linear_interpolation():
    z = random_latents((1, 4, 8, 8), 6)
    assert torch.allclose(slerp(0.25, z, 2 * z), 1.25 * z, atol=1e-6)  # parallel: φ = 0
    assert torch.allclose(slerp(0.5, z, -z), torch.zeros_like(z), atol=1e-6)  # anti-parallel: φ = π
    assert torch.allclose(slerp(0.3, torch.zeros_like(z), z), 0.3 * z, atol=1e-6)  # a zero vector
    with pytest.raises(ValueError, match="should be in"):
        slerp(1.5, z, z)


# ------------------------------------------------------------------------------------------------ inversion
def test_ddim_schedulers_follow_the_pipeline_config():
    pipe = tiny_sdxl_pipeline()  # an Euler config, as SDXL ships
    sampler, inverse = ddim_schedulers(pipe.scheduler.config)
    assert torch.allclose(sampler.alphas_cumprod, pipe.scheduler.alphas_cumprod)
    assert torch.allclose(inverse.alphas_cumprod, pipe.scheduler.alphas_cumprod)
    assert not sampler.config.clip_sample and not inverse.config.clip_sample
    sampler.set_timesteps(10)
    inverse.set_timesteps(10)
    assert torch.equal(inverse.timesteps, sampler.timesteps.flip(0))
    sampler, inverse = ddim_schedulers({**pipe.scheduler.config, "timestep_spacing": "linspace"})
    assert sampler.config.timestep_spacing == inverse.config.timestep_spacing == "leading"


def test_inversion_then_sampling_reconstructs_the_latent():
    """η = 0, guidance 1, same prompt, no fine-tuning: back to z₀ up to float32 rounding.

    Tolerance 1e-4 (absolute, on a unit-variance latent): the UNet ignores its latent input here
    (`ignore_latent_input`), so the steps of inversion and sampling are exact inverses and only float32 rounding
    remains — measured 5e-6 at 10 steps; the steps near the last timestep (901) scale rounding errors by up to
    1/√ᾱ ≈ 60 for this schedule. A wrong pairing of timesteps, ᾱ values or prompts between the two loops leaves an
    error of the size of ε (> 0.1).
    """
    pipe = ignore_latent_input(tiny_pipeline())
    z0, steps = random_latents(), 10
    z_t = ddim_invert(pipe, z0, ["a cat"], num_inference_steps=steps, progress=False)
    reconstructed = ddim_sample(pipe, z_t, ["a cat"], num_inference_steps=steps, guidance_scale=1.0, progress=False)
    assert (reconstructed - z0).abs().max() < 1e-4
    other_prompt = ddim_sample(pipe, z_t, ["a dog"], num_inference_steps=steps, guidance_scale=1.0, progress=False)
    assert (other_prompt - z0).abs().max() > 0.1

    # z_T itself against the DDIM ODE written out here: with x̄ = z/√ᾱ and σ = √((1−ᾱ)/ᾱ), each step adds
    # (σ_t − σ_{t−Δ})·ε(t), so x̄_T = z₀/√ᾱ_start + Σ (σ_t − σ_{t−Δ})·ε(t).
    config = pipe.scheduler.config
    betas = torch.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    ratio = config.num_train_timesteps // steps
    timesteps = [k * ratio + config.steps_offset for k in range(steps)]
    alpha = lambda t: alphas_cumprod[t] if t >= 0 else alphas_cumprod[0]  # set_alpha_to_one=False  # noqa: E731
    sigma = lambda t: ((1 - alpha(t)) / alpha(t)).sqrt()  # noqa: E731
    with torch.no_grad():
        text = pipe.encode_prompt(["a cat"], "cpu", 1, False)[0]
        x_bar = z0.double() / alpha(-1).sqrt()
        for t in timesteps:
            eps = pipe.unet(torch.zeros_like(z0), t, text).sample.double()
            x_bar = x_bar + (sigma(t) - sigma(t - ratio)) * eps
    expected = alpha(timesteps[-1]).sqrt() * x_bar
    assert torch.allclose(z_t.double(), expected, rtol=1e-4, atol=1e-4)


def test_reconstruction_error_shrinks_with_more_steps():
    """With a UNet that does look at its latent, inversion evaluates ε at z_{t−Δ} where sampling uses z_t: a
    first-order error that vanishes as the steps shrink. A random network is no denoiser (its ε changes a lot
    between neighbouring latents), so its output is scaled by 0.05 to make that error resolvable in a few steps."""
    pipe = tiny_pipeline()
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(0.05)
        pipe.unet.conv_out.bias.mul_(0.05)
    z0 = random_latents()
    errors = []
    for steps in (10, 40):
        z_t = ddim_invert(pipe, z0, ["a cat"], num_inference_steps=steps, progress=False)
        back = ddim_sample(pipe, z_t, ["a cat"], num_inference_steps=steps, guidance_scale=1.0, progress=False)
        errors.append(float((back - z0).norm() / z0.norm()))
    assert errors[1] < 0.5 * errors[0], errors


def test_sdxl_inversion_and_sampling_with_a_batch_of_prompts():
    pipe = ignore_latent_input(tiny_sdxl_pipeline())
    z0, prompts = random_latents(), ["a cat", "a dog"]
    z_t = ddim_invert(pipe, z0, prompts, num_inference_steps=5, progress=False)
    assert z_t.shape == (2, 4, 16, 16) and not torch.allclose(z_t[0], z_t[1])  # one z_T per target prompt
    back = ddim_sample(pipe, z_t, prompts, num_inference_steps=5, guidance_scale=1.0, progress=False)
    assert (back - z0).abs().max() < 1e-4  # same tolerance and reason as the SD test
    guided = ddim_sample(pipe, z_t, prompts, num_inference_steps=5, guidance_scale=5.0, progress=False)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, back, atol=1e-3)


def test_eta_adds_seeded_noise():
    pipe = tiny_pipeline()
    z_t = random_latents((2, 4, 16, 16))

    def run(eta, seed):
        generator = torch.Generator().manual_seed(seed)
        return ddim_sample(pipe, z_t, ["a cat", "a dog"], num_inference_steps=4, eta=eta, generator=generator,
                           progress=False)

    deterministic = run(0.0, 1)
    assert torch.equal(deterministic, run(0.0, 2))  # η = 0 draws nothing
    noisy = run(0.5, 1)
    assert (noisy - deterministic).abs().max() > 1e-2
    assert torch.equal(noisy, run(0.5, 1))
    assert not torch.allclose(noisy, run(0.5, 2))
    with pytest.raises(ValueError, match="eta"):
        run(-0.1, 1)


# ------------------------------------------------------------------------------------------------ input image
def test_prepare_image_converts_resizes_and_crops_with_a_message(tmp_path, caplog):
    path = tmp_path / "gray.png"
    random_image(50, 37, mode="L").save(path)
    with caplog.at_level(logging.WARNING, logger="svdiff_adapter.editing"):
        image = prepare_image(path, multiple=8)
    assert image.mode == "RGB" and image.size == (48, 32)
    assert "must be multiples of 8" in caplog.text and "center-cropped to 48×32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="svdiff_adapter.editing"):
        resized = prepare_image(random_image(64, 48, mode="RGBA"), multiple=8, resolution=32)
    assert resized.mode == "RGB" and resized.size == (40, 32)  # 64×48 → 43×32 → cropped to 40×32
    assert "center-cropped to 40×32" in caplog.text
    caplog.clear()
    assert prepare_image(random_image(40, 32), multiple=8).size == (40, 32) and not caplog.text


def test_unreadable_image_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(TrainingDataError, match="Cannot read image .*broken.jpg"):
        prepare_image(broken, multiple=8)
    with pytest.raises(TrainingDataError, match="Cannot read image .*missing.png"):
        prepare_image(tmp_path / "missing.png", multiple=8)


def test_extreme_aspect_ratios_and_huge_images_are_refused():
    # The shorter side goes to the resolution and the shape is kept: 4000×2 would be edited at 64000×32.
    with pytest.raises(TrainingDataError, match=r"to edit is 4000×2; its sides may differ by a factor of at most 4"):
        prepare_image(Image.new("RGB", (4000, 2)), multiple=8, resolution=32)
    with pytest.raises(TrainingDataError, match=r"to edit is 10000×10000 \(100,000,000 pixels\), more than"):
        prepare_image(Image.new("1", (10000, 10000)), multiple=8)  # 1 bit per pixel: cheap to make
    assert prepare_image(Image.new("RGB", (128, 32)), multiple=8, resolution=16).size == (64, 16)  # 4:1 is fine


# ------------------------------------------------------------------------------------------------ end to end
def test_edit_image_fine_tunes_edits_and_writes_files(tmp_path):
    pipe = tiny_pipeline()
    probe = (random_latents(), 10, random_latents((1, 7, 32), seed=1))
    with torch.no_grad():
        before = pipe.unet(*probe).sample
    result = edit_image(pipe, random_image(40, 32, mode="P"), "a cat", ["a dog", "a cat on grass"],
                        max_train_steps=2, num_inference_steps=3, guidance_scale=2.0, eta=0.3, slerp_alpha=0.2,
                        seed=0, output_dir=tmp_path / "out", svd_cache=False, progress=False)
    assert len(result.losses) == 2 and all(math.isfinite(loss) for loss in result.losses)
    assert [image.size for image in result.images] == [(40, 32), (40, 32)]
    names = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert names == ["edit-00-a-dog.png", "edit-01-a-cat-on-grass.png", "input.png", "side_by_side.png",
                     sa.DEFAULT_WEIGHT_NAME]
    assert Image.open(result.files["side_by_side"]).size == (120, 32)
    assert np.array_equal(np.asarray(Image.open(result.files["edit-0"])), np.asarray(result.images[0]))
    deltas = sa.load_shift_file(result.files["shift"]).deltas["unet"]
    assert any(delta.abs().max() > 0 for delta in deltas.values())
    # The pipeline is left as it came: no adapter, the same UNet output.
    assert sa.spectral_adapter_names(pipe.unet) == []
    with torch.no_grad():
        assert torch.equal(pipe.unet(*probe).sample, before)

    # Reusing the saved shift (a folder holding it) gives the same edits without fine-tuning.
    again = edit_image(pipe, random_image(40, 32, mode="P"), None, ["a dog", "a cat on grass"],
                       shift=tmp_path / "out", num_inference_steps=3, guidance_scale=2.0, eta=0.3, slerp_alpha=0.2,
                       seed=0, svd_cache=False, progress=False)
    assert again.losses == [] and again.files == {}
    for first, second in zip(result.images, again.images):
        assert np.array_equal(np.asarray(first), np.asarray(second))
    # The base model (no shift) edits differently.
    base = edit_image(pipe, random_image(40, 32, mode="P"), None, ["a dog", "a cat on grass"], max_train_steps=0,
                      num_inference_steps=3, guidance_scale=2.0, eta=0.3, slerp_alpha=0.2, seed=0, progress=False)
    assert base.shift is None
    assert not np.array_equal(np.asarray(base.images[0]), np.asarray(result.images[0]))


def test_edit_image_rejects_bad_option_combinations():
    pipe = tiny_pipeline()
    image = random_image()
    with pytest.raises(ValueError, match="needs inversion"):
        edit_image(pipe, image, "a cat", "a dog", invert=False, slerp_alpha=0.5, progress=False)
    with pytest.raises(ValueError, match="source prompt"):
        edit_image(pipe, image, None, "a dog", progress=False)
    for option, value in (("num_inference_steps", 0), ("resolution", 0), ("guidance_scale", float("nan"))):
        with pytest.raises(ValueError, match=f"`{option}` should be >= "):
            edit_image(pipe, image, "a cat", "a dog", progress=False, **{option: value})
    with pytest.raises(ValueError, match="`num_inference_steps` should be >= 1"):
        ddim_sample(pipe, random_latents((1, 4, 4, 4)), ["a dog"], num_inference_steps=0, progress=False)
    sa.add_spectral_shift(pipe.unet, sa.SpectralShiftConfig(), "cosine", svd_cache=False)
    with pytest.raises(ValueError, match="already in use"):
        edit_image(pipe, image, "a cat", "a dog", progress=False)
    assert sa.spectral_adapter_names(pipe.unet) == ["cosine"]  # the user's adapter stays


def test_sdxl_edits_with_a_given_shift_or_after_fine_tuning(tmp_path):
    pipe = tiny_sdxl_pipeline()
    sa.add_spectral_shift(pipe.unet, sa.SpectralShiftConfig(init_scale=0.1), "trained", svd_cache=False)
    shift_path = tmp_path / "sdxl_shift.safetensors"
    sa.save_spectral_shift(shift_path, {"unet": pipe.unet}, "trained")
    sa.unload_spectral_shift(pipe.unet)
    result = edit_image(pipe, random_image(), None, ["a cat", "a dog"], shift=shift_path, num_inference_steps=3,
                        guidance_scale=3.0, eta=0.2, seed=0, svd_cache=False, progress=False)
    assert len(result.images) == 2 and result.images[0].size == (32, 32)
    assert sa.spectral_adapter_names(pipe.unet) == []
    base = edit_image(pipe, random_image(), None, ["a cat", "a dog"], max_train_steps=0, num_inference_steps=3,
                      guidance_scale=3.0, eta=0.2, seed=0, progress=False)
    assert not np.array_equal(np.asarray(base.images[0]), np.asarray(result.images[0]))  # the shift was active
    tuned = edit_image(pipe, random_image(), "a cat", ["a dog"], max_train_steps=2, learning_rate=1e-2,
                       num_inference_steps=3, guidance_scale=3.0, seed=0, svd_cache=False, progress=False)
    # SDXL's added conditioning reached the UNet: its embedding layers' shifts moved.
    assert tuned.shift.deltas["unet"]["add_embedding.linear_1"].abs().max() > 0
    assert tuned.losses and all(np.isfinite(tuned.losses))
    assert sa.spectral_adapter_names(pipe.unet) == []


# ------------------------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd-edit")
    tiny_pipeline().save_pretrained(folder)
    return str(folder)


def test_svdiff_edit_command(tiny_model_dir, tmp_path, capsys, monkeypatch):
    image = tmp_path / "photo.png"
    random_image(33, 32).save(image)
    common = ["--pretrained_model_name_or_path", tiny_model_dir, "--image", str(image), "--num_inference_steps", "2",
              "--seed", "0", "--svd_cache", "none"]
    out = tmp_path / "out"
    assert cli_main(["edit", *common, "--source_prompt", "a cat", "--target_prompt", "a dog", "--target_prompt",
                     "a red cat", "--output_dir", str(out), "--max_train_steps", "1", "--eta", "0.5",
                     "--slerp_alpha", "0.3", "--guidance_scale", "3"]) == 0
    printed = capsys.readouterr().out
    assert "side_by_side: " in printed and "shift: " in printed
    assert Image.open(out / "edit-01-a-red-cat.png").size == (32, 32)  # 33 wide: cropped to a multiple of 2
    assert (out / sa.DEFAULT_WEIGHT_NAME).is_file()

    reused = tmp_path / "reused"
    assert cli_main(["edit", *common, "--target_prompt", "a bird", "--shift", str(out / sa.DEFAULT_WEIGHT_NAME),
                     "--no_inversion", "--output_dir", str(reused)]) == 0
    assert sorted(p.name for p in reused.iterdir()) == ["edit-00-a-bird.png", "input.png", "side_by_side.png"]

    # The example script is the same command.
    script = Path(__file__).resolve().parents[1] / "examples" / "single_image_edit.py"
    monkeypatch.setattr(sys, "argv", [str(script), *common, "--target_prompt", "a bird", "--max_train_steps", "0",
                                      "--output_dir", str(tmp_path / "example")])
    runpy.run_path(str(script), run_name="__main__")
    assert (tmp_path / "example" / "side_by_side.png").is_file()

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    assert cli_main(["edit", *common[:2], "--image", str(broken), "--source_prompt", "a cat", "--target_prompt",
                     "a dog", "--output_dir", str(tmp_path / "x")]) == 1
    assert "Cannot read image" in capsys.readouterr().err
    assert cli_main(["edit", *common, "--source_prompt", "a cat", "--target_prompt", "a dog", "--no_inversion",
                     "--slerp_alpha", "0.5", "--output_dir", str(tmp_path / "y")]) == 1
    assert "needs inversion" in capsys.readouterr().err
