"""Setting up a training run: subjects from the options, the base model's components, prior class images."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from .images import TrainingDataError, load_images
from .prior import ensure_class_images
from .subjects import Subject, check_identifier, load_concepts_list, parse_subject


logger = logging.getLogger(__name__)

REQUIRED_COMPONENTS = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
    # SD3's T5 (text_encoder_3) may be left out, as StableDiffusion3Pipeline allows.
    "sd3": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
    "flux": ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
}
# Transformer families by their transformer class (a pipeline saved from an img2img variant names the same one).
TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
FLOW_FAMILIES = ("sd3", "flux")


def build_subjects(args: argparse.Namespace) -> list[Subject]:
    """Subjects from --instance_data_dir/--instance_prompt, --subject specs or --concepts_list (exactly one)."""
    sources = [bool(args.instance_data_dir), bool(args.subject), bool(args.concepts_list)]
    if sum(sources) != 1:
        raise TrainingDataError("Give exactly one of --instance_data_dir (with --instance_prompt), --subject (one "
                                "or more) or --concepts_list.")
    if args.instance_data_dir:
        if not args.instance_prompt:
            raise TrainingDataError("--instance_data_dir needs --instance_prompt, e.g. 'a photo of sks dog'.")
        if args.with_prior_preservation:
            if not args.class_prompt:
                raise TrainingDataError("--with_prior_preservation needs --class_prompt, e.g. 'a photo of dog'.")
            check_identifier(args.instance_prompt, args.class_prompt)
        return [Subject(args.instance_data_dir, args.instance_prompt, class_data_dir=args.class_data_dir,
                        class_prompt=args.class_prompt)]
    subjects = [parse_subject(spec) for spec in args.subject] if args.subject else load_concepts_list(
        args.concepts_list)
    for index, subject in enumerate(subjects):
        if args.with_prior_preservation:
            if subject.class_prompt is None:
                raise TrainingDataError(f"Subject {subject.instance_data_dir!r} needs class= or class_prompt= for "
                                        "prior preservation.")
            check_identifier(subject.instance_prompt, subject.class_prompt)
            if subject.class_data_dir is None:
                label = (subject.class_name or f"subject{index}").replace(" ", "_")
                subject.class_data_dir = os.path.join(args.output_dir, "class_images", label)
    return subjects


def model_family(index: dict, name: str = "the base model") -> str:
    """The trainer's family of a pipeline from its model_index.json: "sd" (SD 1.x/2.x), "sdxl", "sd3" (SD3 / SD3.5)
    or "flux" (Flux.1); other pipelines are refused naming their class."""
    if "transformer" in index:
        transformer = index.get("transformer") or [None, None]
        family = TRANSFORMER_FAMILIES.get(transformer[-1])
        if family is None:
            raise NotImplementedError(
                f"{name} is a {index.get('_class_name')} with a {transformer[-1]}: training supports the "
                f"transformer-based families {sorted(TRANSFORMER_FAMILIES)} (SD3 / SD3.5, Flux.1) and UNet "
                "pipelines (SD 1.x/2.x, SDXL).")
        return family
    if "unet" not in index:
        raise NotImplementedError(f"{name} ({index.get('_class_name')}) has neither a UNet nor a transformer.")
    return "sdxl" if "text_encoder_2" in index else "sd"


def check_base_model(path: str) -> Optional[str]:
    """A local base-model folder must be a pipeline of a supported family with every part training needs: clear
    errors for missing parts and other families. Returns the family (None for a Hub id, which `from_pretrained`
    checks itself)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{path!r} is not a diffusers pipeline folder (no model_index.json).")
    index = json.loads(index_file.read_text())
    family = model_family(index, repr(path))
    needed = REQUIRED_COMPONENTS[family]
    missing = [c for c in needed if c not in index or not (folder / c).is_dir() or index.get(c) in (None, [None, None])]
    if missing:
        raise ValueError(f"The base model {path!r} lacks the component(s) {missing}; training needs "
                         f"{list(needed)}.")
    return family


def load_model_index(path: str, revision: Optional[str] = None) -> dict:
    """The `model_index.json` of a local pipeline folder or a Hub id (through the Hub cache).

    When the Hub is offline (``HF_HUB_OFFLINE=1``) and the id is not in the local cache, the error says so, instead
    of diffusers' "does not appear to have a file named model_index.json".
    """
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    if not Path(path).is_dir() and path.startswith((".", "/")):  # a path, not a Hub id
        raise FileNotFoundError(f"The base model folder {path!r} does not exist.")
    try:
        return DiffusionPipeline.load_config(path, revision=revision)
    except OSError as error:
        if Path(path).is_dir() or not constants.HF_HUB_OFFLINE:
            raise
        raise OSError(f"{path!r} is not a local folder and is not in the local Hub cache ({constants.HF_HUB_CACHE}), "
                      "and the Hub is offline (HF_HUB_OFFLINE=1), so it cannot be downloaded. Download it once "
                      f"while online (`hf download {path}`), or give a local pipeline folder.") from error


def base_family(args: argparse.Namespace) -> str:
    """The family of `--pretrained_model_name_or_path` (a local folder is checked part by part)."""
    path = args.pretrained_model_name_or_path
    if Path(path).is_dir():
        return check_base_model(path)
    return model_family(load_model_index(path, args.revision), repr(path))


def load_components(args: argparse.Namespace, family: Optional[str] = None):
    """(denoiser_name, denoiser, frozen): the UNet or transformer being trained, under its component name, and the
    parts that feed it — `Frozen` for UNet pipelines (SDXL's second tokenizer and text encoder when there), or
    `FlowFrozen` for SD3 / Flux with the flow-matching options of `args` — all with gradients off."""
    family = family or base_family(args)
    if family in FLOW_FAMILIES:
        return _load_flow_components(args, family)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from .loss import Frozen

    path = args.pretrained_model_name_or_path
    common = {"revision": args.revision}
    weights = {"variant": args.variant, **common}
    frozen = Frozen(
        tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **common),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **weights))
    if family == "sdxl":
        frozen.tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **common)
        frozen.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                            **weights)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights)
    for model in (frozen.text_encoder, frozen.text_encoder_2, frozen.vae, unet):
        if model is not None:
            model.requires_grad_(False)
    return "unet", unet, frozen


def _load_flow_components(args: argparse.Namespace, family: str):
    from .flow import flow_frozen

    # The pipeline's own loader picks every component's class (T5 or not, CLIP with or without projection).
    components = load_base_pipeline(args).components
    frozen = flow_frozen(family, components, weighting_scheme=args.weighting_scheme, logit_mean=args.logit_mean,
                         logit_std=args.logit_std, mode_scale=args.mode_scale, guidance_scale=args.guidance_scale,
                         max_sequence_length=args.max_sequence_length)
    for model in (components["transformer"], frozen.vae, *frozen.text_encoders.values()):
        model.requires_grad_(False)
    return "transformer", components["transformer"], frozen


def load_base_pipeline(args: argparse.Namespace, dtype: torch.dtype = torch.float32, **components):
    """The base model's text-to-image pipeline (its model_index.json's class), safety checker off; `components`
    replace loaded ones (e.g. the UNet being trained)."""
    from diffusers import DiffusionPipeline

    config = load_model_index(args.pretrained_model_name_or_path, args.revision)
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in config else {}
    extra.update(absent_components(config))
    return DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, dtype=dtype, revision=args.revision,
                                             variant=args.variant, **extra, **components)


def absent_components(index: dict) -> dict:
    """None for each component a pipeline was saved without ([null, null] in model_index.json, e.g. SD3 without
    T5): diffusers only loads such a folder when they are passed as None."""
    return {name: None for name, value in index.items() if isinstance(value, list) and value == [None, None]}


def target_kinds(text: str) -> list[str]:
    return [kind.strip() for kind in text.split(",") if kind.strip()]


def svd_cache_option(args):
    value = getattr(args, "svd_cache", None)
    if value is None:
        return None
    return False if str(value).lower() in ("none", "0", "false", "off") else value


def prepare_class_images(args, subjects: list[Subject], accelerator) -> Optional[list]:
    if not args.with_prior_preservation:
        return None
    for subject in subjects:
        if not subject.class_data_dir:
            raise TrainingDataError("--with_prior_preservation needs --class_data_dir.")
    if accelerator.is_main_process:
        def make_pipeline():
            precision = args.prior_generation_precision or ("fp16" if accelerator.device.type == "cuda" else "fp32")
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
            return load_base_pipeline(args, dtype).to(accelerator.device)

        pipeline_holder: dict = {}

        def cached_pipeline():
            if "pipe" not in pipeline_holder:
                pipeline_holder["pipe"] = make_pipeline()
            return pipeline_holder["pipe"]

        for index, subject in enumerate(subjects):
            made = ensure_class_images(
                subject.class_data_dir, subject.class_prompt, args.num_class_images, cached_pipeline,
                resolution=args.resolution, sample_batch_size=args.sample_batch_size,
                num_inference_steps=args.class_inference_steps,
                seed=None if args.seed is None else args.seed + index, progress=accelerator.is_local_main_process)
            if made:
                logger.info("Generated %d class images in %s", made, subject.class_data_dir)
        pipeline_holder.clear()
    accelerator.wait_for_everyone()
    return [load_images(s.class_data_dir, what="class image")[: args.num_class_images] for s in subjects]
