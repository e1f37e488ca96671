"""`svdiff extract`: project a fully fine-tuned model onto spectral shifts of its base.

For W_base = U·diag(σ)·Vᵀ the spectral shifts can only change the diagonal of Uᵀ·W·V. The closest shifted weight to
W_tuned (Frobenius norm) has cⱼ = uⱼᵀ·(W_tuned − W_base)·vⱼ, i.e. δⱼ = uⱼᵀ·W_tuned·vⱼ − σⱼ. The stored factors are
float16 (only nearly orthonormal), so the tool solves the small normal equations (UᵀU ∘ VᵀV)·c = diag(Uᵀ·ΔW·V),
which is the same thing for exactly orthonormal factors and exact for the factors the layers actually use.
Everything off the diagonal of Uᵀ·ΔW·V is lost; the report says how much.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from .. import spectral
from ..format import SpectralShiftFile, save_shift_file
from ..svd import one_thread_if_small
from ..tuner.config import MODULE_KINDS, NORM_MODES
from ..tuner.targets import module_kind, unsupported_reason, uses_factors
from ._base import BaseSource, ToolError, base_modules, check_not_exists, load_base, module_fingerprint, qualified


@dataclass
class Extraction:
    """The result of `extract_shift`.

    Attributes:
        shift_file: the spectral shift (format v1, with fingerprints of the base).
        layers: module → {"kept", "relative_residual", "clipped"}: `kept` = 1 − ‖ΔW − ΔW_δ‖²/‖ΔW‖² (the fraction of
            the squared weight change the shift reproduces), `clipped` = values where σ + δ < 0 (the ReLU gives 0).
        kept, relative_residual: the same over all modules together.
        unchanged: modules whose weight did not change (left out of the file).
    """

    shift_file: SpectralShiftFile
    layers: dict[str, dict] = field(default_factory=dict)
    kept: float = 1.0
    relative_residual: float = 0.0
    unchanged: list[str] = field(default_factory=list)

    def report(self) -> dict:
        return {"kept": self.kept, "relative_residual": self.relative_residual, "layers": self.layers,
                "unchanged": len(self.unchanged), "parameters": self.shift_file.num_parameters}


def extract_shift(
    base: BaseSource,
    tuned: BaseSource,
    output: Union[str, os.PathLike, None] = None,
    *,
    target_kinds: Sequence[str] = ("linear", "conv2d", "norm"),
    norm_mode: str = "elementwise",
    base_model: Optional[str] = None,
    base_revision: Optional[str] = None,
    components: Optional[Sequence[str]] = None,
    overwrite: bool = False,
    svd_cache=None,
) -> Extraction:
    """Spectral shifts that best reproduce `tuned` from `base` (δⱼ = uⱼᵀ W_tuned vⱼ − σⱼ per module).

    Args:
        base, tuned: local model folders (pipeline or single model), models, or `{component: model}` dicts, of the
            same architecture.
        output (*optional*): where to write the shift file (format v1).
        target_kinds (*optional*): module kinds to extract (`linear`, `conv2d`, `embedding`, `norm`).
        norm_mode (*optional*, defaults to `"elementwise"`): elementwise norm shifts reproduce γ_tuned exactly.
        base_model, base_revision (*optional*): recorded in the file.
        components (*optional*): which components of a pipeline folder to compare (default: the denoisers and text
            encoders found in both, `base_folder.PIPELINE_COMPONENTS`).

    Returns:
        `Extraction` (the shift file and how much of ‖W_tuned − W_base‖ it keeps, per module and overall).
    """
    unknown = [k for k in target_kinds if k not in MODULE_KINDS]
    if unknown or not target_kinds:
        raise ToolError(f"`target_kinds` should be a non-empty subset of {list(MODULE_KINDS)}, got {list(target_kinds)}.")
    if norm_mode not in NORM_MODES:
        raise ToolError(f"`norm_mode` should be one of {list(NORM_MODES)} but the value passed is {norm_mode!r}.")
    check_not_exists(output, overwrite)
    base_models = load_base(base, list(components) if components else None)
    tuned_models = load_base(tuned, list(base_models))
    common = [c for c in base_models if c in tuned_models]
    if not common:
        raise ToolError(f"Base and tuned models share no component (base: {list(base_models)}, tuned: {list(tuned_models)}).")

    # Modules whose weight changed, as a zero shift file (so the shared helper computes kinds and factors).
    changed, differences, unchanged = {}, {}, []
    for component in common:
        base_params = dict(base_models[component].named_modules())
        tuned_params = dict(tuned_models[component].named_modules())
        changed[component] = {}
        for name, module in base_params.items():
            kind = module_kind(module)
            if kind not in target_kinds or unsupported_reason(module, base_params[name.rpartition(".")[0]]):
                continue
            other = tuned_params.get(name)
            if other is None or getattr(other, "weight", None) is None or other.weight.shape != module.weight.shape:
                raise ToolError(f"The tuned model has no module {qualified(component, name)} of the base's shape: "
                                "base and tuned models must have the same architecture.")
            with one_thread_if_small(module.weight.numel()):
                difference = other.weight.detach().to(torch.float32) - module.weight.detach().to(torch.float32)
                is_changed = bool(difference.any())
            if not is_changed:
                unchanged.append(qualified(component, name))
                continue
            changed[component][name] = torch.zeros(
                spectral.shift_length(module.weight.shape, uses_factors(kind, norm_mode)))
            differences[(component, name)] = difference
    config = {"target_kinds": list(target_kinds), "norm_mode": norm_mode}
    probe = SpectralShiftFile(deltas={c: d for c, d in changed.items() if d},
                              configs={c: dict(config) for c in changed})
    if not probe.deltas:
        raise ToolError("The tuned model's weights equal the base's in every targeted module: nothing to extract.")
    infos = base_modules(base_models, probe, svd_cache=svd_cache)

    result = Extraction(shift_file=SpectralShiftFile(
        deltas={}, configs={c: dict(config) for c in probe.deltas}, fingerprints={},
        base_model=base_model, base_revision=base_revision), unchanged=unchanged)
    total = residual_total = 0.0
    for component, modules in infos.items():
        result.shift_file.deltas[component] = {}
        result.shift_file.fingerprints[component] = {}
        for name, info in modules.items():
            difference = differences[(component, name)]
            with one_thread_if_small(difference.numel()):
                delta, approximation = _project(info, difference)
                change_sq = float(difference.double().pow(2).sum())
                residual_sq = float((difference - approximation).double().pow(2).sum())
            total += change_sq
            residual_total += residual_sq
            clipped = 0 if info.factors is None else int((info.factors.S + delta < 0).sum())
            result.layers[qualified(component, name)] = {
                "kept": 1 - residual_sq / change_sq, "relative_residual": math.sqrt(residual_sq / change_sq),
                "clipped": clipped,
            }
            result.shift_file.deltas[component][name] = delta
            result.shift_file.fingerprints[component][name] = module_fingerprint(info)
    result.kept = 1 - residual_total / total
    result.relative_residual = math.sqrt(residual_total / total)
    if output is not None:
        save_shift_file(result.shift_file, output)
    return result


def _project(info, difference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(δ, ΔW that δ produces) for one module."""
    if info.factors is None:  # elementwise norm: γ + δ reproduces any change
        return difference.reshape(-1).clone(), difference
    U = info.factors.U.to(torch.float64)
    Vh = info.factors.Vh.to(torch.float64)
    rhs = spectral.diagonal_projection(U, Vh, spectral.weight_matrix(difference).to(torch.float64))
    gram = (U.T @ U) * (Vh @ Vh.T)
    # σ + c < 0 cannot be reached (the ReLU gives 0, i.e. c = −σ); δ = c keeps that value clipped at 0.
    delta = torch.linalg.solve(gram, rhs).to(torch.float32)
    effective = spectral.spectral_change(info.factors.S, delta)
    approximation = spectral.factor_product(info.factors.U, info.factors.Vh, effective)
    return delta, approximation.reshape(difference.shape)


__all__ = ["Extraction", "extract_shift"]
