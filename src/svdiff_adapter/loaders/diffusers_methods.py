"""diffusers' pipeline adapter methods made kind-aware: spectral shifts and LoRAs side by side.

diffusers' own `set_adapters`, `delete_adapters`, `unload_lora_weights`, `set_lora_device` and `load_lora_weights`
assume that every tuner layer is a LoRA layer (they read `lora_A`, expand per-block weights for LoRA keys, name new
adapters from LoRA attributes, remove every tuner). `DiffusersAdapterMethods` overrides them for both kinds, plus
the helpers the pipeline mixin shares. Activation rule: a newly loaded adapter replaces the active adapters of its
own kind and joins the active adapters of the other kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from torch import nn

from ..format import COMPONENTS, DEFAULT_WEIGHT_NAME, DELTA_SUFFIX, FORMAT_NAME
from ..tuner import SpectralShiftLayer, offload_spectral_layers
from .block_weights import Weight, weight_function
from .diffusers_compat import (
    excluded_from_offload,
    forget_peft_config,
    lora_components,
    offload_device,
    set_fused_adapter_names,
)
from .model import check_adapter_name, module_path, spectral_adapter_names


def as_list(names: Union[str, Iterable[str], None]) -> Optional[list[str]]:
    return None if names is None else [names] if isinstance(names, str) else list(names)


def _move_adapter(layer: BaseTunerLayer, adapter_name: str, device) -> None:
    """Move one adapter's tensors of any PEFT tuner layer (through its declared per-adapter containers)."""
    for attribute in (*layer.adapter_layer_names, *layer.other_param_names):
        container = getattr(layer, attribute, None)
        if not isinstance(container, (Mapping, nn.ModuleDict, nn.ParameterDict)) or adapter_name not in container:
            continue
        value = container[adapter_name]
        if isinstance(value, nn.Module):
            value.to(device)
        elif isinstance(value, nn.Parameter):
            container[adapter_name] = nn.Parameter(value.detach().to(device), requires_grad=value.requires_grad)
        elif isinstance(value, torch.Tensor):
            container[adapter_name] = value.to(device)


def looks_like_spectral_shift(source) -> bool:
    """Whether what was given to `load_lora_weights` is a spectral shift (a state dict, a local file or folder)."""
    if isinstance(source, Mapping):
        return bool(source) and all(isinstance(k, str) and k.endswith(DELTA_SUFFIX) for k in source)
    if not isinstance(source, (str, Path)):
        return False
    path = Path(source)
    if path.is_dir():
        path = path / DEFAULT_WEIGHT_NAME
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == FORMAT_NAME
    except Exception:  # not a safetensors file: diffusers' own error stands
        return False


class DiffusersAdapterMethods:
    """Helpers over every adapter-holding component, and diffusers' adapter methods for both adapter kinds.

    Methods never call `super()`, so `patch_diffusers()` can copy them into diffusers' classes; `_diffusers_method`
    finds the implementation they override.
    """

    # None: the components diffusers' LoRA loader of the pipeline manages (`_lora_loadable_modules`: `unet` or
    # `transformer` / `transformer_2` and the text encoders it trains); a pipeline class without a LoRA loader falls
    # back to `format.COMPONENTS`. A subclass may name its own tuple.
    spectral_shift_components: Optional[tuple[str, ...]] = None

    # -------------------------------------------------------------------------------------------- helpers
    @classmethod
    def _spectral_component_names(cls) -> list[str]:
        return list(cls.spectral_shift_components or lora_components(cls) or COMPONENTS)

    def _spectral_components(self) -> dict[str, nn.Module]:
        return {
            name: model for name in self._spectral_component_names()
            if isinstance(model := getattr(self, name, None), nn.Module)
        }

    def _adapter_components(self) -> dict[str, nn.Module]:
        """Every component that may hold tuner layers (diffusers' LoRA components and ours)."""
        names = lora_components(self) + self._spectral_component_names()
        return {
            name: model for name in dict.fromkeys(names) if isinstance(model := getattr(self, name, None), nn.Module)
        }

    def _spectral_names(self) -> list[str]:
        names: dict[str, None] = {}
        for model in self._spectral_components().values():
            names.update(dict.fromkeys(spectral_adapter_names(model)))
        return list(names)

    def _all_adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for model in self._adapter_components().values():
            names.update(dict.fromkeys(getattr(model, "peft_config", None) or {}))
        return list(names)

    def _unique_adapter_name(self, prefix: str = "default") -> str:
        taken, index = set(self._all_adapter_names()), 0
        while f"{prefix}_{index}" in taken:
            index += 1
        return f"{prefix}_{index}"

    def _tuner_layers(self) -> Iterable[tuple[str, str, BaseTunerLayer]]:
        for component, model in self._adapter_components().items():
            for name, module in model.named_modules():
                if isinstance(module, BaseTunerLayer):
                    yield component, name, module

    def _activate(self, adapter_names: list[str], holding: Optional[str] = None) -> None:
        """The same active set on every tuner layer of every component (weights unchanged). With `holding`, only
        the components that hold that adapter: a load into some components (Wan's `transformer_2` alone) leaves
        the active adapters of the others as they were, as diffusers' own loaders do."""
        components = self._adapter_components()
        for component, _, layer in self._tuner_layers():
            if holding is None or holding in (getattr(components[component], "peft_config", None) or {}):
                layer.set_adapter(list(adapter_names))

    def _sync_fused_names(self) -> None:
        set_fused_adapter_names(self, {n for _, _, layer in self._tuner_layers() for n in layer.merged_adapters})

    def _diffusers_method(self, name: str) -> Callable:
        """diffusers' implementation of a method these mixins override (what `super()` would give)."""
        from .pipeline import SpectralShiftLoaderMixin

        own = {klass.__dict__[name] for klass in SpectralShiftLoaderMixin.__mro__ if name in klass.__dict__}
        for klass in type(self).__mro__:
            attribute = klass.__dict__.get(name)
            if attribute is not None and attribute not in own:
                return attribute.__get__(self, type(self))
        raise AttributeError(f"{type(self).__name__} has no diffusers method {name!r}.")

    # ------------------------------------------------------------------ diffusers methods made kind-aware
    def set_adapters(
        self,
        adapter_names: Union[str, list[str]],
        adapter_weights: Union[Weight, list[Weight]] = None,
        *,
        weights: Union[Weight, list[Weight]] = None,
    ) -> None:
        """Activate adapters (spectral shifts and LoRAs alike) with weights; the others become inactive.

        Args:
            adapter_names (`str` or `list[str]`): adapters to activate.
            adapter_weights / weights (*optional*, same meaning; `weights=` is the model-level spelling):
                one value per adapter (or one for all): a finite number (`None` = 1), a per-component dict
                `{"unet": w, "text_encoder": w}` (missing components: 1), where the UNet's value may be a per-block
                dict `{"down": w, "mid": w, "up": {"block_1": [w0, w1, w2]}}` (see `block_weights.block_weight`).

        For spectral shifts wᵢ scales δᵢ inside the ReLU: W_δ = U·diag(ReLU(σ + Σᵢ wᵢδᵢ))·Vᵀ, so
        `weights=[a, 1 - a]` interpolates two shifts and `[1, 1]` adds them. Invalid names, lengths, keys or values
        (NaN, inf) raise `ValueError` before anything changes.
        """
        if weights is not None and adapter_weights is not None:
            raise ValueError("Pass the weights once: `adapter_weights=` or `weights=`, not both.")
        weights = adapter_weights if weights is None else weights
        names = as_list(adapter_names)
        if len(set(names)) != len(names):
            raise ValueError(f"Adapter names repeat: {names}.")
        available = self._all_adapter_names()
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; loaded: {available}.")
        per_adapter = weights if isinstance(weights, list) else [weights] * len(names)
        if len(per_adapter) != len(names):
            raise ValueError(
                f"{len(names)} adapter name(s) {names} but {len(per_adapter)} weight(s) {per_adapter}: give one "
                "weight per adapter, or a single weight for all."
            )
        components = self._adapter_components()
        functions: dict[str, list[Callable[[str], float]]] = {c: [] for c in components}
        for name, weight in zip(names, per_adapter):
            if isinstance(weight, dict):
                stray = [k for k in weight if k not in components]
                if stray:
                    raise ValueError(
                        f"Weight dict for {name!r} has key(s) {stray}; keys are components {list(components)} "
                        "(per-block weights go inside, e.g. {'unet': {'down': 1.0, 'up': 0.5}})."
                    )
            for component, model in components.items():
                value = weight.get(component) if isinstance(weight, dict) else weight
                functions[component].append(weight_function(value, component, model, name))
        for component, module_name, layer in list(self._tuner_layers()):
            layer.set_adapter(list(names))
            path = module_path(module_name)
            for name, function in zip(names, functions[component]):
                layer.set_scale(name, function(path))

    def get_active_adapters(self) -> list[str]:
        """Active adapters of the pipeline (spectral and LoRA), in activation order."""
        active: dict[str, None] = {}
        components = self._adapter_components()
        for component, _, layer in self._tuner_layers():
            held = getattr(components[component], "peft_config", {}) or {}
            active.update(dict.fromkeys(n for n in layer.active_adapters if n in held))
        return list(active)

    def delete_adapters(self, adapter_names: Union[str, list[str]]) -> None:
        """Delete adapters of either kind: spectral shifts through `unload_spectral_shift`, LoRAs through diffusers."""
        names = as_list(adapter_names)
        unknown = [n for n in names if n not in self._all_adapter_names()]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; loaded: {self._all_adapter_names()}.")
        spectral = [n for n in names if n in self._spectral_names()]
        others = [n for n in names if n not in spectral]
        if spectral:
            self.unload_spectral_shift(spectral)
        if others:
            self._diffusers_method("delete_adapters")(others)

    def unload_lora_weights(self) -> None:
        """Remove the LoRA (and other non-spectral) adapters; spectral shifts stay loaded as they are.

        Like diffusers, a fused LoRA is not unfused: its change stays in the weights. Use
        `unload_spectral_shift()` for spectral shifts.
        """
        if not self._spectral_names():
            return self._diffusers_method("unload_lora_weights")()
        spectral = set(self._spectral_names())
        active = [n for n in self.get_active_adapters() if n in spectral]
        for model in self._adapter_components().values():
            for name, module in list(model.named_modules()):
                if isinstance(module, BaseTunerLayer) and not isinstance(module, SpectralShiftLayer):
                    parent_name, _, attribute = name.rpartition(".")
                    parent = model.get_submodule(parent_name) if parent_name else model
                    if isinstance(parent, BaseTunerLayer) and not isinstance(parent, SpectralShiftLayer):
                        continue  # the outermost wrapper of this chain is replaced
                    keep = module
                    while isinstance(keep, BaseTunerLayer) and not isinstance(keep, SpectralShiftLayer):
                        keep = keep.base_layer
                    setattr(parent, attribute, keep)
            config = getattr(model, "peft_config", None)
            if isinstance(config, dict):
                for adapter in [a for a in config if a not in spectral]:
                    del config[adapter]
                if not config:
                    forget_peft_config(model)
        self._activate(active)
        self._sync_fused_names()

    def set_lora_device(self, adapter_names: list[str], device) -> None:
        """`set_lora_device` for any adapter kind (diffusers' version reads `lora_A` on every tuner layer)."""
        names = as_list(adapter_names)
        spectral = [n for n in names if n in self._spectral_names()]
        if spectral:
            self.set_spectral_shift_device(spectral, device)
        others = [n for n in names if n not in spectral]
        for _, _, layer in self._tuner_layers():
            if not isinstance(layer, SpectralShiftLayer):
                for name in others:
                    _move_adapter(layer, name, device)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: Optional[str] = None,
                          hotswap: bool = False, **kwargs) -> None:
        """diffusers' `load_lora_weights`, plus: `adapter_name=None` picks a free `default_<n>` (diffusers' naming
        reads LoRA-only attributes), names are checked against spectral shifts, a spectral-shift file is pointed
        to `load_spectral_shift`, and the activation rule of this class applies (the new LoRA replaces the active
        LoRAs and joins the active spectral shifts).
        """
        if looks_like_spectral_shift(pretrained_model_name_or_path_or_dict):
            raise ValueError("This is a spectral-shift file, not a LoRA; load it with `pipe.load_spectral_shift(...)`.")
        spectral = set(self._spectral_names())
        if adapter_name is None:
            adapter_name = self._unique_adapter_name()
        elif adapter_name in spectral:
            raise ValueError(f"Adapter name {adapter_name!r} is already used by a spectral shift; choose another.")
        check_adapter_name(adapter_name)
        active = [n for n in self.get_active_adapters() if n in spectral]
        self._diffusers_method("load_lora_weights")(
            pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, hotswap=hotswap, **kwargs
        )
        if not hotswap:
            self._activate(active + [adapter_name], holding=adapter_name)

    def enable_sequential_cpu_offload(self, gpu_id: Optional[int] = None, device=None) -> None:
        """diffusers' `enable_sequential_cpu_offload`, with spectral layers hooked by `offload_spectral_layers`: their
        W_δ is built and kept on the CPU and only it (and the bias) goes to the device per call. Loading and unloading
        shifts later keeps the offload on (hooks are taken off and put back, as diffusers' LoRA loaders do)."""
        self._diffusers_method("enable_sequential_cpu_offload")(gpu_id=gpu_id, device=device)
        excluded = excluded_from_offload(self)
        for name, model in self._spectral_components().items():
            if name not in excluded:
                offload_spectral_layers(model, offload_device(self))
