"""Command-line options of CoSINE single-image editing (``svdiff edit`` and examples/single_image_edit.py).

Imports neither torch nor diffusers: ``svdiff edit --help`` builds its parser from this module alone.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from .train_options import DefaultsHelpFormatter


def add_edit_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every editing option to `parser`."""
    model = parser.add_argument_group("base model")
    model.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                       help="Hub id or local folder of an SD 1.x/2.x, SDXL, SD3 / SD3.5 or Flux.1 pipeline.")
    model.add_argument("--revision", type=str, default=None, help="Revision of the base model on the Hub.")
    model.add_argument("--variant", type=str, default=None, help="Weight variant of the base model, e.g. fp16.")
    model.add_argument("--device", type=str, default=None,
                       help="Torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available).")

    data = parser.add_argument_group("image and prompts")
    data.add_argument("--image", type=str, required=True, help="The image to edit (any mode; converted to RGB).")
    data.add_argument("--source_prompt", type=str, default=None,
                      help="Describes the image; the shifts are fine-tuned on (image, source prompt).")
    data.add_argument("--target_prompt", type=str, action="append", required=True,
                      help="An edit, e.g. 'a photo of a dog wearing a hat' (repeat for several).")
    data.add_argument("--resolution", type=int, default=None,
                      help="Shorter side of the edited image (default: the UNet's native size, e.g. 512 for SD 1.5).")
    data.add_argument("--output_dir", type=str, required=True,
                      help="Writes input.png, edit-<i>-<prompt>.png, side_by_side.png and the fine-tuned shift.")

    finetune = parser.add_argument_group("fine-tuning (λ = 0)")
    finetune.add_argument("--max_train_steps", type=int, default=300,
                          help="Fine-tuning steps on the one image (0: edit with the base model).")
    finetune.add_argument("--learning_rate", type=float, default=1e-3, help="Learning rate of 2-D/4-D shifts.")
    finetune.add_argument("--learning_rate_1d", type=float, default=1e-6, help="Learning rate of 1-D (norm) shifts.")
    finetune.add_argument("--shift", type=str, default=None,
                          help="Reuse a shift (file, folder, e.g. an earlier --output_dir, or Hub id): no fine-tuning.")
    finetune.add_argument("--svd_cache", type=str, default=None,
                          help='Folder of the SVD cache (default: the shared cache; "none" to disable).')

    sampling = parser.add_argument_group("inversion, noise and sampling")
    sampling.add_argument("--no_inversion", action="store_true",
                          help="Start from Gaussian noise instead of the DDIM inversion of the image.")
    sampling.add_argument("--eta", type=float, default=0.0,
                          help="η while sampling (> 0 adds noise per step; at most 1 for SD3 / Flux).")
    sampling.add_argument("--slerp_alpha", type=float, default=None,
                          help="Replace z_T by slerp(α, z_T, ε), α in [0, 1] (larger: more structural change).")
    sampling.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance while sampling.")
    sampling.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps (inversion and sampling).")
    sampling.add_argument("--seed", type=int, default=None, help="Seeds fine-tuning, ε and the η noise.")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Edit one image with SVDiff's CoSINE: fine-tune spectral shifts on "
                                                 "(image, source prompt), then sample with target prompts.",
                                     formatter_class=DefaultsHelpFormatter)
    return add_edit_arguments(parser)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)
