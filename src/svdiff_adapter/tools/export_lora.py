"""`svdiff export-lora`: a spectral shift as a LoRA, in a diffusers-format file and a kohya file.

ΔW = U·diag(c)·Vᵀ with c = ReLU(σ + δ) − σ is already an SVD (up to the signs of c), so its best rank-R
approximation (Eckart–Young) keeps the R largest |cⱼ|: ΔW_R = Σ_top cⱼ uⱼ vⱼᵀ, relative error
‖ΔW − ΔW_R‖_F / ‖ΔW‖_F = √(Σ_dropped cⱼ²) / √(Σ cⱼ²). The factors are split evenly: up = U[:, top]·diag(sign(c)·√|c|),
down = diag(√|c|)·Vᵀ[top, :], so that up @ down = ΔW_R at scale 1 (diffusers file: lora_alpha = r; the kohya file uses
one alpha for all modules and folds rᵢ/alpha into lora_up). Conv kernels: down is a conv with the kernel's
size/stride/padding (c_in → r), up a 1×1 conv (r → c_out), as in PEFT. Embeddings (vocab × dim) are exported in the
diffusers-format file only; norm weights (1-D) have no LoRA form and are reported as dropped. Key names and metadata
follow the readers (`lora_layout`); `lora_probe` measures how much of the shift's output change each file keeps.
Transformer (DiT) pipelines get the diffusers-format file only (Wan 2.2's `transformer_2` in a second one,
`transformer_2_path`); components their pipeline's LoRA loader does not read are left out before their SVD.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional, Union

import torch

from .. import spectral
from ..atomic import atomic_save_safetensors
from ..format import hub_id_or_none
from ..svd import one_thread_if_small
from . import lora_layout, lora_probe
from ._base import (
    BaseSource, ShiftSource, ToolError, base_modules, base_pipeline_class, check_base, check_not_exists, load_base,
    qualified, read_shift,
)


LORA_KINDS = ("linear", "conv2d", "embedding")
KOHYA_KINDS = ("linear", "conv2d")
FORMATS = ("diffusers", "kohya")
# diffusers' `load_lora_weights` reads LoraConfig kwargs (prefixed by component) from this metadata key.
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
KOHYA_NETWORK_MODULE = "networks.lora"


@dataclass
class ExportedModule:
    """One module's rank-r factors in the storage dtype, up @ down = ΔW_R (`lora_probe.WeightChange` orientation)."""

    component: str
    name: str
    kind: str
    module: torch.nn.Module
    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoraExport:
    """The result of `export_lora`.

    Attributes:
        state_dict: the diffusers-format file's tensors (key layout in `lora_layout`); every component but
            `transformer_2`.
        metadata: its safetensors metadata (`lora_adapter_metadata`: r, lora_alpha, rank_pattern, alpha_pattern,
            target_modules per component; `base_model` when it is a Hub id).
        kohya_state_dict: the kohya file's tensors, `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` /
            `.alpha`; empty for bases other than Stable Diffusion 1/2 and SDXL (`lora_layout.model_family`).
        kohya_metadata: its metadata (`ss_network_module`, `ss_network_dim`, `ss_network_alpha`,
            `ss_base_model_version` as kohya's sd-scripts writes them).
        layers: module → {"rank", "max_rank", "relative_error"} for every exported layer.
        dropped: module → reason, for shifted modules that have no LoRA form (norms), no change, or belong to a
            component no diffusers LoRA loader reads (`lora_layout.unreadable_reason`).
        kohya_skipped: module → reason, for exported modules that only the diffusers-format file holds (embeddings).
        relative_error: ‖ΔW − ΔW_R‖_F / ‖ΔW‖_F over all exported layers together.
        reproduced: component → {"diffusers": score, "kohya": score}: 1 − ‖out_lora − out_shift‖ /
            ‖out_shift − out_base‖ on a small probe input (`lora_probe`); empty without the probe.
        paths: "diffusers", "diffusers transformer_2", "kohya" → the files written.
        transformer_2_state_dict, transformer_2_metadata: the second diffusers-format file, for Wan 2.2's
            `transformer_2` (keys `transformer.…`, `load_lora_weights(path, load_into_transformer_2=True)`), written
            to `transformer_2_path(output)`; empty when the shift has no `transformer_2`.
    """

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]
    kohya_state_dict: dict[str, torch.Tensor]
    kohya_metadata: dict[str, str] = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    kohya_skipped: dict[str, str] = field(default_factory=dict)
    relative_error: float = 0.0
    reproduced: dict[str, Optional[dict[str, Optional[float]]]] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    transformer_2_state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    transformer_2_metadata: dict[str, str] = field(default_factory=dict)

    def report(self) -> dict:
        return {"relative_error": self.relative_error, "layers": self.layers, "dropped": self.dropped,
                "kohya_skipped": self.kohya_skipped, "output_change_reproduced": self.reproduced,
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
    probe: bool = True,
) -> LoraExport:
    """Export a spectral shift (at weight 1) as a LoRA of the given rank or energy.

    Args:
        source: the shift file (or folder, or `SpectralShiftFile`).
        base: its base model (local folder, model or `{component: model}`): U, σ, V come from its weights, which
            must be the ones the shift was trained on (`WrongBaseModelError` otherwise).
        rank (`int`, *optional*): the rank of every layer (fewer where the layer has fewer non-zero changes).
        energy (`float`, *optional*): instead of `rank`, per layer the smallest rank keeping this fraction of
            ‖ΔW‖²_F (e.g. `0.99`). Exactly one of `rank` and `energy` is required.
        output (*optional*): the diffusers-format file (`pipe.load_lora_weights(path)`, ComfyUI). A shift of
            `transformer_2` (Wan 2.2) is written beside it to `transformer_2_path(output)`.
        kohya_output (*optional*): the kohya file (ComfyUI, A1111, LyCORIS, `pipe.load_lora_weights`); Stable
            Diffusion 1/2 and SDXL only (`ToolError` for DiT pipelines, before any SVD).
        dtype (`torch.dtype`, *optional*, defaults to float32): storage dtype of the LoRA tensors.
        probe (`bool`, *optional*, defaults to True): measure on a small input how much of the shift's output
            change each file reproduces (`LoraExport.reproduced`; a few forward passes of each component).

    Returns:
        `LoraExport` with both files' tensors and metadata, the per-layer and overall relative errors of ΔW.
    """
    if (rank is None) == (energy is None):
        raise ToolError("Give exactly one of `rank` (e.g. 8) and `energy` (e.g. 0.99).")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ToolError(f"`rank` should be a positive integer but the value passed is {rank!r}.")
    if energy is not None and not 0 < energy <= 1:
        raise ToolError(f"`energy` should be in (0, 1] but the value passed is {energy!r}.")
    if output is not None and kohya_output is not None and Path(output).resolve() == Path(kohya_output).resolve():
        raise ToolError(f"The diffusers file and the kohya file are both {os.fspath(output)}; give two paths.")
    for path in (output, kohya_output):
        check_not_exists(path, overwrite)
    shift_file = read_shift(source)
    second_output = transformer_2_path(output) if lora_layout.SECOND_TRANSFORMER in shift_file.deltas else None
    check_not_exists(second_output, overwrite)
    pipeline_class = base_pipeline_class(base)
    result = LoraExport(state_dict={}, metadata={}, kohya_state_dict={})
    readable = {}
    for component, deltas in shift_file.deltas.items():
        reason = lora_layout.unreadable_reason(component, pipeline_class)
        if reason is None:
            readable[component] = deltas
        else:  # left out before its SVD: no reader would apply it
            result.dropped.update({qualified(component, name): reason for name in deltas})
    if not readable:
        raise ToolError(f"Nothing to export: no diffusers LoRA loader reads {shift_file.components} "
                        f"({next(iter(result.dropped.values()))}).")
    shift_file = dataclasses.replace(shift_file, deltas=readable)
    models = load_base(base, shift_file.components)
    family = lora_layout.model_family(models, models.pipeline_class)
    if kohya_output is not None and family is None:
        raise ToolError(
            "kohya files (--kohya) are written for Stable Diffusion 1/2 and SDXL only; for this base (components "
            f"{list(models)}) kohya-style readers expect the original checkpoint's module names (for Flux, BFL's "
            "`double_blocks.0.img_attn.qkv`, q, k and v fused), not the diffusers modules the shift is stored on. "
            "Use the diffusers-format file (-o): diffusers' load_lora_weights and ComfyUI read it."
        )
    infos = base_modules(models, shift_file, svd_cache=svd_cache)
    check_base(shift_file, infos)

    exported, total, dropped_total = _exported_modules(shift_file, infos, rank, energy, dtype, result)
    kohya_modules = [m for m in exported if m.kind in KOHYA_KINDS] if family is not None else []
    if kohya_output is not None and not kohya_modules:
        raise ToolError(f"Nothing for the kohya file: it cannot hold {sorted(result.kohya_skipped)}.")
    result.relative_error = math.sqrt(dropped_total / total) if total else 0.0
    error_text = f"{result.relative_error:.6g}"

    first = [m for m in exported if m.component != lora_layout.SECOND_TRANSFORMER]
    second = [m for m in exported if m.component == lora_layout.SECOND_TRANSFORMER]
    base_model = hub_id_or_none(shift_file.base_model)  # a local path would only leak where it was made
    result.state_dict, result.metadata = _diffusers_file(first, models, family, error_text, base_model)
    result.transformer_2_state_dict, result.transformer_2_metadata = _diffusers_file(
        second, models, family, error_text, base_model)
    if family is not None:
        alpha = _common_rank(kohya_modules)
        result.kohya_state_dict = _kohya_state_dict(kohya_modules, models, family, alpha)
        result.kohya_metadata = _kohya_metadata(kohya_modules, alpha, family, error_text)

    if probe:
        result.reproduced = _probe(models, shift_file, infos, exported, result.kohya_state_dict, family)
    if output is not None and result.state_dict:
        result.paths["diffusers"] = _save(result.state_dict, output, result.metadata)
    if second_output is not None and result.transformer_2_state_dict:
        result.paths["diffusers transformer_2"] = _save(result.transformer_2_state_dict, second_output,
                                                        result.transformer_2_metadata)
    if kohya_output is not None:
        result.paths["kohya"] = _save(result.kohya_state_dict, kohya_output, result.kohya_metadata)
    return result


def transformer_2_path(output: Union[str, os.PathLike, None]) -> Optional[Path]:
    """Where the LoRA of Wan 2.2's second expert goes, beside `output`: `lora.safetensors` →
    `lora_transformer_2.safetensors` (for `pipe.load_lora_weights(path, load_into_transformer_2=True)`)."""
    if output is None:
        return None
    output = Path(output)
    return output.with_name(f"{output.stem}_{lora_layout.SECOND_TRANSFORMER}{output.suffix}")


def _exported_modules(shift_file, infos, rank, energy, dtype, result: LoraExport):
    """(modules with their rank-r factors, Σ c², Σ dropped c²); fills `result.layers`, `dropped`, `kohya_skipped`."""
    exported, total, dropped_total = [], 0.0, 0.0
    for component, deltas in shift_file.deltas.items():
        for name, delta in deltas.items():
            info, full_name = infos[component][name], qualified(component, name)
            if info.kind not in LORA_KINDS or info.factors is None:
                result.dropped[full_name] = f"{info.kind} weights have no LoRA form"
                continue
            change = spectral.spectral_change(info.factors.S, delta.to(torch.float32))
            squares = change.double().pow(2)
            if not bool((change != 0).any()):
                result.dropped[full_name] = "no change (δ = 0 or fully clipped at 0)"
                continue
            top, rest = choose_rank(change, rank, energy)
            lost = float(squares[rest].sum())
            total += float(squares.sum())
            dropped_total += lost
            result.layers[full_name] = {"rank": len(top), "max_rank": int((change != 0).sum()),
                                        "relative_error": math.sqrt(lost / float(squares.sum()))}
            with one_thread_if_small(info.weight.numel()):
                down, up = _factors(info, change, top)
            # Rounded to the storage dtype here, so that the probe measures what the files hold.
            exported.append(ExportedModule(component, name, info.kind, info.module, down.to(dtype), up.to(dtype)))
            if info.kind not in KOHYA_KINDS:
                result.kohya_skipped[full_name] = (f"{info.kind}: no kohya key that diffusers and A1111 read; in the "
                                                   "diffusers-format file")
    if not exported:
        raise ToolError(f"Nothing to export: every shifted module was dropped ({result.dropped}).")
    return exported, total, dropped_total


def _diffusers_file(modules: list[ExportedModule], models, family, error_text: str, base_model: Optional[str]):
    """(tensors, metadata) of one diffusers-format file; empty for no modules."""
    if not modules:
        return {}, {}
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(_lora_config(modules), sort_keys=True),
                "svdiff_relative_error": error_text}
    if base_model:
        metadata["base_model"] = base_model
    return _diffusers_state_dict(modules, models, family), metadata


def _factors(info, change: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """down (r × n, or r × c_in × kh × kw) and up (m × r, or c_out × r × 1 × 1) with up @ down = ΔW_R."""
    U = info.factors.U.to(torch.float32)[:, top]
    Vh = info.factors.Vh.to(torch.float32)[top, :]
    c = change[top]
    root = c.abs().sqrt()
    up = U * (torch.sign(c) * root)
    down = root[:, None] * Vh
    weight = info.weight
    if info.kind == "conv2d":
        down = down.reshape(len(top), *weight.shape[1:])
        up = up.reshape(weight.shape[0], len(top), 1, 1)
    return down, up


def _diffusers_state_dict(exported: list[ExportedModule], models, family) -> dict[str, torch.Tensor]:
    state_dict = {}
    for m in exported:
        model = models[m.component]
        a_key, b_key = lora_layout.diffusers_keys(lora_layout.file_component(m.component), model, m.name, m.kind)
        if m.kind == "embedding":
            # PEFT's embedding LoRA: out = embedding(ids, Aᵀ) @ Bᵀ, so A = upᵀ (r × vocab), B = downᵀ (dim × r).
            state_dict[a_key], state_dict[b_key] = m.up.T.contiguous(), m.down.T.contiguous()
        else:
            state_dict[a_key], state_dict[b_key] = m.down.contiguous(), m.up.contiguous()
        comfyui_key = lora_layout.comfyui_generic_key(m.component, model, m.name, family)
        if comfyui_key is not None:  # ComfyUI's LoRA: ΔW = lora_B @ lora_A; copies (safetensors refuses shared memory)
            state_dict[f"{comfyui_key}.lora_A.weight"] = m.down.clone()
            state_dict[f"{comfyui_key}.lora_B.weight"] = m.up.clone()
    return state_dict


def _lora_config(exported: list[ExportedModule]) -> dict:
    """LoraConfig kwargs per component, prefixed by component as diffusers' `save_lora_weights` writes them: the most
    common rank, per-module rank/alpha patterns (alpha = rank: scale 1) and the PEFT default initialisation, so that
    a module a reader does not find stays unchanged (lora_B = 0) instead of getting random weights."""
    config = {}
    for component in dict.fromkeys(m.component for m in exported):
        ranks = {lora_layout.peft_target_name(component, m.name): m.rank for m in exported if m.component == component}
        common = _common_rank([m for m in exported if m.component == component])
        prefix = lora_layout.file_component(component)
        # '^name' anchors PEFT's pattern match `(.*\.)?(key)$` at the start (diffusers writes patterns the same way);
        # text-encoder names stay unanchored so that they match with and without `text_model.`.
        anchor = "" if component.startswith("text_encoder") else "^"
        pattern = {f"{anchor}{name}": r for name, r in ranks.items() if r != common}
        kwargs = {"r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
                  "target_modules": sorted(ranks)}
        config.update({f"{prefix}.{k}" if prefix else k: v for k, v in kwargs.items()})
    return config


def _common_rank(modules: list[ExportedModule]) -> int:
    ranks = [m.rank for m in modules]
    return max(set(ranks), key=ranks.count) if ranks else 0


def _kohya_state_dict(modules: list[ExportedModule], models, family, alpha: int) -> dict[str, torch.Tensor]:
    """kohya keys with ONE alpha for all modules; each lora_up carries rᵢ/alpha so that (alpha/rᵢ)·up·down = ΔW_R.

    Per-module alphas would be equally valid kohya files, but diffusers' kohya loader (0.42) maps differing alphas to
    wrong module names and silently applies scale alpha_common/rᵢ instead (measured: output error 0.035 vs 2e-6).
    """
    state_dict = {}
    for m in modules:
        key = lora_layout.kohya_name(m.component, models[m.component], m.name, family)
        state_dict[f"{key}.lora_down.weight"] = m.down.contiguous()
        state_dict[f"{key}.lora_up.weight"] = (m.up.float() * (m.rank / alpha)).to(m.up.dtype).contiguous()
        state_dict[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=m.up.dtype)
    return state_dict


def _kohya_metadata(modules: list[ExportedModule], alpha: int, family: Optional[str], error_text: str) -> dict:
    """sd-scripts' keys; like its `networks/resize_lora.py`, "Dynamic" dim and alpha where the ranks differ."""
    uniform = len({m.rank for m in modules}) <= 1
    metadata = {"ss_network_module": KOHYA_NETWORK_MODULE,
                "ss_network_dim": str(alpha) if uniform else "Dynamic",
                "ss_network_alpha": str(float(alpha)) if uniform else "Dynamic",
                "svdiff_relative_error": error_text}
    if family is not None:
        metadata["ss_base_model_version"] = family
    return metadata


def _probe(models, shift_file, infos, exported: list[ExportedModule], kohya_state_dict, family) -> dict:
    """Per component, the output change each file reproduces, from the tensors as each file stores them."""
    scores = {}
    for component, deltas in shift_file.deltas.items():
        shift = lora_probe.shift_changes(deltas, infos[component])
        files = {label: [] for label in (FORMATS if family is not None else ("diffusers",))}
        for m in exported:
            if m.component != component:
                continue
            files["diffusers"].append(lora_probe.lora_change(m.module, m.kind, m.down, m.up))
            if "kohya" in files and m.kind in KOHYA_KINDS:
                key = lora_layout.kohya_name(component, models[component], m.name, family)
                files["kohya"].append(lora_probe.WeightChange(m.module, m.kind,
                                                              partial(_kohya_factors, kohya_state_dict, key)))
        scores[component] = lora_probe.reproduced(models[component], shift, files)
    return scores


def _kohya_factors(state_dict, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of a kohya module with its scale alpha / rank applied, as kohya readers compute it."""
    down, up = state_dict[f"{key}.lora_down.weight"], state_dict[f"{key}.lora_up.weight"]
    return down, up.float() * (float(state_dict[f"{key}.alpha"]) / down.shape[0])


def _save(tensors, path, metadata) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, path, metadata)
    return path


__all__ = ["LoraExport", "choose_rank", "export_lora", "transformer_2_path"]
