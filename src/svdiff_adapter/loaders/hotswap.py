"""Hotswap: replace the shifts of a loaded adapter in place (same modules, same tensors), so a `torch.compile`d model
is not recompiled and an optimizer keeps pointing at the same parameters. Model level: a bare model, or the
components of a pipeline (`pipe.load_spectral_shift(..., hotswap=True)` delegates here)."""

from __future__ import annotations

import torch
from torch import nn

from ..format import (
    SpectralFactorMismatchError,
    SpectralShiftFile,
    SpectralShiftFormatError,
    check_factor_fingerprints,
    check_finite,
    check_fingerprints,
)
from ..tuner import SpectralShiftLayer, spectral_layers
from .model import (
    TRUNCATION_KEYS,
    ModelOrComponents,
    components_of,
    layer_factor_fingerprint,
    layer_fingerprint,
    module_path,
    spectral_adapter_names,
)


def hotswap_spectral_shift(models: ModelOrComponents, shift_file: SpectralShiftFile, adapter_name: str) -> None:
    """Copy the shifts of `shift_file` into the loaded adapter `adapter_name`, in place.

    Modules the adapter shifts but the file does not get δ = 0; the adapter keeps its weight and its place in the
    active set. Everything is checked before the first value is copied (same components, modules, shapes and
    norm_mode; not fused; finite; the right base model), so a refused hotswap changes nothing.
    """
    check_finite(shift_file.deltas)
    unchecked = shift_file.unfingerprinted() if shift_file.source == "v1" else []
    if unchecked:
        raise SpectralShiftFormatError(f"Cannot hotswap: the file records no base-model fingerprint for {unchecked[:3]}.")
    models = components_of(models)
    if list(models) == [""] and len(shift_file.components) == 1:
        models = {shift_file.components[0]: models[""]}
    holders = {c: m for c, m in models.items() if adapter_name in spectral_adapter_names(m)}
    if not holders:
        loaded = sorted({n for m in models.values() for n in spectral_adapter_names(m)})
        raise ValueError(
            f"Cannot hotswap into {adapter_name!r}: no spectral shift of that name is loaded (loaded: {loaded}). "
            "Load it first without `hotswap`."
        )
    extra = [c for c in shift_file.components if c not in holders]
    if extra:
        raise ValueError(
            f"Cannot hotswap: the new file shifts component(s) {extra}, which adapter {adapter_name!r} does not."
        )
    plan: list[tuple[SpectralShiftLayer, nn.Parameter, torch.Tensor]] = []
    problems: list[str] = []
    for component, model in holders.items():
        plan += _component_plan(component, model, shift_file, adapter_name, problems)
    if problems:
        raise ValueError(
            f"Cannot hotswap into {adapter_name!r} ({len(problems)} problem(s)): " + "; ".join(problems[:6])
            + (" ..." if len(problems) > 6 else "") + ". Hotswap needs the same modules and shapes."
        )
    with torch.no_grad():  # in place: same tensors, so compiled graphs and optimizers keep pointing at them
        for _, parameter, value in plan:
            parameter.copy_(value.to(device=parameter.device, dtype=parameter.dtype))
    # A graph compiled after an eager forward reads the cached inference weight without re-running the layer's
    # cache check, so rebuild cached weights now, in place (a graph compiled before any forward computes W_δ
    # itself, and eager forwards notice the new δ on their own).
    for layer in dict.fromkeys(layer for layer, _, _ in plan):
        if layer.spectral_cache.weight is not None:
            layer.refresh_spectral_weight()


def _component_plan(component: str, model: nn.Module, shift_file: SpectralShiftFile, adapter_name: str,
                    problems: list[str]) -> list[tuple[SpectralShiftLayer, nn.Parameter, torch.Tensor]]:
    config = model.peft_config[adapter_name]
    prefix = f"{component}." if component else ""
    new_mode = shift_file.configs.get(component, {}).get("norm_mode", config.norm_mode)
    if new_mode != config.norm_mode:
        problems.append(f"{component}: norm_mode {new_mode!r} instead of {config.norm_mode!r}")
    # The same spectrum: a truncated file's δ belongs to the factors its rank and parameters rebuild.
    held = {key: getattr(config, key) for key in TRUNCATION_KEYS} if config.spectral_rank is not None else {}
    file_config = shift_file.configs.get(component, {})
    wanted = {key: file_config.get(key) for key in TRUNCATION_KEYS} if file_config.get("spectral_rank") else {}
    if held != wanted:
        problems.append(f"{component}: spectrum {wanted or 'full'} instead of {held or 'full'}")
    layers = {module_path(name): layer for name, layer in spectral_layers(model) if adapter_name in layer.spectral_delta}
    deltas = shift_file.deltas.get(component, {})
    problems += [f"{prefix}{m}: not shifted by {adapter_name!r}" for m in deltas if m not in layers]
    plan = []
    for module, layer in layers.items():
        if adapter_name in layer.merged_adapters:
            problems.append(f"{prefix}{module}: fused (call `unfuse_spectral_shift()` first)")
        parameter = layer.spectral_delta[adapter_name]
        value = deltas.get(module)
        if value is None:
            value = torch.zeros_like(parameter)
        elif value.shape != parameter.shape:
            problems.append(f"{prefix}{module}: shape {tuple(value.shape)}, needs {tuple(parameter.shape)}")
            continue
        plan.append((layer, parameter, value))
    fingerprints = shift_file.fingerprints.get(component, {})
    if not problems and fingerprints:
        check_fingerprints(fingerprints, {m: layer_fingerprint(layers[m]) for m in deltas if m in fingerprints})
    truncated = [m for m in deltas if m in layers and layers[m].spectral_truncation is not None]
    if not problems and truncated:
        expected = shift_file.factor_fingerprints.get(component, {})
        missing = [m for m in truncated if m not in expected]
        if missing and shift_file.source == "v1":
            raise SpectralShiftFormatError(f"Cannot hotswap: the file records no factor fingerprint for {missing[:3]}.")
        mismatched = check_factor_fingerprints(expected, {m: layer_factor_fingerprint(layers[m]) for m in truncated})
        if mismatched:
            raise SpectralFactorMismatchError(
                f"Cannot hotswap: the top-k singular vectors of {mismatched[:5]} held here differ from the ones the "
                "file was trained with.")
    return plan
