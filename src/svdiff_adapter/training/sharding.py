"""Sharded training: the frozen base weights split across processes (FSDP2), the shifts whole on every process.

A spectral shift trains ~min(m, n) values per matrix: δ, its gradient and Adam's moments are a few thousandths of
the model, while the frozen base weights are what does not fit one device (Flux.1's transformer is 12B parameters).
So under `accelerate launch` with an FSDP configuration the trainer shards each block's base weights with PyTorch's
`fully_shard` (FSDP2, `torch.distributed.fsdp`, torch 2.13) and leaves out of the sharding ("ignored parameters"):

- δ (and the 1-D norm shifts): every process holds them whole and averages their gradients itself
  (`average_gradients`, as DDP does: divide by the world size, then sum), so every process steps the same optimizer
  on the same values, and checkpoints and the saved shift come from the main process unchanged — the run ends with
  the δ a DDP run of the same launch ends with;
- the base weights of elementwise norm shifts (C values each): the file's fingerprint of such a layer reads them.

The SVD factors are buffers, which FSDP does not shard: each process holds U, σ, Vᵀ of every layer (computed from
its own full copy of the weights before sharding). With the full spectrum they are ≈ 1.4× the weights
(docs/performance.md), with `--spectral_rank k` only k·(m + n) values per matrix — the setting for models that
need sharding. Sharding follows accelerate's FSDP plugin where it applies: the blocks to wrap (its
`transformer_cls_names_to_wrap`, else the model's `_no_split_modules`, as accelerate's transformer auto-wrap does)
and whether weights are freed after the forward pass (`reshard_after_forward`, or FSDP1's FULL_SHARD vs
SHARD_GRAD_OP).

Accelerate itself is kept out of the wrapping (it sees a plain multi-process run): its FSDP2 path prepares one model
per call (a run trains the denoiser and text encoders) and its FSDP1 path flattens δ into the frozen weights' shards.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from ..tuner.model import spectral_layers

FSDP_ENVIRONMENT = "ACCELERATE_USE_FSDP"  # what `accelerate launch --use_fsdp` / an FSDP config file sets


@dataclass(frozen=True)
class ShardingPlan:
    """How the trained models are sharded (read from accelerate's FSDP plugin)."""

    reshard_after_forward: bool = True
    block_classes: Optional[tuple[str, ...]] = None  # None: each model's `_no_split_modules`


def sharding_requested() -> bool:
    """Whether the launch asks for FSDP (accelerate's environment variable)."""
    return os.environ.get(FSDP_ENVIRONMENT, "false").lower() in ("1", "true", "yes")


def sharding_plan() -> ShardingPlan:
    """The launch's FSDP settings as far as they apply here; a clear error for those that cannot."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.cpu_ram_efficient_loading:
        raise ValueError("fsdp_cpu_ram_efficient_loading is not supported by svdiff training: every process computes "
                         "the SVD factors from its own full copy of the base weights, which that option leaves "
                         "empty on all but the first process. Set it to false.")
    offload = getattr(plugin.cpu_offload, "offload_params", False) or \
        type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy"
    if offload:
        raise NotImplementedError("fsdp_offload_params is not supported by svdiff training (not tested here); the "
                                  "shifts and, with --spectral_rank, the factors are small enough to stay on the "
                                  "device. Set it to false.")
    if plugin.fsdp_version == 2:
        reshard = bool(plugin.reshard_after_forward)
    else:
        strategy = getattr(plugin.sharding_strategy, "name", str(plugin.sharding_strategy))
        if strategy not in ("FULL_SHARD", "SHARD_GRAD_OP"):
            raise NotImplementedError(f"FSDP sharding strategy {strategy} is not supported by svdiff training; use "
                                      "FULL_SHARD or SHARD_GRAD_OP (or plain multi-process DDP, without FSDP).")
        reshard = strategy == "FULL_SHARD"
    classes = plugin.transformer_cls_names_to_wrap
    if isinstance(classes, str):
        classes = [name.strip() for name in classes.split(",") if name.strip()]
    return ShardingPlan(reshard_after_forward=reshard, block_classes=tuple(classes) if classes else None)


@contextlib.contextmanager
def accelerate_without_fsdp() -> Iterator[None]:
    """Create the `Accelerator` inside this: it then runs a plain multi-process setup and leaves the wrapping to
    `shard_models`."""
    previous = os.environ.get(FSDP_ENVIRONMENT)
    os.environ[FSDP_ENVIRONMENT] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[FSDP_ENVIRONMENT]
        else:
            os.environ[FSDP_ENVIRONMENT] = previous


def kept_whole(model: nn.Module) -> set[nn.Parameter]:
    """Parameters left out of the sharding: everything trained, and the base weights of elementwise norm shifts."""
    whole = {p for p in model.parameters() if p.requires_grad}
    for _, layer in spectral_layers(model):
        if not layer.uses_factors:
            whole.update(layer.base_layer.parameters())
    return whole


def shard_blocks(model: nn.Module, plan: ShardingPlan) -> list[str]:
    """Module paths of the blocks each sharded as one unit: submodules of the plan's classes, outermost matches only
    (the model itself is the last unit, `shard_models`)."""
    names = set(plan.block_classes or getattr(model, "_no_split_modules", None) or ())
    blocks = []
    for name, module in model.named_modules():
        if name and type(module).__name__ in names and not any(name.startswith(outer + ".") for outer in blocks):
            blocks.append(name)
    return blocks


def shard_models(models: Mapping[str, nn.Module], device: torch.device, world_size: int,
                 plan: ShardingPlan) -> dict[str, list[str]]:
    """Shard every model in place (each block, then the rest at the root); returns the sharded blocks per model.

    Call after the shifts are added (their factors come from the full weights) and before the training steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    sharded = {}
    for component, model in models.items():
        model.to(device)
        whole = kept_whole(model)
        blocks = shard_blocks(model, plan)
        for name in blocks:
            block = model.get_submodule(name)
            fully_shard(block, mesh=mesh, reshard_after_forward=plan.reshard_after_forward,
                        ignored_params={p for p in block.parameters() if p in whole})
        fully_shard(model, mesh=mesh, reshard_after_forward=plan.reshard_after_forward, ignored_params=whole)
        sharded[component] = blocks
    return sharded


def average_gradients(parameters: Iterable[nn.Parameter], world_size: int) -> None:
    """Average the gradients of parameters every process holds whole, in one collective, as DDP does (each
    gradient divided by the world size, then summed). A parameter without a gradient on some process (unused there)
    gets zeros there when another process has one, as DDP's reducer treats it."""
    import torch.distributed as dist

    parameters = list(parameters)
    if world_size == 1 or not parameters:
        return
    has_gradient = torch.tensor([p.grad is not None for p in parameters], dtype=torch.int32,
                                device=parameters[0].device)
    dist.all_reduce(has_gradient, op=dist.ReduceOp.MAX)
    reduced = [p for p, flag in zip(parameters, has_gradient.tolist()) if flag]
    for p in reduced:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not reduced:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in reduced]).div_(world_size)
    dist.all_reduce(flat)
    offset = 0
    for p in reduced:
        count = p.grad.numel()
        p.grad.copy_(flat[offset:offset + count].view_as(p.grad))
        offset += count


def release_inference_weights(models: Mapping[str, nn.Module]) -> None:
    """Drop the W_δ each layer cached during validation: sharded, the run must not keep full weights around."""
    for model in models.values():
        for _, layer in spectral_layers(model):
            layer.spectral_cache.clear()
