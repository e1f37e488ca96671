"""CoSINE editing on flow-matching transformer pipelines (SD3, Flux.1), tiny random models: Euler sampling against
the diffusers pipelines' own sampler, inversion followed by sampling, the η-like sampler, the end-to-end edit."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

import svdiff_adapter as sa
from svdiff_adapter.editing import edit_image, encode_image, flow_invert, flow_sample, flow_sigmas

from .test_editing import random_image
from .transformer_models import tiny_flux_training_pipeline, tiny_sd3_training_pipeline

BUILDERS = {"sd3": tiny_sd3_training_pipeline, "flux": tiny_flux_training_pipeline}
LATENT_SHAPE = {"sd3": (1, 4, 8, 8), "flux": (1, 1, 8, 8)}  # 32 px through the tiny VAEs' factor 4


def random_latents(family, seed=0):
    return torch.randn(*LATENT_SHAPE[family], generator=torch.Generator().manual_seed(seed))


def pipeline_sample(pipe, family, latents, prompt, steps, guidance_scale):
    """diffusers' own sampler from `latents` (packed for Flux), returning unpacked final latents."""
    size, channels, height, width = latents.shape
    start = FluxPipeline._pack_latents(latents, size, channels, height, width) if family == "flux" else latents
    with torch.no_grad():
        output = pipe(prompt, latents=start, num_inference_steps=steps, guidance_scale=guidance_scale,
                      height=32, width=32, output_type="latent").images
    return FluxPipeline._unpack_latents(output, 32, 32, pipe.vae_scale_factor) if family == "flux" else output


def ignore_latent_input(pipe, family):
    """Zero the transformer's latent input projection: v then depends on σ and the prompt only, so inversion's one
    approximation, v(x_{i+1}, σ_i) ≈ v(x_i, σ_i), holds exactly."""
    with torch.no_grad():
        (pipe.transformer.x_embedder if family == "flux" else pipe.transformer.pos_embed.proj).weight.zero_()
    return pipe


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sampling_matches_the_pipelines_own_sampler(family):
    pipe = BUILDERS[family]()
    latents = random_latents(family)
    for guidance in (1.0, 4.0):  # SD3: classifier-free guidance at 4; Flux: the guidance embedding
        ours = flow_sample(pipe, latents, ["a red star"], num_inference_steps=4, guidance_scale=guidance,
                           progress=False)
        theirs = pipeline_sample(pipe, family, latents, "a red star", 4, guidance)
        assert torch.allclose(ours, theirs, atol=1e-5), (guidance, (ours - theirs).abs().max())
    sigmas = flow_sigmas(pipe, 4, 8, 8)
    assert len(sigmas) == 5 and sigmas[0] == 1.0 and sigmas[-1] == 0.0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_inversion_then_sampling_reconstructs_the_latent(family):
    """Tolerance 1e-4 (absolute, unit-variance latents): with v independent of x, inversion and sampling add and
    subtract the same (σ_i − σ_{i+1})·v(σ_i) terms, so only float32 rounding of 10 steps remains (measured ~1e-6).
    A different prompt changes v (in these tiny random models only slightly: ~0.04 for SD3), leaving an error over
    a hundred times the tolerance."""
    pipe = ignore_latent_input(BUILDERS[family](), family)
    z0 = random_latents(family)
    z1 = flow_invert(pipe, z0, ["a cat"], num_inference_steps=10, progress=False)
    back = flow_sample(pipe, z1, ["a cat"], num_inference_steps=10, guidance_scale=1.0, progress=False)
    assert (back - z0).abs().max() < 1e-4
    assert (flow_sample(pipe, z1, ["a dog"], num_inference_steps=10, guidance_scale=1.0,
                        progress=False) - z0).abs().max() > 1e-2
    # The pipeline's own sampler from our inverted latent lands on z0 as well.
    assert (pipeline_sample(pipe, family, z1, "a cat", 10, 1.0) - z0).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_reconstruction_error_shrinks_with_more_steps(family):
    """With a transformer that looks at its latent the inversion error is first order in the step; a random
    network's velocity changes fast between neighbouring latents, so its output is scaled by 0.05 to make that error
    resolvable in a few steps."""
    pipe = BUILDERS[family]()
    with torch.no_grad():
        output = pipe.transformer.proj_out
        output.weight.mul_(0.05)
        output.bias.mul_(0.05)
    z0 = random_latents(family)
    errors = []
    for steps in (10, 40):
        z1 = flow_invert(pipe, z0, ["a cat"], num_inference_steps=steps, progress=False)
        back = flow_sample(pipe, z1, ["a cat"], num_inference_steps=steps, guidance_scale=1.0, progress=False)
        errors.append(float((back - z0).norm() / z0.norm()))
    assert errors[1] < 0.5 * errors[0], errors


def test_eta_mixes_seeded_noise_and_is_bounded():
    pipe = tiny_sd3_training_pipeline()
    start = random_latents("sd3")

    def run(eta, seed):
        return flow_sample(pipe, start, ["a cat"], num_inference_steps=4, guidance_scale=1.0, eta=eta,
                           generator=torch.Generator().manual_seed(seed), progress=False)

    deterministic = run(0.0, 1)
    assert torch.equal(deterministic, run(0.0, 2))  # η = 0 draws nothing
    noisy = run(0.5, 1)
    assert (noisy - deterministic).abs().max() > 1e-2
    assert torch.equal(noisy, run(0.5, 1)) and not torch.allclose(noisy, run(0.5, 2))
    for eta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="eta"):
            run(eta, 1)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_edit_image_fine_tunes_the_transformer_and_leaves_the_pipeline_as_it_was(family, tmp_path):
    pipe = BUILDERS[family]()
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    image = random_image(40, 36)
    result = edit_image(pipe, image, "a photo of a cat", ["a photo of a dog", "a photo of a cat"],
                        max_train_steps=3, learning_rate=1e-2, num_inference_steps=3, guidance_scale=2.0, seed=0,
                        resolution=32, output_dir=tmp_path, progress=False)
    multiple = 8 if family == "flux" else 4  # Flux packs latents 2×2
    assert result.source.width % multiple == 0 and result.source.height % multiple == 0
    assert len(result.images) == 2 and result.images[0].size == result.source.size
    assert result.shift.components == ["transformer"] and len(result.losses) == 3
    assert {"input", "edit-0", "edit-1", "side_by_side", "shift"} <= set(result.files)
    assert not sa.loaders.spectral_adapter_names(pipe.transformer)
    after = pipe.transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # The saved shift reproduces the edit when given back instead of fine-tuning. Not always bit for bit: loading it
    # computes the SVD again, and LAPACK's last bits depend on memory alignment on some CPUs (seen on AMD EPYC: one
    # pixel value one level off), so the images may differ by rounding — a wrong or missing shift changes them by far
    # more (the edit itself differs from the source by tens of levels).
    again = edit_image(pipe, image, None, ["a photo of a dog"], shift=result.files["shift"], num_inference_steps=3,
                       guidance_scale=2.0, seed=0, resolution=32, progress=False)
    reproduced, edited = (np.asarray(i, dtype=np.int16) for i in (again.images[0], result.images[0]))
    assert np.abs(reproduced - edited).max() <= 2 and (reproduced != edited).mean() < 0.01
    assert np.abs(edited - np.asarray(result.source, dtype=np.int16)).mean() > 10


def test_encode_image_applies_the_vae_shift_factor():
    pipe = tiny_flux_training_pipeline()
    image = random_image(32, 32)
    with torch.no_grad():
        mean = pipe.vae.encode(torch.from_numpy(__import__("numpy").asarray(image, dtype="float32") / 127.5 - 1)
                               .permute(2, 0, 1)[None]).latent_dist.mean
    expected = (mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    assert torch.allclose(encode_image(pipe, image), expected, atol=1e-6)


def test_svdiff_edit_command_on_a_flux_folder_and_refusals(tmp_path, capsys):
    from svdiff_adapter.cli import main as cli_main

    folder = tmp_path / "flux"
    tiny_flux_training_pipeline().save_pretrained(folder)
    image = tmp_path / "photo.png"
    random_image(36, 36).save(image)
    common = ["--pretrained_model_name_or_path", str(folder), "--image", str(image), "--num_inference_steps", "2",
              "--seed", "0", "--svd_cache", "none", "--resolution", "32"]
    out = tmp_path / "out"
    assert cli_main(["edit", *common, "--source_prompt", "a cat", "--target_prompt", "a dog", "--output_dir", str(out),
                     "--max_train_steps", "1", "--eta", "0.5", "--slerp_alpha", "0.3", "--guidance_scale", "3"]) == 0
    assert (out / "side_by_side.png").is_file()
    assert sa.load_shift_file(out / sa.DEFAULT_WEIGHT_NAME).components == ["transformer"]
    assert cli_main(["edit", *common, "--source_prompt", "a cat", "--target_prompt", "a dog", "--output_dir",
                     str(tmp_path / "x"), "--eta", "1.5"]) == 1
    assert "`eta` should be in [0, 1] for flow models" in capsys.readouterr().err
    sana = tmp_path / "sana"
    sana.mkdir()
    (sana / "model_index.json").write_text('{"_class_name": "SanaPipeline", "transformer": ["diffusers", '
                                           '"SanaTransformer2DModel"]}')
    assert cli_main(["edit", *common[2:], "--pretrained_model_name_or_path", str(sana), "--target_prompt", "a dog",
                     "--output_dir", str(tmp_path / "y")]) == 1
    assert "SanaTransformer2DModel" in capsys.readouterr().err
