"""Every private name of diffusers (0.42) this package touches, in one place, each behind a small function.

diffusers' pipelines keep some of their adapter and offload state in private attributes; where our methods must
read or keep that state truthful, they go through here, so a diffusers upgrade is checked in one file.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

from torch import nn


def mark_peft_loaded(model: nn.Module) -> None:
    """diffusers' model-level adapter methods (set_adapter, set_adapters, ...) refuse to run until
    `_hf_peft_config_loaded` is set; its own loaders set it after `inject_adapter_in_model`, as we do."""
    if hasattr(type(model), "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = bool(getattr(model, "peft_config", None))


def forget_peft_config(model: nn.Module) -> None:
    """Leave a model without adapters as diffusers' `unload_lora_weights` leaves it."""
    if hasattr(model, "peft_config"):
        del model.peft_config
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = None


def lora_components(pipe) -> list[str]:
    """The components diffusers' LoRA loader manages (`_lora_loadable_modules`, e.g. unet and text_encoder)."""
    return list(getattr(pipe, "_lora_loadable_modules", ()))


def set_fused_adapter_names(pipe, names: Iterable[str]) -> None:
    """diffusers' `fused_loras` / `num_fused_loras` read the private set `_merged_adapters`; keep it truthful."""
    pipe._merged_adapters = set(names)


def offload_device(pipe) -> Optional[object]:
    """The device accelerate's offload hooks serve (`_offload_device`), or None."""
    return getattr(pipe, "_offload_device", None)


def excluded_from_offload(pipe) -> set[str]:
    """Components the pipeline keeps out of CPU offload (`_exclude_from_cpu_offload`)."""
    return set(getattr(pipe, "_exclude_from_cpu_offload", ()))


@contextlib.contextmanager
def offloading_suspended(pipe):
    """Remove accelerate's CPU-offload hooks while adapters are added or removed, then enable them again.

    Sequential offload keeps weights on the meta device, where neither an SVD nor a module swap can work; diffusers'
    own LoRA loaders do the same (`lora_base._func_optionally_disable_offloading`).
    """
    try:
        from diffusers.loaders.lora_base import _func_optionally_disable_offloading
    except ImportError:  # pragma: no cover - a diffusers without the helper
        yield
        return
    model_offload, sequential_offload, _ = _func_optionally_disable_offloading(pipe)
    try:
        yield
    finally:
        # Back on the device the hooks served (as diffusers' `maybe_free_model_hooks` does); without `device=`
        # diffusers picks the default accelerator, which differs from the user's choice or is missing.
        device = offload_device(pipe)
        if model_offload:
            pipe.enable_model_cpu_offload(device=device)
        elif sequential_offload:
            pipe.enable_sequential_cpu_offload(device=device)
