"""Optimizer and learning-rate schedule for spectral shifts: 2-D/4-D shifts and 1-D (norm) shifts in separate
parameter groups (SVDiff: 1e-3 and 1e-6), AdamW, diffusers' schedules with warmup."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from ..tuner import SpectralShiftLayer


def shift_parameters(models: Mapping[str, nn.Module], adapter_name: str) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The trainable δ of `adapter_name`, split by the rank of the shifted weight: ``{"matrix": [...], "1d": [...]}``.

    Names are ``component.module.path`` (stable order: the order of `named_modules`)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"matrix": [], "1d": []}
    for component, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, SpectralShiftLayer) and adapter_name in module.spectral_delta:
                parameter = module.spectral_delta[adapter_name]
                if not parameter.requires_grad:
                    continue
                kind = "1d" if module.get_base_layer().weight.ndim == 1 else "matrix"
                groups[kind].append((f"{component}.{name}", parameter))
    return groups


def make_optimizer(models: Mapping[str, nn.Module], adapter_name: str, learning_rate: float = 1e-3,
                   learning_rate_1d: float = 1e-6, *, betas=(0.9, 0.999), weight_decay: float = 1e-2,
                   eps: float = 1e-8, use_8bit_adam: bool = False) -> torch.optim.Optimizer:
    """AdamW over the δ of `adapter_name` in every model: group 0 the 2-D/4-D shifts (`learning_rate`), group 1 the
    1-D norm shifts (`learning_rate_1d`). Empty groups are left out."""
    groups = shift_parameters(models, adapter_name)
    param_groups = [
        {"params": [p for _, p in groups[kind]], "lr": lr, "name": kind}
        for kind, lr in (("matrix", learning_rate), ("1d", learning_rate_1d)) if groups[kind]
    ]
    if not param_groups:
        raise ValueError(f"No trainable spectral shifts named {adapter_name!r} were found.")
    if use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from error
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(param_groups, betas=betas, weight_decay=weight_decay, eps=eps)


def trainable_parameters(optimizer: torch.optim.Optimizer) -> Iterable[nn.Parameter]:
    for group in optimizer.param_groups:
        yield from group["params"]
