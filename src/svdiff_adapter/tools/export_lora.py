"""`svdiff export-lora`: a spectral shift as a LoRA (diffusers/PEFT keys and kohya keys).

ΔW = U·diag(c)·Vᵀ with c = ReLU(σ + δ) − σ is already an SVD (up to the signs of c), so its best rank-R
approximation (Eckart–Young) keeps the R largest |cⱼ|: ΔW_R = Σ_top cⱼ uⱼ vⱼᵀ, relative error
‖ΔW − ΔW_R‖_F / ‖ΔW‖_F = √(Σ_dropped cⱼ²) / √(Σ cⱼ²). The factors are split evenly:
lora_B = U[:, top]·diag(sign(c)·√|c|), lora_A = diag(√|c|)·Vᵀ[top, :], so that lora_B @ lora_A = ΔW_R with
alpha = rank (scale 1; the kohya file uses one alpha for all modules and folds rᵢ/alpha into lora_up). Conv kernels: lora_A is a conv with the kernel's size/stride/padding (c_in → r), lora_B a 1×1
conv (r → c_out), as in PEFT. Norm weights (1-D) have no LoRA form and are reported as dropped; so are embeddings.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from ..svd import atomic_save_safetensors, one_thread_if_small
from ._base import (
    BaseSource, ShiftSource, ToolError, base_modules, check_not_exists, load_base, qualified, read_shift,
)


LORA_KINDS = ("linear", "conv2d")
# diffusers' `load_lora_weights` reads LoraConfig kwargs (prefixed by component) from this metadata key.
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


@dataclass
class LoraExport:
    """The result of `export_lora`.

    Attributes:
        state_dict: diffusers/PEFT keys `<component>.<module>.lora_A.weight` / `.lora_B.weight`.
        metadata: the safetensors metadata written with it (`lora_adapter_metadata`: r, lora_alpha, rank_pattern,
            alpha_pattern, target_modules per component).
        kohya_state_dict: `lora_unet_<module_with_underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`.
        layers: module → {"rank", "max_rank", "relative_error"} for every exported layer.
        dropped: module → reason, for shifted modules that have no LoRA form (norms, embeddings) or no change.
        relative_error: ‖ΔW − ΔW_R‖_F / ‖ΔW‖_F over all exported layers together.
    """

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]
    kohya_state_dict: dict[str, torch.Tensor]
    layers: dict[str, dict] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    relative_error: float = 0.0
    paths: dict[str, Path] = field(default_factory=dict)

    def report(self) -> dict:
        return {"relative_error": self.relative_error, "layers": self.layers, "dropped": self.dropped,
                "parameters": sum(t.numel() for t in self.state_dict.values()),
                "paths": {k: os.fspath(v) for k, v in self.paths.items()}}


def choose_rank(change: torch.Tensor, rank: Optional[int], energy: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept terms (largest |cⱼ| first) and of the dropped ones, for a fixed rank or an energy
    fraction of Σ cⱼ²; never more than the non-zero terms."""
    order = torch.argsort(change.abs(), descending=True, stable=True)
    nonzero = int((change != 0).sum())
    if rank is not None:
        keep = min(rank, nonzero)
    else:
        squares = change[order].double() ** 2
        cumulative = torch.cumsum(squares, 0) / squares.sum()
        keep = min(int((cumulative < energy - 1e-12).sum()) + 1, nonzero)
    return order[:keep], order[keep:]


def export_lora(
    source: ShiftSource,
    base: BaseSource,
    *,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    output: Union[str, os.PathLike, None] = None,
    kohya_output: Union[str, os.PathLike, None] = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    svd_cache=None,
) -> LoraExport:
    """Export a spectral shift (at weight 1) as a LoRA of the given rank or energy.

    Args:
        source: the shift file (or folder, or `SpectralShiftFile`).
        base: its base model (local folder, model or `{component: model}`): U, σ, V come from its weights.
        rank (`int`, *optional*): the rank of every layer (fewer where the layer has fewer non-zero changes).
        energy (`float`, *optional*): instead of `rank`, per layer the smallest rank keeping this fraction of
            ‖ΔW‖²_F (e.g. `0.99`). Exactly one of `rank` and `energy` is required.
        output (*optional*): file for diffusers (`pipe.load_lora_weights(path)` or
            `unet.load_lora_adapter(path, prefix="unet")`).
        kohya_output (*optional*): file with kohya keys (ComfyUI, A1111).
        dtype (`torch.dtype`, *optional*, defaults to float32): storage dtype of the LoRA tensors.

    Returns:
        `LoraExport` with the state dicts and the per-layer and overall relative errors of ΔW.
    """
    if (rank is None) == (energy is None):
        raise ToolError("Give exactly one of `rank` (e.g. 8) and `energy` (e.g. 0.99).")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ToolError(f"`rank` should be a positive integer but the value passed is {rank!r}.")
    if energy is not None and not 0 < energy <= 1:
        raise ToolError(f"`energy` should be in (0, 1] but the value passed is {energy!r}.")
    for path in (output, kohya_output):
        check_not_exists(path, overwrite)
    shift_file = read_shift(source)
    infos = base_modules(load_base(base, shift_file.components), shift_file, svd_cache=svd_cache)

    result = LoraExport(state_dict={}, metadata={}, kohya_state_dict={})
    total, dropped_total, lora_config, kohya_factors = 0.0, 0.0, {}, {}
    for component, deltas in shift_file.deltas.items():
        ranks = {}
        for name, delta in deltas.items():
            info, full_name = infos[component][name], qualified(component, name)
            if info.kind not in LORA_KINDS or info.factors is None:
                result.dropped[full_name] = f"{info.kind} weights have no LoRA form"
                continue
            S = info.factors.S
            change = torch.relu(S + delta.to(torch.float32)) - S
            squares = change.double().pow(2)
            if not bool((change != 0).any()):
                result.dropped[full_name] = "no change (δ = 0 or fully clipped at 0)"
                continue
            top, rest = choose_rank(change, rank, energy)
            keep = len(top)
            lost = float(squares[rest].sum())
            total += float(squares.sum())
            dropped_total += lost
            result.layers[full_name] = {"rank": keep, "max_rank": int((change != 0).sum()),
                                        "relative_error": math.sqrt(lost / float(squares.sum()))}
            with one_thread_if_small(info.weight.numel()):
                lora_A, lora_B = _factors(info, change, top)
            prefix = f"{component}.{name}" if component else name
            result.state_dict[f"{prefix}.lora_A.weight"] = lora_A.to(dtype).contiguous()
            result.state_dict[f"{prefix}.lora_B.weight"] = lora_B.to(dtype).contiguous()
            kohya_factors[_kohya_name(component, name)] = (lora_A, lora_B, keep)
            ranks[name] = keep
        if ranks:
            lora_config.update({f"{component}.{k}" if component else k: v for k, v in _lora_config(ranks).items()})
    if not result.state_dict:
        raise ToolError(f"Nothing to export: every shifted module was dropped ({result.dropped}).")
    result.kohya_state_dict = _kohya_state_dict(kohya_factors, dtype)
    result.relative_error = math.sqrt(dropped_total / total) if total else 0.0
    result.metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(lora_config, sort_keys=True),
                       "svdiff_relative_error": f"{result.relative_error:.6g}"}
    if shift_file.base_model:
        result.metadata["base_model"] = shift_file.base_model
    if output is not None:
        result.paths["diffusers"] = _save(result.state_dict, output, result.metadata)
    if kohya_output is not None:
        kohya_metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(max(
            v["rank"] for v in result.layers.values())), "svdiff_relative_error": result.metadata["svdiff_relative_error"]}
        result.paths["kohya"] = _save(result.kohya_state_dict, kohya_output, kohya_metadata)
    return result


def _factors(info, change: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A (r × n, or r × c_in × kh × kw) and lora_B (m × r, or c_out × r × 1 × 1) with B @ A = ΔW_R."""
    U = info.factors.U.to(torch.float32)[:, top]
    Vh = info.factors.Vh.to(torch.float32)[top, :]
    c = change[top]
    root = c.abs().sqrt()
    lora_B = U * (torch.sign(c) * root)
    lora_A = root[:, None] * Vh
    weight = info.weight
    if info.kind == "conv2d":
        lora_A = lora_A.reshape(len(top), *weight.shape[1:])
        lora_B = lora_B.reshape(weight.shape[0], len(top), 1, 1)
    return lora_A, lora_B


def _lora_config(ranks: dict[str, int]) -> dict:
    """LoraConfig kwargs for one component: the most common rank, per-module patterns (alpha = rank: scale 1)."""
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    # '^name' anchors PEFT's pattern match `(.*\.)?(key)$` at the start (diffusers writes patterns the same way).
    pattern = {f"^{name}": r for name, r in ranks.items() if r != common}
    return {"r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks), "init_lora_weights": False}


def _kohya_state_dict(factors: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """kohya keys with ONE alpha for all modules; each lora_up carries rᵢ/alpha so that (alpha/rᵢ)·up·down = ΔW_R.

    Per-module alphas would be equally valid kohya files, but diffusers' kohya loader (0.42) maps differing alphas to
    wrong module names and silently applies scale alpha_common/rᵢ instead (measured: output error 0.035 vs 2e-6).
    """
    ranks = [rank for _, _, rank in factors.values()]
    alpha = max(set(ranks), key=ranks.count)
    state_dict = {}
    for key, (lora_A, lora_B, rank) in factors.items():
        state_dict[f"{key}.lora_down.weight"] = lora_A.to(dtype).contiguous()
        state_dict[f"{key}.lora_up.weight"] = (lora_B * (rank / alpha)).to(dtype).contiguous()
        state_dict[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return state_dict


def _kohya_name(component: str, name: str) -> str:
    if component.startswith("text_encoder"):
        name = "text_model." + name  # kohya names follow the transformers 4.x layout
    return KOHYA_PREFIX.get(component, "lora_") + name.replace(".", "_")


def _save(tensors, path, metadata) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, path, metadata)
    return path


__all__ = ["LoraExport", "choose_rank", "export_lora"]
