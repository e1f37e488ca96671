"""`ShiftStudio`: what the web app does to a pipeline, without the web page (docs/app.md).

One pipeline and its loaded shifts are shared by every page the app serves. What a page chooses — the prompt, the
seed, each shift's weight and per-block weights — travels with each request, and a request applies its own weights
and generates under one lock, so two users never see each other's weights. Loading and unloading change the shared
set of shifts (every page sees them after its next refresh).

Every method checks its input first and raises `AppInputError` (a `ValueError` whose message the page shows) with
the pipeline left as it was; the loaders underneath are all or nothing too.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from PIL import Image

# Per-block weights are a UNet feature of diffusers' `set_adapters` (docs/pipelines.md).
BLOCKS = ("down", "mid", "up")
MAX_PROMPT_CHARS = 500
MAX_SEED = 2**31 - 1


class AppInputError(ValueError):
    """Bad input from the page or the API; the message says what to change."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: bounds that keep a shared CPU or GPU responsive."""

    max_steps: int = 100
    max_images: int = 4
    max_size: int = 1024
    max_strip: int = 9
    max_weight: float = 4.0
    max_guidance: float = 30.0


def finite_number(value, what: str, low: float, high: float) -> float:
    """`value` as a float in [low, high], or `AppInputError` naming `what` (NaN, inf, text and None included)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AppInputError(f"{what} should be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise AppInputError(f"{what} should be a finite number, got {value!r}.")
    if not low <= number <= high:
        raise AppInputError(f"{what} should be between {low:g} and {high:g}, got {number:g}.")
    return number


def whole_number(value, what: str, low: int, high: int) -> int:
    """`value` as an int in [low, high] (2.0 is accepted, 2.5 is not), or `AppInputError` naming `what`."""
    number = finite_number(value, what, low, high)
    if number != int(number):
        raise AppInputError(f"{what} should be a whole number, got {value!r}.")
    return int(number)


def check_prompt(prompt, what: str = "The prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise AppInputError(f"{what} is empty: describe the image to make.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise AppInputError(f"{what} is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS} are allowed.")
    return prompt.strip()


class ShiftStudio:
    """A pipeline with spectral-shift methods (`SpectralShiftLoaderMixin`), and what the app does with it.

    Args:
        pipe: the pipeline (e.g. `svdiff_adapter.toyworld.load_toyworld_pipeline()`).
        model_source: the folder or Hub id it came from (training reads the base model from there).
        sampling: default `num_inference_steps` and `guidance_scale`.
        work_dir: where training runs and edits are written.
        svd_cache: the SVD cache for loads (see `svdiff_adapter.svd_options`).
        learning_rate: the default learning rate of training and editing on this model.
    """

    def __init__(self, pipe, *, model_source: Union[str, Path, None] = None, sampling: Optional[Mapping] = None,
                 work_dir: Union[str, Path, None] = None, svd_cache=None, limits: Limits = Limits(),
                 learning_rate: float = 1e-3):
        import tempfile

        self.pipe = pipe
        self.model_source = str(model_source) if model_source is not None else None
        sampling = dict(sampling or {})
        self.default_steps = int(sampling.get("num_inference_steps", 25))
        self.default_guidance = float(sampling.get("guidance_scale", 7.5))
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="svdiff-app-"))
        self.svd_cache = svd_cache
        self.limits = limits
        self.learning_rate = learning_rate
        self.lock = threading.RLock()
        self._edit_count = 0
        unet = getattr(pipe, "unet", None)
        self.native_size = (int(unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
                            if unet is not None else 1024)
        self.has_blocks = unet is not None

    # ------------------------------------------------------------------------------------------------- shifts
    @property
    def shifts(self) -> list[str]:
        """The spectral shifts loaded, in the order they were loaded."""
        with self.lock:
            return list(self.pipe._spectral_names())

    def load(self, source: Union[str, Path], name: Optional[str] = None) -> str:
        """Load a shift from a folder, a file or a Hub id; returns its name (default: the file's folder name)."""
        from ..format import SpectralShiftFormatError
        from ..loaders.model import check_adapter_name

        if not isinstance(source, (str, Path)) or not str(source).strip():
            raise AppInputError("Give a shift to load: a folder, a .safetensors file or a Hub repo id.")
        source = str(source).strip()
        name = (name or "").strip() or self._default_name(source)
        try:
            check_adapter_name(name)
        except ValueError as error:
            raise AppInputError(str(error)) from None
        with self.lock:
            if name in self.shifts:
                raise AppInputError(f"A shift named {name!r} is already loaded; unload it or choose another name.")
            try:
                return self.pipe.load_spectral_shift(source, adapter_name=name, svd_cache=self.svd_cache,
                                                     progress=False)
            except (SpectralShiftFormatError, OSError, ValueError, KeyError) as error:
                raise AppInputError(f"Could not load {source}: {error}") from None

    def _default_name(self, source: str) -> str:
        """The file's stem, or its folder's name for the default file name ("dog/spectral_shift_weights...")."""
        from ..format import DEFAULT_WEIGHT_NAME

        path = Path(source)
        if path.suffix == ".safetensors":
            stem = path.parent.name if path.name == DEFAULT_WEIGHT_NAME else path.stem
        else:
            stem = path.name
        base = "".join(c if c.isalnum() or c in "_-" else "_" for c in stem).lstrip("_") or "shift"
        name, index = base, 2
        while name in self.shifts:
            name, index = f"{base}_{index}", index + 1
        return name

    def unload(self, name: str) -> None:
        with self.lock:
            if name not in self.shifts:
                raise AppInputError(f"No shift named {name!r} is loaded (loaded: {self.shifts}).")
            self.pipe.unload_spectral_shift(name)

    # --------------------------------------------------------------------------------------------- weights
    def check_weights(self, weights: Optional[Mapping[str, float]],
                      block_weights: Optional[Mapping[str, Mapping[str, float]]] = None) -> dict[str, object]:
        """The adapter weights `set_adapters` takes, for every loaded shift (0 for those not given)."""
        weights = dict(weights or {})
        loaded = self.shifts
        unknown = [name for name in list(weights) + list(block_weights or {}) if name not in loaded]
        if unknown:
            raise AppInputError(f"No shift named {unknown[0]!r} is loaded (loaded: {loaded}); it may have been "
                                "unloaded from another page: reload the page.")
        limit = self.limits.max_weight
        checked = {name: finite_number(weights.get(name, 0.0), f"The weight of {name!r}", -limit, limit)
                   for name in loaded}
        if block_weights and not self.has_blocks:
            raise AppInputError("Per-block weights are for UNet pipelines; this pipeline has none.")
        for name, blocks in (block_weights or {}).items():
            bad = [block for block in blocks if block not in BLOCKS]
            if bad:
                raise AppInputError(f"Blocks are {list(BLOCKS)}, got {bad}.")
            multipliers = {block: finite_number(blocks.get(block, 1.0), f"The {block}-block weight of {name!r}", -limit,
                                          limit) for block in BLOCKS}
            if any(value != 1.0 for value in multipliers.values()):
                weight = checked[name]
                per_component = {component: weight for component in self.pipe._spectral_components()}
                per_component["unet"] = {block: weight * value for block, value in multipliers.items()}
                checked[name] = per_component
        return checked

    def _apply(self, weights: Mapping[str, object]) -> None:
        if weights:
            self.pipe.set_adapters(list(weights), weights=list(weights.values()))

    # ------------------------------------------------------------------------------------------ generation
    def check_sampling(self, *, seed=0, steps=None, guidance=None, num_images=1, size=None) -> dict:
        limits = self.limits
        size = self.native_size if size in (None, "", 0) else whole_number(size, "The image size", 8, limits.max_size)
        if size % 8:
            raise AppInputError(f"The image size should be a multiple of 8, got {size}.")
        return dict(
            seed=whole_number(seed, "The seed", 0, MAX_SEED),
            steps=self.default_steps if steps in (None, "") else whole_number(steps, "Steps", 1, limits.max_steps),
            guidance=self.default_guidance if guidance in (None, "") else finite_number(
                guidance, "The guidance scale", 0.0, limits.max_guidance),
            num_images=whole_number(num_images, "The number of images", 1, limits.max_images),
            size=size,
        )

    def _sample(self, prompt: str, options: Mapping) -> list[Image.Image]:
        generator = torch.Generator("cpu").manual_seed(options["seed"])
        with torch.no_grad():
            result = self.pipe(prompt, num_inference_steps=options["steps"], guidance_scale=options["guidance"],
                               num_images_per_prompt=options["num_images"], height=options["size"],
                               width=options["size"], generator=generator)
        return list(result.images)

    def generate(self, prompt: str, *, weights: Optional[Mapping[str, float]] = None,
                 block_weights: Optional[Mapping[str, Mapping[str, float]]] = None, **sampling) -> list[Image.Image]:
        """Images of `prompt` with the given shift weights (inside the ReLU: U·diag(ReLU(σ + Σᵢ wᵢδᵢ))·Vᵀ);
        the same inputs give the same images."""
        prompt = check_prompt(prompt)
        options = self.check_sampling(**sampling)
        with self.lock:
            self._apply(self.check_weights(weights, block_weights))
            return self._sample(prompt, options)

    def interpolation_strip(self, prompt: str, first: str, second: str, *, count: int = 5,
                            **sampling) -> list[tuple[float, Image.Image]]:
        """(α, image) for α from 0 to 1: weights 1 − α for `first` and α for `second` (other shifts 0), one image
        each, the same seed for all. The switch cache makes each step a linear rebuild (docs/pipelines.md)."""
        prompt = check_prompt(prompt)
        count = whole_number(count, "The number of strip images", 2, self.limits.max_strip)
        options = {**self.check_sampling(**sampling), "num_images": 1}
        with self.lock:
            loaded = self.shifts
            for name in (first, second):
                if name not in loaded:
                    raise AppInputError(f"Choose two loaded shifts for the strip (loaded: {loaded}), got {name!r}.")
            if first == second:
                raise AppInputError("Choose two different shifts for the strip.")
            strip = []
            self.pipe.enable_spectral_switch_cache()
            try:
                for index in range(count):
                    alpha = index / (count - 1)
                    self._apply(self.check_weights({first: 1 - alpha, second: alpha}))
                    strip.append((alpha, self._sample(prompt, options)[0]))
            finally:
                self.pipe.disable_spectral_switch_cache()
            return strip

    # --------------------------------------------------------------------------------------------- editing
    def edit(self, image, source_prompt: str, target_prompts: Union[str, Sequence[str]], *, train_steps: int = 100,
             learning_rate: Optional[float] = None, invert: bool = True, slerp_alpha: Optional[float] = None,
             seed: int = 0, steps=None, guidance=None):
        """CoSINE (docs/editing.md): fine-tune shifts on (`image`, `source_prompt`), then sample each target prompt.
        Returns `svdiff_adapter.editing.EditResult`; the pipeline's own shifts are left as they were."""
        from ..editing import edit_image

        image = load_uploaded_image(image)
        source_prompt = check_prompt(source_prompt, "The source prompt")
        targets = [target_prompts] if isinstance(target_prompts, str) else list(target_prompts)
        targets = [check_prompt(t, "A target prompt") for t in targets if isinstance(t, str) and t.strip()]
        if not targets:
            raise AppInputError("Give at least one target prompt (one per line).")
        train_steps = whole_number(train_steps, "Fine-tuning steps", 0, 1000)
        learning_rate = self.learning_rate if learning_rate in (None, "") else finite_number(
            learning_rate, "The learning rate", 1e-7, 1.0)
        if slerp_alpha not in (None, ""):
            slerp_alpha = finite_number(slerp_alpha, "The slerp α", 0.0, 1.0)
        else:
            slerp_alpha = None
        options = self.check_sampling(seed=seed, steps=steps, guidance=guidance)
        with self.lock:
            self._edit_count += 1
            folder = self.work_dir / "edits" / f"edit-{self._edit_count}"
            return edit_image(self.pipe, image, source_prompt, targets, max_train_steps=train_steps,
                              learning_rate=learning_rate, invert=bool(invert), slerp_alpha=slerp_alpha,
                              guidance_scale=options["guidance"], num_inference_steps=options["steps"],
                              seed=options["seed"], output_dir=folder, svd_cache=self.svd_cache, progress=False)


def load_uploaded_image(image) -> Image.Image:
    """An uploaded image (a path or a PIL image) as RGB, or `AppInputError` for anything that is not one."""
    if image is None:
        raise AppInputError("Upload an image first.")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError, TypeError) as error:
        name = Path(str(image)).name
        raise AppInputError(f"{name} is not an image this app can read ({error}).") from None
