"""What a run publishes besides the shift file: validation images and the Hub upload."""

from __future__ import annotations

from pathlib import Path

import torch

from ..format import DEFAULT_WEIGHT_NAME
from .subjects import Subject


def run_validation(args, accelerator, models, frozen, step: int, save: bool = True) -> list:
    """Render `--num_validation_images` for `--validation_prompt` into output_dir/validation/ with the models being
    trained (`models`: component → unwrapped model) and the frozen parts; `save=False` only renders (the processes
    other than the main one of a sharded run, whose models need every process)."""
    from diffusers import DPMSolverMultistepScheduler

    from .loss import Frozen
    from .prepare import load_base_pipeline

    components = {**frozen.pipeline_components(), **models}
    pipeline = load_base_pipeline(args, torch.float32, **components)
    if isinstance(frozen, Frozen):  # UNet pipelines sample faster with DPM-Solver; flow models keep their Euler
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(args.seed)
    folder = Path(args.output_dir) / "validation"
    if save:
        folder.mkdir(parents=True, exist_ok=True)
    images = []
    with torch.no_grad():
        for index in range(args.num_validation_images):
            image = pipeline(args.validation_prompt, num_inference_steps=args.validation_inference_steps,
                             height=args.resolution, width=args.resolution, generator=generator).images[0]
            if save:
                image.save(folder / f"step-{step:06d}-{index}.png")
            images.append(image)
    for tracker in accelerator.trackers if save else ():
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step,
                                      dataformats="NHWC")
    return images


def push_output(args, subjects: list[Subject]) -> str:
    """Upload the shift file, a model card and the last validation images (not checkpoints or class images) with
    the loaders' Hub helpers; returns the repo id."""
    try:
        from ..loaders.hub import upload_shift_folder
        from ..loaders.model_card import spectral_shift_model_card
    except ImportError as error:
        raise RuntimeError(f"--push_to_hub needs svdiff_adapter.loaders.hub.upload_shift_folder and "
                           f"loaders.model_card.spectral_shift_model_card, which are not available: {error}. "
                           "The trained shift is saved in the output folder; upload it by hand.") from error
    import shutil
    import tempfile

    output = Path(args.output_dir)
    repo_id = args.hub_model_id or output.resolve().name
    images = sorted((output / "validation").glob("*.png"))[-args.num_validation_images:]
    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        shutil.copy2(output / DEFAULT_WEIGHT_NAME, staging / DEFAULT_WEIGHT_NAME)
        if images:
            (staging / "images").mkdir()
            for image in images:
                shutil.copy2(image, staging / "images" / image.name)
        from ..format import load_shift_file
        from ..loaders.pipelines import PIPELINE_CLASS_NAMES
        from .prepare import load_model_index

        card = spectral_shift_model_card(
            repo_id, base_model=args.base_model_id or args.pretrained_model_name_or_path,
            instance_prompt=subjects[0].instance_prompt, image_paths=[f"images/{p.name}" for p in images],
            adapter_name=args.adapter_name, components=load_shift_file(output / DEFAULT_WEIGHT_NAME).components,
            pipeline_class=load_model_index(args.pretrained_model_name_or_path, args.revision)["_class_name"],
            drop_in_classes=PIPELINE_CLASS_NAMES)
        (staging / "README.md").write_text(card)
        (output / "README.md").write_text(card)
        upload_shift_folder(staging, repo_id, token=args.hub_token)
    return repo_id
