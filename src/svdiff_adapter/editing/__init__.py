"""CoSINE single-image editing (docs/editing.md): fine-tune spectral shifts on one image–prompt pair, then edit by
changing the prompt — DDIM inversion, noise injection (η, slerp), sampling. Imported on demand (not by
`import svdiff_adapter`).

The names below are loaded from their submodules on first use, so that building the command-line parser
(`add_edit_arguments`, for ``svdiff edit --help``) imports neither torch nor diffusers.
"""

import importlib


_EXPORTS = {
    "add_edit_arguments": "args", "build_parser": "args", "parse_args": "args",
    "PromptConditioning": "conditioning", "encode_prompts": "conditioning", "is_sdxl": "conditioning",
    "predict_noise": "conditioning",
    "EditResult": "edit", "check_device": "edit", "edit_image": "edit", "load_pipeline": "edit", "main": "edit",
    "finetune_on_image": "finetune",
    "decode_latents": "images", "encode_image": "images", "prepare_image": "images", "side_by_side": "images",
    "ddim_invert": "inversion", "ddim_sample": "inversion", "ddim_schedulers": "inversion",
    "slerp": "noise",
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
