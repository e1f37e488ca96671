"""`svdiff merge`: several shift files → one file, exactly equivalent to `set_adapters(names, weights)`.

A layer with active adapters i applies ReLU(σ + Σᵢ wᵢδᵢ): the combination is linear inside the ReLU, so the single
shift δ = Σᵢ wᵢδᵢ (`spectral.combine_shifts`, the function the layers call) gives the same weights, bit for bit.
Files are for the same base model when their fingerprints agree; `base_model` ids (Hub ids, or nothing) only
decide when the files share no fingerprinted module.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Union

import torch

from .. import spectral
from ..format import SpectralShiftFile, fingerprints_match, save_shift_file
from ._base import ShiftSource, ToolError, check_not_exists, qualified, read_shift


MERGE_MODES = ("add", "interpolate")


def merge_weights(count: int, weights: Optional[Sequence[float]], mode: str) -> list[float]:
    """The weights actually used: `add` keeps them (default 1 each); `interpolate` normalises them to sum to 1
    (default 1/n each), so `--weights 0.3 0.7` and `--weights 3 7` mean the same blend."""
    if mode not in MERGE_MODES:
        raise ToolError(f"`mode` should be one of {list(MERGE_MODES)} but the value passed is {mode!r}.")
    if count < 1:
        raise ToolError("Give at least one shift file to merge.")
    if weights is None:
        weights = [1.0] * count if mode == "add" else [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ToolError(f"Got {len(weights)} weight(s) for {count} file(s); give one weight per file.")
    if mode == "interpolate":
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ToolError(f"`interpolate` needs non-negative weights with a positive sum, got {weights}.")
        total = sum(weights)
        weights = [w / total for w in weights]
    return weights


def _matches_prefix(component: str, name: str, prefixes: Sequence[str]) -> bool:
    full = qualified(component, name)
    for prefix in prefixes:
        prefix = prefix.strip().rstrip(".")
        if any(candidate == prefix or candidate.startswith(prefix + ".") for candidate in (name, full)):
            return True
    return False


def merge_shifts(
    sources: Sequence[ShiftSource],
    weights: Optional[Sequence[float]] = None,
    mode: str = "add",
    *,
    blocks: Optional[Mapping[Union[int, str], Sequence[str]]] = None,
    output: Union[str, os.PathLike, None] = None,
    overwrite: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> SpectralShiftFile:
    """Merge spectral-shift files into one: δ = Σᵢ wᵢ δᵢ per module (a module missing from a file counts as δ = 0).

    Args:
        sources (`list`): files, folders or `SpectralShiftFile`s, all for the same base model.
        weights (`list[float]`, *optional*): one per source; see `merge_weights` for the defaults and `interpolate`.
        mode (`str`, *optional*, defaults to `"add"`): `"add"` (Σᵢ wᵢδᵢ) or `"interpolate"` (weights normalised to
            sum to 1, the paper's αδ₁ + (1−α)δ₂).
        blocks (`dict`, *optional*): style mixing. Maps a source (its index, or letter `"A"`, `"B"`, ... in order)
            to module-path prefixes (`"down_blocks"`, `"mid_block"`, `"unet.up_blocks.1"`); that source then
            contributes only to modules under those prefixes. Sources not named contribute everywhere.
        output (`str`, *optional*): where to write the merged file (format v1).
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `output`.
        dtype (`torch.dtype`, *optional*): storage dtype of `output` (float32 by default).

    Returns:
        `SpectralShiftFile`: loading it as one adapter at weight 1 gives exactly the weights of loading the sources as
        adapters and calling `set_adapters(names, weights)` (with the `blocks` selection, diffusers' per-block
        weights 0/1 give the same).

    Raises:
        `ToolError`: different base models (different fingerprints; different `base_model` ids where the files
        share no fingerprinted module), different `norm_mode`s,
        δ lengths that disagree, unknown mode, a weight count that does not match, a block prefix that selects
        nothing.
    """
    weights = merge_weights(len(sources), weights, mode)
    check_not_exists(output, overwrite)
    files = [read_shift(source) for source in sources]
    selections = _selections(files, blocks)

    merged = SpectralShiftFile(deltas={}, source="v1")
    terms: dict[tuple[str, str], list[tuple[torch.Tensor, float]]] = {}
    shared_fingerprint = False
    for index, (shift_file, weight) in enumerate(zip(files, weights)):
        for component, deltas in shift_file.deltas.items():
            _merge_config(merged, component, shift_file.configs.get(component, {}), index)
            fingerprints = shift_file.fingerprints.get(component, {})
            known = merged.fingerprints.setdefault(component, {})
            for name, delta in deltas.items():
                if selections[index] is not None and not _matches_prefix(component, name, selections[index]):
                    continue
                if name in fingerprints:
                    if name in known:
                        shared_fingerprint = True
                        if not fingerprints_match(known[name], list(fingerprints[name])):
                            raise ToolError(
                                f"Different base models: the fingerprint of {qualified(component, name)} in file "
                                f"{index + 1} ({fingerprints[name]}) differs from an earlier file's ({known[name]})."
                            )
                    known.setdefault(name, list(fingerprints[name]))
                module_terms = terms.setdefault((component, name), [])
                if module_terms and module_terms[0][0].shape != delta.shape:
                    raise ToolError(
                        f"{qualified(component, name)} has {delta.numel()} values in file {index + 1} but "
                        f"{module_terms[0][0].numel()} in an earlier file: not the same base model or norm mode."
                    )
                module_terms.append((delta, weight))
    bases = {f.base_model for f in files if f.base_model}
    if len(bases) > 1 and not shared_fingerprint:
        raise ToolError(f"The files name different base models {sorted(bases)} and share no fingerprinted module; "
                        "they cannot be checked to fit one base.")
    for (component, name), module_terms in terms.items():
        merged.deltas.setdefault(component, {})[name] = spectral.combine_shifts(module_terms, module_terms[0][0].numel())
    merged.base_model = next(iter(sorted(bases)), None) if len(bases) == 1 else None
    merged.base_revision = next((f.base_revision for f in files if f.base_revision), None) if merged.base_model else None
    merged.configs = {c: merged.configs[c] for c in merged.deltas}
    merged.fingerprints = {c: f for c, f in merged.fingerprints.items() if c in merged.deltas and f}
    if not merged.deltas:
        raise ToolError("The selection leaves no module to merge.")
    if output is not None:
        save_shift_file(merged, output, dtype=dtype)
    return merged


def _merge_config(merged: SpectralShiftFile, component: str, config: dict, index: int) -> None:
    current = merged.configs.get(component)
    if current is None:
        merged.configs[component] = {**config, "target_kinds": list(config.get("target_kinds", []))}
        return
    if config.get("norm_mode", "elementwise") != current.get("norm_mode", "elementwise"):
        raise ToolError(
            f"File {index + 1} shifts {component or 'model'} norms with norm_mode={config.get('norm_mode')!r}, an "
            f"earlier file with {current.get('norm_mode')!r}; their norm shifts mean different things."
        )
    kinds = current["target_kinds"] + [k for k in config.get("target_kinds", []) if k not in current["target_kinds"]]
    current["target_kinds"] = kinds


def _selections(files: list[SpectralShiftFile], blocks) -> list[Optional[list[str]]]:
    selections: list[Optional[list[str]]] = [None] * len(files)
    for label, prefixes in (blocks or {}).items():
        index = _source_index(label, len(files))
        prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
        selections[index] = (selections[index] or []) + prefixes
        for prefix in prefixes:
            if not any(_matches_prefix(c, n, [prefix]) for c, d in files[index].deltas.items() for n in d):
                raise ToolError(f"Block prefix {prefix!r} selects no module of file {label!r}.")
    return selections


def _source_index(label: Union[int, str], count: int) -> int:
    if isinstance(label, int) or (isinstance(label, str) and label.isdigit()):
        index = int(label)
    elif isinstance(label, str) and len(label) == 1 and label.isalpha():
        index = ord(label.upper()) - ord("A")
    else:
        raise ToolError(f"Unknown source label {label!r} in `blocks`: use a letter A, B, ... or an index 0, 1, ...")
    if not 0 <= index < count:
        raise ToolError(f"`blocks` names source {label!r}, but only {count} file(s) were given.")
    return index


__all__ = ["MERGE_MODES", "merge_shifts", "merge_weights"]
