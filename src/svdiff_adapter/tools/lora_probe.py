"""How much of a spectral shift's effect an exported LoRA keeps, measured on the component outputs.

Each component runs once on a small fixed input (CLIP text encoders: one random 77-token prompt, T5: 16 tokens; UNets:
one random latent of 4·2^(levels−1) pixels a side, t = 500, random encoder states and SDXL added conditioning; Flux,
SD3 and Wan transformers: 4 × 4 latent patches and 8 random text states, `probe_inputs`) three ways: as given
(base), with the shift, and with each file's LoRA. Both changes are added by forward hooks in low-rank form
(up(down(x)), as PEFT computes a LoRA), so nothing in the models changes and no weight is copied. The score is
1 − ‖out_lora − out_shift‖ / ‖out_shift − out_base‖: 1 reproduces the shift, 0 is as far from it as the base model.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import spectral


@dataclass
class WeightChange:
    """A module's weight change, made when its hook runs (so a whole model's changes are never in memory at once):
    `tensors()` gives (down, up) with ΔW = up @ down in `spectral.weight_matrix` orientation (conv: down a kernel
    r × c_in × kh × kw, up a 1×1 kernel c_out × r × 1 × 1), or (Δγ,) for a norm weight."""

    module: nn.Module
    kind: str
    tensors: Callable[[], tuple[torch.Tensor, ...]]


def lora_change(module: nn.Module, kind: str, down: torch.Tensor, up: torch.Tensor) -> WeightChange:
    return WeightChange(module, kind, lambda: (down, up))


def shift_changes(deltas: Mapping[str, torch.Tensor], infos: Mapping) -> list[WeightChange]:
    """The shift's own changes: U·diag(c)·Vᵀ on the non-zero cⱼ, γ + δ for elementwise norm shifts."""
    return [WeightChange(infos[name].module, infos[name].kind, partial(_shift_tensors, infos[name], delta))
            for name, delta in deltas.items()]


def _shift_tensors(info, delta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if info.factors is None:
        return (delta.to(torch.float32),)
    change = spectral.spectral_change(info.factors.S, delta.to(torch.float32))
    kept = torch.nonzero(change).flatten()
    up = info.factors.U.to(torch.float32)[:, kept] * change[kept]
    down = info.factors.Vh.to(torch.float32)[kept, :]
    if info.kind == "norm":  # svdiff-pytorch's scalar mode: γ as a 1 × C matrix
        return ((up @ down).flatten(),)
    if info.kind == "conv2d":
        weight = info.weight
        return down.reshape(len(kept), *weight.shape[1:]), up.reshape(weight.shape[0], len(kept), 1, 1)
    return down, up


def _hook(change: WeightChange):
    def add_change(module, args, output):
        x = args[0]
        dtype = output.dtype if change.kind == "embedding" else x.dtype
        tensors = [t.to(x.device, dtype) for t in change.tensors()]
        if change.kind == "norm":
            (delta,) = tensors
            if isinstance(module, nn.GroupNorm):
                normalized = F.group_norm(x, module.num_groups, None, None, module.eps)
                return output + normalized * delta.reshape(1, -1, *([1] * (x.ndim - 2)))
            return output + F.layer_norm(x, module.normalized_shape, None, None, module.eps) * delta.reshape(
                module.normalized_shape)
        down, up = tensors
        if change.kind == "embedding":
            return output + F.embedding(x, up) @ down
        if change.kind == "conv2d":
            return output + F.conv2d(module._conv_forward(x, down, None), up)
        return output + F.linear(F.linear(x, down), up)

    return add_change


@contextmanager
def applied(changes: Iterable[WeightChange]):
    """The changes added to their modules' outputs while the context lasts."""
    with ExitStack() as stack:
        for change in changes:
            stack.callback(change.module.register_forward_hook(_hook(change)).remove)
        yield


def probe_inputs(model: nn.Module) -> Optional[dict]:
    """A small fixed input for a diffusers UNet, a Flux / SD3 / Wan transformer, or a CLIP / T5 text encoder; None
    for other models (their output change is then not measured)."""
    generator = torch.Generator().manual_seed(0)
    config = getattr(model, "config", None)
    name = type(model).__name__
    if name == "UNet2DConditionModel" and isinstance(config.cross_attention_dim, int) and (
            config.addition_embed_type in (None, "text_time") and config.class_embed_type is None):
        side = 4 * 2 ** (len(config.block_out_channels) - 1)
        inputs = {"sample": torch.randn(1, config.in_channels, side, side, generator=generator),
                  "timestep": torch.tensor(500),
                  "encoder_hidden_states": torch.randn(1, 77, config.cross_attention_dim, generator=generator)}
        if config.addition_embed_type == "text_time":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=generator),
                                           "time_ids": torch.tensor([[8.0 * side] * 2 + [0.0] * 2 + [8.0 * side] * 2])}
        return inputs
    if name in _TRANSFORMER_INPUTS:
        return _TRANSFORMER_INPUTS[name](config, generator)
    if name.startswith("CLIPText"):
        ids = torch.randint(0, config.vocab_size, (1, config.max_position_embeddings), generator=generator)
        return {"input_ids": ids}
    if name in ("T5EncoderModel", "UMT5EncoderModel"):
        return {"input_ids": torch.randint(0, config.vocab_size, (1, 16), generator=generator)}
    return None


def _flux_inputs(config, generator) -> dict:
    """FluxTransformer2DModel (diffusers 0.42 models/transformers/transformer_flux.py): packed latents of a 4 × 4
    grid, 8 text tokens, t = 0.5 (the pipeline passes t / 1000), guidance 3.5 where the model embeds it."""
    grid = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 2)
    inputs = {"hidden_states": torch.randn(1, 16, config.in_channels, generator=generator),
              "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=generator),
              "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
              "timestep": torch.tensor([0.5]),
              "img_ids": torch.cat([torch.zeros(16, 1), grid], 1), "txt_ids": torch.zeros(8, 3)}
    if config.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


def _sd3_inputs(config, generator) -> dict:
    """SD3Transformer2DModel (transformer_sd3.py): a latent of 4 × 4 patches, 8 text tokens, t = 500."""
    side = 4 * config.patch_size
    return {"hidden_states": torch.randn(1, config.in_channels, side, side, generator=generator),
            "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=generator),
            "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
            "timestep": torch.tensor([500.0])}


def _wan_inputs(config, generator) -> Optional[dict]:
    """WanTransformer3DModel (transformer_wan.py), text-to-video only (image-conditioned variants: None): one latent
    frame of 4 × 4 patches, 8 text tokens, t = 500."""
    if config.image_dim is not None:
        return None
    frames, height, width = config.patch_size
    return {"hidden_states": torch.randn(1, config.in_channels, frames, 4 * height, 4 * width, generator=generator),
            "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, 8, config.text_dim, generator=generator)}


_TRANSFORMER_INPUTS = {"FluxTransformer2DModel": _flux_inputs, "SD3Transformer2DModel": _sd3_inputs,
                       "WanTransformer3DModel": _wan_inputs}


def _run(model: nn.Module, inputs: dict) -> torch.Tensor:
    parameter = next(model.parameters())

    def to_model(value):
        if isinstance(value, dict):
            return {k: to_model(v) for k, v in value.items()}
        if value.is_floating_point():
            return value.to(parameter.device, parameter.dtype)
        return value.to(parameter.device)

    with torch.no_grad():
        output = model(**to_model(inputs))
    parts = [getattr(output, field) for field in ("sample", "last_hidden_state", "text_embeds", "pooler_output")
             if getattr(output, field, None) is not None]
    return torch.cat([part.flatten().double().cpu() for part in parts])


def reproduced(model: nn.Module, shift: list[WeightChange], loras: Mapping[str, list[WeightChange]]
               ) -> Optional[dict[str, Optional[float]]]:
    """1 − ‖out_lora − out_shift‖ / ‖out_shift − out_base‖ for each LoRA of `loras`; None without a probe input,
    None per LoRA where the shift changes nothing."""
    inputs = probe_inputs(model)
    if inputs is None:
        return None
    base = _run(model, inputs)
    with applied(shift):
        target = _run(model, inputs)
    effect = float((target - base).norm())
    scores = {}
    for label, changes in loras.items():
        with applied(changes):
            got = _run(model, inputs)
        scores[label] = 1 - float((got - target).norm()) / effect if effect > 0 and math.isfinite(effect) else None
    return scores


__all__ = ["WeightChange", "applied", "lora_change", "probe_inputs", "reproduced", "shift_changes"]
