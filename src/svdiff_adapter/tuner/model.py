"""`SpectralShiftModel`: the PEFT tuner that finds targets, computes their SVD once, and creates layers."""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Mapping, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from peft.tuners.tuners_utils import set_adapter as peft_set_adapter
from torch import nn

from ..factor_location import check_factor_location
from ..spectral import weight_matrix
from ..svd import SpectralFactors, SVDCache, compute_factors, factor_dtype_of, truncation_for
from .layer import SpectralShiftLayer, find_spectral_layer, layer_class_for
from .targets import is_excluded, module_kind, raw_module, resolve_targets, uses_factors


_SVD_OPTIONS: contextvars.ContextVar[dict] = contextvars.ContextVar("svdiff_svd_options", default={})


@contextlib.contextmanager
def svd_options(
    cache: Union[bool, str, os.PathLike, SVDCache, None] = None,
    progress: Optional[bool] = None,
    factors: Optional[Mapping[str, SpectralFactors]] = None,
    targets: Optional[Mapping[str, nn.Module]] = None,
    factor_location: str = "auto",
) -> Iterator[None]:
    """Options for the SVDs that adapter injection computes (PEFT's functions take no such arguments).

    Args:
        cache: `None`/`True` the default on-disk cache (off with `SVDIFF_SVD_CACHE=0`), `False` none, or a folder.
        progress: show a progress bar (default: only for large models).
        factors: factors already computed, by module name (e.g. by a loader that checked fingerprints).
        targets: module name → raw module, already checked by a loader (`targets.fit_shifts`); injection from a
            state dict then shifts exactly these modules without matching them again.
        factor_location: where new factors are kept between uses, "auto", "device", "cpu" or "disk"
            (`svdiff_adapter.factor_location`).
    """
    check_factor_location(factor_location)
    token = _SVD_OPTIONS.set({"cache": cache, "progress": progress, "factors": dict(factors or {}),
                              "targets": None if targets is None else dict(targets),
                              "factor_location": factor_location})
    try:
        yield
    finally:
        _SVD_OPTIONS.reset(token)


class _NoLayer:
    """Matches no module: PEFT's `set_adapter` with it switches only the auxiliary wrappers (modules_to_save)."""


class SpectralShiftModel(BaseTuner):
    """PEFT tuner for spectral shifts; use it through `peft.inject_adapter_in_model` or `peft.get_peft_model`."""

    prefix: str = "spectral_"
    tuner_layer_cls = SpectralShiftLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config, model_config):
        # `target_modules=None` means "every module of target_kinds", not "look up the model type".
        return peft_config

    def _check_target_module_exists(self, peft_config, key):
        if key in getattr(self, "_spectral_targets", ()):
            return True
        if is_excluded(peft_config, key):
            # PEFT tells "excluded" from "not matched" by the marker its own matcher returns for an excluded key
            # (it checks exclusions first); passing it on keeps PEFT's warnings about unused exclusions truthful.
            return check_target_module_exists(peft_config, key)
        return False

    def inject_adapter(self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False,
                       state_dict=None):
        config = self.peft_config[adapter_name]
        options = _SVD_OPTIONS.get()
        if state_dict is not None and options.get("targets") is not None:
            targets = options["targets"]
        else:
            module_names = None
            if state_dict is not None:
                module_names = {key.rsplit("." + self.prefix, 1)[0].removeprefix("_orig_mod.") for key in state_dict}
            targets = resolve_targets(model, config, module_names)
        factor_dtype = factor_dtype_of(config.factor_dtype)
        truncation = config.truncated_svd
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
                if wants_factors and existing.factor_dtype != factor_dtype:
                    raise ValueError(
                        f"Module {name!r} keeps its SVD factors in {existing.factor_dtype}; all adapters of one "
                        f"module share them, so `factor_dtype` must be {str(existing.factor_dtype)[6:]!r} here."
                    )
                if wants_factors:
                    check_same_truncation(name, existing, truncation)
            elif wants_factors:
                needed[name] = raw
        given = options.get("factors", {})
        to_compute = {name: weight_matrix(raw.weight) for name, raw in needed.items() if name not in given}
        computed = compute_factors(to_compute, cache=options.get("cache"), progress=options.get("progress"),
                                   desc=f"SVD for {adapter_name!r}", factor_dtype=factor_dtype, truncation=truncation,
                                   factor_location=options.get("factor_location", "auto"))
        self._spectral_factors = {name: given.get(name) or computed.get(name) for name in needed}
        self._spectral_targets = set(targets)
        self._spectral_injecting = True
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        finally:
            self._spectral_factors = {}
            self._spectral_injecting = False
        if not autocast_adapter_dtype:
            self._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=False)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        """PEFT's `set_adapter` (which unmerges merged layers first, with a warning) — except while a new adapter is
        injected: adding a shift must not silently unfuse the fused ones. Merged layers apply later adapters on top
        of the merged ones, inside the same ReLU."""
        if not getattr(self, "_spectral_injecting", False):
            return super().set_adapter(adapter_name, inference_mode=inference_mode)
        peft_set_adapter(self.model, adapter_name, inference_mode=inference_mode, layer_cls=_NoLayer)  # auxiliaries
        for _, layer in spectral_layers(self.model):
            layer.set_adapter(adapter_name, inference_mode=inference_mode)
        self.active_adapter = adapter_name

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """δ is created in float32 (PEFT's `autocast_adapter_dtype=True`); `False` keeps it in the dtype of a
        float16 / bfloat16 base weight instead, as PEFT's LoRA does."""
        if autocast_adapter_dtype:
            return
        for _, layer in spectral_layers(self.model):
            weight_dtype = layer.base_layer.weight.dtype
            if adapter_name in layer.spectral_delta and weight_dtype in (torch.float16, torch.bfloat16):
                delta = layer.spectral_delta[adapter_name]
                layer.spectral_delta[adapter_name] = nn.Parameter(delta.detach().to(weight_dtype),
                                                                  requires_grad=delta.requires_grad)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        existing = find_spectral_layer(target)
        if existing is not None:
            existing.update_layer(adapter_name, init_scale=peft_config.init_scale)
            return
        raw = raw_module(target)
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


def check_same_truncation(name: str, layer: SpectralShiftLayer, truncation) -> None:
    """Adapters of one module share its factors: a new one must ask for the spectrum the layer holds (the same
    `spectral_rank` and randomized-SVD parameters, or both the full spectrum)."""
    wanted = truncation_for(weight_matrix(layer.base_layer.weight).shape, truncation)
    if layer.spectral_truncation != wanted:
        def describe(held):
            return "the full spectrum" if held is None else (
                f"spectral_rank={held.rank} (oversampling {held.oversampling}, power iterations "
                f"{held.power_iterations}, seed {held.seed}, {held.dtype})")
        raise ValueError(
            f"Module {name!r} holds factors of {describe(layer.spectral_truncation)}; all adapters of one module "
            f"share them, so this adapter cannot use {describe(wanted)} there."
        )


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
