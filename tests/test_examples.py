"""Examples that run on tiny models with no network are run as a user would run them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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


def test_the_readmes_model_level_snippet_runs_as_written(tmp_path, monkeypatch):
    """The README's model-level example on the bundled toy-world UNet: executed as a user would paste it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Model level"):]
    snippet = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md (model level)", "exec"), namespace)
    unet = namespace["unet"]
    assert not any("spectral" in name for name in unet.state_dict())  # unloaded: the plain UNet again
    assert (tmp_path / "dog.safetensors").is_file()


def test_the_quickstarts_training_image_grid_shows_the_training_images(tmp_path):
    """The quickstart writes its training images as a grid; they live in one folder per background."""
    import importlib.util

    import numpy as np
    from PIL import Image

    from svdiff_adapter import toyworld
    from svdiff_adapter.toyworld.personalize import write_subject_images

    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    subject = toyworld.get_subject("split_circle")
    for background in ("white", "black"):
        write_subject_images(subject, tmp_path / "instance" / background, 2, [background])
    images = quickstart.training_images(tmp_path)
    assert len(images) == 4
    grid = np.asarray(quickstart.labelled_grid([("training images", images)], []))
    label_width = 300  # the grid's label column; the images follow it
    pixels = grid[:, label_width:label_width + 4 * 128]
    assert (pixels < 200).any(axis=-1).mean() > 0.1  # the subjects and dark backgrounds, not a blank canvas
    with pytest.raises(FileNotFoundError, match="No training images"):
        quickstart.training_images(tmp_path / "empty")
