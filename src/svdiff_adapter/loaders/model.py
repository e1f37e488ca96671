"""Model-level spectral-shift I/O: add, load, save, unload shifts on one torch model (a UNet, a text encoder, ...).

Moves data between files and the tuner; all math lives in `svdiff_adapter.tuner.layer`.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Union

import torch
from peft import inject_adapter_in_model
from torch import nn

from ..format import (
    DELTA_SUFFIX,
    FINGERPRINT_LENGTH,
    SpectralShiftFile,
    SpectralShiftFormatError,
    check_finite,
    fingerprints_match,
    load_shift_file,
    save_shift_file,
)
from ..svd import SpectralFactors, compute_factors, weight_matrix
from ..tuner import SpectralShiftConfig, SpectralShiftLayer, remove_spectral_layers, spectral_layers, svd_options
from ..tuner.layer import find_spectral_layer, module_kind, unsupported_reason, uses_factors


ModelOrComponents = Union[nn.Module, Mapping[str, nn.Module]]
# Options saved with a file; everything else in the config is rebuilt from the tensors.
_SAVED_CONFIG_KEYS = ("target_kinds", "norm_mode")
# Hops that wrappers add to a layer's name: other tuners (".base_layer") and torch.compile ("_orig_mod.").
_WRAPPER_HOPS = re.compile(r"\.base_layer(?=\.|$)|(?:^|(?<=\.))_orig_mod\.")


def module_path(layer_name: str) -> str:
    """The user-facing module path of a layer: without the hops of other tuners and of `torch.compile`."""
    return _WRAPPER_HOPS.sub("", layer_name)


def _components(models: ModelOrComponents) -> dict[str, nn.Module]:
    return dict(models) if isinstance(models, Mapping) else {"": models}


def spectral_adapter_names(model: nn.Module) -> list[str]:
    """Names of the spectral adapters held by a model."""
    config = getattr(model, "peft_config", {}) or {}
    return [name for name, cfg in config.items() if getattr(cfg, "peft_type", None) == "SPECTRAL_SHIFT"]


def add_spectral_shift(
    model: nn.Module,
    config: Optional[SpectralShiftConfig] = None,
    adapter_name: str = "default",
    *,
    svd_cache=None,
    progress: Optional[bool] = None,
) -> nn.Module:
    """Add a new (trainable) spectral-shift adapter to `model` in place, computing the needed SVDs.

    Same as `peft.inject_adapter_in_model(config, model, adapter_name)` plus the SVD cache/progress options.
    """
    if adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"Adapter name {adapter_name!r} is already in use; choose another name.")
    with svd_options(cache=svd_cache, progress=progress):
        inject_adapter_in_model(config or SpectralShiftConfig(), model, adapter_name)
    _mark_peft_loaded(model)
    return model


def _mark_peft_loaded(model: nn.Module) -> None:
    # diffusers' model-level adapter methods (set_adapter, set_adapters, ...) refuse to run until this flag is set;
    # its own loaders set it after `inject_adapter_in_model`, as we do.
    if hasattr(type(model), "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = bool(getattr(model, "peft_config", None))


def get_spectral_shift_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Module path → δ of one adapter (detached, float32)."""
    if adapter_name not in spectral_adapter_names(model):
        raise ValueError(f"Unknown spectral adapter {adapter_name!r}; loaded: {spectral_adapter_names(model)}.")
    return {
        # A LoRA wrapping our layer puts it at "<module>.base_layer"; files name the module itself.
        module_path(name): layer.spectral_delta[adapter_name].detach().float().clone()
        for name, layer in spectral_layers(model) if adapter_name in layer.spectral_delta
    }


def layer_fingerprint(layer: SpectralShiftLayer) -> list[float]:
    """Leading singular values of the base weight (or ‖γ‖ and leading γ for elementwise norm shifts)."""
    if layer.uses_factors:
        return fingerprint_from_singular_values(layer.spectral_S[:FINGERPRINT_LENGTH])
    return norm_fingerprint(layer.base_layer.weight)


def fingerprint_from_singular_values(values) -> list[float]:
    """Fingerprint values as stored: 7 significant digits, well inside the match tolerance, and a compact header."""
    return [float(f"{float(v):.7g}") for v in values]


def norm_fingerprint(weight: torch.Tensor) -> list[float]:
    """Fingerprint of a norm weight shifted elementwise (no SVD): ‖γ‖ and the leading elements."""
    values = weight.detach().float().reshape(-1)
    return fingerprint_from_singular_values([values.norm()] + list(values[: FINGERPRINT_LENGTH - 1]))


def to_shift_file(
    models: ModelOrComponents, adapter_name: str = "default", base_model: Optional[str] = None,
    base_revision: Optional[str] = None,
) -> SpectralShiftFile:
    """Collect one adapter of one or several components into a `SpectralShiftFile`."""
    result = SpectralShiftFile(deltas={}, base_model=base_model, base_revision=base_revision)
    for component, model in _components(models).items():
        if adapter_name not in spectral_adapter_names(model):
            continue
        deltas = get_spectral_shift_state_dict(model, adapter_name)
        config = model.peft_config[adapter_name]
        result.deltas[component] = deltas
        result.configs[component] = {key: getattr(config, key) for key in _SAVED_CONFIG_KEYS}
        result.fingerprints[component] = {
            name: layer_fingerprint(find_spectral_layer(model.get_submodule(name))) for name in deltas
        }
    if not result.deltas:
        raise ValueError(f"No component holds a spectral adapter named {adapter_name!r}.")
    return result


def save_spectral_shift(
    path: Union[str, os.PathLike],
    models: ModelOrComponents,
    adapter_name: str = "default",
    *,
    base_model: Optional[str] = None,
    base_revision: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
):
    """Save one adapter as a format-v1 file (atomic write). `models` is a model or `{component: model}`."""
    return save_shift_file(to_shift_file(models, adapter_name, base_model, base_revision), path, dtype=dtype)


def _expected_shift_size(module: nn.Module, norm_mode: str) -> int:
    kind = module_kind(module)
    if not uses_factors(kind, norm_mode):
        return module.weight.numel()
    return min(weight_matrix(module.weight).shape)


def load_spectral_shift_into_model(
    model: nn.Module,
    deltas: Mapping[str, torch.Tensor],
    config: Union[SpectralShiftConfig, Mapping, None] = None,
    adapter_name: str = "default",
    *,
    fingerprints: Optional[Mapping[str, list[float]]] = None,
    svd_cache=None,
    progress: Optional[bool] = None,
) -> None:
    """Load shifts (module path → δ) as adapter `adapter_name`. On any error the model is left as it was.

    Checks, before touching the model: the name is free, every module exists and can be shifted, every δ has the
    right length and is finite, and the base weights match the fingerprints (wrong base model).
    """
    if not isinstance(config, SpectralShiftConfig):
        options = {k: v for k, v in dict(config or {}).items() if k in _SAVED_CONFIG_KEYS}
        config = SpectralShiftConfig(**options)
    if adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"Adapter name {adapter_name!r} is already in use; choose another name or unload it.")
    if not deltas:
        raise SpectralShiftFormatError("No spectral shifts to load for this model.")
    check_finite({"": dict(deltas)})

    existing_layers: dict[str, SpectralShiftLayer] = {}
    raw_modules: dict[str, nn.Module] = {}
    problems = []
    for name, delta in deltas.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such module")
            continue
        layer = find_spectral_layer(module)
        raw = layer.base_layer if layer is not None else (
            module.get_base_layer() if hasattr(module, "get_base_layer") else module
        )
        if module_kind(raw) is None or unsupported_reason(raw):
            problems.append(f"{name}: {unsupported_reason(raw) or type(raw).__name__ + ' cannot be shifted'}")
            continue
        expected = _expected_shift_size(raw, config.norm_mode)
        if delta.ndim != 1 or delta.numel() != expected:
            problems.append(f"{name}: shift has shape {tuple(delta.shape)}, the module needs ({expected},)")
            continue
        raw_modules[name] = raw
        if layer is not None:
            existing_layers[name] = layer
    if problems:
        raise SpectralShiftFormatError(
            f"The spectral shift does not fit this model ({len(problems)} problem(s)): " + "; ".join(problems[:6])
            + (" ..." if len(problems) > 6 else "")
        )

    needs_svd = {
        name: weight_matrix(raw.weight) for name, raw in raw_modules.items()
        if name not in existing_layers and uses_factors(module_kind(raw), config.norm_mode)
    }
    factors = compute_factors(needs_svd, cache=svd_cache, progress=progress, desc=f"SVD for {adapter_name!r}")
    if fingerprints:
        _check_fingerprints(fingerprints, raw_modules, existing_layers, factors, config.norm_mode)

    state_dict = {f"{name}{DELTA_SUFFIX}": delta for name, delta in deltas.items()}
    try:
        with svd_options(cache=svd_cache, progress=progress, factors=factors):
            inject_adapter_in_model(config, model, adapter_name, state_dict=state_dict)
        with torch.no_grad():
            for name, delta in deltas.items():
                target = find_spectral_layer(model.get_submodule(name)).spectral_delta[adapter_name]
                target.copy_(delta.to(target))
    except BaseException:
        remove_spectral_layers(model, [adapter_name])
        _mark_peft_loaded(model)
        raise
    _mark_peft_loaded(model)


def _check_fingerprints(
    fingerprints: Mapping[str, list[float]],
    raw_modules: Mapping[str, nn.Module],
    existing_layers: Mapping[str, SpectralShiftLayer],
    factors: Mapping[str, SpectralFactors],
    norm_mode: str,
) -> None:
    mismatched = []
    for name, expected in fingerprints.items():
        if name not in raw_modules:
            continue
        if name in existing_layers:
            actual = layer_fingerprint(existing_layers[name])
        elif name in factors:
            actual = fingerprint_from_singular_values(factors[name].S[:FINGERPRINT_LENGTH])
        else:
            actual = norm_fingerprint(raw_modules[name].weight)
        if not fingerprints_match(list(expected), actual):
            mismatched.append(name)
    if mismatched:
        raise SpectralShiftFormatError(
            f"Wrong base model: the weights of {len(mismatched)} of {len(fingerprints)} shifted module(s) differ from "
            f"the ones the shift was trained on (singular-value fingerprint mismatch), e.g. {mismatched[:5]}. "
            "Spectral shifts only apply to the exact base model they were trained on."
        )


def load_spectral_shift(
    models: ModelOrComponents,
    source: Union[str, os.PathLike, SpectralShiftFile],
    adapter_name: str = "default",
    *,
    svd_cache=None,
    progress: Optional[bool] = None,
) -> SpectralShiftFile:
    """Load a shift file (v1 or svdiff-pytorch) into a model or `{component: model}`; all or nothing."""
    shift_file = source if isinstance(source, SpectralShiftFile) else load_shift_file(source)
    components = _components(models)
    missing = [c for c in shift_file.components if c not in components]
    if missing:
        raise SpectralShiftFormatError(
            f"The file has shifts for component(s) {missing}, which were not given (have: {list(components)})."
        )
    loaded = []
    try:
        for component, deltas in shift_file.deltas.items():
            load_spectral_shift_into_model(
                components[component], deltas, shift_file.configs.get(component), adapter_name,
                fingerprints=shift_file.fingerprints.get(component), svd_cache=svd_cache, progress=progress,
            )
            loaded.append(component)
    except BaseException:
        for component in loaded:
            remove_spectral_layers(components[component], [adapter_name])
        raise
    return shift_file


def unload_spectral_shift(model: nn.Module, adapter_names: Optional[list[str]] = None) -> None:
    """Remove spectral adapters (default: all). Original modules and weights come back bit for bit."""
    unknown = [n for n in adapter_names or [] if n not in spectral_adapter_names(model)]
    if unknown:
        raise ValueError(f"Unknown spectral adapter(s) {unknown}; loaded: {spectral_adapter_names(model)}.")
    remove_spectral_layers(model, adapter_names)
    _mark_peft_loaded(model)



def set_spectral_build_dtype(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Precision of the U·diag(c)·Vᵀ products that build inference (and fused) weights on `model`.

    float32 (default) or bfloat16 / float16: only the change ΔW is rounded (bfloat16: relative error ~2⁻⁸ of ΔW,
    W itself stays exact), and the build runs about twice as fast on CPUs with bfloat16 instructions (AVX512-BF16,
    AMX) — float16 is for GPUs, most CPUs multiply it slowly. Gradients always use float32; δ = 0 still gives W bit
    for bit and unfuse/unload still restore it exactly. Returns the number of layers changed.
    """
    layers = [layer for _, layer in spectral_layers(model) if layer.uses_factors]
    for layer in layers:
        layer.set_build_dtype(dtype)
    return len(layers)


def enable_spectral_switch_cache(model: nn.Module, enabled: bool = True) -> int:
    """Make changes of adapter weights or of the active set cheap on `model` (for interpolation sweeps).

    Every shifted layer keeps Dᵢ = U·diag(δᵢ)·Vᵀ of each adapter it uses, so a new combination is rebuilt as
    W + Σᵢ wᵢDᵢ plus a correction on the singular values the ReLU clips, instead of a full m·n·k product. Costs one
    weight-sized matrix (in the weight's dtype) per adapter and layer. `enabled=False` frees them. Returns the number
    of layers changed.
    """
    layers = [layer for _, layer in spectral_layers(model) if layer.uses_factors]
    for layer in layers:
        layer.enable_switch_cache(enabled)
    return len(layers)
