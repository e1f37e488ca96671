"""The moving average of δ (`--ema_decay`, `ShiftAverage`): its recursion against a float64 reference, the saved
shift equal to the average of the run's per-step δ, exact resume, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import svdiff_adapter as sa
from svdiff_adapter.training import CheckpointError, train
from svdiff_adapter.training.optim import ShiftAverage

from .test_training import load_deltas, tiny_model_dir, train_args, write_images  # noqa: F401  (a fixture)


def reference_average(trajectory: list[torch.Tensor], decay: float) -> torch.Tensor:
    """avg₀ = δ₀; after step n, avg ← avg + (1 − d)(δₙ − avg), d = min(decay, (1 + n) / (10 + n)) — in float64."""
    average = trajectory[0].double()
    for n, delta in enumerate(trajectory[1:], start=1):
        d = min(decay, (1 + n) / (10 + n))
        average = average + (1 - d) * (delta.double() - average)
    return average


def test_average_follows_the_recursion_and_is_applied_only_inside():
    parameter = torch.nn.Parameter(torch.zeros(5))
    average = ShiftAverage([("m.layer", parameter)], decay=0.9)
    generator = torch.Generator().manual_seed(0)
    trajectory = [parameter.detach().clone()]
    for _ in range(30):  # past the warm-up, where d reaches the decay
        with torch.no_grad():
            parameter.add_(torch.randn(5, generator=generator))
        trajectory.append(parameter.detach().clone())
        average.update()
    expected = reference_average(trajectory, 0.9).float()
    torch.testing.assert_close(average.state()["m.layer"], expected, rtol=1e-6, atol=1e-6)
    last = parameter.detach().clone()
    with average.applied():
        torch.testing.assert_close(parameter.detach(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(parameter.detach(), last)
    with pytest.raises(ValueError, match="decay"):
        ShiftAverage([("m.layer", parameter)], decay=1.0)


def test_run_saves_the_average_of_its_steps_and_resumes_exactly(tiny_model_dir, tmp_path):
    """3 steps with a checkpoint after each: the file holds the average of the checkpoints' δ (each checkpoint keeps
    the step's own δ), not the last δ; 2 steps resumed to 3 write the same file bit for bit."""
    instance = write_images(tmp_path / "dog")
    common = ("--instance_data_dir", instance, "--instance_prompt", "a photo of sks dog", "--learning_rate", 1e-2,
              "--ema_decay", 0.6, "--checkpointing_steps", 1)
    train(train_args(tiny_model_dir, tmp_path / "full", *common, "--max_train_steps", 3))
    saved = load_deltas(tmp_path / "full" / sa.DEFAULT_WEIGHT_NAME)["unet"]
    steps = [load_file(tmp_path / "full" / f"checkpoint-{k}" / "shifts.safetensors") for k in (1, 2, 3)]
    assert load_file(tmp_path / "full" / "checkpoint-3" / "average.safetensors").keys() == steps[0].keys()
    for key, value in saved.items():
        trajectory = [torch.zeros_like(value)] + [step[f"unet.{key}"] for step in steps]
        torch.testing.assert_close(value, reference_average(trajectory, 0.6).float(), rtol=1e-5, atol=1e-8)
    last = {key: steps[-1][f"unet.{key}"] for key in saved}
    assert any((saved[key] - last[key]).abs().max() > 1e-4 for key in saved)

    train(train_args(tiny_model_dir, tmp_path / "split", *common, "--max_train_steps", 2))
    train(train_args(tiny_model_dir, tmp_path / "split", *common, "--max_train_steps", 3,
                     "--resume_from_checkpoint", "latest"))
    resumed = load_deltas(tmp_path / "split" / sa.DEFAULT_WEIGHT_NAME)["unet"]
    assert all(torch.equal(resumed[key], saved[key]) for key in saved)


def test_average_and_checkpoint_must_agree(tiny_model_dir, tmp_path):
    instance = write_images(tmp_path / "dog")
    common = ("--instance_data_dir", instance, "--instance_prompt", "a photo of sks dog", "--checkpointing_steps", 1)
    train(train_args(tiny_model_dir, tmp_path / "out", *common, "--max_train_steps", 1))
    before = load_file(tmp_path / "out" / sa.DEFAULT_WEIGHT_NAME)
    with pytest.raises(CheckpointError, match="holds no moving average.*keeps one"):
        train(train_args(tiny_model_dir, tmp_path / "out", *common, "--max_train_steps", 2, "--ema_decay", 0.9,
                         "--resume_from_checkpoint", "latest"))
    after = load_file(tmp_path / "out" / sa.DEFAULT_WEIGHT_NAME)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for value in ("1", "-0.1", "nan"):
        with pytest.raises(ValueError, match="--ema_decay"):
            train(train_args(tiny_model_dir, tmp_path / "other", *common, "--ema_decay", value))
