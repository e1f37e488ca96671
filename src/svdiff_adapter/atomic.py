"""Atomic file writes: a temporary file in the target's folder, then a rename, so a reader sees the old file or the
new one, never a part. Temporary files of writers that were killed are removed by the next write to that folder."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file


_TEMPORARY = re.compile(r"^\..+\.pid(\d+)\.[^.]+\.tmp$")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def process_alive(pid: int) -> bool:
    """Whether a process of this machine with this pid is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: Union[str, os.PathLike]) -> list[Path]:
    """Delete the temporary files that writers killed mid-write left in `folder` (their process is gone)."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1))):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass  # removed by another writer meanwhile, or not ours to remove
    return removed


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> Path:
    """Call `write(temporary_path)`, then rename the temporary file onto `path` (same folder, so the rename is
    atomic). On any error, or an interruption, the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    remove_stale_temporaries(path.parent)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: Union[str, os.PathLike],
                            metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write a safetensors file atomically (see `atomic_write`). A failed write (a full disk, a file-size limit)
    raises `OSError` naming `path`; safetensors' own error names neither the file nor the cause's type."""

    def write(temporary: str) -> None:
        try:
            save_file(dict(tensors), temporary, metadata=dict(metadata or {}))
        except SafetensorError as error:
            raise OSError(f"Cannot write {os.fspath(path)}: {error}") from error

    return atomic_write(path, write)
