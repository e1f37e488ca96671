"""The fine-tuning methods compared by the quality benchmark, each set up on a loaded toy-world pipeline (the UNet
one, or the DiT one: the denoiser is `pipe.unet` or `pipe.transformer`, the text encoders those the trainer shifts).

Every method trains through the same loop (run.py) on the same batches; only what is trainable differs:
- ``spectral``: SVDiff spectral shifts (the package's `add_spectral_shift` + `make_optimizer`, 1-D norm shifts at
  1e-6 as in the trainer), full spectrum or the top ``spectral_rank`` singular values;
- ``lora``: PEFT LoRA on the attention projections, as diffusers' `train_dreambooth_lora.py` (and its SD3 / Flux
  variants) targets them (to_q/to_k/to_v/to_out.0; text encoder q/k/v/out_proj), lora_alpha = rank, gaussian init;
- ``full``: every weight of the denoiser (and text encoders).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from svdiff_adapter import SpectralShiftConfig, add_spectral_shift, save_spectral_shift
from svdiff_adapter.training.optim import make_optimizer

ADAPTER = "subject"
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass(frozen=True)
class MethodSpec:
    """One method's setting: ``kind`` (spectral/lora/full), LoRA ``rank``, whether the text encoder trains, lr."""

    kind: str
    learning_rate: float
    train_text_encoder: bool = True
    rank: Optional[int] = None  # LoRA's rank, or the shift's spectral_rank (None: the full spectrum)

    @property
    def label(self) -> str:
        shift = "shift" if self.rank is None else f"shift k={self.rank}"
        parts = {"spectral": shift, "lora": f"LoRA r{self.rank}", "full": "full FT"}[self.kind]
        return parts + (" (UNet+TE)" if self.train_text_encoder else " (UNet)")

    @property
    def slug(self) -> str:
        rank = f"r{self.rank}" if self.kind == "lora" else (f"k{self.rank}" if self.rank else "")
        return f"{self.kind}{rank}-{'te' if self.train_text_encoder else 'unet'}-lr{self.learning_rate:g}"


@dataclass
class Prepared:
    optimizer: torch.optim.Optimizer
    parameters: list[torch.nn.Parameter]
    trainable_parameters: int


def trained_models(spec: MethodSpec, pipe) -> dict:
    """Component → model that `spec` trains: the denoiser, and the text encoders the trainer shifts (the UNet
    pipeline's one; the DiT's two CLIP encoders) when `spec.train_text_encoder`."""
    from svdiff_adapter.editing import denoiser_of

    name, denoiser = denoiser_of(pipe)
    models = {name: denoiser}
    if spec.train_text_encoder:
        encoders = ("text_encoder", "text_encoder_2") if name == "transformer" else ("text_encoder",)
        models.update({encoder: getattr(pipe, encoder) for encoder in encoders})
    return models


def prepare(spec: MethodSpec, pipe, weight_decay: float = 1e-2, step_scale: str = "uniform",
            denoiser_targets: Optional[str] = None) -> Prepared:
    """Make the denoiser (and text encoders) trainable the way `spec` says; returns the optimizer (`step_scale`:
    the shifts', `make_optimizer`; `denoiser_targets`: a regex of the denoiser's modules to shift, default all)."""
    models = trained_models(spec, pipe)
    for model in pipe.components.values():
        if isinstance(model, torch.nn.Module):
            model.requires_grad_(False)
    encoders = [model for name, model in models.items() if name.startswith("text_encoder")]
    denoiser = next(model for name, model in models.items() if not name.startswith("text_encoder"))
    if spec.kind == "spectral":
        add_spectral_shift(denoiser, SpectralShiftConfig(target_kinds=["linear", "conv2d", "norm"],
                                                         spectral_rank=spec.rank, target_modules=denoiser_targets),
                           ADAPTER,
                           svd_cache=False, progress=False)
        for encoder in encoders:
            add_spectral_shift(encoder, SpectralShiftConfig(target_kinds=["linear", "embedding", "norm"],
                                                            spectral_rank=spec.rank),
                               ADAPTER, svd_cache=False, progress=False)
        optimizer = make_optimizer(models, ADAPTER, spec.learning_rate, 1e-6, weight_decay=weight_decay,
                                   step_scale=step_scale)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
    else:
        if spec.kind == "lora":
            denoiser.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.rank, init_lora_weights="gaussian",
                                            target_modules=UNET_LORA_TARGETS), ADAPTER)
            for encoder in encoders:
                encoder.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.rank, init_lora_weights="gaussian",
                                               target_modules=TEXT_LORA_TARGETS), ADAPTER)
        elif spec.kind == "full":
            for model in models.values():
                model.requires_grad_(True)
        else:
            raise ValueError(f"Unknown method kind {spec.kind!r}.")
        parameters = [p for model in models.values() for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=spec.learning_rate, weight_decay=weight_decay)
    return Prepared(optimizer, parameters, sum(p.numel() for p in parameters))


def save(spec: MethodSpec, pipe, folder: Path) -> int:
    """Write what a user would ship for this method into `folder`; returns its size in bytes.

    Spectral: the format-v1 shift file. LoRA: the adapter weights (float32 safetensors). Full fine-tuning: the
    trained weights in float32 (what a full DreamBooth checkpoint of these components holds).
    """
    folder.mkdir(parents=True, exist_ok=True)
    components = trained_models(spec, pipe)
    if spec.kind == "spectral":
        path = folder / "spectral_shift_weights.safetensors"
        save_spectral_shift(path, components, ADAPTER)
    else:
        state = {}
        for component, model in components.items():
            weights = (get_peft_model_state_dict(model, adapter_name=ADAPTER) if spec.kind == "lora"
                       else model.state_dict())
            state.update({f"{component}.{key}": value.detach().float().contiguous() for key, value in weights.items()})
        path = folder / ("lora_weights.safetensors" if spec.kind == "lora" else "full_weights.safetensors")
        save_file(state, str(path))
    return os.path.getsize(path)
