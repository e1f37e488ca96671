"""`svdiff convert`: svdiff-pytorch files ↔ format v1.

svdiff-pytorch (0.2.0) writes `spectral_shifts.safetensors` (UNet) and `spectral_shifts_te.safetensors` (text
encoder), keys `<module>.delta` (text encoder: `text_model.<module>.delta`), one scalar δ per norm, no metadata.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from ..format import (
    DEFAULT_WEIGHT_NAME,
    LEGACY_SUFFIX,
    LEGACY_TEXT_PREFIX,
    LEGACY_WEIGHT_NAMES,
    SpectralShiftFile,
    save_shift_file,
)
from ..svd import atomic_save_safetensors
from ._base import (
    BaseSource,
    ShiftSource,
    ToolError,
    base_modules,
    check_not_exists,
    guess_kind,
    load_base,
    module_fingerprint,
    read_shift,
)


LEGACY_FILE_OF = {component: name for name, component in LEGACY_WEIGHT_NAMES.items()}


def svdiff_pytorch_to_v1(
    source: ShiftSource,
    base: BaseSource,
    output: Union[str, os.PathLike, None] = None,
    *,
    base_model: Optional[str] = None,
    base_revision: Optional[str] = None,
    overwrite: bool = False,
    svd_cache=None,
) -> SpectralShiftFile:
    """Convert svdiff-pytorch shift files to format v1, adding fingerprints and metadata from the base model.

    Args:
        source: a folder with `spectral_shifts.safetensors` and/or `spectral_shifts_te.safetensors`, one such file,
            or a `SpectralShiftFile` read from them.
        base: the base model the shifts were trained on (local folder, model or `{component: model}`); every module
            must exist there with the right size.
        output (*optional*): a file path, or a folder (then `spectral_shift_weights.safetensors` in it): an existing
            folder, or a new path without a suffix. An existing file is replaced with `overwrite=True`.
        base_model, base_revision (`str`, *optional*): recorded in the file (e.g. the Hub id of the base).

    Returns:
        `SpectralShiftFile` in format v1 (`norm_mode="scalar"`, fingerprints of the base weights). Text-encoder
        module paths lose svdiff-pytorch's `text_model.` prefix (current transformers layout).
    """
    shift_file = read_shift(source)
    if shift_file.source != "svdiff-pytorch":
        raise ToolError(f"{os.fspath(source) if not isinstance(source, SpectralShiftFile) else 'The source'} is "
                        f"already a {shift_file.source} file, not an svdiff-pytorch one.")
    output = _output_file(output)
    check_not_exists(output, overwrite)
    infos = base_modules(load_base(base, shift_file.components), shift_file, svd_cache=svd_cache)
    result = SpectralShiftFile(
        deltas={c: dict(d) for c, d in shift_file.deltas.items()},
        configs={c: dict(shift_file.configs[c]) for c in shift_file.deltas},
        fingerprints={c: {name: module_fingerprint(info) for name, info in infos[c].items()} for c in infos},
        base_model=base_model, base_revision=base_revision, source="v1",
    )
    if output is not None:
        save_shift_file(result, output)
    return result


def v1_to_svdiff_pytorch(
    source: ShiftSource,
    output_dir: Union[str, os.PathLike],
    *,
    base: Optional[BaseSource] = None,
    drop_norms: bool = False,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a format-v1 file as svdiff-pytorch's files (`spectral_shifts.safetensors`, `spectral_shifts_te.safetensors`).

    svdiff-pytorch shifts a norm weight by one scalar (`norm_mode="scalar"`); elementwise norm shifts (γ + δ, our
    default) cannot be represented there and are refused, unless `drop_norms=True` leaves them out (the result then
    differs from the v1 file on those norms). Norm modules are recognised from `base` when given, else by name.

    Returns:
        `dict`: component → path written.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ToolError(f"{os.fspath(output_dir)} is a file, but svdiff-pytorch's shifts are a folder (of "
                        f"{' and '.join(LEGACY_WEIGHT_NAMES)}): give a folder as the output.")
    shift_file = read_shift(source)
    unsupported = [c for c in shift_file.components if c not in LEGACY_FILE_OF]
    if unsupported:
        raise ToolError(f"svdiff-pytorch files hold only {list(LEGACY_FILE_OF)}; this file also has {unsupported}.")
    infos = base_modules(load_base(base, shift_file.components), shift_file) if base is not None else None
    paths = {c: output_dir / LEGACY_FILE_OF[c] for c in shift_file.components}
    for path in paths.values():
        check_not_exists(path, overwrite)
    tensors_of = {}
    for component, deltas in shift_file.deltas.items():
        norm_mode = shift_file.configs.get(component, {}).get("norm_mode", "elementwise")
        tensors, norms = {}, []
        for name, delta in deltas.items():
            kind = infos[component][name].kind if infos is not None else guess_kind(name, delta, norm_mode)
            if kind == "norm" and norm_mode == "elementwise":
                norms.append(name)
                continue
            key = (LEGACY_TEXT_PREFIX + name if component.startswith("text_encoder") else name) + LEGACY_SUFFIX
            tensors[key] = delta.detach().to(torch.float32).contiguous()
        if norms and not drop_norms:
            raise ToolError(
                f"{len(norms)} norm layer(s) of {component} have elementwise shifts (γ + δ, e.g. {norms[:2]}), which "
                "svdiff-pytorch cannot represent (it shifts a norm by one scalar). Pass drop_norms=True "
                "(CLI: --drop-norms) to leave them out, or train with norm_mode='scalar'."
            )
        if not tensors:
            raise ToolError(f"Nothing of {component} is left to write.")
        tensors_of[component] = tensors
    output_dir.mkdir(parents=True, exist_ok=True)
    for component, tensors in tensors_of.items():
        atomic_save_safetensors(tensors, paths[component])  # no metadata: svdiff-pytorch writes none
    return paths


def _output_file(output: Union[str, os.PathLike, None]) -> Optional[Path]:
    if output is None:
        return None
    output = Path(output)
    # An existing file is the output whatever its name; a new name without a suffix is a folder to create.
    is_folder = output.is_dir() or (not output.suffix and not output.exists())
    return output / DEFAULT_WEIGHT_NAME if is_folder else output


__all__ = ["svdiff_pytorch_to_v1", "v1_to_svdiff_pytorch"]
