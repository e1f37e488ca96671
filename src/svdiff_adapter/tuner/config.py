"""`SpectralShiftConfig`: which modules get spectral shifts, and how norms are shifted."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig


class SpectralShiftPeftType(str, enum.Enum):
    """PEFT type of spectral shifts.

    PEFT's `PeftType` enum cannot be extended without private enum internals. A str-enum member hashes and compares
    like the plain string "SPECTRAL_SHIFT" (so PEFT's mapping lookups work) and still has the `.value` that
    transformers and PEFT's hotswap code read.
    """

    SPECTRAL_SHIFT = "SPECTRAL_SHIFT"


MODULE_KINDS = ("linear", "conv2d", "embedding", "norm")
NORM_MODES = ("elementwise", "scalar")


@dataclass
class SpectralShiftConfig(PeftConfig):
    """Configuration of a spectral-shift (SVDiff) adapter.

    Each targeted weight W = U diag(σ) Vᵀ is replaced by U diag(ReLU(σ + Σᵢ wᵢ δᵢ)) Vᵀ, where δᵢ (one number per
    singular value) is the only trainable state. Conv kernels are reshaped to c_out × (c_in·kh·kw).

    Args:
        target_modules (`list[str]` or `str`, *optional*, defaults to `None`):
            Module names (exact or suffix) or a regex, as in PEFT's LoRA. `None` targets every module whose kind is
            listed in `target_kinds`.
        exclude_modules (`list[str]` or `str`, *optional*, defaults to `None`):
            Module names or a regex to leave untouched.
        target_kinds (`list[str]`, *optional*, defaults to `["linear", "conv2d"]`):
            Which module kinds may be shifted: any of `"linear"`, `"conv2d"`, `"embedding"` and `"norm"`
            (`LayerNorm` / `GroupNorm` weights). Modules of other kinds are never targeted.
        norm_mode (`str`, *optional*, defaults to `"elementwise"`):
            How 1-D norm weights γ are shifted: `"elementwise"` adds one shift per element (γ + δ, the paper);
            `"scalar"` treats γ as a 1×C matrix whose single singular value is ‖γ‖, i.e. γ·ReLU(‖γ‖+δ)/‖γ‖
            (svdiff-pytorch's files).
        init_scale (`float`, *optional*, defaults to `0.0`):
            Standard deviation of the random initial δ. `0.0` (the default) starts exactly at the base model.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names or a regex to shift; None targets every module of the kinds in target_kinds."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to exclude from shifting."}
    )
    target_kinds: list[str] = field(
        default_factory=lambda: ["linear", "conv2d"],
        metadata={"help": f"Module kinds that may be shifted, a subset of {MODULE_KINDS}."},
    )
    norm_mode: str = field(
        default="elementwise",
        metadata={"help": "1-D norm weights: 'elementwise' (γ + δ) or 'scalar' (γ·ReLU(‖γ‖+δ)/‖γ‖)."},
    )
    init_scale: float = field(
        default=0.0, metadata={"help": "Std of the random initial shift; 0 starts at the base model exactly."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Unused; present because PEFT's target matching reads it."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Unused; present because PEFT's target matching reads it."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SpectralShiftPeftType.SPECTRAL_SHIFT
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_kinds, str):
            self.target_kinds = [self.target_kinds]
        self.target_kinds = list(self.target_kinds)
        unknown = [kind for kind in self.target_kinds if kind not in MODULE_KINDS]
        if unknown or not self.target_kinds:
            raise ValueError(
                f"`target_kinds` should be a non-empty subset of {list(MODULE_KINDS)} but the value passed is "
                f"{self.target_kinds}."
            )
        if self.norm_mode not in NORM_MODES:
            raise ValueError(
                f"`norm_mode` should be one of {list(NORM_MODES)} but the value passed is {self.norm_mode!r}."
            )
        if self.init_scale < 0:
            raise ValueError(f"`init_scale` should be >= 0 but the value passed is {self.init_scale}.")
