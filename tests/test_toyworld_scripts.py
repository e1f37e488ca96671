"""Smoke runs of the toy world's training scripts (examples/toyworld/train_base_model.py, train_pair_model.py) on
tiny schedules: they write loadable pipelines, resume from their checkpoints, and save one when stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from svdiff_adapter import toyworld as tw

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "examples" / "toyworld"


def run_script(name: str, *options, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, options)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_base_model_script_trains_every_phase_and_finds_the_finished_run(tmp_path):
    options = ("--out", tmp_path, "--num-images", 64, "--vae-steps", 2, "--vae-batch-size", 4, "--unet-steps", 2,
               "--batch-size", 4, "--eval-every", 0, "--sweep-prompts", 2, "--eval-prompts", 2, "--guidance", 3,
               "--inference-steps", 2, "--threads", 1)
    result = run_script("train_base_model.py", *options)
    assert result.returncode == 0, result.stderr[-3000:]
    pipe = tw.load_toyworld_pipeline(tmp_path / "pipeline")
    assert pipe.unet is not None and pipe.vae is not None
    log = (tmp_path / "training_log.txt").read_text()
    assert "vae: done, 2 steps" in log and "unet: done, 2 steps" in log
    assert json.loads((tmp_path / "checkpoints" / "unet_done.json").read_text())["steps"] == 2
    again = run_script("train_base_model.py", *options)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (tmp_path / "training_log.txt").read_text()
    assert "vae: already trained" in log and "unet: already trained" in log


@pytest.mark.slow
def test_pair_model_script_saves_a_checkpoint_when_stopped_and_resumes(tmp_path):
    """SIGTERM once the first checkpoint exists: the script saves the step it reached and exits 130; the same
    command resumes from there and finishes."""
    options = ("--out", tmp_path, "--steps", 40, "--batch-size", 2, "--checkpoint-minutes", 0, "--log-every", 1,
               "--eval-prompts", 2, "--threads", 1)
    process = subprocess.Popen([sys.executable, str(SCRIPTS / "train_pair_model.py"), *map(str, options)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "checkpoints" / "model.safetensors"
    try:
        deadline = time.monotonic() + 600
        while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert process.poll() is None, "the run ended before it could be stopped"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-3000:]
    log = (tmp_path / "training_log.txt").read_text()
    stopped = int(log.split("pairs: interrupted at step ")[1].split(";")[0])
    assert 1 <= stopped < 40
    result = run_script("train_pair_model.py", *options)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "training_log.txt").read_text()
    assert f"pairs: resumed at step {stopped}" in log and "trained 40 steps" in log
    assert tw.load_toyworld_pipeline(tmp_path / "pipeline").unet is not None
    assert (tmp_path / "metrics.json").is_file()
