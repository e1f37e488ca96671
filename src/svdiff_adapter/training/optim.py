"""Optimizer and learning-rate schedule for spectral shifts: 2-D/4-D shifts and 1-D (norm) shifts in separate
parameter groups (SVDiff: 1e-3 and 1e-6), AdamW, diffusers' schedules with warmup.

Step scale "sigma" trains δ relative to σ: every step of δᵢ is multiplied by σᵢ, which for Adam is the step of
θ = δ / σ (Adam's direction does not depend on the gradient's scale), so the learning rate is a relative change of
the singular values, the same for every matrix and every model, and small singular values move little.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping

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


STEP_SCALES = ("uniform", "sigma")


def make_optimizer(models: Mapping[str, nn.Module], adapter_name: str, learning_rate: float = 1e-3,
                   learning_rate_1d: float = 1e-6, *, betas=(0.9, 0.999), weight_decay: float = 1e-2,
                   eps: float = 1e-8, use_8bit_adam: bool = False, step_scale: str = "uniform") -> torch.optim.Optimizer:
    """AdamW over the δ of `adapter_name` in every model: group 0 the 2-D/4-D shifts (`learning_rate`), group 1 the
    1-D norm shifts (`learning_rate_1d`). Empty groups are left out. `step_scale="sigma"` multiplies every step of
    a matrix shift's δᵢ by its σᵢ (module docstring); norm shifts keep plain steps."""
    if step_scale not in STEP_SCALES:
        raise ValueError(f"step_scale must be one of {list(STEP_SCALES)}, not {step_scale!r}.")
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
    optimizer = optimizer_cls(param_groups, betas=betas, weight_decay=weight_decay, eps=eps)
    if step_scale == "sigma":
        scale_steps(optimizer, singular_value_scales(models, adapter_name))
    return optimizer


def singular_value_scales(models: Mapping[str, nn.Module], adapter_name: str) -> dict[nn.Parameter, torch.Tensor]:
    """σ of every matrix shift's layer, keyed by its δ (float32, on δ's device)."""
    scales = {}
    for model in models.values():
        for module in model.modules():
            if isinstance(module, SpectralShiftLayer) and adapter_name in module.spectral_delta \
                    and module.uses_factors:
                delta = module.spectral_delta[adapter_name]
                scales[delta] = module.spectral_S.detach().to(delta.device, torch.float32).clone()
    return scales


def scale_steps(optimizer: torch.optim.Optimizer, scales: Mapping[nn.Parameter, torch.Tensor]) -> None:
    """Multiply each optimizer step of these parameters elementwise by their scale (step hooks: the optimizer's
    own update, weight decay included, is computed as usual, then its change is rescaled)."""
    before: dict[nn.Parameter, torch.Tensor] = {}

    def remember(optimizer, args, kwargs):
        before.clear()
        before.update({p: p.detach().clone() for p in scales})

    @torch.no_grad()
    def rescale(optimizer, args, kwargs):
        for parameter, scale in scales.items():
            old = before[parameter]
            parameter.copy_(old + (parameter - old) * scale)
        before.clear()

    optimizer.register_step_pre_hook(remember)
    optimizer.register_step_post_hook(rescale)


def trainable_parameters(optimizer: torch.optim.Optimizer) -> Iterable[nn.Parameter]:
    for group in optimizer.param_groups:
        yield from group["params"]


class ShiftAverage:
    """An exponential moving average of the trained shifts (Polyak averaging), which the run saves and validates
    with instead of the last step's δ.

    After the n-th optimizer step, avg ← avg + (1 − d)·(δ − avg) with d = min(decay, (1 + n) / (10 + n)) — the
    warm-up of diffusers' `EMAModel` (diffusers 0.42, training_utils.py), so the early average does not stay near
    the initial δ = 0. Keys are the checkpoint's (`component.module.path`, `shift_parameters`).
    """

    def __init__(self, named_parameters: Iterable[tuple[str, nn.Parameter]], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"The EMA decay must be in (0, 1), not {decay!r}.")
        named = list(named_parameters)
        self.names = [name for name, _ in named]
        self.parameters = [parameter for _, parameter in named]
        self.decay = decay
        self.steps = 0
        self.averages = [parameter.detach().clone() for parameter in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.averages, [p.detach() for p in self.parameters], 1 - decay)

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        """Put the average into the shifts (the end of a run)."""
        for parameter, average in zip(self.parameters, self.averages):
            parameter.copy_(average)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the shifts inside (validation), the trained values back afterwards."""
        trained = [parameter.detach().clone() for parameter in self.parameters]
        self.copy_to_parameters()
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.parameters, trained):
                    parameter.copy_(value)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: average.float().cpu().contiguous() for name, average in zip(self.names, self.averages)}

    @torch.no_grad()
    def load_state(self, tensors: Mapping[str, torch.Tensor], steps: int) -> None:
        for name, average in zip(self.names, self.averages):
            average.copy_(tensors[name].to(average.device, average.dtype))
        self.steps = steps
