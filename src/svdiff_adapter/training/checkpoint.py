"""Training checkpoints: δ, optimizer, lr scheduler, RNG states and the step — no pickle, crash-safe.

Layout: ``output_dir/checkpoint-<step>/`` with ``shifts.safetensors`` (keys ``component.module.path``),
``optimizer.safetensors``, ``scheduler.safetensors``, ``rng.safetensors`` (`state_files`: tensors, and the rest of
each state as JSON in the file's metadata), ``state.json`` and, for runs with ``--ema_decay``, ``average.safetensors``
(the moving average of δ, `ShiftAverage`, whose step count is ``average_steps`` in state.json). Nothing is unpickled, so resuming from a checkpoint
made elsewhere cannot run code.

A checkpoint is written into ``.checkpoint-<step>.tmp-<pid>``, flushed to disk and renamed into place, so a
``checkpoint-<step>`` folder is complete. Replacing one of the same step takes two renames (the old one to
``.checkpoint-<step>.old-<pid>``, then the new one into place); a crash between them leaves the old one under its
``.old`` name, and `recover_checkpoints` (run by `train` and by every save) renames it back and removes the
temporary folders of writers that are gone.
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

from ..atomic import process_alive
from .optim import ShiftAverage, shift_parameters
from .state_files import StateFileError, load_state, save_state


CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
_LEFTOVER_PATTERN = re.compile(r"^\.checkpoint-(\d+)\.(tmp|old)-(\d+)$")
STATE_FILES = ("optimizer.safetensors", "scheduler.safetensors", "rng.safetensors")
AVERAGE_FILE = "average.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: missing, damaged or truncated files, or other shifts."""


def rng_state() -> dict[str, Any]:
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


# ------------------------------------------------------------------------------------------------------- writing
def _flush(path: Path) -> None:
    # Renamed folders survive a power cut only if their files (and the folder entries) reached the disk first.
    if os.name != "posix":  # folders cannot be opened for fsync elsewhere
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(output_dir: str, step: int, models: Mapping[str, nn.Module], adapter_name: str,
                    optimizer, lr_scheduler, extra: Optional[dict] = None, total_limit: Optional[int] = None,
                    average: Optional[ShiftAverage] = None) -> Path:
    """Write ``checkpoint-<step>`` (replacing one of the same step) with the run's moving average of δ if it keeps
    one; keep at most `total_limit` checkpoints.

    On an error or an interruption while writing, the temporary folder is removed and an existing checkpoint of
    the same step is kept.
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    recover_checkpoints(output)
    final = output / f"checkpoint-{step}"
    temporary = output / f".checkpoint-{step}.tmp-{os.getpid()}"
    temporary.mkdir()
    try:
        save_file(shift_state(models, adapter_name), temporary / "shifts.safetensors")
        save_state(optimizer.state_dict(), temporary / "optimizer.safetensors")
        save_state(lr_scheduler.state_dict(), temporary / "scheduler.safetensors")
        save_state(rng_state(), temporary / "rng.safetensors")
        state = {"global_step": step, **(extra or {})}
        if average is not None:
            save_file(average.state(), temporary / AVERAGE_FILE)
            state["average_steps"] = average.steps
        (temporary / "state.json").write_text(json.dumps(state, indent=2))
        for path in temporary.iterdir():
            _flush(path)
        _flush(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if final.exists():
        old = output / f".checkpoint-{step}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(temporary, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, final)
    _flush(output)
    if total_limit is not None and total_limit > 0:
        for stale in list_checkpoints(output)[:-total_limit]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _writer_is_running(pid: int) -> bool:
    # This process writes one checkpoint at a time: a folder of ours is left from an error.
    return pid != os.getpid() and process_alive(pid)


def recover_checkpoints(output_dir) -> list[Path]:
    """Undo what writers that crashed or were killed left in `output_dir`; returns the checkpoints restored.

    A ``.checkpoint-<step>.old-<pid>`` folder is a complete checkpoint that was being replaced: it is renamed back to
    ``checkpoint-<step>`` when that is missing (the crash came between the two renames), else removed. Temporary
    ``.checkpoint-<step>.tmp-<pid>`` folders are removed. Folders of a writer that is still running are left alone.
    Call it from one process only (in a distributed run, the main one).
    """
    output = Path(output_dir)
    if not output.is_dir():
        return []
    restored = []
    for path in sorted(output.iterdir()):
        match = _LEFTOVER_PATTERN.match(path.name)
        if not match or not path.is_dir() or _writer_is_running(int(match.group(3))):
            continue
        final = output / f"checkpoint-{match.group(1)}"
        if match.group(2) == "old" and not final.exists():
            os.replace(path, final)
            restored.append(final)
        else:
            shutil.rmtree(path, ignore_errors=True)
    return restored


# ------------------------------------------------------------------------------------------------------- reading
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


def _read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], list]:
    """state.json, δ and the three states of a checkpoint, all read before anything is changed."""
    for name in ("state.json", "shifts.safetensors", *STATE_FILES):
        if not (path / name).is_file():
            pickled = path / name.replace(".safetensors", ".pt")
            why = (f"it holds {pickled.name} instead: pickled files are never loaded (loading them can run code), "
                   "and checkpoints written before states were stored as safetensors cannot be resumed"
                   if pickled.is_file() else "the checkpoint is incomplete")
            raise CheckpointError(f"Cannot resume from checkpoint {str(path)!r}: it has no {name} ({why}).")
    try:
        state = json.loads((path / "state.json").read_text())
        global_step = state["global_step"]
        if not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"global_step is {global_step!r}")
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"Cannot resume from checkpoint {str(path)!r}: state.json is damaged "
                              f"({type(error).__name__}: {error}).") from error
    try:
        shifts = load_file(path / "shifts.safetensors")
    except Exception as error:  # safetensors' error for damaged or truncated files
        raise CheckpointError(f"Cannot resume from checkpoint {str(path)!r}: shifts.safetensors is damaged or "
                              f"truncated ({error}).") from error
    try:
        states = [load_state(path / name) for name in STATE_FILES]
    except StateFileError as error:
        raise CheckpointError(f"Cannot resume from checkpoint {str(path)!r}: {error}") from error
    return state, shifts, states


def load_checkpoint(path, models: Mapping[str, nn.Module], adapter_name: str, optimizer, lr_scheduler,
                    restore_rng: bool = True, average: Optional[ShiftAverage] = None) -> dict:
    """Restore δ (in place), optimizer, scheduler, RNG and the moving average of δ (a run with one resumes only from
    a checkpoint with one, and the other way round) from a checkpoint; returns its state.json.

    Every file is read and checked first: a checkpoint that cannot be used raises `CheckpointError` naming it and
    the file, with δ left as it was.
    """
    path = Path(path)
    state, saved, (optimizer_state, scheduler_state, rng) = _read_checkpoint(path)
    groups = shift_parameters(models, adapter_name)
    parameters = {name: p for group in groups.values() for name, p in group}
    if set(saved) != set(parameters):
        missing, extra = sorted(set(parameters) - set(saved)), sorted(set(saved) - set(parameters))
        raise CheckpointError(f"Checkpoint {str(path)!r} does not match this run's shifts (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}): was it made with other target options or text-encoder "
                              "training?")
    wrong = [name for name, p in parameters.items() if saved[name].shape != p.shape]
    if wrong:
        raise CheckpointError(f"Checkpoint {str(path)!r} has shifts of other sizes than this run's (e.g. {wrong[0]}: "
                              f"{tuple(saved[wrong[0]].shape)}, expected {tuple(parameters[wrong[0]].shape)}).")
    saved_average = _read_average(path, state, average, parameters)
    try:  # torch checks the parameter groups and their sizes before it changes anything
        optimizer.load_state_dict(optimizer_state)
        lr_scheduler.load_state_dict(scheduler_state)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"Cannot resume from checkpoint {str(path)!r}: its optimizer or scheduler state does "
                              f"not fit this run ({error}).") from error
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(saved[name].to(parameter.device, parameter.dtype))
    if average is not None:
        average.load_state(saved_average, state["average_steps"])
    if restore_rng:
        set_rng_state(rng)
    return state


def _read_average(path: Path, state: dict, average: Optional[ShiftAverage], parameters: Mapping[str, nn.Parameter]):
    """The checkpoint's moving average of δ, checked against the run's (None when neither has one)."""
    has_average = (path / AVERAGE_FILE).is_file()
    if has_average != (average is not None):
        held = "holds a" if has_average else "holds no"
        raise CheckpointError(f"Checkpoint {str(path)!r} {held} moving average of δ (--ema_decay) and this run "
                              f"{'does not keep one' if has_average else 'keeps one'}: resume with the same "
                              "--ema_decay setting, or start a new run.")
    if average is None:
        return None
    try:
        saved = load_file(path / AVERAGE_FILE)
    except Exception as error:
        raise CheckpointError(f"Cannot resume from checkpoint {str(path)!r}: {AVERAGE_FILE} is damaged or truncated "
                              f"({error}).") from error
    if set(saved) != set(parameters) or any(saved[n].shape != p.shape for n, p in parameters.items()) or \
            not isinstance(state.get("average_steps"), int):
        raise CheckpointError(f"Cannot resume from checkpoint {str(path)!r}: its {AVERAGE_FILE} does not match this "
                              "run's shifts, or state.json lacks average_steps.")
    return saved
