"""Fast tests of the toy world: generator, prompts, subjects, tokenizer, judge, pipeline packaging, bundled assets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import svdiff_adapter as sa

from svdiff_adapter import toyworld as tw
from svdiff_adapter.toyworld import world as W
from svdiff_adapter.toyworld.judge import (
    HEADS,
    augment,
    evaluate_judge,
    load_judge_file,
    predict,
    save_judge,
    train_judge,
)
from svdiff_adapter.toyworld.tokenizer import (
    IDENTIFIERS,
    MODEL_MAX_LENGTH,
    check_tokenizer,
    load_tokenizer,
    tokenizer_words,
)

# --------------------------------------------------------------------------------------------------------------------
# World
# --------------------------------------------------------------------------------------------------------------------


def test_same_seed_same_images():
    a = W.make_batch(24, seed=7, pattern_fraction=0.3)
    b = W.make_batch(24, seed=7, pattern_fraction=0.3)
    assert a.images.shape == (24, 64, 64, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images)
    assert a.prompts == b.prompts
    for k in a.labels:
        assert np.array_equal(a.labels[k], b.labels[k])
    c = W.make_batch(24, seed=8, pattern_fraction=0.3)
    assert not np.array_equal(a.images, c.images)


def test_image_depends_only_on_seed_and_index():
    specs = W.sample_specs(10, seed=3)
    small = W.render_specs(specs[:4], seed=11)
    big = W.render_specs(specs, seed=11)
    assert np.array_equal(small.images, big.images[:4])


def test_pair_scenes_are_two_single_object_images_on_one_background():
    pairs = W.sample_pair_specs(40, seed=5, pattern_fraction=0.5)
    assert all(p.left.background == p.right.background for p in pairs)
    assert not any(p.left.pattern != "plain" and p.right.pattern != "plain" for p in pairs)
    assert {p.left.pattern != "plain" for p in pairs} == {True, False}  # patterned objects appear on both sides
    assert {p.right.pattern != "plain" for p in pairs} == {True, False}
    batch = W.render_pairs(pairs, seed=9)
    assert batch.images.shape == (40, 64, 128, 3)
    assert np.array_equal(batch.images, W.render_pairs(pairs, seed=9).images)
    assert np.array_equal(W.render_pairs(pairs[:3], seed=9).images, batch.images[:3])
    # Each half is a single-object image of its spec, and the halves share one background colour.
    assert np.array_equal(batch.images[:, :, 0], batch.images[:, :, 127])  # outer columns: background only
    for side in ("left", "right"):
        for key in HEADS:
            assert batch.labels[f"{side}_{key}"].tolist() == [getattr(p, side).labels()[key] for p in pairs]
    tokenizer = load_tokenizer()
    for pair, prompt in zip(pairs, batch.prompts):
        assert prompt.startswith(W.prompt_for(pair.left, drop_background=True) + " and ")
        assert prompt.endswith(f" and {W.prompt_for(pair.right, drop_background=True)} on a {pair.background} background")
        assert len(tokenizer(prompt).input_ids) <= MODEL_MAX_LENGTH  # never truncated
    with pytest.raises(ValueError, match="share one background"):
        W.PairSpec(W.Spec("star", "red", "white"), W.Spec("ring", "blue", "black"))


def test_pair_prompt_with_identifiers():
    split_circle, dotted_square = tw.get_subject("split_circle"), tw.get_subject("dotted_square")
    scene = W.PairSpec(split_circle.spec("blue"), dotted_square.spec("blue"))
    assert W.pair_prompt(scene, ("sks", "zwx")) == "a sks circle and a zwx square on a blue background"


def test_tensors_range_and_layout():
    x, y = W.make_batch(4, seed=0).tensors()
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert set(y) == set(HEADS) and all(v.dtype == torch.long for v in y.values())


def test_prompts_match_labels():
    batch = W.make_batch(300, seed=5, pattern_fraction=0.3)
    for prompt, spec, i in zip(batch.prompts, batch.specs, range(len(batch))):
        words = prompt.split()
        assert words[0] == "a" and words[-3:] == ["a", spec.background, "background"]
        assert W.SHAPES[batch.labels["shape"][i]] in words
        assert W.BACKGROUNDS[batch.labels["background"][i]] == spec.background
        assert W.PATTERNS[batch.labels["pattern"][i]] == spec.pattern
        if spec.pattern == "plain":
            assert prompt == f"a {spec.color} {spec.shape} on a {spec.background} background"
            assert W.COLORS[batch.labels["color"][i]] == spec.color
            assert batch.labels["color2"][i] == W.NO_COLOR
        else:
            assert prompt == (f"a {spec.color} and {spec.color2} {W.PATTERN_WORDS[spec.pattern]} {spec.shape} "
                              f"on a {spec.background} background")
            pair = {W.COLORS[batch.labels["color"][i]], W.COLORS[batch.labels["color2"][i]]}
            assert pair == {spec.color, spec.color2}


def test_shape_colour_never_background_colour():
    for spec in W.sample_specs(2000, seed=1, pattern_fraction=0.3):
        assert spec.color != spec.background and spec.color2 != spec.background
    combos = W.plain_combinations()
    assert len(combos) == len(W.SHAPES) * (len(W.COLORS) * len(W.BACKGROUNDS) - 2)


def test_background_and_shape_colour_are_visible():
    # the shape covers a sizeable part of the image and differs from the background
    batch = W.make_batch(50, seed=2)
    for img, spec in zip(batch.images, batch.specs):
        bg = np.asarray(W.BACKGROUND_RGB[spec.background], dtype=float)
        diff = np.abs(img.astype(float) - bg).sum(-1) > 60
        assert 0.05 < diff.mean() < 0.6


def test_subjects_are_outside_the_training_distribution():
    pairs = {(s.shape, s.pattern) for s in W.SUBJECTS.values()}
    specs = W.sample_specs(3000, seed=0, pattern_fraction=1.0)
    assert all(s.pattern != "plain" for s in specs)
    assert not {(s.shape, s.pattern) for s in specs} & pairs
    every = W.sample_specs(3000, seed=0, pattern_fraction=1.0, exclude_subjects=False)
    assert {(s.shape, s.pattern) for s in every} & pairs


def test_subject_recipe():
    subj = W.get_subject("striped_star")
    assert (subj.shape, subj.pattern, subj.colors) == ("star", "stripes", ("yellow", "red"))
    batch = subj.images(5, seed=0, backgrounds=["white", "black", "gray"])
    assert batch.prompts[0] == "a sks star on a white background"
    assert [s.background for s in batch.specs] == ["white", "black", "gray", "white", "black"]
    assert np.array_equal(batch.images, subj.images(5, seed=0, backgrounds=["white", "black", "gray"]).images)
    assert subj.class_prompt("blue") == "a star on a blue background"
    assert subj.description("blue") == "a yellow and red striped star on a blue background"
    assert subj.prompt("blue", identifier="zwx") == "a zwx star on a blue background"
    assert all(W.PATTERNS[p] == "stripes" for p in batch.labels["pattern"])
    with pytest.raises(KeyError):
        W.get_subject("nope")


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------


def test_tokenizer_one_token_per_word():
    tok = load_tokenizer()
    check_tokenizer(tok)
    ids = {w: tok(w, add_special_tokens=False)["input_ids"] for w in tokenizer_words()}
    assert all(len(v) == 1 for v in ids.values())
    assert len({v[0] for v in ids.values()}) == len(ids)  # distinct ids
    assert tok.model_max_length == MODEL_MAX_LENGTH == 16
    enc = tok("a yellow and red striped star on a blue background", padding="max_length",
              max_length=tok.model_max_length)["input_ids"]
    assert len(enc) == 16 and enc[0] == tok.bos_token_id and enc[11] == tok.eos_token_id


def test_identifiers_never_in_world_prompts():
    assert not set(IDENTIFIERS) & set(W.world_words())
    prompts = W.make_batch(500, seed=0, pattern_fraction=0.3, drop_color=0.1, drop_background=0.1).prompts
    words = {w for p in prompts for w in p.split()}
    assert words <= set(W.world_words())
    assert "sks" in IDENTIFIERS and "zwx" in IDENTIFIERS


# --------------------------------------------------------------------------------------------------------------------
# Judge
# --------------------------------------------------------------------------------------------------------------------


def test_tiny_judge_trains_saves_and_loads(tmp_path):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = train_judge(steps=3, batch_size=16, width=8, progress=False)
    x, _ = W.make_batch(6, seed=1).tensors()
    pred = predict(model, x)
    assert set(pred) == set(HEADS) and all(v.shape == (6,) for v in pred.values())
    path = save_judge(model, tmp_path / "judge.safetensors")
    assert path.read_bytes()[:8] != b"\x80\x02\x8a\n"  # not a pickle
    loaded = load_judge_file(path)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5)
    acc = evaluate_judge(model, n=32)
    assert 0.0 <= acc["all"] <= 1.0


def test_augment_keeps_range():
    x, _ = W.make_batch(8, seed=0).tensors()
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert not torch.equal(x, y)


# --------------------------------------------------------------------------------------------------------------------
# Pipeline packaging (tiny random components)
# --------------------------------------------------------------------------------------------------------------------


def test_tiny_pipeline_saves_fp16_and_loads(tmp_path):
    from diffusers import StableDiffusionPipeline

    from svdiff_adapter.toyworld import models as M

    torch.manual_seed(0)
    tok = load_tokenizer()
    vae = M.make_vae(block_out_channels=(8, 8), norm_num_groups=4)  # 64x64 -> 32x32 latents
    unet = M.make_unet(block_out_channels=(8, 16), cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
                       sample_size=32)
    te = M.make_text_encoder(tok, hidden_size=16, layers=1, heads=2)
    pipe = M.build_pipeline(vae, te, tok, unet)
    pipe.to(torch.float16).save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.float32)
    assert loaded.tokenizer.model_max_length == 16
    assert loaded.text_encoder.config.max_position_embeddings == 16
    sched = loaded.scheduler.config
    assert sched.steps_offset == 1 and sched.set_alpha_to_one is False
    images = tw.generate(loaded, ["a red star on a blue background", "a sks star"], num_inference_steps=2,
                         guidance_scale=2.0, seed=0)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    again = tw.generate(loaded, ["a red star on a blue background", "a sks star"], num_inference_steps=2,
                        guidance_scale=2.0, seed=0)
    assert torch.equal(images, again)


def test_missing_assets_error_explains_how_to_build(tmp_path):
    with pytest.raises(tw.AssetsMissingError, match="train_base_model.py"):
        tw.load_toyworld_pipeline(tmp_path)
    with pytest.raises(tw.AssetsMissingError, match="train_judge.py"):
        tw.load_judge(tmp_path / "judge.safetensors")


# --------------------------------------------------------------------------------------------------------------------
# Bundled assets (skipped until they are built)
# --------------------------------------------------------------------------------------------------------------------

_avail = tw.assets_available()
needs_pipeline = pytest.mark.skipif(
    not _avail["pipeline"],
    reason=f"bundled toy-world pipeline not built yet ({tw.PIPELINE_DIR}); see docs/toyworld.md",
)
needs_judge = pytest.mark.skipif(
    not _avail["judge"], reason=f"bundled toy-world judge not built yet ({tw.JUDGE_PATH}); see docs/toyworld.md"
)


@needs_judge
def test_bundled_judge_is_accurate():
    judge = tw.load_judge()
    acc = evaluate_judge(judge, n=400, seed=424_242)
    assert min(acc.values()) >= 0.98, acc


@needs_pipeline
def test_bundled_pipeline_loads_small_and_samples():
    from diffusers import StableDiffusionPipeline

    size = sum(f.stat().st_size for f in tw.PIPELINE_DIR.rglob("*") if f.is_file())
    assert size <= 12e6
    pipe = StableDiffusionPipeline.from_pretrained(tw.PIPELINE_DIR)  # the plain diffusers route works
    assert pipe.unet.dtype == torch.float16 or pipe.unet.dtype == torch.float32
    pipe = tw.load_toyworld_pipeline()
    assert isinstance(pipe, sa.SpectralShiftLoaderMixin)  # `pipe.load_spectral_shift(...)` works on it
    check_tokenizer(pipe.tokenizer)
    assert pipe.tokenizer.get_vocab() == load_tokenizer().get_vocab()
    images = tw.generate(pipe, ["a red star on a blue background"] * 2, num_inference_steps=5, seed=0)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


@needs_pipeline
@needs_judge
def test_bundled_pipeline_draws_what_it_is_asked():
    pipe = tw.load_toyworld_pipeline()
    prompts = ["a red circle on a white background", "a yellow star on a black background",
               "a blue square on a gray background", "a green triangle on a blue background"]
    pred = tw.judge_images(tw.generate(pipe, prompts, seed=0))
    right = sum(p.split()[2] == s and p.split()[1] == c
                for p, s, c in zip(prompts, pred["shape"], pred["color"]))
    assert right >= 3, pred


@needs_pipeline
@needs_judge
def test_short_personalisation_moves_the_judge_toward_the_subject(tmp_path):
    """A short run of the real trainer (the quickstart's recipe, fewer steps) on 5 images of a subject the base never
    saw: samples of "a sks circle on a white background" must move towards the subject in the judge's eyes."""
    import svdiff_adapter as sa
    from svdiff_adapter.toyworld.personalize import ShiftRecipe, subject_probability, train_subject_shift

    subject = tw.get_subject("split_circle")
    run = train_subject_shift(subject, tmp_path / "run", recipe=ShiftRecipe(max_train_steps=100))
    pipe = sa.StableDiffusionPipeline(**tw.load_toyworld_pipeline().components)
    prompts = [subject.prompt("white")] * 8
    before = subject_probability(tw.generate(pipe, prompts, seed=3), subject).mean()
    pipe.load_spectral_shift(run, adapter_name="subject")
    after = subject_probability(tw.generate(pipe, prompts, seed=3), subject).mean()
    assert after > before + 0.05, (float(before), float(after))  # base: ~1e-6


@needs_pipeline
def test_shipped_shift_loads_on_the_bundled_pipeline_and_unloads_exactly():
    import svdiff_adapter as sa

    pipe = sa.StableDiffusionPipeline(**tw.load_toyworld_pipeline().components)
    prompt = [tw.get_subject("dotted_square").prompt("blue", "zwx")]
    base = tw.generate(pipe, prompt, num_inference_steps=5, seed=0)
    pipe.load_spectral_shift(tw.ASSETS_DIR / "shifts" / "dotted_square", adapter_name="shipped")  # fingerprints match
    shifted = tw.generate(pipe, prompt, num_inference_steps=5, seed=0)
    pipe.unload_spectral_shift()
    assert not torch.allclose(shifted, base, atol=1e-3)
    assert torch.equal(tw.generate(pipe, prompt, num_inference_steps=5, seed=0), base)
