"""The app's functions without a browser (`svdiff_adapter.app.ShiftStudio`, `TrainingJob`, the page's handlers), on
the bundled toy world: weights inside the ReLU, the interpolation strip, per-block weights, two pages at once,
loading and unloading, training, editing, and bad input answered with a message and the pipeline unchanged."""

import math
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import svdiff_adapter as sa
from svdiff_adapter import toyworld as tw
from svdiff_adapter.app import TOY_PROMPT, AppInputError, open_studio
from svdiff_adapter.app.jobs import TrainingJob
from svdiff_adapter.tuner import spectral_layers

from .tiny_models import assert_unchanged, state_snapshot

SHIPPED = tw.ASSETS_DIR / "shifts" / "dotted_square"
FEW_STEPS = dict(steps=4)


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    studio = open_studio(work_dir=tmp_path_factory.mktemp("app"), svd_cache=tmp_path_factory.mktemp("svd"))
    # A second shift: the shipped one with δ reversed and halved, a real and different model.
    shipped = sa.load_shift_file(SHIPPED / sa.DEFAULT_WEIGHT_NAME)
    for component, deltas in shipped.deltas.items():
        shipped.deltas[component] = {name: -0.5 * delta for name, delta in deltas.items()}
    other = tmp_path_factory.mktemp("other") / "reversed" / sa.DEFAULT_WEIGHT_NAME
    sa.save_shift_file(shipped, other)
    studio.load(other.parent)
    return studio


def pipeline_state(studio):
    return state_snapshot(studio.pipe.unet), state_snapshot(studio.pipe.text_encoder), studio.shifts


def assert_pipeline_unchanged(studio, before):
    assert_unchanged(studio.pipe.unet, before[0])
    assert_unchanged(studio.pipe.text_encoder, before[1])
    assert studio.shifts == before[2]


def test_weight_zero_is_the_base_model_and_one_draws_the_subject(studio):
    assert studio.shifts == ["dotted_square", "reversed"]
    base = tw.load_toyworld_pipeline()
    generator = torch.Generator().manual_seed(0)
    expected = base(TOY_PROMPT, num_inference_steps=4, guidance_scale=studio.default_guidance, height=64, width=64,
                    generator=generator).images[0]
    zero = studio.generate(TOY_PROMPT, weights={"dotted_square": 0.0}, **FEW_STEPS)[0]
    assert np.array_equal(pixels(zero), pixels(expected))  # δ = 0: the base model, bit for bit
    shifted = studio.generate(TOY_PROMPT, weights={"dotted_square": 1.0}, seed=0, num_images=4)
    judged = tw.judge_images(shifted)
    assert judged["pattern"].count("dots") >= 3, judged  # the shipped subject: a dotted square
    again = studio.generate(TOY_PROMPT, weights={"dotted_square": 1.0}, seed=0, num_images=4)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(shifted, again))


def test_the_strip_runs_from_one_shift_to_the_other_inside_the_relu(studio):
    strip = studio.interpolation_strip(TOY_PROMPT, "dotted_square", "reversed", count=3, **FEW_STEPS)
    assert [alpha for alpha, _ in strip] == [0.0, 0.5, 1.0]
    ends = [studio.generate(TOY_PROMPT, weights=w, **FEW_STEPS)[0]
            for w in ({"dotted_square": 1.0}, {"dotted_square": 0.5, "reversed": 0.5}, {"reversed": 1.0})]
    for (_, image), expected in zip(strip, ends):
        assert np.abs(pixels(image) - pixels(expected)).max() <= 1  # the switch cache rebuilds to float rounding
    assert not np.array_equal(pixels(strip[0][1]), pixels(strip[2][1]))
    assert not any(layer.spectral_cache.switch_enabled for _, layer in spectral_layers(studio.pipe.unet))


def test_per_block_weights_scale_the_unet_blocks(studio):
    plain = studio.generate(TOY_PROMPT, weights={"dotted_square": 1.0}, **FEW_STEPS)[0]
    ones = studio.generate(TOY_PROMPT, weights={"dotted_square": 1.0},
                           block_weights={"dotted_square": {"down": 1, "mid": 1, "up": 1}}, **FEW_STEPS)[0]
    assert np.array_equal(pixels(plain), pixels(ones))
    # Shift on the down blocks only, and the text encoder: between the plain weight and the text encoder's alone.
    down = studio.generate(TOY_PROMPT, weights={"dotted_square": 1.0},
                           block_weights={"dotted_square": {"down": 1, "mid": 0, "up": 0}}, **FEW_STEPS)[0]
    assert not np.array_equal(pixels(down), pixels(plain))
    layer = next(layer for name, layer in spectral_layers(studio.pipe.unet) if name.startswith("up_blocks"))
    assert layer.spectral_scaling["dotted_square"] == 0.0
    layer = next(layer for name, layer in spectral_layers(studio.pipe.unet) if name.startswith("down_blocks"))
    assert layer.spectral_scaling["dotted_square"] == 1.0


def test_two_pages_at_once_each_get_their_own_weights(studio):
    expected = {w: studio.generate(TOY_PROMPT, weights={"dotted_square": w}, **FEW_STEPS)[0] for w in (0.0, 1.0)}
    results, errors = {0.0: [], 1.0: []}, []

    def page(weight):
        try:
            for _ in range(3):
                results[weight].append(studio.generate(TOY_PROMPT, weights={"dotted_square": weight}, **FEW_STEPS)[0])
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=page, args=(w,)) for w in (0.0, 1.0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for weight, images in results.items():
        assert all(np.array_equal(pixels(image), pixels(expected[weight])) for image in images)


@pytest.mark.parametrize("call, match", [
    (lambda s: s.generate("   ", **FEW_STEPS), "prompt is empty"),
    (lambda s: s.generate(TOY_PROMPT, weights={"dotted_square": math.nan}), "finite"),
    (lambda s: s.generate(TOY_PROMPT, weights={"dotted_square": "lots"}), "should be a number"),
    (lambda s: s.generate(TOY_PROMPT, weights={"nobody": 1.0}), "No shift named 'nobody'"),
    (lambda s: s.generate(TOY_PROMPT, size=100_000), "size should be between"),
    (lambda s: s.generate(TOY_PROMPT, size=100), "multiple of 8"),
    (lambda s: s.generate(TOY_PROMPT, steps=10_000), "Steps should be between"),
    (lambda s: s.generate(TOY_PROMPT, num_images=50), "number of images"),
    (lambda s: s.generate(TOY_PROMPT, seed=1.5), "whole number"),
    (lambda s: s.generate(TOY_PROMPT, block_weights={"dotted_square": {"left": 1}}), "Blocks are"),
    (lambda s: s.interpolation_strip(TOY_PROMPT, "dotted_square", "dotted_square"), "two different"),
    (lambda s: s.interpolation_strip(TOY_PROMPT, "dotted_square", "gone"), "two loaded shifts"),
    (lambda s: s.load(""), "Give a shift"),
    (lambda s: s.load(SHIPPED, "dotted_square"), "already loaded"),
    (lambda s: s.load(SHIPPED, "bad name!"), "Invalid adapter name"),
    (lambda s: s.unload("gone"), "No shift named 'gone'"),
])
def test_bad_input_is_a_message_and_changes_nothing(studio, call, match):
    before = pipeline_state(studio)
    with pytest.raises(AppInputError, match=match):
        call(studio)
    assert_pipeline_unchanged(studio, before)


def test_loading_files_that_are_not_shifts_says_why(studio, tmp_path):
    before = pipeline_state(studio)
    (tmp_path / "notes.safetensors").write_text("not a tensor file")
    for source, match in ((tmp_path / "notes.safetensors", "Could not load"), (tmp_path / "missing", "Could not load")):
        with pytest.raises(AppInputError, match=match):
            studio.load(source, "x")
        assert_pipeline_unchanged(studio, before)


def test_load_and_unload_change_the_shared_list(studio, tmp_path):
    name = studio.load(SHIPPED, "again")
    assert name == "again" and studio.shifts[-1] == "again"
    studio.unload("again")
    assert studio.shifts == ["dotted_square", "reversed"]
    # Default names: a folder's name, a file's stem, the folder of a file with the default name; never one in use.
    upload = tmp_path / "upload-1234" / "my dog.safetensors"
    upload.parent.mkdir()
    upload.write_bytes((SHIPPED / sa.DEFAULT_WEIGHT_NAME).read_bytes())
    assert studio.load(upload) == "my_dog"
    assert studio.load(SHIPPED / sa.DEFAULT_WEIGHT_NAME) == "dotted_square_2"
    for name in ("my_dog", "dotted_square_2"):
        studio.unload(name)


def test_the_page_turns_errors_into_messages(studio):
    from svdiff_adapter.app.ui import MAX_SLOTS, AppPage

    page = AppPage(studio, TOY_PROMPT)
    names = page.refresh()[0]
    assert names == studio.shifts
    weights = [1.0, 0.0] + [0.0] * (MAX_SLOTS - 2) + [1.0] * (3 * MAX_SLOTS)
    images, message = page.generate(TOY_PROMPT, 0, 4, 2.0, 1, 64, names, *weights)
    assert images[0].size == (256, 256) and "dotted_square 1" in message  # enlarged 4× for the page
    _, message = page.generate("", 0, 4, 2.0, 1, 64, names, *weights)
    assert message.startswith("**Error:**") and "prompt is empty" in message
    image = page.api_generate(TOY_PROMPT, 0, '{"dotted_square": 1.0}', 4, None)
    assert image.size == (64, 64)
    import gradio as gr

    for weights_json, match in (("{oops", "not valid JSON"), ('{"dotted_square": NaN}', "finite"), ("[1]", "JSON object")):
        with pytest.raises(gr.Error, match=match):
            page.api_generate(TOY_PROMPT, 0, weights_json, 4, None)


def test_a_training_run_reports_progress_and_loads_its_shift(studio, tmp_path):
    images = []
    for index, pixels_ in enumerate(tw.get_subject("striped_star").images(3, seed=0, backgrounds=["white"]).images):
        path = tmp_path / f"star-{index}.png"
        Image.fromarray(pixels_).save(path)
        images.append(path)
    job = TrainingJob(studio, images, "a sks star on a white background", name="star", steps=4, validation_every=2)
    seen = []
    job._on_step = (lambda original: (lambda step, logs: (seen.append(step), original(step, logs))[1]))(job._on_step)
    status = job.start().join(timeout=600)
    assert status.state == "done", status.message
    assert seen == [1, 2, 3, 4] and status.step == 4 and len(status.losses) == 4
    assert status.validation_image is not None and status.validation_image.is_file()
    assert status.weights.is_file() and "star" in studio.shifts
    trained = sa.load_shift_file(status.weights)
    assert set(trained.components) == {"unet", "text_encoder"}
    studio.unload("star")


def test_a_cancelled_run_stops_after_a_step_and_keeps_a_checkpoint(studio, tmp_path):
    path = tmp_path / "star.png"
    Image.fromarray(tw.get_subject("striped_star").images(1, seed=0, backgrounds=["white"]).images[0]).save(path)
    job = TrainingJob(studio, [path], "a sks star on a white background", name="stopped", steps=50,
                      validation_every=0, train_text_encoder=False)
    original = job._on_step

    def cancel_at_two(step, logs):
        if step == 2:
            job.cancel()
        original(step, logs)

    job._on_step = cancel_at_two
    status = job.start().join(timeout=600)
    assert status.state == "cancelled" and status.step == 2, status.message
    assert "checkpoint" in status.message and "stopped" not in studio.shifts
    assert list((job.folder / "output").glob("checkpoint-2"))


@pytest.mark.parametrize("images, prompt, match", [
    ([], "a sks star", "Upload the images"),
    (["not-an-image"], "a sks star", "not an image"),
    (["IMAGE"], "", "instance prompt is empty"),
])
def test_bad_training_input_is_refused_before_anything_runs(studio, tmp_path, images, prompt, match):
    good = tmp_path / "star.png"
    Image.new("RGB", (64, 64)).save(good)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    paths = [good if item == "IMAGE" else text for item in images]
    with pytest.raises(AppInputError, match=match):
        TrainingJob(studio, paths, prompt, name="bad")
    assert not (studio.work_dir / "training" / "bad").exists()


def test_edit_fine_tunes_and_edits_and_leaves_the_shifts_alone(studio, tmp_path):
    before = pipeline_state(studio)
    path = tmp_path / "circle.png"
    Image.fromarray(tw.render_specs([tw.Spec("circle", "red", "white")], seed=0).images[0]).save(path)
    result = studio.edit(path, "a red circle on a white background", ["a blue circle on a white background", ""],
                         train_steps=2, steps=5, seed=0)
    assert len(result.images) == 1 and result.images[0].size == (64, 64) and len(result.losses) == 2
    assert_pipeline_unchanged(studio, before)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for image, match in ((None, "Upload an image"), (text, "not an image")):
        with pytest.raises(AppInputError, match=match):
            studio.edit(image, "a circle", "a blue circle")
    with pytest.raises(AppInputError, match="at least one target"):
        studio.edit(path, "a circle", ["  "])
