"""Command-line options of DreamBooth-style spectral-shift training, named as in diffusers'
`examples/dreambooth/train_dreambooth.py` wherever that script has the option.

Imports neither torch nor diffusers: ``svdiff train --help`` builds its parser from this module alone.
"""

from __future__ import annotations

import argparse
import math
from typing import Optional, Sequence


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to an option's help, except for defaults that mean "not set" (None, False), which
    the help text explains."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# Option → (lowest allowed value, whether that value is allowed): checked by `check_train_arguments`.
_AT_LEAST = {
    "resolution": (1, True), "num_class_images": (0, True), "sample_batch_size": (1, True),
    "class_inference_steps": (1, True), "train_batch_size": (1, True), "max_train_steps": (1, True),
    "gradient_accumulation_steps": (1, True), "lr_warmup_steps": (0, True), "lr_num_cycles": (1, True),
    "checkpointing_steps": (0, True), "checkpoints_total_limit": (1, True), "num_validation_images": (1, True),
    "validation_steps": (0, True), "validation_inference_steps": (1, True),
    "learning_rate": (0, False), "learning_rate_1d": (0, True), "prior_loss_weight": (0, True),
    "unmix_weight": (0, True), "adam_weight_decay": (0, True), "adam_epsilon": (0, False),
    "max_grad_norm": (0, True), "lr_power": (0, False), "spectral_rank": (1, True),
    "logit_std": (0, False), "mode_scale": (0, True), "guidance_scale": (0, True), "max_sequence_length": (1, True),
}
# Option → closed interval of allowed values.
_BETWEEN = {"cutmix_prob": (0.0, 1.0), "adam_beta1": (0.0, 1.0), "adam_beta2": (0.0, 1.0)}
# Option → half-open interval [lowest, highest) (a decay of 1 would never move).
_BELOW = {"ema_decay": (0.0, 1.0)}


def check_train_arguments(args: argparse.Namespace) -> None:
    """Refuse numeric options out of range (a batch size of 0, -1 steps, a NaN learning rate ...) before anything is
    loaded; the `ValueError` names the option and the value."""
    for name, (lowest, allowed) in _AT_LEAST.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if not (math.isfinite(value) and (value >= lowest if allowed else value > lowest)):
            bound = f">= {lowest}" if allowed else f"> {lowest}"
            raise ValueError(f"--{name} should be {bound}, got {value}.")
    for name, (lowest, highest) in _BETWEEN.items():
        value = getattr(args, name, None)
        if value is not None and not lowest <= value <= highest:
            raise ValueError(f"--{name} should be in [{lowest:g}, {highest:g}], got {value}.")
    for name, (lowest, highest) in _BELOW.items():
        value = getattr(args, name, None)
        if value is not None and not lowest <= value < highest:
            raise ValueError(f"--{name} should be in [{lowest:g}, {highest:g}), got {value}.")


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every training option to `parser` (used by the example script and by ``svdiff train``)."""
    model = parser.add_argument_group("base model")
    model.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                       help="Hub id or local folder of a Stable Diffusion 1.x/2.x, SDXL, SD3 / SD3.5 or "
                            "Flux.1 pipeline.")
    model.add_argument("--revision", type=str, default=None, help="Revision of the base model on the Hub.")
    model.add_argument("--variant", type=str, default=None, help="Weight variant of the base model, e.g. fp16.")
    model.add_argument("--base_model_id", type=str, default=None,
                       help="Base-model id written into the shift file (default: --pretrained_model_name_or_path).")

    data = parser.add_argument_group("data")
    data.add_argument("--instance_data_dir", type=str, default=None, help="Folder of instance images (one subject).")
    data.add_argument("--instance_prompt", type=str, default=None, help="e.g. 'a photo of sks dog'.")
    data.add_argument("--class_data_dir", type=str, default=None, help="Folder of class images (prior preservation).")
    data.add_argument("--class_prompt", type=str, default=None, help="e.g. 'a photo of dog'.")
    data.add_argument("--subject", action="append", default=None, metavar="SPEC",
                      help="A subject (repeat for several): 'dir=imgs/dog,prompt=a photo of sks dog,class=dog' with "
                           "optional token=, class_dir=, class_prompt=.")
    data.add_argument("--concepts_list", type=str, default=None,
                      help="JSON/YAML list of concepts (instance_data_dir, instance_prompt, class_data_dir, "
                           "class_prompt, optional class and token).")
    data.add_argument("--resolution", type=int, default=512, help="Training resolution (square).")
    data.add_argument("--center_crop", action="store_true", help="Center crop (default: random crop).")
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")

    prior = parser.add_argument_group("prior preservation")
    prior.add_argument("--with_prior_preservation", action="store_true", help="Add the prior-preservation loss.")
    prior.add_argument("--prior_loss_weight", type=float, default=1.0, help="λ, the weight of the prior loss.")
    prior.add_argument("--num_class_images", type=int, default=100,
                       help="Class images wanted per subject; missing ones are generated by the base model.")
    prior.add_argument("--sample_batch_size", type=int, default=4, help="Batch size when generating class images.")
    prior.add_argument("--class_inference_steps", type=int, default=50,
                       help="Denoising steps when generating class images.")
    prior.add_argument("--prior_generation_precision", type=str, default=None, choices=["no", "fp32", "fp16", "bf16"],
                       help="Precision of class-image generation (default: fp16 on GPU, fp32 on CPU).")

    multi = parser.add_argument_group("multi-subject (Cut-Mix-Unmix)")
    multi.add_argument("--cutmix_prob", type=float, default=0.6,
                       help="Probability of a Cut-Mix sample per instance sample (needs 2+ subjects).")
    multi.add_argument("--unmix_weight", type=float, default=0.0,
                       help="Weight of the unmix regularisation on cross-attention maps (0: off).")

    shift = parser.add_argument_group("spectral shifts")
    shift.add_argument("--adapter_name", type=str, default="default", help="Adapter name stored in the file.")
    shift.add_argument("--unet_target_kinds", type=str, default="linear,conv2d,norm",
                       help="Module kinds of the denoiser (UNet or transformer) to shift (linear, conv2d, "
                            "embedding, norm).")
    shift.add_argument("--train_text_encoder", action="store_true",
                       help="Also train text-encoder shifts (the CLIP encoders; T5 always stays frozen).")
    shift.add_argument("--text_encoder_target_kinds", type=str, default="linear,embedding,norm",
                       help="Module kinds of the text encoder to shift.")
    shift.add_argument("--norm_mode", type=str, default="elementwise", choices=["elementwise", "scalar"],
                       help="How norm weights are shifted (see SpectralShiftConfig).")
    shift.add_argument("--spectral_rank", type=int, default=None,
                       help="Shift only the top k singular values of each matrix (a seeded randomized SVD, much faster "
                            "than a full one on large models; see SpectralShiftConfig). Default: the full spectrum.")

    flow = parser.add_argument_group("flow matching (SD3 / SD3.5, Flux.1)")
    flow.add_argument("--weighting_scheme", type=str, default="none",
                      choices=["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"],
                      help="How σ is sampled or the loss weighted, as diffusers' SD3/Flux DreamBooth scripts name them "
                           "(docs/training.md).")
    flow.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal scheme.")
    flow.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the logit_normal scheme.")
    flow.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode scheme.")
    flow.add_argument("--guidance_scale", type=float, default=3.5,
                      help="Flux's guidance embedding during training (guidance-distilled models such as Flux.1-dev).")
    flow.add_argument("--max_sequence_length", type=int, default=None,
                      help="T5 tokens per prompt (default: the pipeline's own, 256 for SD3 and 512 for Flux).")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=1, help="Instance samples per device and step.")
    optim.add_argument("--max_train_steps", type=int, default=500, help="Optimizer steps.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Micro-batches whose gradients make one optimizer step.")
    optim.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute activations in the backward pass (less memory, slower).")
    optim.add_argument("--learning_rate", type=float, default=1e-3, help="Learning rate of 2-D/4-D shifts.")
    optim.add_argument("--learning_rate_1d", type=float, default=1e-6, help="Learning rate of 1-D (norm) shifts.")
    optim.add_argument("--scale_lr", action="store_true",
                       help="Scale the learning rates by accumulation steps × batch size × processes.")
    optim.add_argument("--lr_scheduler", type=str, default="constant",
                       help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", '
                            '"constant_with_warmup".')
    optim.add_argument("--lr_warmup_steps", type=int, default=0, help="Steps of linear learning-rate warm-up.")
    optim.add_argument("--lr_num_cycles", type=int, default=1, help="Restarts of cosine_with_restarts.")
    optim.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    optim.add_argument("--use_8bit_adam", action="store_true", help="AdamW 8-bit (needs bitsandbytes).")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW's β₁.")
    optim.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW's β₂.")
    optim.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW's decoupled weight decay.")
    optim.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW's ε.")
    optim.add_argument("--ema_decay", type=float, default=0.0,
                       help="Keep an exponential moving average of δ with this decay (e.g. 0.99; 0: off) and save "
                            "and validate with it instead of the last step's δ (docs/training.md, 'Moving average').")
    optim.add_argument("--shift_step_scale", type=str, default="uniform", choices=["uniform", "sigma"],
                       help="'sigma': each step of δᵢ is multiplied by σᵢ, so --learning_rate is a relative change "
                            "of the singular values (docs/training.md, 'Step scale').")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0: off).")
    optim.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Autocast precision; shifts, SVD factors and the UNet's base weights stay fp32.")
    optim.add_argument("--seed", type=int, default=None, help="Seed for a reproducible (and resumable) run.")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", type=str, default="svdiff-model",
                        help="Where the shift file, checkpoints and validation images go.")
    output.add_argument("--checkpointing_steps", type=int, default=500,
                        help="Save a checkpoint every N steps (0: only on Ctrl-C).")
    output.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most N checkpoints.")
    output.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help='"latest" or a checkpoint folder to continue from.')
    output.add_argument("--validation_prompt", type=str, default=None,
                        help="Render images of this prompt during training (output_dir/validation/).")
    output.add_argument("--num_validation_images", type=int, default=4, help="Images per validation.")
    output.add_argument("--validation_steps", type=int, default=100, help="Validate every N steps (0: never).")
    output.add_argument("--validation_inference_steps", type=int, default=25,
                        help="Denoising steps of a validation image.")
    output.add_argument("--report_to", type=str, default="tensorboard",
                        help='"tensorboard", "wandb", "all" or "none" (skipped if not installed).')
    output.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, inside --output_dir.")
    output.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to the Hub.")
    output.add_argument("--hub_model_id", type=str, default=None,
                        help="Hub repo to push to (default: the name of --output_dir).")
    output.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the logged-in one).")
    output.add_argument("--svd_cache", type=str, default=None,
                        help='Folder of the SVD cache (default: the shared cache; "none" to disable).')
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train SVDiff spectral shifts, DreamBooth-style.",
                                     formatter_class=DefaultsHelpFormatter)
    return add_train_arguments(parser)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)
