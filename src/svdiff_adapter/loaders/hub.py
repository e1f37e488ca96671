"""Where spectral-shift files come from and go to: local files and folders, Hub repos (through `huggingface_hub`).

Moves files only: reading them is `svdiff_adapter.format`, applying them is `svdiff_adapter.loaders.model`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from ..format import DEFAULT_WEIGHT_NAME, LEGACY_WEIGHT_NAMES, SpectralShiftFile, load_shift_file


# Default names, tried in this order when `weight_name` is None: format v1, then svdiff-pytorch's two files.
DEFAULT_WEIGHT_NAMES = (DEFAULT_WEIGHT_NAME, *LEGACY_WEIGHT_NAMES)
# Files that identify a LoRA folder/repo, to point users to `load_lora_weights` instead.
_LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")


class SpectralShiftNotFoundError(FileNotFoundError):
    """No spectral-shift file where one was asked for: a missing file, folder, repo, revision, or a cache miss."""


def _lora_hint(files) -> str:
    names = {Path(f).name for f in files}
    if names & set(_LORA_WEIGHT_NAMES) or any("lora" in name.lower() for name in names):
        return " It holds a LoRA: load it with `pipe.load_lora_weights(...)`."
    return ""


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "namespace/name"; anything else that does not exist locally is a missing path.
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source or source.endswith(
        ".safetensors")


def _from_folder(folder: Path, weight_name: Optional[str]) -> list[Path]:
    if weight_name is not None:
        path = folder / weight_name
        if not path.is_file():
            raise SpectralShiftNotFoundError(f"No file {weight_name!r} in folder {folder}.")
        return [path]
    found = [folder / name for name in DEFAULT_WEIGHT_NAMES if (folder / name).is_file()]
    if DEFAULT_WEIGHT_NAME in {p.name for p in found}:
        return [folder / DEFAULT_WEIGHT_NAME]
    if found:
        return found
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    candidates = [name for name in files if name.endswith(".safetensors")]
    if len(candidates) == 1 and not _lora_hint(candidates):
        return [folder / candidates[0]]  # a lone safetensors file under another name: let the format reader judge
    raise SpectralShiftNotFoundError(
        f"No spectral-shift file in folder {folder} (looked for {list(DEFAULT_WEIGHT_NAMES)}; it has {files[:10]})."
        + (_lora_hint(files) or " Pass `weight_name=` to choose a file.")
    )


def _from_hub(
    repo_id: str, weight_name: Optional[str], subfolder: Optional[str], revision: Optional[str],
    cache_dir, force_download: bool, local_files_only: Optional[bool], token,
) -> list[Path]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "") + (
        f", subfolder {subfolder!r}" if subfolder else "")
    names = [weight_name] if weight_name is not None else list(DEFAULT_WEIGHT_NAMES)
    found, not_cached, missing = [], [], []
    for name in names:
        try:
            path = hf_hub_download(
                repo_id, name, subfolder=subfolder or None, revision=revision, cache_dir=cache_dir,
                force_download=force_download, local_files_only=bool(local_files_only), token=token,
            )
        except HFValidationError as error:
            raise SpectralShiftNotFoundError(
                f"{repo_id!r} is neither an existing file or folder nor a valid Hub repo id."
            ) from error
        except RevisionNotFoundError as error:
            raise SpectralShiftNotFoundError(f"Revision {revision!r} does not exist in Hub repo {repo_id!r}.") from error
        except RepositoryNotFoundError as error:
            raise SpectralShiftNotFoundError(
                f"Hub repo {repo_id!r} does not exist, or it is private or gated and no valid `token` was given."
            ) from error
        except RemoteEntryNotFoundError:
            missing.append(name)
            continue
        except LocalEntryNotFoundError:
            not_cached.append(name)
            continue
        found.append(Path(path))
        if name == DEFAULT_WEIGHT_NAME:
            break
    if found:
        return found
    if not_cached:
        raise SpectralShiftNotFoundError(
            f"Cannot find a spectral-shift file of {where} in the local cache, and the Hub cannot be reached "
            f"(offline: HF_HUB_OFFLINE=1 or local_files_only=True, or no connection). Tried {not_cached}. Load it "
            "once while online (or pass `weight_name=` of a cached file)."
        )
    if weight_name is not None:
        raise SpectralShiftNotFoundError(f"Hub repo {where} has no file {weight_name!r}.")
    raise SpectralShiftNotFoundError(
        f"Hub repo {where} holds no spectral-shift file (looked for {list(DEFAULT_WEIGHT_NAMES)}).{_repo_files_hint(repo_id, revision, subfolder, token)}"
    )


def _repo_files_hint(repo_id, revision, subfolder, token) -> str:
    from huggingface_hub import HfApi

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
    except Exception:  # the hint is best effort; the error it decorates is what matters
        return " Pass `weight_name=` to choose a file."
    if subfolder:
        files = [f[len(subfolder.strip("/")) + 1:] for f in files if f.startswith(subfolder.strip("/") + "/")]
    return f" It has {files[:10]}." + (_lora_hint(files) or " Pass `weight_name=` to choose a file.")


def resolve_shift_files(
    source: Union[str, os.PathLike],
    *,
    weight_name: Optional[str] = None,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    force_download: bool = False,
    local_files_only: Optional[bool] = None,
    token: Union[str, bool, None] = None,
) -> list[Path]:
    """Local paths of the spectral-shift file(s) that `source` names: a file, a folder or a Hub repo id.

    With `weight_name=None` a folder or repo is searched for `spectral_shift_weights.safetensors`, then for
    svdiff-pytorch's `spectral_shifts.safetensors` / `spectral_shifts_te.safetensors` (both are returned when both
    exist). Hub files go through `hf_hub_download` (its cache, `HF_HUB_OFFLINE`, `revision`, `token`, ...).

    Raises:
        `SpectralShiftNotFoundError` (an `OSError`): missing file/folder/repo/revision/file in repo, or offline and
        not cached. The message says which, and points to `load_lora_weights` when it finds a LoRA instead.
    """
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source).strip():
        raise SpectralShiftNotFoundError(f"Give a file, a folder or a Hub repo id to load shifts from, not {source!r}.")
    path = Path(os.path.expanduser(os.fspath(source)))
    if path.is_file():
        return [path]
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise SpectralShiftNotFoundError(f"No subfolder {subfolder!r} in {path}.")
        return _from_folder(folder, weight_name)
    source = os.fspath(source)
    if _looks_like_path(source):
        raise SpectralShiftNotFoundError(f"No such file or folder: {source!r} (and it is not a Hub repo id).")
    return _from_hub(source, weight_name, subfolder, revision, cache_dir, force_download, local_files_only, token)


def read_shift_files(paths: list[Path]) -> SpectralShiftFile:
    """Read one file, or merge svdiff-pytorch's UNet and text-encoder files into one `SpectralShiftFile`."""
    files = [load_shift_file(path) for path in paths]
    result = files[0]
    for other in files[1:]:
        clash = set(result.deltas) & set(other.deltas)
        if clash:
            raise ValueError(f"The files {[str(p) for p in paths]} both hold component(s) {sorted(clash)}.")
        result.deltas.update(other.deltas)
        result.configs.update(other.configs)
        result.fingerprints.update(other.fingerprints)
        result.factor_fingerprints.update(other.factor_fingerprints)
    return result


def upload_shift_folder(
    folder: Union[str, os.PathLike], repo_id: str, *, private: Optional[bool] = None, token=None,
    commit_message: Optional[str] = None,
):
    """`create_repo(exist_ok=True)` then `upload_folder`; returns the commit info of the upload."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    return upload_folder(
        repo_id=repo_id, folder_path=os.fspath(folder), token=token,
        commit_message=commit_message or "Upload spectral shift (svdiff-adapter)",
    )
