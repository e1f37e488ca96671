"""CoSINE single-image editing (from the SVDiff paper; docs/editing.md): fine-tune spectral shifts on one image–prompt
pair, then edit by changing the prompt — inversion with the target prompt (DDIM for UNet pipelines, the flow ODE
backwards for SD3 / Flux), optional noise (η > 0, slerp), sampling with guidance. No fine-tuning per target
prompt."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ..format import DEFAULT_WEIGHT_NAME, SpectralShiftFile, save_shift_file
from ..loaders import load_spectral_shift, spectral_adapter_names, to_shift_file, unload_spectral_shift
from ..tools import read_shift
from ..training.images import load_image
from svdiff_cli.edit_options import parse_args
from .finetune import denoiser_of, finetune_on_image
from .flow import flow_family, flow_invert, flow_sample
from .images import ImageInput, decode_latents, encode_image, prepare_image, save_png, side_by_side
from .inversion import ddim_invert, ddim_sample
from .noise import slerp


SHIFTED_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


@dataclass
class EditResult:
    """What `edit_image` made.

    Attributes:
        images (`list[PIL.Image.Image]`): one edit per target prompt, in order.
        prompts (`list[str]`): the target prompts.
        source (`PIL.Image.Image`): the input as edited (RGB, resized/cropped to multiples of the VAE factor).
        shift (`SpectralShiftFile`, *optional*): the shift used (trained or given); pass it as `shift=` to edit the
            same image again without fine-tuning. None when editing with the base model.
        losses (`list[float]`): the fine-tuning loss per step (empty when no fine-tuning ran).
        files (`dict[str, Path]`): what was written: "input", "edit-0", "edit-1", ..., "side_by_side" and, after
            fine-tuning, "shift".
    """

    images: list[Image.Image]
    prompts: list[str]
    source: Image.Image
    shift: Optional[SpectralShiftFile] = None
    losses: list[float] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def side_by_side(self) -> Image.Image:
        """The input followed by every edit, in one row."""
        return side_by_side([self.source, *self.images])


def _slug(prompt: str, length: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:length].strip("-") or "edit"


def edit_image(
    pipe,
    image: ImageInput,
    source_prompt: Optional[str],
    target_prompts: Union[str, Sequence[str]],
    *,
    shift: Union[str, Path, SpectralShiftFile, None] = None,
    max_train_steps: int = 300,
    learning_rate: float = 1e-3,
    learning_rate_1d: float = 1e-6,
    invert: bool = True,
    eta: float = 0.0,
    slerp_alpha: Optional[float] = None,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
    seed: Optional[int] = None,
    resolution: Optional[int] = None,
    output_dir: Union[str, Path, None] = None,
    adapter_name: str = "cosine",
    svd_cache=None,
    progress: bool = True,
) -> EditResult:
    """Edit one image towards each target prompt with CoSINE.

    1. Fine-tune spectral shifts of the denoiser (UNet or transformer) on (`image`, `source_prompt`) with λ = 0 — or load `shift` (a file,
       a folder holding one, a Hub repo id or a `SpectralShiftFile`) — or, with `max_train_steps=0` and no shift,
       use the base model.
    2. `invert=True`: invert the image latent with each *target* prompt at guidance 1 with the fine-tuned weights
       (z_T): DDIM inversion for UNet pipelines, the flow ODE integrated backwards for SD3 / Flux
       (`flow_invert`). `invert=False`: z_T is Gaussian noise and the shifted weights alone carry the image.
    3. Noise for larger structural edits: `slerp_alpha` replaces z_T by slerp(α, z_T, ε); `eta` > 0 adds fresh
       noise at every sampling step (DDIM's η; for flow models η ≤ 1 mixes noise into the predicted noise).
    4. Sampling with each target prompt and `guidance_scale` (DDIM; Euler steps of the flow for SD3 / Flux, where
       `guidance_scale` is classifier-free guidance for SD3 and the guidance embedding for Flux.1-dev).

    The pipeline is left as it was: the adapter added here is unloaded at the end (`EditResult.shift` keeps it).

    Args:
        pipe: a Stable Diffusion 1.x/2.x, SDXL, SD3 / SD3.5 or Flux.1 pipeline. Fine-tuning needs a float32
            denoiser.
        image: a path or a PIL image (any mode; converted to RGB).
        source_prompt (`str`, *optional*): describes the input; required for fine-tuning.
        target_prompts (`str` or `list[str]`): one edit per prompt.
        shift (*optional*): a shift to use instead of fine-tuning.
        max_train_steps (`int`, defaults to 300): fine-tuning steps (0: no fine-tuning).
        learning_rate, learning_rate_1d (`float`, default 1e-3 and 1e-6): the paper's rates for 2-D/4-D and 1-D
            shifts.
        invert (`bool`, defaults to `True`): start from the DDIM inversion of the image.
        eta (`float`, defaults to 0.0): DDIM's η while sampling.
        slerp_alpha (`float`, *optional*): α in [0, 1] of slerp(α, z_T, ε); needs `invert`.
        guidance_scale (`float`, defaults to 7.5): classifier-free guidance while sampling.
        num_inference_steps (`int`, defaults to 50): DDIM steps of the inversion and of the sampling.
        seed (`int`, *optional*): seeds fine-tuning, ε and the η noise.
        resolution (`int`, *optional*): shorter side of the edited image (default: the denoiser's native size, e.g.
            512 for SD 1.5, 1024 for SDXL, SD3 and Flux); sides are then cropped to multiples of the VAE factor
            (twice it for Flux, whose latents are packed 2×2).
        output_dir (*optional*): write input.png, edit-<i>-<prompt>.png, side_by_side.png and, after fine-tuning,
            spectral_shift_weights.safetensors (each file written atomically).
        adapter_name (`str`, defaults to "cosine"): name of the temporary adapter; must not be in use.
        svd_cache: the SVD cache option of `add_spectral_shift`.
        progress (`bool`, defaults to `True`): progress bars.
    """
    prompts = [target_prompts] if isinstance(target_prompts, str) else list(target_prompts)
    if not prompts:
        raise ValueError("Give at least one target prompt.")
    check_edit_options(max_train_steps=max_train_steps, learning_rate=learning_rate,
                       learning_rate_1d=learning_rate_1d, invert=invert, eta=eta, slerp_alpha=slerp_alpha,
                       guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, resolution=resolution,
                       flow=flow_family(pipe) is not None)
    fine_tune = shift is None and max_train_steps > 0
    if fine_tune and not source_prompt:
        raise ValueError("Fine-tuning needs a source prompt describing the image (or pass a shift to reuse).")
    components = {name: getattr(pipe, name) for name in SHIFTED_COMPONENTS if getattr(pipe, name, None) is not None}
    taken = [name for name, model in components.items() if adapter_name in (getattr(model, "peft_config", None) or {})]
    if taken:
        raise ValueError(f"Adapter name {adapter_name!r} is already in use in {taken}; pass another adapter_name.")

    family = flow_family(pipe)
    factor = pipe.vae_scale_factor
    if resolution is None:
        sample_size = pipe.default_sample_size if family is not None else pipe.unet.config.sample_size
        resolution = (min(sample_size) if isinstance(sample_size, (list, tuple)) else sample_size) * factor
    source = prepare_image(image, factor * (2 if family == "flux" else 1), resolution)
    invert_latents, sample_latents = (flow_invert, flow_sample) if family is not None else (ddim_invert, ddim_sample)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    result = EditResult(images=[], prompts=prompts, source=source)
    try:
        if shift is not None:
            result.shift = load_spectral_shift(components, read_shift(shift), adapter_name, svd_cache=svd_cache)
        elif fine_tune:
            result.losses = finetune_on_image(
                pipe, source, source_prompt, max_train_steps=max_train_steps, learning_rate=learning_rate,
                learning_rate_1d=learning_rate_1d, adapter_name=adapter_name, seed=seed, svd_cache=svd_cache,
                progress=progress)
            result.shift = to_shift_file(dict([denoiser_of(pipe)]), adapter_name,
                                         base_model=getattr(pipe, "name_or_path", None) or None)
        latents = encode_image(pipe, source)
        if invert:
            start = invert_latents(pipe, latents, prompts, num_inference_steps=num_inference_steps, progress=progress)
            if slerp_alpha is not None:
                noise = randn_tensor(start.shape, generator=generator, device=start.device, dtype=start.dtype)
                start = slerp(slerp_alpha, start, noise)
        else:
            start = randn_tensor((len(prompts), *latents.shape[1:]), generator=generator, device=latents.device,
                                 dtype=latents.dtype)
        edited = sample_latents(pipe, start, prompts, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, eta=eta, generator=generator, progress=progress)
        result.images = decode_latents(pipe, edited)
    finally:
        # Only our adapter can carry this name (checked above): leave the pipeline as it came.
        for model in components.values():
            if adapter_name in spectral_adapter_names(model):
                unload_spectral_shift(model, [adapter_name])
    if output_dir is not None:
        result.files = _write_outputs(result, Path(output_dir), save_shift=fine_tune)
    return result


def check_edit_options(*, max_train_steps: int, learning_rate: float, learning_rate_1d: float, invert: bool,
                       eta: float, slerp_alpha: Optional[float], guidance_scale: float, num_inference_steps: int,
                       resolution: Optional[int], flow: bool = False) -> None:
    """Refuse options of `edit_image` that are out of range (the `ValueError` names the option and the value), so
    that ``svdiff edit`` fails before the pipeline is loaded."""
    at_least = {"max_train_steps": (max_train_steps, 0), "num_inference_steps": (num_inference_steps, 1),
                "eta": (eta, 0), "guidance_scale": (guidance_scale, 0), "learning_rate_1d": (learning_rate_1d, 0)}
    if resolution is not None:
        at_least["resolution"] = (resolution, 1)
    for name, (value, lowest) in at_least.items():
        if not (math.isfinite(value) and value >= lowest):
            raise ValueError(f"`{name}` should be >= {lowest} but the value passed is {value}.")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"`learning_rate` should be > 0 but the value passed is {learning_rate}.")
    if slerp_alpha is not None and not invert:
        raise ValueError("`slerp_alpha` interpolates the inverted latent towards noise; it needs inversion "
                         "(without inversion the start is pure noise already).")
    if flow and eta > 1:
        raise ValueError(f"`eta` should be in [0, 1] for flow models (SD3, Flux) but the value passed is {eta}.")
    if slerp_alpha is not None and not 0.0 <= slerp_alpha <= 1.0:
        raise ValueError(f"`slerp_alpha` should be in [0, 1] but the value passed is {slerp_alpha}.")


def check_device(device: Optional[str]) -> torch.device:
    """`device` as a `torch.device` (default: CUDA when available), refused with a clear `ValueError` when it is not
    a device name or this machine does not have it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"Device {device!r} is not a torch device name (e.g. cpu, cuda, cuda:1): {error}") from None
    if parsed.type == "cpu":
        return parsed
    backend = getattr(torch, parsed.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"Device {device!r}: this machine has no {parsed.type} device available to torch "
                         f"{torch.__version__}; use cpu (CLI: --device cpu, or leave --device out).")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"Device {device!r}: this machine has {count} {parsed.type} device(s), numbered from 0.")
    return parsed


def _write_outputs(result: EditResult, folder: Path, *, save_shift: bool) -> dict[str, Path]:
    files = {"input": save_png(result.source, folder / "input.png")}
    for index, (prompt, image) in enumerate(zip(result.prompts, result.images)):
        files[f"edit-{index}"] = save_png(image, folder / f"edit-{index:02d}-{_slug(prompt)}.png")
    files["side_by_side"] = save_png(result.side_by_side, folder / "side_by_side.png")
    if save_shift:
        files["shift"] = folder / DEFAULT_WEIGHT_NAME
        save_shift_file(result.shift, files["shift"])
    return files


def load_pipeline(path: str, *, revision: Optional[str] = None, variant: Optional[str] = None,
                  device: Optional[str] = None):
    """A Stable Diffusion 1.x/2.x, SDXL, SD3 / SD3.5 or Flux.1 pipeline in float32 (fine-tuning trains against
    float32 weights), on `device` (default: CUDA when available), without the safety checker (edits are decoded
    here); other families are refused before anything is loaded."""
    from diffusers import DiffusionPipeline

    from ..training.prepare import absent_components, load_model_index, model_family

    target = check_device(device)
    index = load_model_index(path, revision)
    model_family(index, repr(path))
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    extra.update(absent_components(index))
    pipe = DiffusionPipeline.from_pretrained(path, revision=revision, variant=variant, dtype=torch.float32,
                                             **extra)
    denoiser = "transformer" if flow_family(pipe) is not None else "unet"
    missing = [name for name in (denoiser, "vae", "encode_prompt") if getattr(pipe, name, None) is None]
    if missing:
        raise ValueError(f"{path!r} is a {type(pipe).__name__} without {missing}; editing needs a Stable Diffusion "
                         "1.x/2.x, SDXL, SD3 / SD3.5 or Flux.1 pipeline.")
    return pipe.to(target)


def main(args: Optional[argparse.Namespace] = None) -> EditResult:
    """Entry point of ``svdiff edit`` and examples/single_image_edit.py: parse (if needed), check the options, the
    device and the image, then load the pipeline and edit."""
    from ..training.prepare import svd_cache_option

    if args is None:
        args = parse_args()
    check_edit_options(max_train_steps=args.max_train_steps, learning_rate=args.learning_rate,
                       learning_rate_1d=args.learning_rate_1d, invert=not args.no_inversion, eta=args.eta,
                       slerp_alpha=args.slerp_alpha, guidance_scale=args.guidance_scale,
                       num_inference_steps=args.num_inference_steps, resolution=args.resolution)
    check_device(args.device)
    image = load_image(args.image)  # an unreadable or refused image fails before the (slow) pipeline load
    pipe = load_pipeline(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                         device=args.device)
    return edit_image(
        pipe, image, args.source_prompt, args.target_prompt, shift=args.shift,
        max_train_steps=args.max_train_steps, learning_rate=args.learning_rate,
        learning_rate_1d=args.learning_rate_1d, invert=not args.no_inversion, eta=args.eta,
        slerp_alpha=args.slerp_alpha, guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps, seed=args.seed, resolution=args.resolution,
        output_dir=args.output_dir, svd_cache=svd_cache_option(args))
