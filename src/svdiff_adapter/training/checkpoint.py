"""Training checkpoints: δ, optimizer, lr scheduler, RNG states and the step, written atomically.

Layout: ``output_dir/checkpoint-<step>/`` with ``shifts.safetensors`` (keys ``component.module.path``),
``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` and ``state.json``. The folder is written under a temporary name
and renamed into place, so a checkpoint folder is either complete or absent.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .optim import shift_parameters


CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    # Plain tuples, ints and tensors only, so that checkpoints load with `torch.load(weights_only=True)`.
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def shift_state(models: Mapping[str, nn.Module], adapter_name: str) -> dict[str, torch.Tensor]:
    groups = shift_parameters(models, adapter_name)
    return {name: p.detach().float().cpu().contiguous() for group in groups.values() for name, p in group}


def save_checkpoint(output_dir: str, step: int, models: Mapping[str, nn.Module], adapter_name: str,
                    optimizer, lr_scheduler, extra: Optional[dict] = None, total_limit: Optional[int] = None) -> Path:
    """Write ``checkpoint-<step>`` atomically (replacing one of the same step); keep at most `total_limit`."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    final = output / f"checkpoint-{step}"
    temporary = output / f".checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    save_file(shift_state(models, adapter_name), temporary / "shifts.safetensors")
    torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), temporary / "scheduler.pt")
    torch.save(rng_state(), temporary / "rng.pt")
    (temporary / "state.json").write_text(json.dumps({"global_step": step, **(extra or {})}, indent=2))
    if final.exists():
        old = output / f".checkpoint-{step}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(temporary, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, final)
    if total_limit is not None and total_limit > 0:
        for stale in list_checkpoints(output)[:-total_limit]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoint folders, oldest step first."""
    output = Path(output_dir)
    if not output.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: Optional[str], output_dir: str) -> Optional[Path]:
    """``"latest"`` → the newest checkpoint in `output_dir` (None if there is none); a name or path → that folder."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / spec
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"Checkpoint {spec!r} not found (looked for {str(path / 'state.json')!r}).")
    return path


def load_checkpoint(path, models: Mapping[str, nn.Module], adapter_name: str, optimizer, lr_scheduler,
                    restore_rng: bool = True) -> dict:
    """Restore δ (in place), optimizer, scheduler and RNG from a checkpoint; returns its state.json."""
    path = Path(path)
    saved = load_file(path / "shifts.safetensors")
    groups = shift_parameters(models, adapter_name)
    parameters = {name: p for group in groups.values() for name, p in group}
    if set(saved) != set(parameters):
        missing, extra = sorted(set(parameters) - set(saved)), sorted(set(saved) - set(parameters))
        raise ValueError(f"Checkpoint {str(path)!r} does not match this run's shifts (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}): was it made with other target options or text-encoder training?")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(saved[name].to(parameter.device, parameter.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if restore_rng:
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())
