"""Smoke runs of the benchmark scripts (`benchmarks/gpu.sh --cpu`, `factor_location.py --smoke`,
`training.py --flux --smoke`): every step runs and every number is there.

The numbers of a 1/24-width model on a CPU mean nothing; benchmarks/results/dit holds the real CPU run and
benchmarks/results/gpu a GPU run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_runs_on_the_cpu(tmp_path):
    env = dict(os.environ, OUT_DIR=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--cpu"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "dit.json").read_text())
    for rank in (16, 64):
        row = results[f"rank_{rank}"]
        for key in ("cold_load_s", "cached_load_s", "lora_load_s", "build_s", "base_forward_s", "unfused_forward_s",
                    "fused_forward_s", "lora_forward_s"):
            assert row[key] > 0, key
        assert set(row["memory"]) == {"base", "unfused", "fused", "fused-offloaded", "lora"}
        assert all(m["forward_peak_bytes"] > m["baseline_bytes"] for m in row["memory"].values())
    assert results["full_svd_total_s"] > 0 and results["flux_dev_extrapolation"]["full_svd_s"] > 0
    table = (tmp_path / "dit.md").read_text()
    assert "cold load of a whole Flux.1-dev, extrapolated" in table and "fused-offloaded vs base" in table
    locations = json.loads((tmp_path / "factor_location.json").read_text())
    assert [row["location"] for row in locations] == ["device", "cpu", "disk"]
    assert all(row["rank"] == 64 and row["device"] == "cpu" for row in locations)
    training = json.loads((tmp_path / "training_dit.json").read_text())
    assert training["device"] == "cpu" and all(row["step_s"] > 0 for row in training["methods"].values())


def test_factor_location_benchmark_runs_every_location(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "factor_location.py"), "--smoke", "--ranks",
                             "full", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "factor_location.json").read_text())
    assert [row["location"] for row in rows] == ["device", "cpu", "disk"]
    for row in rows:
        assert row["rank"] is None and row["factor_bytes"] > 0 and row["load_s"] > 0
        assert row["steady_forward_s"] > 0 and row["base_forward_s"] > 0
    assert (tmp_path / "factor_location.md").read_text().count("| full |") == 3


def test_flux_training_step_benchmark_runs_every_method(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "training.py"), "--flux", "--smoke", "--steps",
                             "1", "--threads", "1", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "training_dit.json").read_text())
    assert list(results["methods"]) == ["shift_full", "shift_k64", "lora_r16", "full_ft"]
    for method, row in results["methods"].items():
        assert row["step_s"] > 0 and row["steps_peak_rss_bytes"] > 0 and row["trainable_moved"], method
    trainable = {m: r["trainable_params"] for m, r in results["methods"].items()}
    assert trainable["shift_k64"] < trainable["shift_full"] < trainable["lora_r16"] < trainable["full_ft"]
    assert "full-spectrum step / full fine-tuning step" in (tmp_path / "training_dit.md").read_text()
