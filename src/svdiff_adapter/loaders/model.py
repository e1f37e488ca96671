"""Model-level spectral-shift I/O: add, load, save, unload shifts on one torch model (a UNet, a text encoder, ...).

Moves data between files and the tuner; the math lives in `svdiff_adapter.spectral`, the layers in
`svdiff_adapter.tuner`. The pipeline mixin (`loaders.pipeline`) delegates here, one component at a time, as
diffusers' `StableDiffusionLoraLoaderMixin` delegates to the model-level `load_lora_adapter`.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Mapping, Optional, Sequence, Union

import torch
from peft import inject_adapter_in_model
from torch import nn

from ..format import (
    DELTA_SUFFIX,
    TRUNCATION_CONFIG_KEYS,
    SpectralFactorMismatchError,
    SpectralShiftFile,
    SpectralShiftFormatError,
    base_fingerprint,
    check_factor_fingerprints,
    check_finite,
    check_fingerprints,
    factor_fingerprint,
    hub_id_or_none,
    load_shift_file,
    save_shift_file,
)
from ..spectral import weight_matrix
from ..factor_location import check_factor_location
from ..svd import SpectralFactors, TruncatedSVD, compute_factors, factor_dtype_of, resolve_cache, truncation_for
from ..tuner import SpectralShiftConfig, SpectralShiftLayer, remove_spectral_layers, spectral_layers, svd_options
from ..tuner.layer import find_spectral_layer
from ..tuner.model import check_same_truncation
from ..tuner.targets import ShiftTarget, fit_shifts, resolve_targets
from .diffusers_compat import mark_peft_loaded
from .fused_layouts import check_layout, guard_layout_changes


logger = logging.getLogger(__name__)

ModelOrComponents = Union[nn.Module, Mapping[str, nn.Module]]
# Options saved with a file; everything else in the config is rebuilt from the tensors.
SAVED_CONFIG_KEYS = ("target_kinds", "norm_mode")
# Saved too when the spectrum is truncated: they rebuild the same top-k factors at load.
TRUNCATION_KEYS = ("spectral_rank", *TRUNCATION_CONFIG_KEYS)
# Where the truncated factors were computed (a record, not an option): the device types a load retries on.
FACTOR_DEVICES_KEY = "spectral_factor_devices"
# Hops that wrappers add to a layer's name: other tuners (".base_layer") and torch.compile ("_orig_mod.").
_WRAPPER_HOPS = re.compile(r"\.base_layer(?=\.|$)|(?:^|(?<=\.))_orig_mod\.")
# Adapter names become keys of a ParameterDict and parts of parameter names.
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def module_path(layer_name: str) -> str:
    """The user-facing module path of a layer: without the hops of other tuners and of `torch.compile`."""
    return _WRAPPER_HOPS.sub("", layer_name)


def components_of(models: ModelOrComponents) -> dict[str, nn.Module]:
    return dict(models) if isinstance(models, Mapping) else {"": models}


def check_adapter_name(adapter_name) -> None:
    """Adapter names are parts of parameter names: letters, digits, `_` and `-`, not starting with `__`, and not an
    attribute of torch's containers (`"to"`, `"keys"`)."""
    if (not isinstance(adapter_name, str) or not _ADAPTER_NAME.fullmatch(adapter_name)
            or adapter_name.startswith("__") or hasattr(nn.ParameterDict, adapter_name)):
        raise ValueError(
            f"Invalid adapter name {adapter_name!r}: use letters, digits, '_' and '-' (no '.', not empty), not "
            "starting with '__' and not the name of a torch.nn.ParameterDict attribute such as 'to' or 'keys'."
        )


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
    factor_location: str = "auto",
) -> nn.Module:
    """Add a new (trainable) spectral-shift adapter to `model` in place, computing the needed SVDs.

    Same as `peft.inject_adapter_in_model(config, model, adapter_name)` plus the SVD cache/progress options and
    where new factors are kept (`factor_location`: "auto", "device", "cpu" or "disk"; `svdiff_adapter.factor_location`).
    """
    check_adapter_name(adapter_name)
    check_factor_location(factor_location)
    if adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"Adapter name {adapter_name!r} is already in use; choose another name.")
    config = config or SpectralShiftConfig()
    check_layout(model, resolve_targets(model, config))
    try:
        with svd_options(cache=svd_cache, progress=progress, factor_location=factor_location):
            inject_adapter_in_model(config, model, adapter_name)
    except BaseException:
        remove_spectral_layers(model, [adapter_name])  # PEFT registers the config before injection can fail
        mark_peft_loaded(model)
        raise
    mark_peft_loaded(model)
    guard_layout_changes(model)
    return model


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
    """The fingerprint format v1 records for the base weight of a layer."""
    return base_fingerprint(layer.spectral_S, layer.base_layer.weight)


def layer_factor_fingerprint(layer: SpectralShiftLayer) -> list[float]:
    """The factor fingerprint a file records for a layer holding a truncated spectrum."""
    return factor_fingerprint(layer.spectral_U, layer.spectral_Vh)


def to_shift_file(
    models: ModelOrComponents, adapter_name: str = "default", base_model: Optional[str] = None,
    base_revision: Optional[str] = None,
) -> SpectralShiftFile:
    """Collect one adapter of one or several components into a `SpectralShiftFile` (a `base_model` that is a
    local path is dropped: the fingerprints identify the base)."""
    result = SpectralShiftFile(deltas={}, base_model=hub_id_or_none(base_model), base_revision=base_revision)
    for component, model in components_of(models).items():
        if adapter_name not in spectral_adapter_names(model):
            continue
        deltas = get_spectral_shift_state_dict(model, adapter_name)
        config = model.peft_config[adapter_name]
        layers = {name: find_spectral_layer(model.get_submodule(name)) for name in deltas}
        truncated = {name: layer for name, layer in layers.items() if layer.spectral_truncation is not None}
        result.deltas[component] = deltas
        result.configs[component] = {key: getattr(config, key) for key in SAVED_CONFIG_KEYS}
        if config.spectral_rank is not None:
            result.configs[component].update({key: getattr(config, key) for key in TRUNCATION_KEYS})
            result.configs[component][FACTOR_DEVICES_KEY] = sorted(
                {layer.spectral_factors_computed_on for layer in truncated.values()} - {None})
        result.fingerprints[component] = {name: layer_fingerprint(layer) for name, layer in layers.items()}
        if truncated:
            result.factor_fingerprints[component] = {
                name: layer_factor_fingerprint(layer) for name, layer in truncated.items()}
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


def load_spectral_shift_into_model(
    model: nn.Module,
    deltas: Mapping[str, torch.Tensor],
    config: Union[SpectralShiftConfig, Mapping, None] = None,
    adapter_name: str = "default",
    *,
    fingerprints: Optional[Mapping[str, list[float]]] = None,
    require_fingerprints: bool = False,
    svd_cache=None,
    progress: Optional[bool] = None,
    factor_dtype: Union[torch.dtype, str, None] = None,
    factor_fingerprints: Optional[Mapping[str, list[float]]] = None,
    factor_location: str = "auto",
) -> None:
    """Load shifts (module path → δ) as adapter `adapter_name`. On any error the model is left as it was.

    Checks, before touching the model: the name is valid and free, every module exists and can be shifted, every δ
    has the right length and is finite, and the base weights match the fingerprints (wrong base model; with
    `require_fingerprints`, every module must have one). `factor_dtype` (`torch.float16` by default, or
    `torch.float32`) is the storage dtype of new SVD factors, `factor_location` where they are kept
    (`factor_location.py`: "auto", "device", "cpu" or "disk").

    A file's config (a mapping) with `spectral_rank` rebuilds the top-k factors with the file's rank and
    randomized-SVD parameters, never the caller's defaults; their `factor_fingerprints` must then match
    (`SpectralFactorMismatchError` otherwise, after retrying the mismatching modules on the file's device types that
    this machine has and on the CPU; with `require_fingerprints`, every truncated module must have one).
    """
    recorded_devices: list[str] = []
    if not isinstance(config, SpectralShiftConfig):
        recorded_devices = list(dict(config or {}).get(FACTOR_DEVICES_KEY) or [])
        options = {k: v for k, v in dict(config or {}).items() if k in SAVED_CONFIG_KEYS + TRUNCATION_KEYS}
        if factor_dtype is not None:
            options["factor_dtype"] = factor_dtype
        config = SpectralShiftConfig(**options)
    check_adapter_name(adapter_name)
    if adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"Adapter name {adapter_name!r} is already in use; choose another name or unload it.")
    if not deltas:
        raise SpectralShiftFormatError("No spectral shifts to load for this model.")
    check_finite({"": dict(deltas)})
    check_layout(model, deltas)  # before the fit check, whose "no such module" would not name the fix
    targets = fit_shifts(model, deltas, config.norm_mode, rank=config.spectral_rank)
    unchecked = [name for name in deltas if name not in (fingerprints or {})]
    if require_fingerprints and unchecked:
        raise SpectralShiftFormatError(
            f"The file records no base-model fingerprint for {len(unchecked)} module(s), e.g. {unchecked[:3]}, so "
            "nothing could detect a wrong base model. Re-save it with svdiff-adapter, or load its tensors as a "
            "state dict to skip the check."
        )

    existing = {name: layer for name in targets if (layer := find_spectral_layer(model.get_submodule(name)))}
    truncation = config.truncated_svd
    for name, layer in existing.items():
        if targets[name].decomposed:
            check_same_truncation(name, layer, truncation)
    truncated = [name for name, target in targets.items()
                 if target.decomposed and truncation_for(weight_matrix(target.weight).shape, truncation)]
    unchecked = [name for name in truncated if name not in (factor_fingerprints or {})]
    if require_fingerprints and unchecked:
        raise SpectralShiftFormatError(
            f"The file truncates the spectrum (spectral_rank={config.spectral_rank}) but records no factor "
            f"fingerprint for {len(unchecked)} module(s), e.g. {unchecked[:3]}, so nothing could detect factors "
            "rebuilt differently from the ones it was trained with. Re-save it with svdiff-adapter."
        )
    needs_svd = {
        name: weight_matrix(target.weight) for name, target in targets.items()
        if name not in existing and target.decomposed
    }
    factors = compute_factors(needs_svd, cache=svd_cache, progress=progress, desc=f"SVD for {adapter_name!r}",
                              factor_dtype=factor_dtype_of(config.factor_dtype), truncation=truncation,
                              factor_location=factor_location)
    if factor_fingerprints and truncated:
        _match_file_factors(targets, existing, factors, dict(factor_fingerprints), truncation, recorded_devices,
                            svd_cache, factor_dtype_of(config.factor_dtype))
    if fingerprints:
        actual = {}
        for name, target in targets.items():
            if name in existing:
                actual[name] = layer_fingerprint(existing[name])
            else:
                actual[name] = base_fingerprint(factors[name].S if name in factors else None, target.weight)
        check_fingerprints(fingerprints, actual)

    state_dict = {f"{name}{DELTA_SUFFIX}": delta for name, delta in deltas.items()}
    try:
        with svd_options(cache=svd_cache, progress=progress, factors=factors,
                         targets={name: target.module for name, target in targets.items()}):
            inject_adapter_in_model(config, model, adapter_name, state_dict=state_dict)
        with torch.no_grad():
            for name, delta in deltas.items():
                target = find_spectral_layer(model.get_submodule(name)).spectral_delta[adapter_name]
                target.copy_(delta.to(target))
    except BaseException:
        remove_spectral_layers(model, [adapter_name])
        mark_peft_loaded(model)
        raise
    mark_peft_loaded(model)
    guard_layout_changes(model)


def _device_available(device_type: str) -> bool:
    try:
        torch.empty(0, device=device_type)
    except (RuntimeError, AssertionError):
        return False
    return True


def _match_file_factors(targets: Mapping[str, ShiftTarget], existing: Mapping[str, SpectralShiftLayer],
                        factors: dict[str, SpectralFactors], expected: dict[str, list[float]],
                        truncation: TruncatedSVD, recorded_devices: list[str], svd_cache, factor_dtype) -> None:
    """Make the truncated factors those of the file, or raise `SpectralFactorMismatchError`.

    A mismatch means the top-k singular vectors came out rotated (near-equal singular values decomposed with other
    round-off: another device type, library or version). The mismatching modules are decomposed again on each device
    type the file recorded that this machine has, then on the CPU, the reference; matching factors replace the ones
    in `factors` (kept where the first ones were). Factors already held by a layer (shared with loaded adapters) are
    not recomputed.
    """
    def fingerprint_of(name: str) -> list[float]:
        held = existing.get(name)
        return layer_factor_fingerprint(held) if held is not None else factor_fingerprint(factors[name].U,
                                                                                          factors[name].Vh)

    names = [name for name in expected if name in targets and (
        (name in existing and existing[name].spectral_truncation is not None)
        or (name in factors and factors[name].truncation is not None))]
    mismatched = check_factor_fingerprints(expected, {name: fingerprint_of(name) for name in names})
    tried = {name: {existing[name].spectral_factors_computed_on if name in existing else factors[name].computed_on}
             for name in mismatched}
    for device_type in dict.fromkeys([*recorded_devices, "cpu"]):
        retry = [name for name in mismatched if name not in existing and device_type not in tried[name]]
        if not retry or not _device_available(device_type):
            continue
        again = {}
        for location in dict.fromkeys(factors[name].location for name in retry):  # kept where the first ones were
            again.update(compute_factors(
                {name: weight_matrix(targets[name].weight).to(device_type) for name in retry
                 if factors[name].location == location},
                cache=svd_cache, progress=False, factor_dtype=factor_dtype, truncation=truncation,
                factor_location=location))
        still = set(check_factor_fingerprints(
            expected, {name: factor_fingerprint(again[name].U, again[name].Vh) for name in retry}))
        for name in retry:
            tried[name].add(device_type)
            if name not in still:
                kept_on = targets[name].weight.device if again[name].location == "device" else "cpu"
                factors[name] = again[name].to(kept_on)
                logger.info("Top-%d factors of %s rebuilt on %s to match the file.", truncation.rank, name,
                            device_type)
        mismatched = [name for name in mismatched if name not in retry or name in still]
    if mismatched:
        shared = [name for name in mismatched if name in existing]
        made_on = sorted({d for name in mismatched for d in tried[name] if d})
        raise SpectralFactorMismatchError(
            f"The top-{truncation.rank} singular vectors of {len(mismatched)} module(s), e.g. {mismatched[:5]}, come "
            f"out differently here (computed on {made_on}) from the ones the shift was trained with (computed on "
            f"{recorded_devices or 'an unrecorded device'}): their singular values are near-equal, so the round-off "
            "of another device type or library version rotates the vectors, and the shift would act on other "
            "directions of the weights. Load it on a machine with that device type and the same torch version, or "
            "retrain the shift here."
            + (f" Modules {shared[:5]} hold factors shared with adapters loaded before: unload those first."
               if shared else "")
        )


def load_spectral_shift_adapter(
    models: ModelOrComponents,
    source: Union[str, os.PathLike, SpectralShiftFile],
    adapter_name: str = "default",
    *,
    components: Optional[Sequence[str]] = None,
    svd_cache=None,
    progress: Optional[bool] = None,
    factor_dtype: Union[torch.dtype, str, None] = None,
    factor_location: str = "auto",
) -> SpectralShiftFile:
    """Load a shift file (v1 or svdiff-pytorch) into a model or `{component: model}`; all or nothing.

    Args:
        models: a model (for a file of one component, or with `components` naming one) or `{component: model}`.
        source: a file path or a `SpectralShiftFile`.
        components (*optional*): load only these components of the file; the others are skipped, with a log line
            saying so. By default every component of the file must be given.
        factor_dtype (*optional*): storage dtype of new SVD factors (`torch.float16` default, `torch.float32`).
        factor_location (*optional*): where new SVD factors are kept between uses: `"auto"` (default), `"device"`,
            `"cpu"` or `"disk"` (memory-mapped from the SVD cache); see `svdiff_adapter.factor_location`.

    A v1 file must carry a fingerprint for every module it shifts; one without (edited by hand, or written by
    another tool) is refused, because nothing could tell a wrong base model. Shifts given as a state dict
    (`parse_in_memory`) carry none and load unchecked.

    A file trained with a truncated spectrum (`spectral_rank` in its config) is loaded with its own rank and
    randomized-SVD parameters, and must carry a factor fingerprint for every truncated module: factors rebuilt here
    that differ from the recorded ones (beyond round-off) are retried on the CPU and the recorded device types, then
    refused with `SpectralFactorMismatchError` (a `WrongBaseModelError`) naming the modules.
    """
    check_factor_location(factor_location)
    shift_file = source if isinstance(source, SpectralShiftFile) else load_shift_file(source)
    wanted = list(shift_file.components) if components is None else list(components)
    unknown = [c for c in wanted if c not in shift_file.components]
    if unknown:
        raise SpectralShiftFormatError(f"The file has no component(s) {unknown} (it has {shift_file.components}).")
    given = components_of(models)
    if "" in given and len(given) == 1 and len(wanted) == 1:
        given = {wanted[0]: given[""]}  # a bare model for the one component asked for
    missing = [c for c in wanted if c not in given]
    if missing:
        raise SpectralShiftFormatError(
            f"The file has shifts for component(s) {missing}, which were not given (have: {list(given)}); pass "
            "`components=[...]` to load only some of them."
        )
    skipped = [c for c in shift_file.components if c not in wanted]
    if skipped:
        logger.info("Loading %s of the spectral shift; skipped component(s) %s.", wanted, skipped)
    loaded = []
    try:
        for component in wanted:
            load_spectral_shift_into_model(
                given[component], shift_file.deltas[component], shift_file.configs.get(component), adapter_name,
                fingerprints=shift_file.fingerprints.get(component), require_fingerprints=shift_file.source == "v1",
                svd_cache=svd_cache, progress=progress, factor_dtype=factor_dtype,
                factor_fingerprints=shift_file.factor_fingerprints.get(component), factor_location=factor_location,
            )
            loaded.append(component)
    except BaseException:
        for component in loaded:
            remove_spectral_layers(given[component], [adapter_name])
            mark_peft_loaded(given[component])
        raise
    return shift_file


def unload_spectral_shift(model: nn.Module, adapter_names: Optional[list[str]] = None) -> None:
    """Remove spectral adapters (default: all). Original modules and weights come back bit for bit."""
    unknown = [n for n in adapter_names or [] if n not in spectral_adapter_names(model)]
    if unknown:
        raise ValueError(f"Unknown spectral adapter(s) {unknown}; loaded: {spectral_adapter_names(model)}.")
    remove_spectral_layers(model, adapter_names)
    mark_peft_loaded(model)


def set_spectral_shift_build_dtype(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Precision of the U·diag(c)·Vᵀ products that build inference (and fused) weights on `model`.

    float32 (default) or bfloat16 / float16: only the change ΔW is rounded (bfloat16: relative error ~2⁻⁸ of ΔW,
    W itself stays exact), and the build runs faster on CPUs with bfloat16 instructions (docs/performance.md) —
    float16 is for GPUs, most CPUs multiply it slowly. Gradients always use float32; δ = 0 still gives W bit for
    bit and unfuse/unload still restore it exactly. Returns the number of layers changed.
    """
    layers = [layer for _, layer in spectral_layers(model) if layer.uses_factors]
    for layer in layers:
        layer.set_build_dtype(dtype)
    return len(layers)


def set_spectral_factor_location(models: ModelOrComponents, location: str, svd_cache=None) -> int:
    """Keep the SVD factors of every spectral layer of a model (or `{component: model}`) in `location`: `"device"`
    (with the weight), `"cpu"` or `"disk"` (the SVD cache's file, memory-mapped; written first where missing); see
    `svdiff_adapter.factor_location` for what each costs. The values do not change, so neither do outputs. All or
    nothing: an error (e.g. an unwritable cache) leaves every layer as it was. Returns the number of layers."""
    check_factor_location(location)
    if location == "auto":
        raise ValueError("`factor_location='auto'` chooses at load time; here choose 'device', 'cpu' or 'disk'.")
    cache = resolve_cache(svd_cache) if location == "disk" else None
    if location == "disk" and cache is None:
        raise ValueError("factor_location='disk' keeps the factors in the SVD cache's files, but the cache is off; "
                         "pass `svd_cache=True` or a folder.")
    layers = [layer for model in components_of(models).values() for _, layer in spectral_layers(model)
              if layer.uses_factors]
    moved = []
    for layer in layers:
        held = layer.resting_factors()
        if location == "disk":
            moved.append(cache.mapped(weight_matrix(layer._unmerged_weight()), held))
        else:  # off a file's pages into process memory (a copy only where `.to` would keep the mapping)
            device = layer.base_layer.weight.device if location == "device" else torch.device("cpu")
            moved.append(held.to(device, location, copy=held.location == "disk" and device.type == "cpu"))
    for layer, factors in zip(layers, moved):
        layer.set_factor_location(factors)
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


# Earlier names, kept for existing code.
load_spectral_shift = load_spectral_shift_adapter
set_spectral_build_dtype = set_spectral_shift_build_dtype
