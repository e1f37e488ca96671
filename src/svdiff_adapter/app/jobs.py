"""Training a shift from the web app: the package's trainer (`svdiff_adapter.training.train`, docs/training.md) in a
background thread, with progress the page polls and a cancel that stops it like Ctrl-C (a checkpoint of the last
completed step is kept, and the run can be resumed with `svdiff train --resume_from_checkpoint latest`).
"""

from __future__ import annotations

import shutil
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .studio import AppInputError, ShiftStudio, check_prompt, finite_number, load_uploaded_image, whole_number

MAX_TRAIN_STEPS = 5000
MAX_TRAIN_IMAGES = 64


@dataclass
class TrainingStatus:
    """What the page shows about a run: `state` is "preparing", "running", "done", "cancelled" or "failed"."""

    state: str = "preparing"
    step: int = 0
    total: int = 0
    loss: Optional[float] = None
    message: str = ""
    validation_image: Optional[Path] = None
    weights: Optional[Path] = None
    losses: list[float] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "failed")


class TrainingJob:
    """One training run of a shift named `name` on uploaded images; `start()` runs it in a thread.

    When it finishes, the shift is loaded into the studio under `name`. `cancel()` stops it after the current step.
    A validation image of the instance prompt is drawn every `validation_every` steps (default: four per run).
    """

    def __init__(self, studio: ShiftStudio, images: Sequence, instance_prompt: str, *, name: str,
                 steps: int = 300, learning_rate: Optional[float] = None, prior_preservation: bool = False,
                 class_prompt: Optional[str] = None, num_class_images: int = 20, train_text_encoder: bool = True,
                 validation_every: Optional[int] = None, seed: int = 0):
        from ..loaders.model import check_adapter_name

        if studio.model_source is None:
            raise AppInputError("Training needs the base model's folder or Hub id; this app was given a pipeline "
                                "object without one.")
        self.instance_prompt = check_prompt(instance_prompt, "The instance prompt")
        try:
            check_adapter_name(name)
        except ValueError as error:
            raise AppInputError(str(error)) from None
        if name in studio.shifts:
            raise AppInputError(f"A shift named {name!r} is already loaded; choose another name.")
        if not images:
            raise AppInputError("Upload the images of the subject (a few, 3–10 is typical).")
        if len(images) > MAX_TRAIN_IMAGES:
            raise AppInputError(f"At most {MAX_TRAIN_IMAGES} images per run, got {len(images)}.")
        self.pictures = [load_uploaded_image(image) for image in images]
        self.steps = whole_number(steps, "Training steps", 1, MAX_TRAIN_STEPS)
        self.learning_rate = studio.learning_rate if learning_rate in (None, "") else finite_number(
            learning_rate, "The learning rate", 1e-7, 1.0)
        self.class_prompt = check_prompt(class_prompt, "The class prompt") if prior_preservation else None
        self.num_class_images = whole_number(num_class_images, "Class images", 1, 1000)
        # A validation image four times per run unless told otherwise (0: never).
        self.validation_every = max(1, self.steps // 4) if validation_every is None else whole_number(
            validation_every, "Validate every", 0, MAX_TRAIN_STEPS)
        self.seed = whole_number(seed, "The seed", 0, 2**31 - 1)
        self.train_text_encoder = bool(train_text_encoder)
        self.studio, self.name = studio, name
        self.folder = studio.work_dir / "training" / name
        self.status = TrainingStatus(total=self.steps)
        self._cancel = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def arguments(self) -> list[str]:
        """The `svdiff train` command line of this run."""
        argv = [
            "--pretrained_model_name_or_path", self.studio.model_source,
            "--instance_data_dir", str(self.folder / "instance"), "--instance_prompt", self.instance_prompt,
            "--output_dir", str(self.folder / "output"), "--resolution", str(self.studio.native_size),
            "--train_batch_size", str(min(4, len(self.pictures))), "--max_train_steps", str(self.steps),
            "--learning_rate", str(self.learning_rate), "--adapter_name", self.name, "--seed", str(self.seed),
            "--report_to", "none", "--checkpointing_steps", "0",
            "--validation_prompt", self.instance_prompt, "--validation_steps", str(self.validation_every),
            "--num_validation_images", "1",
        ]
        if self.train_text_encoder:
            argv.append("--train_text_encoder")
        if self.class_prompt:
            argv += ["--with_prior_preservation", "--class_prompt", self.class_prompt,
                     "--class_data_dir", str(self.folder / "class"), "--num_class_images", str(self.num_class_images)]
        return argv

    def start(self) -> "TrainingJob":
        if self.folder.exists():
            shutil.rmtree(self.folder)
        (self.folder / "instance").mkdir(parents=True)
        for index, picture in enumerate(self.pictures):
            picture.save(self.folder / "instance" / f"image-{index:03d}.png")
        self._thread = threading.Thread(target=self._run, name=f"train-{self.name}", daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()
        if not self.status.finished:
            self.status.message = "Stopping after this step…"

    def join(self, timeout: Optional[float] = None) -> TrainingStatus:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status

    def _on_step(self, step: int, logs: dict) -> None:
        status = self.status
        status.state, status.step, status.loss = "running", step, float(logs["loss"])
        status.losses.append(status.loss)
        shots = sorted((self.folder / "output" / "validation").glob("step-*.png"))
        status.validation_image = shots[-1] if shots else None
        if self._cancel.is_set():
            raise KeyboardInterrupt

    def _run(self) -> None:
        from ..training import TrainingInterrupted, parse_args, train

        status = self.status
        try:
            if self._cancel.is_set():
                raise KeyboardInterrupt
            status.message = "Preparing (class images, SVDs)…" if self.class_prompt else "Preparing (SVDs)…"
            result = train(parse_args(self.arguments()), step_callback=self._on_step)
            status.weights = Path(result["weights"])
            self.studio.load(status.weights, self.name)
            status.state, status.message = "done", f"Done: {self.name!r} is loaded ({status.step} steps)."
        except TrainingInterrupted as stopped:
            status.state = "cancelled"
            status.message = f"Cancelled at step {stopped.global_step}" + (
                f"; checkpoint {stopped.checkpoint}." if stopped.checkpoint else ".")
        except KeyboardInterrupt:
            status.state, status.message = "cancelled", "Cancelled before training started."
        except Exception as error:  # shown on the page; the traceback goes to the server's log
            traceback.print_exc()
            status.state, status.message = "failed", f"Training failed: {error}"
