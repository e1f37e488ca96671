"""Which modules take a spectral shift, and how long each shift is: target matching for the tuner and the one fit
check that loaders and tools run before a file's shifts touch a model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn

from ..format import SpectralShiftFormatError
from ..spectral import shift_length
from .config import SpectralShiftConfig


def module_kind(module: nn.Module) -> Optional[str]:
    """The kind of a raw torch module as named in `SpectralShiftConfig.target_kinds`, or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and getattr(module, "weight", None) is not None:
        return "norm"
    return None


# What to do instead, said with every refusal of a quantized or float8-stored weight.
QUANTIZED_ADVICE = ("load the base in bfloat16/float16/float32 to apply a spectral shift; for a quantized model, export "
                    "the shift as a LoRA against the float base (`svdiff export-lora`) and load that LoRA instead")
_FLOAT8_DTYPES = tuple(dtype for name in dir(torch) if name.startswith("float8_")
                       and isinstance(dtype := getattr(torch, name), torch.dtype))


def quantized_weight_reason(module: nn.Module) -> Optional[str]:
    """Why a module's weight is not a plain floating-point tensor that a shift can decompose and run with, or None.

    A shift needs the float weight twice: for its SVD and for its forward, which runs the base op with
    W_δ = W + U·diag(c)·Vᵀ built in the weight's own dtype. None of these holds one:

    - bitsandbytes `Linear4bit` / `Linear8bitLt` (`nn.Linear` subclasses): `Params4bit` holds packed 4-bit codes
      (a (n·m/2) × 1 uint8 column) and `Int8Params` int8 rows with separate scales; an SVD of either is meaningless,
      and their forward does not take another weight.
    - torchao (`quantize_`): the weight is a tensor subclass (`Int8Tensor`, `AffineQuantizedTensor`, ...) on a plain
      `nn.Linear`, whose `dtype` still reads float32; arithmetic on it stays quantized.
    - GGUF (diffusers 0.42 quantizers/gguf/utils.py `GGUFLinear` / `GGUFParameter`): uint8 blocks of the GGML
      format, dequantized by the module's own forward.
    - float8 storage (diffusers' `enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, ...)`, hooks/
      layerwise_casting.py, or a float8 checkpoint): the layer's hook upcasts W per forward, but a shift replaces
      that forward and would build W_δ in float8 (3 mantissa bits: most of the shift's change rounds away) and
      multiply it with compute-dtype inputs.

    Any weight that is not exactly a `torch.Tensor` / `nn.Parameter` of a floating dtype is refused the same way, so
    quantizers not listed here are never decomposed silently. Dequantizing only for the SVD would not help: the
    forward and `fuse` still need a float weight. A LoRA exported from the shift against the float base
    (`svdiff export-lora`, docs/tools.md) adds the same ΔW to the quantized weight, as LoRAs on quantized bases do
    (PEFT 0.21 has LoRA layers for bitsandbytes and torchao weights, peft/tuners/lora/bnb.py and torchao.py).
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if type(weight) not in (torch.Tensor, nn.Parameter) or type(weight.data) is not torch.Tensor:
        origin = type(weight).__module__.split(".")[0]
        return (f"its weight is a {origin} {type(weight).__name__} (a quantized or wrapped tensor, not a plain float "
                f"weight); {QUANTIZED_ADVICE}")
    if weight.dtype in _FLOAT8_DTYPES:
        return (f"its weight is stored in {str(weight.dtype).removeprefix('torch.')} (e.g. diffusers' "
                "enable_layerwise_casting), and a shift needs the full-precision weight for its SVD and its forward; "
                f"{QUANTIZED_ADVICE}")
    if not weight.is_floating_point():
        return f"its weight is {str(weight.dtype).removeprefix('torch.')} (quantized); {QUANTIZED_ADVICE}"
    return None


def unsupported_reason(module: nn.Module, parent: Optional[nn.Module] = None) -> Optional[str]:
    """Why a module of a supported kind cannot be shifted (given the module that holds it), or None."""
    quantized = quantized_weight_reason(module)
    if quantized is not None:
        return quantized
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"Conv2d with groups={module.groups} (only groups=1 kernels have one matrix to decompose)"
    if isinstance(parent, nn.MultiheadAttention):
        # MultiheadAttention passes `out_proj.weight` to F.multi_head_attention_forward instead of calling out_proj,
        # so a wrapper around it would never run: its shift would be ignored and get no gradient.
        return "nn.MultiheadAttention reads out_proj.weight directly, so a shift of out_proj would never apply"
    return None


def uses_factors(kind: str, norm_mode: str) -> bool:
    """Elementwise norm shifts need no SVD; every other shift does."""
    return not (kind == "norm" and norm_mode == "elementwise")


def raw_module(module: nn.Module) -> nn.Module:
    """The original module inside any chain of tuner layers (ours, LoRA, ...)."""
    while isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return module


def _parent(model: nn.Module, name: str) -> nn.Module:
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


# ---------------------------------------------------------------------------------------- matching a config
def is_excluded(config: SpectralShiftConfig, name: str) -> bool:
    """Excluded by `exclude_modules` or `modules_to_save`, by the rules of PEFT's own matcher."""
    excluded = config.exclude_modules
    if excluded is not None:
        if isinstance(excluded, str):
            if re.fullmatch(excluded, name):
                return True
        elif any(name == entry or name.endswith("." + entry) for entry in excluded):
            return True
    # Modules saved whole (and their children) are never shifted, as in PEFT.
    return any(re.match(rf"(^|.*\.){saved}($|\..*)", name) for saved in config.modules_to_save or ())


def _layer_index_allowed(config: SpectralShiftConfig, name: str) -> bool:
    """`layers_to_transform` / `layers_pattern`, matched as PEFT's LoRA matches them: the first numbered path
    segment (after `layers_pattern` when given) is the layer index."""
    indexes = config.layers_to_transform
    if indexes is None:
        return True
    patterns = config.layers_pattern
    patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
    if patterns:
        matches = (re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name) for pattern in patterns)
        match = next((m for m in matches if m is not None), None)
    else:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def _matched_by_config(config: SpectralShiftConfig, name: str) -> bool:
    if is_excluded(config, name) or not _layer_index_allowed(config, name):
        return False
    return config.target_modules is None or bool(check_target_module_exists(config, name))


def resolve_targets(
    model: nn.Module, config: SpectralShiftConfig, module_names: Optional[set[str]] = None
) -> dict[str, nn.Module]:
    """Module names → raw modules that an adapter with this config (or these explicit names) shifts.

    A module is shifted when it matches `target_modules` (None: all), is not excluded (`exclude_modules`,
    `modules_to_save`), sits in one of `layers_to_transform`, and its kind is in `target_kinds`. Explicitly named
    modules that cannot be shifted raise; a catch-all never targets them (e.g. `out_proj` of `nn.MultiheadAttention`).
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
        elif not _matched_by_config(config, name):
            continue
        raw = raw_module(module)
        kind = module_kind(raw)
        if kind is None or (module_names is None and kind not in config.target_kinds):
            continue
        reason = unsupported_reason(raw, _parent(model, name))
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


# ------------------------------------------------------------------------------------------- fitting a file
@dataclass(frozen=True)
class ShiftTarget:
    """One module a shift applies to: the raw module, its kind, whether the shift moves singular values, and the
    `spectral_rank` that truncates its spectrum (None: all of it)."""

    module: nn.Module
    kind: str
    decomposed: bool
    rank: Optional[int] = None

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def shift_length(self) -> int:
        return shift_length(self.module.weight.shape, self.decomposed, self.rank)


class ShiftDoesNotFitError(SpectralShiftFormatError):
    """The shifts of a file do not fit a model: missing modules, modules that cannot be shifted, wrong lengths."""


def fit_shifts(
    model: nn.Module, shifts: Mapping[str, torch.Tensor], norm_mode: str, what: str = "this model",
    rank: Optional[int] = None,
) -> dict[str, ShiftTarget]:
    """Check that every shift (module path → δ) fits `model` before anything changes: the module exists, can be
    shifted, and δ is 1-D with one value per kept singular value (`rank`: the file's `spectral_rank`) or per element
    of an elementwise norm weight.

    Raises `ShiftDoesNotFitError` listing the problems; returns the targets otherwise.
    """
    targets, problems = {}, []
    for name, delta in shifts.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such module")
            continue
        raw = raw_module(module)
        kind = module_kind(raw)
        reason = unsupported_reason(raw, _parent(model, name)) if kind is not None else (
            f"{type(raw).__name__} cannot be shifted")
        if reason is not None:
            problems.append(f"{name}: {reason}")
            continue
        target = ShiftTarget(raw, kind, uses_factors(kind, norm_mode), rank)
        if delta.ndim != 1 or delta.numel() != target.shift_length:
            with_rank = f" with spectral_rank={rank}" if rank is not None and target.decomposed else ""
            problems.append(f"{name}: shift has shape {tuple(delta.shape)}, the module needs "
                            f"({target.shift_length},){with_rank}")
            continue
        targets[name] = target
    if problems:
        raise ShiftDoesNotFitError(
            f"The spectral shift does not fit {what} ({len(problems)} problem(s)): " + "; ".join(problems[:6])
            + (" ..." if len(problems) > 6 else "")
        )
    return targets
