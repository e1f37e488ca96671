"""Spectral shifts and fused attention projections (diffusers' `fuse_qkv_projections()`).

diffusers 0.42 (`models/attention.py`, `AttentionModuleMixin.fuse_projections`) fuses an attention's `to_q`, `to_k`,
`to_v` into a new `to_qkv` (cross-attention: `to_k`, `to_v` into `to_kv`; SD3 / Flux: `add_*_proj` into
`to_added_qkv`) by copying their weights, keeps the parts, and runs only the fused module from then on. The SVD of
[W_q; W_k; W_v] is not the SVDs of its parts, so a shift belongs to one layout: a shift of a part is ignored by a
fused attention, and a shift of a fused module disappears with it on unfuse. Both would be silent wrong models, so
loads check the layout, and an attention holding shifts refuses to change layout until they are unloaded. Flux.2's
native fused projections (`to_qkv_mlp_proj`) are ordinary Linear modules: they take shifts like any other.
"""

from __future__ import annotations

import types
from typing import Iterable

from torch import nn

from ..tuner.layer import find_spectral_layer
from ..tuner.targets import ShiftDoesNotFitError


# fused module → the projections it replaces
FUSED_PROJECTIONS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}


def _parent(model: nn.Module, name: str):
    parent_name, _, leaf = name.rpartition(".")
    try:
        return (model.get_submodule(parent_name) if parent_name else model), leaf
    except AttributeError:
        return None, leaf


def layout_problems(model: nn.Module, module_names: Iterable[str]) -> list[str]:
    """Shifted modules (paths in `model`) whose attention runs another layout than the shift was made on."""
    problems = []
    for name in module_names:
        attention, leaf = _parent(model, name)
        if attention is None:
            continue
        if getattr(attention, "fused_projections", False):
            fused = [f for f, parts in FUSED_PROJECTIONS.items() if leaf in parts and hasattr(attention, f)]
            if fused:
                problems.append(
                    f"{name}: this attention's projections are fused (it runs `{fused[0]}`, not `{leaf}`) and the "
                    "shift was made on the unfused layout; call `unfuse_qkv_projections()` on the model first"
                )
        elif leaf in FUSED_PROJECTIONS and not hasattr(attention, leaf) and any(
                hasattr(attention, part) for part in FUSED_PROJECTIONS[leaf]):
            problems.append(
                f"{name}: the shift was made on fused projections; call `fuse_qkv_projections()` on the model "
                "before loading it"
            )
    return problems


def check_layout(model: nn.Module, module_names: Iterable[str]) -> None:
    """Raise `ShiftDoesNotFitError` naming the fix if a shift was made on the other projection layout."""
    problems = layout_problems(model, module_names)
    if problems:
        raise ShiftDoesNotFitError(
            f"The spectral shift does not fit the model's attention layout ({len(problems)} module(s)): "
            + "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else "")
        )


def _shifted_projections(attention: nn.Module) -> list[str]:
    names = {n for fused, parts in FUSED_PROJECTIONS.items() for n in (fused, *parts)}
    return [n for n in sorted(names) if (layer := find_spectral_layer(getattr(attention, n, None))) is not None
            and layer.spectral_delta]


def _guarded(method_name: str):
    def guarded(attention, *args, **kwargs):
        shifted = _shifted_projections(attention)
        if shifted:
            raise ValueError(
                f"Cannot {method_name.split('_')[0]} the projections of an attention whose {shifted} carry spectral "
                "shifts: the other layout would not apply them. Unload the shifts first "
                "(`unload_spectral_shift()`), change the layout, then load shifts made on that layout."
            )
        return getattr(type(attention), method_name)(attention, *args, **kwargs)

    return guarded


def guard_layout_changes(model: nn.Module) -> None:
    """Make every attention of `model` that holds shifted projections refuse `fuse_projections` /
    `unfuse_projections` while it does (what `fuse_qkv_projections()` / `unfuse_qkv_projections()` call per
    attention). The guard is an instance attribute that looks at the projections on each call, so it stays
    harmless after the shifts are unloaded; attentions fused earlier in the same model-level call hold no shifts,
    so refusing part-way leaves every output unchanged."""
    for module in model.modules():
        if not hasattr(type(module), "fuse_projections") or not _shifted_projections(module):
            continue
        for method_name in ("fuse_projections", "unfuse_projections"):
            if method_name not in vars(module) and hasattr(type(module), method_name):
                setattr(module, method_name, types.MethodType(_guarded(method_name), module))
