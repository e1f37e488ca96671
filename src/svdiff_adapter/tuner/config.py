"""`SpectralShiftConfig`: which modules get spectral shifts, how norms are shifted, and how much of each spectrum."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from peft.config import PeftConfig

from ..svd import SVD_DTYPES, TruncatedSVD, check_count


class SpectralShiftPeftType(str, enum.Enum):
    """PEFT type of spectral shifts.

    PEFT's `PeftType` enum cannot be extended without private enum internals. A str-enum member hashes and compares
    like the plain string "SPECTRAL_SHIFT" (so PEFT's mapping lookups work) and still has the `.value` that
    transformers and PEFT's hotswap code read.
    """

    SPECTRAL_SHIFT = "SPECTRAL_SHIFT"


MODULE_KINDS = ("linear", "conv2d", "embedding", "norm")
NORM_MODES = ("elementwise", "scalar")
FACTOR_DTYPES = ("float16", "float32")


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
        factor_dtype (`str`, *optional*, defaults to `"float16"`):
            Storage dtype of the SVD factors U and Vᵀ: `"float16"` (half the memory; ΔW exact to ~2⁻¹¹ of each
            value's change, W itself exact) or `"float32"` (twice the memory, the paper's formula to float32
            round-off). The factors belong to the module: every adapter of one module uses the first adapter's.
        layers_to_transform (`int` or `list[int]`, *optional*, defaults to `None`):
            Only shift modules of these layer indices, matched as PEFT's LoRA matches them (the first number in the
            module path, after `layers_pattern` when given). Works with `target_modules=None` and with a list; a
            regex `target_modules` cannot be combined with it.
        layers_pattern (`str` or `list[str]`, *optional*, defaults to `None`):
            The name of the module list holding the layers (e.g. `"layers"`, `"h"`); needs `layers_to_transform`.
        modules_to_save (`list[str]`, *optional*, defaults to `None`):
            Modules trained and saved whole beside the shifts (e.g. a classifier head), as in PEFT's other tuners.
            `get_peft_model` with `task_type="SEQ_CLS"` adds the classifier itself. They are never shifted.
        spectral_rank (`int`, *optional*, defaults to `None`):
            Shift only the top k singular values of each matrix: a matrix m × n keeps U_k, σ_k, V_kᵀ with
            k' = min(k, min(m, n)) and its δ has k' values; W_δ = W + U_k·diag(ReLU(σ_k + δ) − σ_k)·V_kᵀ (δ = 0 still
            gives W exactly). The top-k factors come from a seeded randomized SVD (Halko, Martinsson & Tropp 2011),
            far cheaper than a full SVD for large matrices. `None` (the default) shifts the full spectrum. Norm
            weights shifted elementwise are unaffected. Files record it and the three values below, so that a load
            rebuilds the same factors.
        spectral_oversampling (`int`, *optional*, defaults to `16`):
            Extra columns p of the randomized sketch (k' + p columns); only used with `spectral_rank`.
        spectral_power_iterations (`int`, *optional*, defaults to `4`):
            Power iterations q of the randomized SVD (each one product with Wᵀ and one with W, re-orthonormalised);
            more make the top-k factors of slowly decaying spectra closer to the exact ones.
        spectral_seed (`int`, *optional*, defaults to `0`):
            Seed of the sketch's Gaussian test matrix (drawn on the CPU, the same for every device type).
        spectral_svd_dtype (`str`, *optional*, defaults to `"float32"`):
            Arithmetic of the randomized SVD: `"float32"` or `"float64"`.

    The shifts δ are float32 parameters whatever the model's dtype (PEFT's `autocast_adapter_dtype=True`, the
    default); `autocast_adapter_dtype=False` in `get_peft_model` / `PeftModel.from_pretrained` keeps them in the
    dtype of a float16 / bfloat16 base weight instead.
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
    factor_dtype: str = field(
        default="float16",
        metadata={"help": f"Storage dtype of the SVD factors U, Vᵀ, one of {FACTOR_DTYPES} (float32: 2× memory)."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only shift modules of these layer indices (as PEFT's LoRA matches them)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the module list holding the layers; needs layers_to_transform."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained and saved whole beside the shifts (e.g. a classifier)."}
    )
    spectral_rank: Optional[int] = field(
        default=None,
        metadata={"help": "Shift only the top k singular values of each matrix (k' = min(k, min(m, n)) values, from a "
                          "seeded randomized SVD); None shifts the full spectrum."},
    )
    spectral_oversampling: int = field(
        default=16, metadata={"help": "Extra sketch columns p of the randomized SVD (with spectral_rank)."}
    )
    spectral_power_iterations: int = field(
        default=4, metadata={"help": "Power iterations q of the randomized SVD (with spectral_rank)."}
    )
    spectral_seed: int = field(
        default=0, metadata={"help": "Seed of the randomized SVD's Gaussian test matrix (with spectral_rank)."}
    )
    spectral_svd_dtype: str = field(
        default="float32", metadata={"help": f"Arithmetic of the randomized SVD, one of {SVD_DTYPES}."}
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
        if isinstance(self.factor_dtype, torch.dtype):
            self.factor_dtype = str(self.factor_dtype).removeprefix("torch.")
        if self.factor_dtype not in FACTOR_DTYPES:
            raise ValueError(
                f"`factor_dtype` should be one of {list(FACTOR_DTYPES)} but the value passed is {self.factor_dtype!r}."
            )
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError("`layers_to_transform` and `layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        if self.spectral_rank is not None:
            check_count("spectral_rank", self.spectral_rank, minimum=1)
            self.spectral_rank = int(self.spectral_rank)
        check_count("spectral_oversampling", self.spectral_oversampling, minimum=0)
        check_count("spectral_power_iterations", self.spectral_power_iterations, minimum=0)
        check_count("spectral_seed", self.spectral_seed, minimum=0, maximum=2**63 - 1)
        if isinstance(self.spectral_svd_dtype, torch.dtype):
            self.spectral_svd_dtype = str(self.spectral_svd_dtype).removeprefix("torch.")
        if self.spectral_svd_dtype not in SVD_DTYPES:
            raise ValueError(f"`spectral_svd_dtype` should be one of {list(SVD_DTYPES)} but the value passed is "
                             f"{self.spectral_svd_dtype!r}.")

    @property
    def truncated_svd(self) -> Optional[TruncatedSVD]:
        """How the top-k factors are computed, or None for the full spectrum (`spectral_rank=None`)."""
        if self.spectral_rank is None:
            return None
        return TruncatedSVD(rank=self.spectral_rank, oversampling=int(self.spectral_oversampling),
                            power_iterations=int(self.spectral_power_iterations), seed=int(self.spectral_seed),
                            dtype=self.spectral_svd_dtype)
