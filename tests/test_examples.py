"""Examples that run on tiny models with no network are run as a user would run them."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_load_and_compose_example_passes_its_checks(tmp_path):
    """The example pulls two shifts through a local Hub and checks a = 1 / a = 0 against each shift alone and
    weights (1, 1) against the summed shift; it exits non-zero if one fails."""
    result = subprocess.run([sys.executable, "examples/load_and_compose.py", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "load_and_compose.json").read_text())
    assert summary["columns"] == ["base", "a=0.0", "a=0.25", "a=0.5", "a=0.75", "a=1.0"]
    assert len(summary["checks"]) == 3 and all(summary["checks"].values())
    assert (tmp_path / "load_and_compose.png").stat().st_size > 0
