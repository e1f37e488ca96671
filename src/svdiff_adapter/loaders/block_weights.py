"""Adapter weights for `set_adapters`: a number per adapter, a per-component dict, or — for a UNet — diffusers'
per-block dict `{"down": ..., "mid": ..., "up": {"block_1": [w0, w1, w2]}}`. Everything is validated (including
NaN and infinite values) before any layer changes."""

from __future__ import annotations

import math
from typing import Callable, Mapping, Union

from torch import nn


Weight = Union[float, int, None, dict]
_BLOCK_SIDES = {"down_blocks": "down", "up_blocks": "up"}


def check_number(value, where: str) -> None:
    """A weight is a finite number (None means 1)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"The weight for {where} should be a number, got {value!r}.")
    if value is not None and not math.isfinite(value):
        raise ValueError(f"The weight for {where} should be a finite number, got {value!r}.")


def check_block_weights(spec: Mapping, unet: nn.Module) -> None:
    """Validate `{"down": ..., "mid": ..., "up": ...}` against the UNet's blocks (raise before anything changes)."""
    unknown = set(spec) - {"down", "mid", "up"}
    if unknown:
        raise ValueError(f"Per-block UNet weights take the keys 'down', 'mid' and 'up'; got {sorted(unknown)}.")
    mid = spec.get("mid", 1.0)
    if isinstance(mid, list) and len(mid) != 1 or isinstance(mid, dict):
        raise ValueError(f"The 'mid' weight should be a number, got {mid!r}.")
    check_number(mid[0] if isinstance(mid, list) else mid, "mid")
    for side in ("down", "up"):
        value = spec.get(side, 1.0)
        if not isinstance(value, dict):
            check_number(value, side)
            continue
        blocks = getattr(unet, f"{side}_blocks")
        for key, block_value in value.items():
            index = key.removeprefix("block_")
            if not key.startswith("block_") or not index.isdigit() or int(index) >= len(blocks):
                raise ValueError(
                    f"Unknown UNet block {side}.{key}; this UNet has block_0 .. block_{len(blocks) - 1} on the "
                    f"{side!r} side."
                )
            if isinstance(block_value, list):
                layers = len(blocks[int(index)].resnets)
                if len(block_value) not in (1, layers):
                    raise ValueError(f"{side}.{key} has {layers} layer(s) but {len(block_value)} weights were given.")
                for item in block_value:
                    check_number(item, f"{side}.{key}")
            else:
                check_number(block_value, f"{side}.{key}")


def block_weight(spec: Mapping, path: str, default: float = 1.0) -> float:
    """The weight a per-block dict gives one UNet module.

    `mid` covers `mid_block.*`; `down`/`up` cover every module of `down_blocks.*`/`up_blocks.*` (attentions,
    resnets, samplers); `{"block_i": w}` one block; `{"block_i": [w0, w1, ...]}` layer j of the block
    (`attentions.j` and `resnets.j`). Anything not named (conv_in, time embedding, conv_out, ...) gets `default`.
    """
    parts = path.split(".")
    if parts[0] == "mid_block":
        value = spec.get("mid", default)
        return float(value[0] if isinstance(value, list) else value)
    side = _BLOCK_SIDES.get(parts[0])
    if side is None or len(parts) < 2:
        return default
    value = spec.get(side, default)
    if isinstance(value, dict):
        value = value.get(f"block_{parts[1]}", default)
    if isinstance(value, list):
        if len(value) == 1:
            return float(value[0])
        if len(parts) > 3 and parts[2] in ("attentions", "resnets"):
            return float(value[int(parts[3])])
        return default
    return float(default if value is None else value)


def weight_function(value: Weight, component: str, model: nn.Module, adapter: str) -> Callable[[str], float]:
    """Module path → weight of one adapter in one component (validating the value first)."""
    if isinstance(value, dict):
        if not hasattr(model, "down_blocks"):
            raise ValueError(
                f"Per-block weights (a dict) for {adapter!r} in {component!r}: only a UNet takes them; give a number."
            )
        check_block_weights(value, model)
        return lambda path: block_weight(value, path)
    check_number(value, f"adapter {adapter!r} in {component!r}")
    weight = 1.0 if value is None else float(value)
    return lambda path: weight
