"""The bundled toy DiT (`toyworld/assets/dit`): diffusers' own `StableDiffusion3Pipeline` loads it offline, it shares
the UNet pipeline's VAE and text encoder, draws what it is asked (judged), stays within its size budget, and the
package's trainer personalises it; and the quality benchmark's methods set up on it."""

import sys
from pathlib import Path

import pytest
import torch

import svdiff_adapter as sa
from svdiff_adapter import toyworld as tw

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (tw.DIT_DIR / "model_index.json").is_file(), reason="toy DiT not bundled")


def test_bundle_loads_with_diffusers_own_class_and_shares_the_unet_pipelines_parts():
    from diffusers import StableDiffusion3Pipeline

    size = sum(f.stat().st_size for f in tw.DIT_DIR.rglob("*") if f.is_file())
    assert size <= 12e6, size
    pipe = StableDiffusion3Pipeline.from_pretrained(tw.DIT_DIR, text_encoder_3=None, tokenizer_3=None,
                                                    dtype=torch.float32)
    unet_pipe = tw.load_toyworld_pipeline()
    for name, value in unet_pipe.vae.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[name], value), name
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        for name, value in unet_pipe.text_encoder.state_dict().items():
            assert torch.equal(encoder.text_model.state_dict()[name], value), name
        assert torch.equal(encoder.text_projection.weight, torch.eye(64))
    assert unet_pipe.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()


def test_the_dit_draws_what_it_is_asked():
    """20 fresh prompts with the pipeline's defaults (256 zero T5 tokens). The bundle's recorded rate is 76 % of 300
    prompts (docs/toyworld.md); 20 samples at that rate fall under 50 % with probability < 1 %, while an untrained
    or broken model draws all three attributes right by chance in well under 5 % (6 shapes × 6 colours)."""
    from svdiff_adapter.toyworld.evaluate import evaluate_prompts

    pipe = tw.load_toyworld_pipeline(tw.DIT_DIR)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    scores = evaluate_prompts(pipe, tw.load_judge(), n=20, seed=77, **tw.recommended_sampling(tw.DIT_DIR))
    assert scores["all"] >= 0.5 and scores["color"] >= 0.9 and scores["background"] >= 0.9, scores


def test_the_trainer_personalises_the_dit(tmp_path):
    from svdiff_adapter.toyworld.personalize import ShiftRecipe, train_subject_shift

    subject = tw.get_subject("split_circle")
    recipe = ShiftRecipe(max_train_steps=4, with_prior_preservation=False, num_images=3)
    folder = train_subject_shift(subject, tmp_path / "run", pipeline_dir=tw.DIT_DIR, recipe=recipe)
    shift = sa.load_shift_file(folder / sa.DEFAULT_WEIGHT_NAME)
    assert set(shift.deltas) == {"transformer", "text_encoder", "text_encoder_2"}
    pipe = tw.load_toyworld_pipeline(tw.DIT_DIR)
    before = tw.generate(pipe, [subject.prompt("white")], seed=3, num_inference_steps=4)
    pipe.load_spectral_shift(str(folder), "subject")
    after = tw.generate(pipe, [subject.prompt("white")], seed=3, num_inference_steps=4)
    assert (after - before).abs().max() > 1e-3
    pipe.unload_spectral_shift()
    assert torch.equal(tw.generate(pipe, [subject.prompt("white")], seed=3, num_inference_steps=4), before)


@pytest.mark.parametrize("kind, rank", [("spectral", None), ("spectral", 16), ("lora", 4), ("full", None)])
def test_quality_methods_train_on_the_dit_and_the_unet_model(kind, rank, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks" / "quality"))
    import run
    from methods import MethodSpec, save

    from svdiff_adapter.toyworld.personalize import write_subject_images
    from svdiff_adapter.training import DreamBoothData, ImageTransform, Subject

    subject = tw.get_subject("split_circle")
    images = tmp_path / "images"
    write_subject_images(subject, images, 2, ["white"])
    data = DreamBoothData([Subject(str(images), subject.prompt("white"), class_name="circle")], ImageTransform(64),
                          cutmix_prob=0.0)
    spec = MethodSpec(kind, 1e-3, rank=rank)
    for pipe, denoiser in ((tw.load_toyworld_pipeline(tw.DIT_DIR), "transformer"), (tw.load_toyworld_pipeline(),
                                                                                      "unet")):
        before = {k: v.clone() for k, v in getattr(pipe, denoiser).state_dict().items()}
        result = run.train(pipe, spec, data, seed=0, steps=2)
        assert result["trainable_parameters"] > 0 and result["final_loss"] > 0
        assert save(spec, pipe, tmp_path / f"{denoiser}-{kind}") > 0
        after = getattr(pipe, denoiser).state_dict()
        changed = any(not torch.equal(before[k], after[k]) for k in before if k in after)
        assert changed == (kind == "full"), (denoiser, kind)  # adapters leave the base weights as they were


def test_the_dit_training_script_runs_resumes_and_saves_a_loadable_pipeline(tmp_path):
    """A smoke run of examples/toyworld/train_dit_model.py (tiny schedule): the pipeline it writes loads with
    diffusers' class, and running the same command again finds the finished run instead of training again."""
    import subprocess

    from diffusers import StableDiffusion3Pipeline

    command = [sys.executable, str(ROOT / "examples" / "toyworld" / "train_dit_model.py"), "--out", str(tmp_path),
               "--num-images", "256", "--steps", "3", "--layers", "1", "--eval-every", "0", "--sweep-prompts", "4",
               "--eval-prompts", "4", "--guidance", "3", "--inference-steps", "2", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "pipeline", text_encoder_3=None, tokenizer_3=None)
    assert pipe.transformer.config.num_layers == 1
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "dit: resumed at step 3" in (tmp_path / "training_log.txt").read_text()
    changed = subprocess.run(command[:-2] + ["--threads", "1", "--lr", "1e-3"], capture_output=True, text=True,
                             timeout=600)
    assert changed.returncode == 2  # the checkpointed run's options are binding
