"""DreamBooth-style training of spectral shifts: data, Cut-Mix-Unmix, the unmix regularisation, the loss, the
optimizer, checkpoints and the loop (`train`). Imported on demand (not by `import svdiff_adapter`).

The names below are loaded from their submodules on first use, so that building the command-line parser
(`add_train_arguments`, for ``svdiff train --help``) imports neither torch nor diffusers.
"""

import importlib


_EXPORTS = {
    "add_train_arguments": "args", "build_parser": "args", "check_train_arguments": "args", "parse_args": "args",
    "AttentionProbsRecorder": "attention", "CrossAttentionStore": "attention",
    "identifier_token_weights": "attention", "install_attention_recorders": "attention", "unmix_loss": "attention",
    "CheckpointError": "checkpoint", "list_checkpoints": "checkpoint", "load_checkpoint": "checkpoint",
    "recover_checkpoints": "checkpoint", "resolve_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "CutMixSample": "cutmix", "cut_mix": "cutmix", "cut_mix_prompt": "cutmix", "draw_pair": "cutmix",
    "Batch": "data", "DreamBoothData": "data",
    "ImageTransform": "images", "MAX_ASPECT_RATIO": "images", "TrainingDataError": "images",
    "check_image_size": "images", "list_images": "images", "load_image": "images", "load_images": "images",
    "to_rgb": "images",
    "TrainingInterrupted": "loop", "main": "loop", "train": "loop",
    "Frozen": "loss", "training_loss": "loss",
    "make_optimizer": "optim", "shift_parameters": "optim",
    "ensure_class_images": "prior",
    "Subject": "subjects", "check_identifier": "subjects", "infer_identifier": "subjects",
    "load_concepts_list": "subjects", "parse_subject": "subjects",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
