"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`, which puts this folder on sys.path)."""

from __future__ import annotations

import gc
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from svdiff_adapter.tuner import spectral_layers


def timed(function):
    """(seconds, result) of one call, after a garbage collection."""
    gc.collect()
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def median_time(function, repeats):
    """Median seconds of `repeats` calls after one warm-up call (which builds caches)."""
    function()
    return statistics.median(timed(function)[0] for _ in range(repeats))


def lora_state_dict(model, module_names, prefix, rank=4):
    """A random rank-`rank` LoRA on the given modules in diffusers' key layout (`<prefix>.<module>.lora_A.weight`).

    The probe adapter is stripped again, so the model is left as it was.
    """
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(module_names), init_lora_weights=False)
    inject_adapter_in_model(config, model, "lora_probe")
    state = get_peft_model_state_dict(model, adapter_name="lora_probe")
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attribute, module.get_base_layer())
    del model.peft_config
    if hasattr(type(model), "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False
    return {f"{prefix}.{key}": value.contiguous() for key, value in state.items()}


def randomize_shifts(model, adapter, scale=0.02, seed=0):
    """δ ~ N(0, (scale·mean σ)²) for every spectral layer of `model` holding `adapter`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in spectral_layers(model):
            if adapter in layer.spectral_delta:
                base = float(layer.spectral_S.mean()) if layer.uses_factors else 1.0
                layer.spectral_delta[adapter].copy_(torch.randn(layer.shift_size, generator=generator) * scale * base)
