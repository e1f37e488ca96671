"""Training core (issue 4) on a tiny random pipeline saved to disk: loss, only-δ, prior images, resume, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import svdiff_adapter as sa
from svdiff_adapter.training import (
    CheckpointError,
    DreamBoothData,
    Frozen,
    ImageTransform,
    Subject,
    TrainingDataError,
    ensure_class_images,
    list_checkpoints,
    load_checkpoint,
    load_image,
    make_optimizer,
    parse_args,
    parse_subject,
    recover_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    train,
    training_loss,
)
from svdiff_adapter.training.prepare import check_base_model

from .tiny_models import tiny_pipeline

RESOLUTION = 32


def build_tiny_pipeline(seed: int = 0):
    return tiny_pipeline(seed=seed)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_pipeline().save_pretrained(folder)
    return str(folder)


def write_images(folder, count=3, seed=0, modes=("RGB",), size=(40, 48)):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        mode = modes[index % len(modes)]
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(array).convert(mode)
        image.save(folder / f"img{index}.{'jpg' if mode == 'CMYK' else 'png'}")
    return str(folder)


def train_args(model_dir, output_dir, *extra):
    return parse_args([
        "--pretrained_model_name_or_path", model_dir, "--output_dir", str(output_dir),
        "--resolution", str(RESOLUTION), "--train_batch_size", "1", "--seed", "7", "--report_to", "none",
        "--checkpointing_steps", "1000", *map(str, extra)])


def load_deltas(path):
    return sa.load_shift_file(path).deltas


# ------------------------------------------------------------------------------------------------ learning
def test_loss_decreases_on_fixed_batch(tiny_model_dir, tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    sa.add_spectral_shift(pipe.unet, sa.SpectralShiftConfig(target_kinds=["linear", "conv2d", "norm"]), "dog",
                          svd_cache=False)
    subject = Subject(write_images(tmp_path / "dog"), "a photo of sks dog", class_name="dog")
    data = DreamBoothData([subject], ImageTransform(RESOLUTION, center_crop=True))
    batch = data.sample(1, torch.Generator().manual_seed(0))
    frozen = Frozen(pipe.vae, pipe.text_encoder, pipe.tokenizer,
                    DDPMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler"))
    optimizer = make_optimizer({"unet": pipe.unet}, "dog", learning_rate=3e-2)
    assert_loss_decreases(pipe.unet, frozen, batch, optimizer)


def assert_loss_decreases(unet, frozen, batch, optimizer, **loss_options):
    losses = []
    for _ in range(15):
        loss, _ = training_loss(unet, frozen, batch, torch.Generator().manual_seed(1), **loss_options)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses


def test_param_groups_split_matrix_and_norm_shifts(tiny_model_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    sa.add_spectral_shift(unet, sa.SpectralShiftConfig(target_kinds=["linear", "conv2d", "norm"]), svd_cache=False)
    optimizer = make_optimizer({"unet": unet}, "default")
    matrix, norm = optimizer.param_groups
    assert (matrix["lr"], norm["lr"]) == (1e-3, 1e-6)
    assert isinstance(optimizer, torch.optim.AdamW)
    norm_names = {n for n, p in unet.named_parameters() if any(p is q for q in norm["params"])}
    assert norm_names and all("norm" in n for n in norm_names)
    total = sum(p.numel() for n, p in unet.named_parameters() if p.requires_grad)
    assert total == sum(p.numel() for g in optimizer.param_groups for p in g["params"])


def test_sigma_step_scale_multiplies_each_step_by_the_singular_values():
    """Two AdamW runs on the same gradients: with step_scale="sigma" the change of δᵢ is σᵢ times the plain
    change (σ from a float64 SVD of the weight), weight decay included; norm shifts step as before."""
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.LayerNorm(9))
        model.requires_grad_(False)
        sa.add_spectral_shift(model, sa.SpectralShiftConfig(target_kinds=["linear", "norm"]), svd_cache=False)
        return model

    def deltas(model):
        return [model[i].spectral_delta["default"].detach().clone() for i in (0, 1)]

    inputs = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    changes = {}
    for scale in ("uniform", "sigma"):
        model = build()
        with torch.no_grad():  # a non-zero start, so that weight decay takes part
            model[0].spectral_delta["default"].fill_(0.05)
        optimizer = make_optimizer({"m": model}, "default", 1e-2, 1e-2, weight_decay=0.5, step_scale=scale)
        start = deltas(model)
        model(inputs).square().sum().backward()
        optimizer.step()
        changes[scale] = [after - before for after, before in zip(deltas(model), start)]
    sigma = torch.linalg.svdvals(build()[0].base_layer.weight.double()).float()
    torch.testing.assert_close(changes["sigma"][0], changes["uniform"][0] * sigma, rtol=1e-5, atol=1e-9)
    assert changes["uniform"][0].abs().min() > 1e-4 and not torch.allclose(sigma, sigma.mean().expand_as(sigma))
    torch.testing.assert_close(changes["sigma"][1], changes["uniform"][1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="step_scale"):
        make_optimizer({"m": build()}, "default", step_scale="relative")


def test_train_changes_only_delta_and_saves_v1(tiny_model_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    instance = write_images(tmp_path / "dog")
    args = train_args(tiny_model_dir, tmp_path / "out", "--instance_data_dir", instance, "--instance_prompt",
                      "a photo of sks dog", "--max_train_steps", 3, "--random_flip", "--lr_scheduler",
                      "constant_with_warmup", "--lr_warmup_steps", 1, "--gradient_accumulation_steps", 2)
    result = train(args)
    assert result["global_step"] == 3
    weights = tmp_path / "out" / sa.DEFAULT_WEIGHT_NAME
    shift = sa.load_shift_file(weights)
    # A local folder is not recorded as the base model (a path means nothing elsewhere); fingerprints guard it.
    assert shift.base_model is None and list(shift.deltas) == ["unet"]
    assert any(d.abs().max() > 0 for d in shift.deltas["unet"].values())
    # The base weights are bit-identical: load the shift into a fresh UNet and compare every base tensor.
    fresh = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    base = {k: v.clone() for k, v in fresh.state_dict().items()}
    sa.load_spectral_shift({"unet": fresh}, weights, svd_cache=False)  # fingerprints match the trained base
    trained = result["models"]["unet"].state_dict()
    for key, value in base.items():
        holder = key.rsplit(".", 1)
        wrapped = f"{holder[0]}.base_layer.{holder[1]}"
        assert torch.equal(trained.get(key, trained.get(wrapped)), value), key


def test_text_encoder_shifts_and_prior_images_generated_once(tiny_model_dir, tmp_path):
    instance = write_images(tmp_path / "dog")
    class_dir = tmp_path / "class"
    write_images(class_dir, count=1, seed=5)  # one existing image: only the missing ones are generated
    common = ["--instance_data_dir", instance, "--instance_prompt", "a photo of sks dog", "--with_prior_preservation",
              "--class_data_dir", class_dir, "--class_prompt", "a photo of dog", "--num_class_images", 3,
              "--class_inference_steps", 2, "--sample_batch_size", 2, "--max_train_steps", 2, "--train_text_encoder"]
    train(train_args(tiny_model_dir, tmp_path / "out", *common))
    files = sorted(class_dir.iterdir())
    assert len(files) == 3 and sum(f.name.startswith("class-") for f in files) == 2
    stamps = {f.name: f.stat().st_mtime_ns for f in files}
    shift = sa.load_shift_file(tmp_path / "out" / sa.DEFAULT_WEIGHT_NAME)
    assert set(shift.deltas) == {"unet", "text_encoder"}
    assert any(d.abs().max() > 0 for d in shift.deltas["text_encoder"].values())
    # A second run reuses them (no pipeline is even loaded: ensure_class_images reports 0 generated).
    train(train_args(tiny_model_dir, tmp_path / "out2", *common))
    assert {f.name: f.stat().st_mtime_ns for f in class_dir.iterdir()} == stamps
    calls = []
    assert ensure_class_images(str(class_dir), "a photo of dog", 3, lambda: calls.append(1)) == 0 and not calls


# ------------------------------------------------------------------------------------------------ resume
def test_interrupted_and_resumed_run_ends_with_the_same_delta(tiny_model_dir, tmp_path):
    instance = write_images(tmp_path / "dog")
    class_dir = write_images(tmp_path / "class", count=2, seed=3)
    common = ["--instance_data_dir", instance, "--instance_prompt", "a photo of sks dog", "--with_prior_preservation",
              "--class_data_dir", class_dir, "--class_prompt", "a photo of dog", "--num_class_images", 2,
              "--gradient_accumulation_steps", 2, "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", 3,
              "--random_flip", "--learning_rate_1d", 1e-3]
    train(train_args(tiny_model_dir, tmp_path / "full", *common, "--max_train_steps", 3))
    train(train_args(tiny_model_dir, tmp_path / "split", *common, "--max_train_steps", 2, "--checkpointing_steps", 2))
    assert [p.name for p in list_checkpoints(tmp_path / "split")] == ["checkpoint-2"]
    assert not any(p.name.startswith(".checkpoint") for p in (tmp_path / "split").iterdir())
    result = train(train_args(tiny_model_dir, tmp_path / "split", *common, "--max_train_steps", 3,
                              "--resume_from_checkpoint", "latest"))
    assert result["global_step"] == 3 and len(result["history"]) == 1
    full = load_deltas(tmp_path / "full" / sa.DEFAULT_WEIGHT_NAME)["unet"]
    split = load_deltas(tmp_path / "split" / sa.DEFAULT_WEIGHT_NAME)["unet"]
    assert full.keys() == split.keys()
    for key in full:
        assert torch.equal(full[key], split[key]), key


def test_checkpoint_contents_total_limit_and_validation_images(tiny_model_dir, tmp_path):
    instance = write_images(tmp_path / "dog")
    train(train_args(tiny_model_dir, tmp_path / "out", "--instance_data_dir", instance, "--instance_prompt",
                     "a photo of sks dog", "--max_train_steps", 3, "--checkpointing_steps", 1,
                     "--checkpoints_total_limit", 2, "--validation_prompt", "a photo of sks dog",
                     "--validation_steps", 3, "--num_validation_images", 1, "--validation_inference_steps", 2))
    checkpoints = list_checkpoints(tmp_path / "out")
    assert [p.name for p in (tmp_path / "out" / "validation").iterdir()] == ["step-000003-0.png"]
    assert [p.name for p in checkpoints] == ["checkpoint-2", "checkpoint-3"]
    assert {p.name for p in checkpoints[-1].iterdir()} == {"shifts.safetensors", "optimizer.safetensors",
                                                           "scheduler.safetensors", "rng.safetensors", "state.json"}
    assert json.loads((checkpoints[-1] / "state.json").read_text())["global_step"] == 3


# Above PID_MAX_LIMIT (2**22 on 64-bit Linux): no process can have this id, so its writer is surely gone.
NEVER_A_PID = 2**22 + 1


def checkpoint_parts(seed=0):
    """A tiny shifted UNet, its optimizer after one step and a warm-up scheduler: what `save_checkpoint` saves."""
    from diffusers.optimization import get_scheduler

    from .tiny_models import tiny_unet

    unet = tiny_unet()
    sa.add_spectral_shift(unet, sa.SpectralShiftConfig(target_kinds=["linear", "conv2d", "norm"]), "default",
                          svd_cache=False)
    optimizer = make_optimizer({"unet": unet}, "default", learning_rate=1e-2)
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=3, num_training_steps=10)
    generator = torch.Generator().manual_seed(seed)
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            parameter.grad = torch.randn(parameter.shape, generator=generator)
    optimizer.step()
    scheduler.step()
    return {"unet": unet}, optimizer, scheduler


def test_checkpoint_states_round_trip_without_pickle(tmp_path):
    from diffusers.optimization import get_scheduler
    from safetensors import safe_open

    models, optimizer, scheduler = checkpoint_parts()
    path = save_checkpoint(str(tmp_path), 1, models, "default", optimizer, scheduler, extra={"seed": 3})
    for name in ("optimizer", "scheduler", "rng"):
        with safe_open(str(path / f"{name}.safetensors"), "pt") as handle:  # plain safetensors: tensors + JSON
            assert handle.metadata()["format"] == "svdiff-training-state"
    fresh_models, fresh_optimizer, _ = checkpoint_parts(seed=1)
    fresh_scheduler = get_scheduler("constant_with_warmup", fresh_optimizer, num_warmup_steps=3, num_training_steps=10)
    state = load_checkpoint(path, fresh_models, "default", fresh_optimizer, fresh_scheduler)
    assert state == {"global_step": 1, "seed": 3}
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert fresh_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    for index, values in optimizer.state_dict()["state"].items():
        for key, value in values.items():
            assert torch.equal(fresh_optimizer.state_dict()["state"][index][key], value), (index, key)
    for (name, p), (_, q) in zip(models["unet"].named_parameters(), fresh_models["unet"].named_parameters()):
        assert torch.equal(p, q), name


def test_checkpoint_left_half_replaced_by_a_crash_is_recovered(tmp_path):
    """The states a crash of `save_checkpoint` can leave on disk, made by hand: the next run repairs them."""
    import shutil

    models, optimizer, scheduler = checkpoint_parts()
    save_checkpoint(str(tmp_path), 2, models, "default", optimizer, scheduler)
    saved = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-2").iterdir()}
    # Crash between the two renames of a replacement: the old copy is aside, the new one still temporary.
    os.replace(tmp_path / "checkpoint-2", tmp_path / f".checkpoint-2.old-{NEVER_A_PID}")
    shutil.copytree(tmp_path / f".checkpoint-2.old-{NEVER_A_PID}", tmp_path / f".checkpoint-2.tmp-{NEVER_A_PID}")
    # A write killed midway, and one of a process that is still running (this test's parent: left alone).
    (tmp_path / f".checkpoint-3.tmp-{NEVER_A_PID}").mkdir()
    (tmp_path / f".checkpoint-3.tmp-{NEVER_A_PID}" / "shifts.safetensors").write_bytes(b"partial")
    (tmp_path / f".checkpoint-4.tmp-{os.getppid()}").mkdir()
    assert list_checkpoints(tmp_path) == []

    assert recover_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".checkpoint-4.tmp-{os.getppid()}", "checkpoint-2"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-2").iterdir()} == saved
    assert resolve_checkpoint("latest", str(tmp_path)) == tmp_path / "checkpoint-2"

    # Crash after the replacement, before the old copy was removed: the old copy goes, the new one stays.
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / f".checkpoint-2.old-{NEVER_A_PID}")
    (tmp_path / "checkpoint-2" / "state.json").write_text('{"global_step": 2, "newer": true}')
    save_checkpoint(str(tmp_path), 5, models, "default", optimizer, scheduler)  # every save recovers first
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".checkpoint-4.tmp-{os.getppid()}", "checkpoint-2",
                                                           "checkpoint-5"]
    assert json.loads((tmp_path / "checkpoint-2" / "state.json").read_text())["newer"] is True


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path):
    models, optimizer, scheduler = checkpoint_parts()
    save_checkpoint(str(tmp_path), 1, models, "default", optimizer, scheduler)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-1").iterdir()}
    with pytest.raises(TypeError, match="not JSON serializable"):  # fails at the last file, state.json
        save_checkpoint(str(tmp_path), 1, models, "default", optimizer, scheduler, extra={"bad": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-1").iterdir()} == before


def test_damaged_or_pickled_checkpoints_are_refused_naming_the_file(tmp_path):
    import pickle
    import shutil

    models, optimizer, scheduler = checkpoint_parts()
    good = save_checkpoint(str(tmp_path), 1, models, "default", optimizer, scheduler)
    truncated = shutil.copytree(good, tmp_path / "truncated")
    data = (truncated / "optimizer.safetensors").read_bytes()
    (truncated / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated.*optimizer.safetensors is damaged or truncated"):
        load_checkpoint(truncated, models, "default", optimizer, scheduler)

    class RunsCode:  # unpickling this would create `marker`
        def __reduce__(self):
            return Path.touch, (tmp_path / "marker",)

    pickled = shutil.copytree(good, tmp_path / "pickled")
    (pickled / "optimizer.safetensors").unlink()
    (pickled / "optimizer.pt").write_bytes(pickle.dumps(RunsCode()))
    before = {name: p.detach().clone() for name, p in models["unet"].named_parameters()}
    with pytest.raises(CheckpointError, match=r"pickled.*no optimizer.safetensors \(it holds optimizer.pt"):
        load_checkpoint(pickled, models, "default", optimizer, scheduler)
    assert not (tmp_path / "marker").exists()
    broken_json = shutil.copytree(good, tmp_path / "broken-json")
    (broken_json / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match="broken-json.*state.json is damaged"):
        load_checkpoint(broken_json, models, "default", optimizer, scheduler)
    assert all(torch.equal(p, before[name]) for name, p in models["unet"].named_parameters())


# ------------------------------------------------------------------------------------------------ data + errors
def test_images_of_mixed_modes_become_rgb(tmp_path):
    folder = write_images(tmp_path / "mixed", count=5, modes=("RGB", "L", "RGBA", "P", "CMYK"))
    transform = ImageTransform(RESOLUTION, center_crop=False, random_flip=True)
    for path in sorted(Path(folder).iterdir()):
        image = load_image(path)
        assert image.mode == "RGB"
        tensor = transform(image, torch.Generator().manual_seed(0))
        assert tensor.shape == (3, RESOLUTION, RESOLUTION) and -1 <= tensor.min() and tensor.max() <= 1
        assert torch.equal(tensor, transform(image, torch.Generator().manual_seed(0)))


def test_center_crop_and_flip():
    array = np.zeros((32, 64, 3), dtype=np.uint8)
    array[:, :16] = 255  # white left quarter, cut away by a center crop
    image = Image.fromarray(array)
    centered = ImageTransform(32, center_crop=True)(image)
    assert centered.max() == -1
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8))
    plain = ImageTransform(32, center_crop=True)(image)
    flipping = ImageTransform(32, center_crop=True, random_flip=True)
    seen = set()
    for seed in range(12):
        out = flipping(image, torch.Generator().manual_seed(seed))
        assert torch.equal(out, plain) or torch.equal(out, plain.flip(-1))
        seen.add(bool(torch.equal(out, plain)))
    assert seen == {True, False}


def test_clear_errors_for_bad_data(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(TrainingDataError, match="holds no images"):
        DreamBoothData([Subject(str(empty), "a photo of sks dog")], ImageTransform(RESOLUTION))
    with pytest.raises(TrainingDataError, match="does not exist"):
        DreamBoothData([Subject(str(tmp_path / "nope"), "a photo of sks dog")], ImageTransform(RESOLUTION))
    broken = tmp_path / "broken"
    write_images(broken, count=1)
    (broken / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(TrainingDataError, match="Cannot read image .*bad.jpg"):
        DreamBoothData([Subject(str(broken), "a photo of sks dog")], ImageTransform(RESOLUTION))
    with pytest.raises(TrainingDataError, match="no identifier token"):
        parse_subject(f"dir={broken},prompt=a photo of dog,class=dog")
    with pytest.raises(TrainingDataError, match="does not contain the identifier token 'zwx'"):
        parse_subject(f"dir={broken},prompt=a photo of sks dog,class=dog,token=zwx")
    with pytest.raises(TrainingDataError, match="no identifier token that the class prompt"):
        train(train_args(tiny_model_dir, tmp_path / "o", "--instance_data_dir", str(broken), "--instance_prompt",
                         "a photo of dog", "--with_prior_preservation", "--class_prompt", "a photo of dog",
                         "--class_data_dir", str(tmp_path / "c")))
    assert parse_subject(f"dir={broken},prompt=a photo of sks dog, on grass,class=dog").token == "sks"


# ------------------------------------------------------------------------------------------------ SDXL
@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    from .tiny_models import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline().save_pretrained(folder)
    return str(folder)


def sdxl_frozen(pipe):
    from diffusers import DDPMScheduler

    return Frozen(pipe.vae, pipe.text_encoder, pipe.tokenizer, DDPMScheduler.from_config(pipe.scheduler.config),
                  text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)


def test_sdxl_text_conditioning_matches_diffusers_pipeline(tiny_sdxl_dir):
    """The trainer encodes prompts exactly as diffusers' SDXL pipeline does (hidden states and pooled embeddings),
    and time ids say (original size, crop (0, 0), target size)."""
    from diffusers import StableDiffusionXLPipeline

    from svdiff_adapter.training.loss import encode_prompts, sdxl_time_ids

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    prompts = ["a photo of sks dog", "a dog"]
    text = encode_prompts(sdxl_frozen(pipe), prompts, "cpu")
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(text.hidden, embeds, rtol=0, atol=0)
    torch.testing.assert_close(text.pooled, pooled, rtol=0, atol=0)
    assert sdxl_time_ids(32, 48, 2, "cpu").tolist() == [[32, 48, 0, 0, 32, 48]] * 2


def test_sdxl_loss_decreases_and_reaches_the_added_conditioning(tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    sa.add_spectral_shift(pipe.unet, sa.SpectralShiftConfig(target_kinds=["linear", "conv2d", "norm"]), "dog",
                          svd_cache=False)
    sa.add_spectral_shift(pipe.text_encoder_2, sa.SpectralShiftConfig(target_kinds=["linear"]), "dog",
                          svd_cache=False)
    data = DreamBoothData([Subject(write_images(tmp_path / "dog"), "a photo of sks dog", class_name="dog")],
                          ImageTransform(RESOLUTION, center_crop=True))
    batch = data.sample(1, torch.Generator().manual_seed(0))
    frozen = sdxl_frozen(pipe)
    optimizer = make_optimizer({"unet": pipe.unet, "text_encoder_2": pipe.text_encoder_2}, "dog", learning_rate=3e-2)
    loss, _ = training_loss(pipe.unet, frozen, batch, torch.Generator().manual_seed(1), train_text_encoder=True)
    loss.backward()
    # The pooled embeddings and time ids feed add_embedding; the second encoder's projection feeds the pooled ones.
    unet_layer = pipe.unet.add_embedding.linear_1
    assert unet_layer.spectral_delta["dog"].grad.abs().max() > 0
    assert pipe.text_encoder_2.text_projection.spectral_delta["dog"].grad.abs().max() > 0
    optimizer.zero_grad()
    assert_loss_decreases(pipe.unet, frozen, batch, optimizer, train_text_encoder=True)


def test_sdxl_training_run_saves_all_three_components(tiny_sdxl_dir, tmp_path):
    """`train` on an SDXL folder: prior images made by the SDXL pipeline, shifts of the UNet and both text encoders
    in one file that loads back into the pipeline with the base weights untouched."""
    instance = write_images(tmp_path / "dog")
    args = train_args(tiny_sdxl_dir, tmp_path / "out", "--instance_data_dir", instance, "--instance_prompt",
                      "a photo of sks dog", "--with_prior_preservation", "--class_data_dir", tmp_path / "class",
                      "--class_prompt", "a photo of dog", "--num_class_images", 2, "--class_inference_steps", 2,
                      "--sample_batch_size", 2, "--max_train_steps", 3, "--train_text_encoder",
                      "--learning_rate", 1e-2, "--validation_prompt", "a photo of sks dog", "--validation_steps", 3,
                      "--num_validation_images", 1, "--validation_inference_steps", 2)
    train(args)
    assert len(list((tmp_path / "class").iterdir())) == 2
    assert len(list((tmp_path / "out" / "validation").iterdir())) == 1
    weights = tmp_path / "out" / sa.DEFAULT_WEIGHT_NAME
    shift = sa.load_shift_file(weights)
    assert set(shift.deltas) == {"unet", "text_encoder", "text_encoder_2"}
    for component, deltas in shift.deltas.items():
        assert any(d.abs().max() > 0 for d in deltas.values()), component

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    base = {name: p.clone() for name, p in pipe.unet.named_parameters()}
    sa.patch_diffusers()
    pipe.load_spectral_shift(str(weights), adapter_name="dog")  # fingerprints match: base weights unchanged
    loaded = sa.get_spectral_shift_state_dict(pipe.text_encoder_2, "dog")
    for name, delta in shift.deltas["text_encoder_2"].items():
        torch.testing.assert_close(loaded[name], delta, rtol=0, atol=0)
    pipe.unload_spectral_shift()
    assert all(torch.equal(p, base[name]) for name, p in pipe.unet.named_parameters())


def test_clear_errors_for_bad_base_model(tmp_path, tiny_model_dir):
    import shutil

    broken = tmp_path / "no-vae"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ValueError, match=r"lacks the component\(s\) \['vae'\]"):
        check_base_model(str(broken))
    shutil.copytree(tiny_model_dir + "/vae", broken / "vae")
    assert check_base_model(str(broken)) == "sd"
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"lacks the component\(s\) \['text_encoder_2', 'tokenizer_2'\]"):
        check_base_model(str(broken))
    index["transformer"] = ["diffusers", "SanaTransformer2DModel"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(NotImplementedError, match="SanaTransformer2DModel.*SD3 / SD3.5, Flux.1"):
        check_base_model(str(broken))
    with pytest.raises(ValueError, match="not a diffusers pipeline"):
        check_base_model(str(tmp_path))


# ------------------------------------------------------------------------------------------------ distributed
@pytest.mark.slow
def test_two_process_ddp_run(tiny_model_dir, tmp_path):
    """Two CPU processes (torchrun + gloo, ~25 s): both ranks end with identical δ, one file is written."""
    out = tmp_path / "out"
    rank0, rank1 = two_process_run(tiny_model_dir, tmp_path, "--resolution", RESOLUTION)
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(v.abs().max() > 0 for v in rank0.values())
    assert [p.name for p in out.iterdir() if p.suffix == ".safetensors"] == [sa.DEFAULT_WEIGHT_NAME]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]


def two_process_run(model_dir, tmp_path, *extra, port=29517, environment=None):
    """Train 2 steps on two CPU processes (torchrun + gloo) into tmp_path/out; returns each rank's δ (and norm
    shifts) after training, as state dicts. Each rank also writes, to tmp_path/rankN.json, how many of its trained
    models' parameters are sharded (DTensors) and how many elements of them it holds locally and in all."""
    instance = write_images(tmp_path / "dog")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys\n"
        "from svdiff_adapter.training import parse_args, train\n"
        "from accelerate import PartialState\n"
        "result = train(parse_args(sys.argv[1:]))\n"
        "assert PartialState().num_processes == 2, PartialState()\n"
        "from safetensors.torch import save_file\n"
        "from svdiff_adapter.training.checkpoint import shift_state\n"
        "rank = PartialState().process_index\n"
        f"save_file(shift_state(result['models'], 'default'), '{tmp_path}/rank%d.safetensors' % rank)\n"
        "import json\n"
        "from torch.distributed.tensor import DTensor\n"
        "params = [p for m in result['models'].values() for p in m.parameters() if isinstance(p, DTensor)]\n"
        "counts = {'sharded': len(params), 'local': sum(p.to_local().numel() for p in params),\n"
        "          'total': sum(p.numel() for p in params)}\n"
        f"open('{tmp_path}/rank%d.json' % rank, 'w').write(json.dumps(counts))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", **(environment or {})}
    # torchrun sets RANK/WORLD_SIZE and ACCELERATE_USE_CPU makes accelerate pick multi-CPU DDP over gloo
    # (`accelerate launch --cpu --num_processes 2` starts one process unless MPI is set up).
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(probe),
               "--pretrained_model_name_or_path", model_dir, "--output_dir", str(tmp_path / "out"), "--seed", "3",
               "--report_to", "none", "--instance_data_dir", instance, "--instance_prompt", "a photo of sks dog",
               "--max_train_steps", "2", "--checkpointing_steps", "2", *map(str, extra)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    from safetensors.torch import load_file

    return load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")


def test_example_script_and_defaults(tiny_model_dir, tmp_path):
    import argparse

    from svdiff_adapter.training import add_train_arguments

    defaults = add_train_arguments(argparse.ArgumentParser()).parse_args(["--pretrained_model_name_or_path", "x"])
    assert (defaults.learning_rate, defaults.learning_rate_1d, defaults.cutmix_prob) == (1e-3, 1e-6, 0.6)
    assert defaults.shift_step_scale == "uniform"
    script = Path(__file__).resolve().parents[1] / "examples" / "train_dreambooth_svdiff.py"
    instance = write_images(tmp_path / "dog")
    completed = subprocess.run(
        [sys.executable, str(script), "--pretrained_model_name_or_path", tiny_model_dir, "--output_dir",
         str(tmp_path / "out"), "--instance_data_dir", instance, "--instance_prompt", "a photo of sks dog",
         "--resolution", str(RESOLUTION), "--max_train_steps", "1", "--report_to", "none", "--seed", "0"],
        capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "out" / sa.DEFAULT_WEIGHT_NAME).is_file()


def test_bf16_mixed_precision_keeps_shifts_fp32(tiny_model_dir, tmp_path):
    instance = write_images(tmp_path / "dog")
    result = train(train_args(tiny_model_dir, tmp_path / "out", "--instance_data_dir", instance, "--instance_prompt",
                              "a photo of sks dog", "--max_train_steps", 2, "--mixed_precision", "bf16",
                              "--gradient_checkpointing"))
    unet = result["models"]["unet"]
    deltas = [p for n, p in unet.named_parameters() if "spectral_delta" in n]
    assert all(p.dtype == torch.float32 for p in deltas) and any(p.abs().max() > 0 for p in deltas)
    assert np.isfinite(result["history"][-1]["loss"])
    from diffusers import UNet2DConditionModel

    fresh = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    sa.load_spectral_shift({"unet": fresh}, tmp_path / "out" / sa.DEFAULT_WEIGHT_NAME, svd_cache=False)


def test_push_to_hub_uploads_shift_card_and_images(tiny_model_dir, tmp_path, hub_api, hub_token, unique_repo_id):
    instance = write_images(tmp_path / "dog")
    train(train_args(tiny_model_dir, tmp_path / "out", "--instance_data_dir", instance, "--instance_prompt",
                     "a photo of sks dog", "--max_train_steps", 1, "--checkpointing_steps", 1,
                     "--validation_prompt", "a photo of sks dog", "--validation_steps", 1,
                     "--num_validation_images", 1, "--validation_inference_steps", 1, "--push_to_hub",
                     "--hub_model_id", unique_repo_id, "--hub_token", hub_token))
    files = set(hub_api.list_repo_files(unique_repo_id))
    assert files == {sa.DEFAULT_WEIGHT_NAME, "README.md", "images/step-000001-0.png"} | ({".gitattributes"} & files)
