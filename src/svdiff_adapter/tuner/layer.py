"""Spectral-shift layers: one base class that applies the math of `svdiff_adapter.spectral` to a wrapped module, and
thin subclasses that say how to run each module type with another weight.

For a weight W = U diag(σ) Vᵀ and active adapters i with shifts δᵢ and weights wᵢ, the layer applies

    W_δ = W + U · diag(ReLU(σ + Σᵢ wᵢ δᵢ) − σ) · Vᵀ            (delta form; δ = 0 gives W bit for bit)

Inference reuses W_δ (`SpectralWeightCache`) until δ, the weights, the active set, the base weight or its
device/dtype change; the forward pass then costs exactly one call of the base operation. Training recomposes W_δ
each step through `spectral.SpectralDeltaWeight`, or — where it is cheaper (few rows) — adds the factored term
op(op(x, Vᵀ)·c, U) to the base output.

With the switch cache on, each adapter's Dᵢ = U·diag(δᵢ)·Vᵀ is kept, and a change of weights or active set rebuilds
the weight linearly, because ReLU(σ + s) − σ = s + ReLU(−(σ + s)):

    W_δ = W + Σᵢ wᵢ Dᵢ + U_J · diag(ReLU(−(σ + s))_J) · V_Jᵀ,   J = the singular values the ReLU clips

which costs a few passes over the weight instead of an m·n·k product, at the price of one weight-sized matrix per
adapter.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .. import spectral
from ..svd import SpectralFactors, tensor_digest
from . import merge_storage
from .cache import SpectralWeightCache
from .factor_storage import FACTOR_BUFFERS, SpectralFactorStorage

BUILD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SpectralShiftLayer(SpectralFactorStorage, nn.Module, BaseTunerLayer):
    """Base of all spectral-shift layers; subclasses only say how to run the base op with a given weight.

    It is an `nn.Module` itself (ahead of PEFT's mixin) so that its `forward` and `_apply` (`SpectralFactorStorage`)
    are the ones used.
    """

    adapter_layer_names = ("spectral_delta",)
    other_param_names = ("spectral_scaling",)
    # Shape attributes of the wrapped module that callers read off the layer they find (diffusers' SDXL pipeline reads
    # `unet.add_embedding.linear_1.in_features`), copied as PEFT's LoRA layers copy in/out_features.
    mirrored_attributes: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, factors: Optional[SpectralFactors]) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        for attribute in self.mirrored_attributes:
            setattr(self, attribute, getattr(base_layer, attribute))
        self.in_features, self.out_features = self.features(base_layer)
        self.spectral_delta = nn.ParameterDict()
        self.spectral_scaling: dict[str, float] = {}
        self._spectral_unscaled: Optional[dict[str, float]] = None
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter: list[str] = []
        # (original weight tensor, combined shift baked into the merged weight, digest of the merged weight)
        self._spectral_merge: Optional[tuple[torch.Tensor, torch.Tensor, str]] = None
        for name in FACTOR_BUFFERS:
            self.register_buffer(name, None, persistent=False)
        self.spectral_cache = SpectralWeightCache()
        self._spectral_storage_dtype: Optional[torch.dtype] = None  # set while the factors are upcast for training
        # Where the factors rest between uses (`factor_location.py`): "device" follows the weight; "cpu" / "disk"
        # stay on the CPU, and `_resting_factors` holds them while float32 copies on the device train δ.
        self.spectral_factor_location = getattr(factors, "location", "device")
        self._resting_factors: Optional[tuple[torch.Tensor, ...]] = None
        # Precision of the U·diag(c)·Vᵀ products that build inference weights (W itself is never rounded).
        self.spectral_build_dtype = torch.float32
        # Set under sequential CPU offload (`offload_spectral_layers`): the layer's tensors stay where they are and
        # each call sends the weight in use and the bias to this device.
        self.spectral_execution_device: Optional[torch.device] = None
        # How the factors were computed (None for a full SVD): adapters sharing them must ask for the same.
        self.spectral_truncation = getattr(factors, "truncation", None)
        self.spectral_factors_computed_on = getattr(factors, "computed_on", None)
        if factors is not None:
            device = base_layer.weight.device if self.spectral_factor_location == "device" else "cpu"
            self.spectral_U, self.spectral_S, self.spectral_Vh = (t.to(device) for t in (factors.U, factors.S,
                                                                                          factors.Vh))

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) as PEFT's layers report them (subclasses)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------- adapters
    @property
    def uses_factors(self) -> bool:
        return self.spectral_S is not None

    @property
    def factor_dtype(self) -> Optional[torch.dtype]:
        """Storage dtype of U and Vᵀ (None for elementwise norm shifts, which have no factors)."""
        return (self._spectral_storage_dtype or self.spectral_U.dtype) if self.uses_factors else None

    @property
    def shift_size(self) -> int:
        """Number of shift values: the k kept singular values (min(m, n), or min(spectral_rank, m, n) for a truncated
        spectrum), or C elements of a norm weight."""
        if self.uses_factors:
            return self.spectral_S.numel()
        return spectral.shift_length(self.base_layer.weight.shape, False)

    @property
    def spectral_weight(self) -> Optional[torch.Tensor]:
        """The cached inference weight W_δ, if any."""
        return self.spectral_cache.weight

    def update_layer(self, adapter_name: str, init_scale: float = 0.0, **kwargs) -> None:
        if adapter_name in self.spectral_delta:
            raise ValueError(f"Adapter name {adapter_name!r} is already in use on this layer.")
        delta = torch.zeros(self.shift_size, dtype=torch.float32, device=self.base_layer.weight.device)
        if init_scale > 0:
            delta.normal_(0.0, init_scale)
        self.spectral_delta[adapter_name] = nn.Parameter(delta)
        self.spectral_scaling[adapter_name] = 1.0
        self.spectral_cache.clear()
        self.set_adapter(self.active_adapters)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        if not self._spectral_active():
            self.spectral_cache.clear()  # free the effective weight while no shift applies

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        if not enabled:
            self.spectral_cache.clear()

    def _spectral_active(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.spectral_delta]

    def _applied_adapters(self) -> list[str]:
        """The adapters whose shifts the forward applies, inside one ReLU: the merged ones (in the weight already,
        active or not) followed by the active ones not merged."""
        active = self._spectral_active()
        return self.merged_adapters + [n for n in active if n not in self.merged_adapters]

    def _unmerged_weight(self) -> torch.Tensor:
        """The base weight without any merged shift (the weight itself while nothing is merged); an original kept
        off the device (`merge(original_storage=...)`) comes back as a temporary copy."""
        if self._spectral_merge is None:
            return self.base_layer.weight
        return merge_storage.on_device(self._spectral_merge[0], self.base_layer.weight.device)

    def set_scale(self, adapter: str, scale: float) -> None:
        """Set the weight wᵢ of one adapter (diffusers' `set_adapters` calls this on every layer)."""
        _check_finite_scale(scale, f"adapter {adapter!r}")
        if adapter in self.spectral_scaling:
            self.spectral_scaling[adapter] = float(scale)

    def scale_layer(self, scale: float) -> None:
        """Multiply the weights of the active adapters (diffusers' `cross_attention_kwargs={"scale": s}`)."""
        _check_finite_scale(scale, "the adapters (cross_attention_kwargs scale)")
        if scale == 1:
            return
        if self._spectral_unscaled is None:
            # Remembered so that unscaling restores the exact weights: w·s/s is not always w in floating point,
            # and a drifting weight would rebuild the effective weights on every denoising step.
            self._spectral_unscaled = dict(self.spectral_scaling)
        for adapter in self._spectral_active():
            self.spectral_scaling[adapter] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        """Undo `scale_layer(scale)`; `None` resets the active adapters' weights to 1."""
        if scale is None:
            for adapter in self._spectral_active():
                self.spectral_scaling[adapter] = 1.0
        elif scale != 1 and self._spectral_unscaled is not None:
            self.spectral_scaling.update(
                {name: value for name, value in self._spectral_unscaled.items() if name in self.spectral_scaling}
            )
        self._spectral_unscaled = None

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Cannot delete adapter {adapter_name!r} while it is merged; unmerge it first.")
        super().delete_adapter(adapter_name)
        self.spectral_cache.adapter_matrices.pop(adapter_name, None)
        self.spectral_cache.clear()

    # ------------------------------------------------------------------------------------------------- math
    def combined_shift(self, adapter_names: list[str]) -> torch.Tensor:
        """Σᵢ wᵢ δᵢ over the given adapters (float32), the quantity that enters the ReLU."""
        return spectral.combine_shifts(
            ((self.spectral_delta[name], self.spectral_scaling[name]) for name in adapter_names),
            self.shift_size, self.base_layer.weight.device)

    def delta_from_shift(self, shift: torch.Tensor) -> torch.Tensor:
        """ΔW (float32, the weight's shape) for a combined shift; differentiable w.r.t. the shift."""
        return spectral.delta_weight(*self.working_factors(), shift, self.base_layer.weight.shape)

    def weight_with_shift(self, base_weight: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """W + ΔW in the base weight's dtype."""
        return spectral.shifted_weight(base_weight, *self.working_factors(), shift, self.spectral_build_dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW of one adapter alone at its current scale (float32, the weight's shape)."""
        with torch.no_grad():
            return self.delta_from_shift(self.combined_shift([adapter]))

    def set_build_dtype(self, dtype: torch.dtype) -> None:
        """Precision of the products that build inference weights: float32 (default) or bfloat16/float16, which
        round only ΔW (relative error ~2⁻⁸ of ΔW for bfloat16), never W (speed: docs/performance.md). Training
        (gradients) always uses float32."""
        if dtype not in BUILD_DTYPES:
            raise ValueError(f"build dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}.")
        self.spectral_build_dtype = dtype

    def enable_switch_cache(self, enabled: bool = True) -> None:
        """Keep U·diag(δᵢ)·Vᵀ per adapter so that `set_adapters` / `set_scale` rebuild the weight linearly."""
        self.spectral_cache.switch_enabled = bool(enabled) and self.uses_factors
        if not self.spectral_cache.switch_enabled:
            self.spectral_cache.adapter_matrices.clear()

    def _adapter_matrix(self, adapter: str) -> torch.Tensor:
        """Dᵢ = U·diag(δᵢ)·Vᵀ of one adapter (unscaled, unclipped) as an m × n matrix in the weight's dtype."""
        weight, delta = self.base_layer.weight, self.spectral_delta[adapter]
        key = (delta._version, delta.data_ptr(), weight.device, weight.dtype, self.spectral_build_dtype,
               self.spectral_U.device)

        def build() -> torch.Tensor:
            U, _, Vh = self.working_factors()
            with torch.no_grad():
                return spectral.factor_product(U, Vh, delta.detach().to(torch.float32),
                                               self.spectral_build_dtype).to(weight.dtype)

        return self.spectral_cache.adapter_matrix(adapter, key, build)

    def _switch_cached_weight(self, base_weight: torch.Tensor, names: list[str]) -> torch.Tensor:
        """W_δ from the per-adapter matrices plus a correction for the clipped singular values (module docstring)."""
        shift = self.combined_shift(names)
        fused = spectral.weight_matrix(base_weight).to(torch.float32, copy=True)
        for name in names:
            fused.add_(self._adapter_matrix(name), alpha=self.spectral_scaling[name])
        U, S, Vh = self.working_factors()
        clipped_amount = spectral.clipped_amount(S, shift)
        clipped = clipped_amount.nonzero().flatten()
        if clipped.numel():
            fused = spectral.add_factor_product(fused, U, Vh, clipped_amount[clipped], self.spectral_build_dtype,
                                                clipped)
        return fused.reshape(base_weight.shape).to(base_weight.dtype)

    # ------------------------------------------------------------------------------------ inference weights
    def _needs_grad(self, names: list[str]) -> bool:
        return torch.is_grad_enabled() and (
            self.base_layer.weight.requires_grad or any(self.spectral_delta[n].requires_grad for n in names)
        )

    def _scale_state(self, names: list[str]) -> tuple:
        return tuple((n, self.spectral_scaling[n]) for n in names)

    def _weight_key(self, names: list[str]):
        base = self._spectral_merge[0] if self._spectral_merge is not None else self.base_layer.weight
        shifts = tuple(
            (n, self.spectral_scaling[n], self.spectral_delta[n]._version, self.spectral_delta[n].data_ptr())
            for n in names
        )
        return shifts, merge_storage.identity(base), self.base_layer.weight.device, self.spectral_build_dtype

    def effective_weight(self) -> torch.Tensor:
        """W_δ for the applied adapters: cached for inference, recomposed when gradients are needed."""
        names = self._applied_adapters()
        if self._needs_grad(names):
            return self.weight_with_shift(self._unmerged_weight(), self.combined_shift(names))
        cache = self.spectral_cache
        if torch.compiler.is_compiling():
            # A compiled graph reads the cached tensor as an input; eager code (`refresh_spectral_weight`, e.g. after
            # a hotswap) updates it in place, so swapping shifts does not recompile. Dynamo guards on the adapters and
            # weights compared here, so `set_adapters` on a compiled model recompiles instead of using a stale one.
            if cache.weight is not None and cache.scales == self._scale_state(names):
                return cache.weight
            return self.weight_with_shift(self._unmerged_weight(), self.combined_shift(names))
        if cache.weight is None or cache.key != self._weight_key(names):
            self.refresh_spectral_weight()
        return cache.weight

    def refresh_spectral_weight(self) -> None:
        """Rebuild the inference weight now, in place when its shape/dtype/device allow."""
        names = self._applied_adapters()
        if not names:
            self.spectral_cache.clear()
            return
        self._float32_factors(False)  # inference after training: back to the storage dtype
        weight = self._unmerged_weight()
        with torch.no_grad():
            if self.spectral_cache.switch_enabled:
                fresh = self._switch_cached_weight(weight, names)
            else:
                fresh = self.weight_with_shift(weight, self.combined_shift(names))
        self.spectral_cache.store(fresh, self._weight_key(names), self._scale_state(names))

    def reset_spectral_cache(self) -> None:
        """Drop the inference weight (needed only after editing the base weight's `.data` in place)."""
        self.spectral_cache.clear()

    # ---------------------------------------------------------------------------------------- merge / unmerge
    def _merge_plan(self, adapter_names: Optional[list[str]]):
        """(names to merge now, the weight before any merge, the combined shift of all merged names, W_δ)."""
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.spectral_delta]
        if not names:
            return None
        original = self._unmerged_weight().data
        with torch.no_grad():
            shift = self.combined_shift(self.merged_adapters + names).detach().clone()
            merged = self.weight_with_shift(original, shift)
        return names, original, shift, merged

    def merge_is_finite(self, adapter_names: Optional[list[str]] = None) -> bool:
        """Whether merging these adapters would give a finite weight (nothing is changed)."""
        plan = self._merge_plan(adapter_names)
        return plan is None or bool(torch.isfinite(plan[3]).all())

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None,
              original_storage: merge_storage.OriginalStorage = None) -> None:
        """Write W_δ of the given (default: active) adapters into the base weight; `unmerge` restores it exactly.

        Adapters merged later join the ones already merged inside the same ReLU. With `safe_merge`, a result with
        NaN or inf raises and the weight stays as it was. `original_storage` says where the original weight waits
        for `unmerge`: `None` / `"device"` with the weight, `"cpu"`, or a folder (a raw file, memory-mapped back);
        see `tuner.merge_storage`.
        """
        merge_storage.check_storage(original_storage)
        # Any tuner's merge may have changed the shared base weight: drop our cached effective weight.
        self.spectral_cache.clear()
        plan = self._merge_plan(adapter_names)
        if plan is None:
            return
        names, original, shift, merged = plan
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs or infs detected in the merged weights; adapters {names} were not merged.")
        self.base_layer.weight.data = merged
        kept = self._spectral_merge[0] if self._spectral_merge else merge_storage.store(original, original_storage)
        self._spectral_merge = (kept, shift, tensor_digest(merged))
        self.merged_adapters = self.merged_adapters + names

    def unmerge(self) -> None:
        """Restore the weight from before the first merge, bit for bit.

        If another tuner (e.g. a fused LoRA) changed the weight while ours was merged (detected by a digest of the
        merged weight's bytes), its change is carried over.
        """
        self.spectral_cache.clear()
        if self._spectral_merge is None:
            return
        kept, shift, digest = self._spectral_merge
        current = self.base_layer.weight.data
        original = merge_storage.on_device(kept, current.device)
        if tensor_digest(current) == digest:
            restored = original
        else:
            with torch.no_grad():
                ours = self.weight_with_shift(original, shift).to(torch.float32)
                restored = (original.to(torch.float32) + (current.to(torch.float32) - ours)).to(original.dtype)
        self.base_layer.weight.data = restored
        merge_storage.release(kept)
        self._spectral_merge = None
        self.merged_adapters = []

    # ------------------------------------------------------------------------------------------------ forward
    def run_base(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The base module's operation with another weight and bias (subclasses)."""
        raise NotImplementedError

    def factored_rows(self, x: torch.Tensor) -> Optional[int]:
        """Rows of the matrix product this input makes (tokens, output pixels), or None if the layer has no
        factored path (subclasses)."""
        return None

    def factored_delta(self, x: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        """x ↦ op(x, U·diag(change)·Vᵀ) without forming the m × n matrix (subclasses)."""
        raise NotImplementedError

    def _factored_is_cheaper(self, x: torch.Tensor) -> bool:
        """Training cost in multiply-adds per step, B rows. Recomposing W_δ: B·m·n forward, 2·B·m·n backward (input
        and weight gradients), 2·m·n·k to build ΔW and project its gradient. Factored, op(x, W) + op(op(x, Vᵀ)·c, U):
        B·m·n forward, B·m·n backward (W is frozen: no weight gradient), 2·B·k·(m+n) for the thin products (U and
        Vᵀ are frozen too: the backward only needs the input gradient, whose G·U also gives dL/dc). Few rows
        (low-resolution UNet blocks, text tokens, embeddings) favour the factored form."""
        rows = self.factored_rows(x)
        if rows is None or not self.uses_factors:
            return False
        m, n, k = self.spectral_U.shape[0], self.spectral_Vh.shape[1], self.spectral_S.numel()
        return 2 * rows * k * (m + n) < rows * m * n + 2 * m * n * k

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.spectral_execution_device is not None:
            return self._offloaded_forward(x)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if not [n for n in self._spectral_active() if n not in self.merged_adapters]:
            return self.base_layer(x, *args, **kwargs)  # nothing beyond what is merged into the weight
        names = self._applied_adapters()
        if self._needs_grad(names):
            self._float32_factors(True)
            if not self.merged and self._factored_is_cheaper(x):
                change = spectral.spectral_change(self.spectral_S, self.combined_shift(names))
                return self.base_layer(x, *args, **kwargs) + self.factored_delta(x, change)
        return self.run_base(x, self.effective_weight(), getattr(self.base_layer, "bias", None))

    def _offloaded_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sequential offload: W_δ is built and cached where the layer's tensors live (the CPU); only the weight in
        use and the bias travel to the execution device, for this call — the traffic and device memory of the base
        layer under accelerate's own hooks."""
        if self.disable_adapters and self.merged:
            self.unmerge()
        shifted = not self.disable_adapters and [n for n in self._spectral_active() if n not in self.merged_adapters]
        weight = self.effective_weight() if shifted else self.base_layer.weight
        bias = getattr(self.base_layer, "bias", None)
        device = self.spectral_execution_device
        return self.run_base(x, weight.to(device), None if bias is None else bias.to(device))


def _check_finite_scale(scale, what: str) -> None:
    number = isinstance(scale, numbers.Real) and not isinstance(scale, bool) or (
        isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.is_floating_point())
    finite = number and math.isfinite(float(scale))
    if not finite:
        raise ValueError(f"The weight of {what} should be a finite number, got {scale!r}.")


def _factors_as(layer: SpectralShiftLayer, x: torch.Tensor, change: torch.Tensor):
    dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
    return layer.spectral_U.to(dtype), layer.spectral_Vh.to(dtype), change.to(dtype)


class Linear(SpectralShiftLayer):
    @staticmethod
    def features(base_layer):
        return base_layer.in_features, base_layer.out_features

    def run_base(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def factored_rows(self, x):
        return x.numel() // x.shape[-1]

    def factored_delta(self, x, change):
        U, Vh, change = _factors_as(self, x, change)
        return F.linear(F.linear(x.to(U.dtype), Vh) * change, U).to(x.dtype)


class Conv2d(SpectralShiftLayer):
    mirrored_attributes = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")

    @staticmethod
    def features(base_layer):
        return base_layer.in_channels, base_layer.out_channels

    def run_base(self, x, weight, bias):
        return self.base_layer._conv_forward(x, weight, bias)

    def factored_rows(self, x):
        stride = self.base_layer.stride
        return x.shape[0] * (x.shape[-2] // stride[0]) * (x.shape[-1] // stride[1])

    def factored_delta(self, x, change):
        # Conv with the k kernels of Vᵀ (same stride/padding/dilation), scale channels, then a 1×1 conv with U.
        U, Vh, change = _factors_as(self, x, change)
        kernels = Vh.reshape(Vh.shape[0], *self.base_layer.weight.shape[1:])
        hidden = self.base_layer._conv_forward(x.to(U.dtype), kernels, None) * change.view(1, -1, 1, 1)
        return F.conv2d(hidden, U.reshape(*U.shape, 1, 1)).to(x.dtype)


class Embedding(SpectralShiftLayer):
    mirrored_attributes = ("num_embeddings", "embedding_dim", "padding_idx")

    @staticmethod
    def features(base_layer):
        return base_layer.num_embeddings, base_layer.embedding_dim

    def run_base(self, x, weight, bias):
        base = self.base_layer  # embeddings have no bias
        return F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)

    def factored_rows(self, x):
        return None if self.base_layer.max_norm is not None else x.numel()  # max_norm renormalises whole rows

    def factored_delta(self, x, change):
        U, Vh, change = _factors_as(self, self.base_layer.weight, change)
        return ((F.embedding(x, U) * change) @ Vh).to(self.base_layer.weight.dtype)


class _Norm(SpectralShiftLayer):
    @staticmethod
    def features(base_layer):
        channels = base_layer.weight.shape[0]  # a norm maps C features to C features
        return channels, channels


class LayerNorm(_Norm):
    mirrored_attributes = ("normalized_shape", "eps")

    def run_base(self, x, weight, bias):
        base = self.base_layer
        return F.layer_norm(x, base.normalized_shape, weight, bias, base.eps)


class GroupNorm(_Norm):
    mirrored_attributes = ("num_groups", "num_channels", "eps")

    def run_base(self, x, weight, bias):
        base = self.base_layer
        return F.group_norm(x, base.num_groups, weight, bias, base.eps)


LAYER_CLASSES = {
    nn.Linear: Linear,
    nn.Conv2d: Conv2d,
    nn.Embedding: Embedding,
    nn.LayerNorm: LayerNorm,
    nn.GroupNorm: GroupNorm,
}


def layer_class_for(module: nn.Module) -> type[SpectralShiftLayer]:
    for base_type, layer_cls in LAYER_CLASSES.items():
        if isinstance(module, base_type):
            return layer_cls
    raise TypeError(f"Spectral shifts do not support modules of type {type(module).__name__}.")


def find_spectral_layer(module: nn.Module) -> Optional[SpectralShiftLayer]:
    """The spectral layer in a chain of tuner layers (another tuner such as LoRA may wrap ours), or None."""
    while module is not None:
        if isinstance(module, SpectralShiftLayer):
            return module
        module = getattr(module, "base_layer", None)
    return None
