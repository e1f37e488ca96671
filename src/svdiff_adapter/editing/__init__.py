"""CoSINE single-image editing (docs/editing.md): fine-tune spectral shifts on one image–prompt pair, then edit by
changing the prompt — inversion (DDIM, or the flow ODE backwards for SD3 / Flux), noise injection (η, slerp),
sampling. Imported on demand (not by
`import svdiff_adapter`). The command-line options live in `svdiff_cli.edit_options` and are re-exported here.
"""

from svdiff_cli.edit_options import add_edit_arguments, build_parser, parse_args

from .conditioning import PromptConditioning, encode_prompts, is_sdxl, predict_noise
from .edit import EditResult, check_device, edit_image, load_pipeline, main
from .finetune import denoiser_of, finetune_on_image
from .flow import flow_family, flow_invert, flow_sample, flow_sigmas
from .images import decode_latents, encode_image, prepare_image, side_by_side
from .inversion import ddim_invert, ddim_sample, ddim_schedulers
from .noise import slerp


__all__ = [
    "EditResult", "PromptConditioning", "add_edit_arguments", "build_parser", "check_device", "ddim_invert",
    "ddim_sample", "ddim_schedulers", "decode_latents", "denoiser_of", "edit_image", "encode_image", "encode_prompts",
    "finetune_on_image", "flow_family", "flow_invert", "flow_sample", "flow_sigmas", "is_sdxl", "load_pipeline", "main", "parse_args", "predict_noise", "prepare_image",
    "side_by_side", "slerp",
]
