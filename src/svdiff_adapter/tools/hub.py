"""`svdiff push` / `svdiff pull`: thin wrappers over the Hub functions of `svdiff_adapter.loaders.hub`."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

from ..format import DEFAULT_WEIGHT_NAME
from ..loaders import hub
from ._base import ToolError, read_shift


def push_shift(
    source: Union[str, os.PathLike], repo_id: str, *, private: Optional[bool] = None, token=None,
    commit_message: Optional[str] = None,
):
    """Upload a shift file (or a folder holding one) to a Hub model repo, creating it if needed.

    A single file is uploaded under its own name; the file is read first, so a broken file is never pushed.
    Returns the commit info of the upload.
    """
    path = Path(os.path.expanduser(os.fspath(source)))
    read_shift(path)  # refuse missing / unreadable files before touching the Hub
    if path.is_dir():
        return hub.upload_shift_folder(path, repo_id, private=private, token=token, commit_message=commit_message)
    with tempfile.TemporaryDirectory() as staging:
        shutil.copy2(path, Path(staging) / path.name)
        return hub.upload_shift_folder(staging, repo_id, private=private, token=token, commit_message=commit_message)


def pull_shift(
    repo_id: str, output_dir: Union[str, os.PathLike, None] = None, *, weight_name: Optional[str] = None,
    revision: Optional[str] = None, token=None, cache_dir=None,
) -> list[Path]:
    """Download the shift file(s) of a Hub repo (v1, or svdiff-pytorch's two files) into the Hub cache, and copy
    them to `output_dir` when given. Returns the local paths."""
    paths = hub.resolve_shift_files(repo_id, weight_name=weight_name, revision=revision, token=token,
                                    cache_dir=cache_dir)
    hub.read_shift_files(paths)  # the files must be readable spectral shifts
    if output_dir is None:
        return paths
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in paths:
        target = output_dir / (path.name or DEFAULT_WEIGHT_NAME)
        shutil.copyfile(path, target)
        copied.append(target)
    return copied


__all__ = ["ToolError", "pull_shift", "push_shift"]
