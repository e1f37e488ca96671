"""Optimizer, lr-scheduler and RNG states as safetensors files, without pickle.

A state — what `state_dict()` methods return: nested dicts, lists and tuples of numbers, strings, None and tensors —
is stored as its tensors plus a JSON description of everything else in the file's metadata. Reading a file back runs
no code from it (unlike `torch.load` of a pickle), so a checkpoint from elsewhere can at worst fail to load.

The description keeps what JSON alone would lose: JSON numbers, strings, booleans and null stand for themselves;
``{"list": [...]}``, ``{"tuple": [...]}`` and ``{"dict": [[key, value], ...]}`` (keys of any of these types, such as
the integer parameter indices of an optimizer state) hold containers; ``{"tensor": "<key>"}`` points at a tensor.
"""

from __future__ import annotations

import json
import os
from typing import Any, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file


STATE_FORMAT = "svdiff-training-state"
STATE_FORMAT_VERSION = "1"


class StateFileError(ValueError):
    """A state file that cannot be read: damaged, truncated, or not written by `save_state`."""


def save_state(state: Any, path: Union[str, os.PathLike]) -> None:
    """Write `state` (tensors moved to the CPU) to a safetensors file at `path`."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.Tensor):
            key = str(len(tensors))
            # A copy of its own: safetensors refuses tensors that share memory, and views are not contiguous.
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()
            return {"tensor": key}
        if isinstance(value, tuple):
            return {"tuple": [encode(item) for item in value]}
        if isinstance(value, list):
            return {"list": [encode(item) for item in value]}
        if isinstance(value, dict):
            return {"dict": [[encode(key), encode(item)] for key, item in value.items()]}
        raise TypeError(f"Cannot store a {type(value).__name__} in a training state file ({value!r:.80}).")

    structure = json.dumps(encode(state))
    save_file(tensors, os.fspath(path),
              metadata={"format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION, "structure": structure})


def load_state(path: Union[str, os.PathLike]) -> Any:
    """Read a state written by `save_state`; raises `StateFileError` (naming the file) if it cannot."""
    path = os.fspath(path)
    try:
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != STATE_FORMAT:
                raise StateFileError(f"{path} is not a training state file (metadata {sorted(metadata)}).")
            if metadata.get("format_version") != STATE_FORMAT_VERSION:
                raise StateFileError(f"{path} has state format version {metadata.get('format_version')!r}; this "
                                     f"version reads {STATE_FORMAT_VERSION!r}.")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        structure = json.loads(metadata["structure"])
    except StateFileError:
        raise
    except Exception as error:  # safetensors' and json's errors for damaged or truncated files
        raise StateFileError(f"{path} is damaged or truncated ({type(error).__name__}: {error}).") from error

    def decode(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, dict) and len(value) == 1:
            (kind, content), = value.items()
            if kind == "tensor" and content in tensors:
                return tensors[content]
            if kind in ("list", "tuple") and isinstance(content, list):
                items = [decode(item) for item in content]
                return items if kind == "list" else tuple(items)
            if kind == "dict" and isinstance(content, list):
                if all(isinstance(pair, list) and len(pair) == 2 for pair in content):
                    return {decode(key): decode(item) for key, item in content}
        raise StateFileError(f"{path} holds a state this version cannot read (at {str(value)[:80]}).")

    try:
        return decode(structure)
    except TypeError as error:  # e.g. a list as a dict key
        raise StateFileError(f"{path} holds a state this version cannot read ({error}).") from error
