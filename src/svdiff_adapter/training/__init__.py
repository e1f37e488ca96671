"""DreamBooth-style training of spectral shifts: data, Cut-Mix-Unmix, the unmix regularisation, the loss, the
optimizer, checkpoints and the loop (`train`). Imported on demand (not by `import svdiff_adapter`). The command-line
options live in `svdiff_cli.train_options` (so that `svdiff train --help` imports no torch) and are re-exported here.
"""

from svdiff_cli.train_options import add_train_arguments, build_parser, check_train_arguments, parse_args

from .attention import (
    AttentionProbsRecorder,
    CrossAttentionStore,
    identifier_token_weights,
    install_attention_recorders,
    unmix_loss,
)
from .checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    recover_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from .cutmix import CutMixSample, cut_mix, cut_mix_prompt, draw_pair
from .data import Batch, DreamBoothData
from .images import (
    MAX_ASPECT_RATIO,
    ImageTransform,
    TrainingDataError,
    check_image_size,
    list_images,
    load_image,
    load_images,
    to_rgb,
)
from .flow import FlowFrozen, flow_matching_loss
from .loop import TrainingInterrupted, main, train
from .loss import Frozen, training_loss
from .optim import make_optimizer, shift_parameters
from .prior import ensure_class_images
from .subjects import Subject, check_identifier, infer_identifier, load_concepts_list, parse_subject


__all__ = [
    "AttentionProbsRecorder", "Batch", "CheckpointError", "CrossAttentionStore", "CutMixSample", "DreamBoothData",
    "FlowFrozen", "Frozen", "ImageTransform", "MAX_ASPECT_RATIO", "Subject", "TrainingDataError", "TrainingInterrupted",
    "add_train_arguments", "build_parser", "check_identifier", "check_image_size", "check_train_arguments",
    "cut_mix", "cut_mix_prompt", "draw_pair", "ensure_class_images", "flow_matching_loss", "identifier_token_weights", "infer_identifier",
    "install_attention_recorders", "list_checkpoints", "list_images", "load_checkpoint", "load_concepts_list",
    "load_image", "load_images", "main", "make_optimizer", "parse_args", "parse_subject", "recover_checkpoints",
    "resolve_checkpoint", "save_checkpoint", "shift_parameters", "to_rgb", "train", "training_loss", "unmix_loss",
]
