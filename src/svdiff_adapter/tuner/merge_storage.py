"""Where a fused layer keeps its original weight until unfuse: with the weight (the default), in CPU memory, or in a
file on disk, memory-mapped back.

Fusing writes W_δ into the weight and keeps the original tensor, so that unfuse restores it bit for bit (no
add/subtract drift). Kept beside W_δ that is a second copy of every shifted weight; a model that cannot afford it
keeps the originals off the device (`"cpu"`, for GPU inference) or on disk (a folder, for CPU inference of models
that fill the RAM). Bytes are stored as they are, so unfuse stays bit-exact whatever the storage.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Optional, Union

import torch

OriginalStorage = Union[None, str, os.PathLike]


class StoredOriginal:
    """An original weight kept away from the layer: in CPU memory or in a raw file (deleted by `release`)."""

    def __init__(self, tensor: torch.Tensor, storage: Union[str, os.PathLike]):
        self.shape, self.dtype = tensor.shape, tensor.dtype
        self.path: Optional[Path] = None
        if isinstance(storage, str) and storage == "cpu":
            self.tensor = tensor.detach().to("cpu", copy=True)
            return
        folder = Path(storage)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"svdiff-original-{uuid.uuid4().hex}.bin"
        partial = self.path.with_suffix(".partial")
        tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tofile(partial)
        os.replace(partial, self.path)
        # A private read-only mapping: pages are read from the file when touched and never count twice.
        self.tensor = torch.from_file(str(self.path), shared=False, size=tensor.numel() * tensor.element_size(),
                                      dtype=torch.uint8).view(self.dtype).reshape(self.shape)

    def materialize(self, device) -> torch.Tensor:
        """A tensor of the original bytes on `device`, owning its memory (never the file mapping)."""
        return self.tensor.to(device, copy=True)

    def release(self) -> None:
        self.tensor = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def check_storage(storage: OriginalStorage) -> None:
    """`None` / `"device"` (with the weight), `"cpu"`, or a folder path."""
    if storage is None or (isinstance(storage, str) and storage in ("device", "cpu")):
        return
    if not isinstance(storage, (str, os.PathLike)) or not str(storage):
        raise ValueError(
            f"`original_storage` should be 'device', 'cpu' or a folder path, got {storage!r}."
        )
    if Path(storage).exists() and not Path(storage).is_dir():
        raise ValueError(f"`original_storage` {str(storage)!r} exists and is not a folder.")


def store(tensor: torch.Tensor, storage: OriginalStorage) -> Union[torch.Tensor, StoredOriginal]:
    """Keep `tensor` where `storage` says (the tensor itself for `None` / `"device"`)."""
    if storage is None or (isinstance(storage, str) and storage == "device"):
        return tensor
    return StoredOriginal(tensor, storage)


def on_device(kept: Union[torch.Tensor, StoredOriginal], device) -> torch.Tensor:
    """The kept original as a tensor on `device` (a new tensor unless it stayed with the weight)."""
    return kept.materialize(device) if isinstance(kept, StoredOriginal) else kept


def identity(kept: Union[torch.Tensor, StoredOriginal]) -> tuple:
    """What a cache key needs to know about the kept original (stable across calls)."""
    if isinstance(kept, StoredOriginal):
        return id(kept), 0, kept.shape, kept.dtype
    return kept.data_ptr(), kept._version, kept.device, kept.dtype


def release(kept: Union[torch.Tensor, StoredOriginal, None]) -> None:
    if isinstance(kept, StoredOriginal):
        kept.release()
