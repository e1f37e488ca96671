"""`SpectralShiftModel`: the PEFT tuner that finds targets, computes their SVD once, and creates layers."""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from typing import Iterator, Mapping, Optional, Union

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn

from ..svd import SpectralFactors, SVDCache, compute_factors, weight_matrix
from .config import SpectralShiftConfig
from .layer import SpectralShiftLayer, find_spectral_layer, layer_class_for, module_kind, unsupported_reason, uses_factors


_SVD_OPTIONS: contextvars.ContextVar[dict] = contextvars.ContextVar("svdiff_svd_options", default={})


@contextlib.contextmanager
def svd_options(
    cache: Union[bool, str, os.PathLike, SVDCache, None] = None,
    progress: Optional[bool] = None,
    factors: Optional[Mapping[str, SpectralFactors]] = None,
) -> Iterator[None]:
    """Options for the SVDs that adapter injection computes (PEFT's functions take no such arguments).

    Args:
        cache: `None`/`True` the default on-disk cache (off with `SVDIFF_SVD_CACHE=0`), `False` none, or a folder.
        progress: show a progress bar (default: only for large models).
        factors: factors already computed, by module name (e.g. by a loader that checked fingerprints).
    """
    token = _SVD_OPTIONS.set({"cache": cache, "progress": progress, "factors": dict(factors or {})})
    try:
        yield
    finally:
        _SVD_OPTIONS.reset(token)


def _raw_module(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def resolve_targets(
    model: nn.Module, config: SpectralShiftConfig, module_names: Optional[set[str]] = None
) -> dict[str, nn.Module]:
    """Module names → raw modules that an adapter with this config (or these explicit names) shifts.

    A module is shifted when it matches `target_modules` (None: all), is not excluded, and its kind is in
    `target_kinds`. Explicitly named modules that cannot be shifted raise; a catch-all never targets them.
    """
    targets: dict[str, nn.Module] = {}
    tuner_prefixes: list[str] = []
    explicit = module_names is not None or config.target_modules is not None
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in tuner_prefixes):
            continue
        if isinstance(module, BaseTunerLayer):
            tuner_prefixes.append(name + ".")
        if module_names is not None:
            if name not in module_names:
                continue
        elif _is_excluded(config, name) or (
            config.target_modules is not None and not check_target_module_exists(config, name)
        ):
            continue
        raw = _raw_module(module)
        kind = module_kind(raw)
        if kind is None or (module_names is None and kind not in config.target_kinds):
            continue
        reason = unsupported_reason(raw)
        if reason is not None:
            if explicit:
                raise ValueError(f"Module {name!r} cannot take a spectral shift: {reason}.")
            continue
        targets[name] = raw
    if module_names is not None:
        missing = sorted(set(module_names) - set(targets))
        if missing:
            raise ValueError(
                f"{len(missing)} module(s) named by the spectral shift are missing from the model or cannot be "
                f"shifted: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            )
    return targets


def _is_excluded(config: SpectralShiftConfig, name: str) -> bool:
    excluded = config.exclude_modules
    if excluded is None:
        return False
    if isinstance(excluded, str):
        return re.fullmatch(excluded, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in excluded)


class SpectralShiftModel(BaseTuner):
    """PEFT tuner for spectral shifts; use it through `peft.inject_adapter_in_model` or `peft.get_peft_model`."""

    prefix: str = "spectral_"
    tuner_layer_cls = SpectralShiftLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config, model_config):
        # `target_modules=None` means "every module of target_kinds", not "look up the model type".
        return peft_config

    def _check_target_module_exists(self, peft_config, key):
        return key in getattr(self, "_spectral_targets", ())

    def inject_adapter(self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False,
                       state_dict=None):
        config = self.peft_config[adapter_name]
        module_names = None
        if state_dict is not None:
            module_names = {key.rsplit("." + self.prefix, 1)[0].removeprefix("_orig_mod.") for key in state_dict}
        targets = resolve_targets(model, config, module_names)
        # Validate every target before the first module is replaced, so a failure leaves the model unchanged.
        needed: dict[str, nn.Module] = {}
        for name, raw in targets.items():
            existing = find_spectral_layer(model.get_submodule(name))
            wants_factors = uses_factors(module_kind(raw), config.norm_mode)
            if existing is not None:
                if adapter_name in existing.spectral_delta:
                    raise ValueError(f"Adapter name {adapter_name!r} is already in use on module {name!r}.")
                if existing.uses_factors != wants_factors:
                    raise ValueError(
                        f"Module {name!r} already holds spectral shifts with another norm_mode; all adapters of one "
                        f"module must use the same norm_mode."
                    )
            elif wants_factors:
                needed[name] = raw
        options = _SVD_OPTIONS.get()
        given = options.get("factors", {})
        to_compute = {name: weight_matrix(raw.weight) for name, raw in needed.items() if name not in given}
        computed = compute_factors(to_compute, cache=options.get("cache"), progress=options.get("progress"),
                                   desc=f"SVD for {adapter_name!r}")
        self._spectral_factors = {name: given.get(name) or computed.get(name) for name in needed}
        self._spectral_targets = set(targets)
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=False,
                                   low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        finally:
            self._spectral_factors = {}

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        existing = find_spectral_layer(target)
        if existing is not None:
            existing.update_layer(adapter_name, init_scale=peft_config.init_scale)
            return
        raw = _raw_module(target)
        new_module = layer_class_for(raw)(raw, self._spectral_factors.get(current_key))
        new_module.update_layer(adapter_name, init_scale=peft_config.init_scale)
        if target is raw:
            self._replace_module(parent, target_name, new_module, target)
            return
        # Another tuner (e.g. LoRA) wraps this module: ours goes innermost so that it sees the raw weight and the
        # outer tuner adds its own term to our output.
        holder = target
        while holder.base_layer is not raw:
            holder = holder.base_layer
        holder.base_layer = new_module


def spectral_layers(model: nn.Module) -> Iterator[tuple[str, SpectralShiftLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, SpectralShiftLayer):
            yield name, module


def remove_spectral_layers(model: nn.Module, adapter_names: Optional[list[str]] = None) -> None:
    """Delete spectral adapters (default: all); layers left without adapters give back the original module.

    A merged layer is unmerged first, so the original weight comes back bit for bit. Other tuners (LoRA) stay.
    """
    for name, layer in list(spectral_layers(model)):
        names = list(layer.spectral_delta) if adapter_names is None else [
            n for n in adapter_names if n in layer.spectral_delta
        ]
        if layer.merged and set(layer.merged_adapters) & set(names):
            layer.unmerge()
        # Deactivate first, so PEFT does not announce a replacement for each deleted active adapter.
        layer.set_adapter([n for n in layer.active_adapters if n not in names])
        for adapter in names:
            layer.delete_adapter(adapter)
        if len(layer.spectral_delta) == 0:
            _replace_in_holder(model, name, layer, layer.base_layer)
    config = getattr(model, "peft_config", None)
    if isinstance(config, dict):
        for adapter in list(config):
            if getattr(config[adapter], "peft_type", None) == "SPECTRAL_SHIFT" and (
                adapter_names is None or adapter in adapter_names
            ):
                del config[adapter]


def _replace_in_holder(model: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, new)
