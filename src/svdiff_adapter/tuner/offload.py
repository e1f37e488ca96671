"""Sequential CPU offload (accelerate's `cpu_offload`, diffusers' `enable_sequential_cpu_offload`) for spectral layers.

accelerate streams each module's own tensors to the execution device when that module is called and sends them back
to the meta device afterwards. A spectral layer never calls its base module: it reads W, δ and the SVD factors
itself, so under accelerate's hooks it would find them on the meta device, while its factors (non-persistent
buffers) would sit on the execution device for good. `offload_spectral_layers` replaces those hooks: the layer's
tensors stay on the CPU, where W_δ is built and cached, and each call sends only the weight in use and the bias.
"""

from __future__ import annotations

from typing import Union

import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import send_to_device
from torch import nn

from .model import spectral_layers


class SpectralOffloadHook(ModelHook):
    """accelerate hook of one spectral layer under sequential offload: inputs go to the execution device, and the
    layer (`SpectralShiftLayer.spectral_execution_device`) sends its weight there per call."""

    def __init__(self, execution_device: Union[torch.device, str, int]) -> None:
        self.execution_device = execution_device

    def init_hook(self, module: nn.Module) -> nn.Module:
        module.spectral_execution_device = self.execution_device
        return module

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        return send_to_device(args, self.execution_device), send_to_device(kwargs, self.execution_device)

    def detach_hook(self, module: nn.Module) -> nn.Module:
        module.spectral_execution_device = None
        return module


def offload_spectral_layers(model: nn.Module, execution_device: Union[torch.device, str, int]) -> int:
    """Make the spectral layers of a sequentially offloaded `model` work, and keep them light on the device.

    Call after accelerate's `cpu_offload(model, execution_device)` (the pipeline mixin's
    `enable_sequential_cpu_offload` does it for you). Each spectral layer loses accelerate's hooks on itself and its
    children (which puts W, δ and the factors back on the CPU) and gets a `SpectralOffloadHook`: W_δ is built on the
    CPU when δ, the adapter weights or the active set change, and each call moves only W_δ and the bias, as much as
    the base layer moves. `accelerate.hooks.remove_hook_from_module(model, recurse=True)` undoes it. Returns the
    number of layers hooked.
    """
    layers = [layer for _, layer in spectral_layers(model)]
    for layer in layers:
        remove_hook_from_module(layer, recurse=True)
        on_meta = [name for name, tensor in (*layer.named_parameters(), *layer.named_buffers()) if tensor.is_meta]
        if on_meta:
            raise ValueError(
                f"Spectral layer {type(layer).__name__} has tensors on the meta device ({on_meta[:3]}) that no "
                "accelerate offload hook holds; call this right after `cpu_offload(model, execution_device)`."
            )
        add_hook_to_module(layer, SpectralOffloadHook(execution_device))
    return len(layers)
