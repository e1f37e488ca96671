"""File format v1 of spectral shifts (the spec is docs/format.md), and reading svdiff-pytorch files.

Pure data: tensors, names and metadata; nothing here knows torch modules.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from .svd import atomic_save_safetensors


FORMAT_NAME = "svdiff-adapter"
FORMAT_VERSION = 1
DEFAULT_WEIGHT_NAME = "spectral_shift_weights.safetensors"
DELTA_SUFFIX = ".spectral_delta"
# svdiff-pytorch (mkshing/svdiff-pytorch 0.2.0): one file per component, keys "<module>.delta", no metadata.
LEGACY_WEIGHT_NAMES = {"spectral_shifts.safetensors": "unet", "spectral_shifts_te.safetensors": "text_encoder"}
LEGACY_SUFFIX = ".delta"
LEGACY_TEXT_PREFIX = "text_model."
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FINGERPRINT_LENGTH = 4
FINGERPRINT_RTOL = 5e-3
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class SpectralShiftFormatError(ValueError):
    """A file or state dict that is not a valid spectral-shift file."""


@dataclass
class SpectralShiftFile:
    """The content of a spectral-shift file.

    Attributes:
        deltas: component → module path → δ (1-D). The component is "" for a bare model.
        configs: component → adapter config options (`target_kinds`, `norm_mode`, ...).
        fingerprints: component → module path → leading singular values (or norm values) of the base weight.
        base_model, base_revision: the base model the shifts were trained on, when known.
        source: "v1" or "svdiff-pytorch".
    """

    deltas: dict[str, dict[str, torch.Tensor]]
    configs: dict[str, dict] = field(default_factory=dict)
    fingerprints: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    base_model: Optional[str] = None
    base_revision: Optional[str] = None
    source: str = "v1"

    @property
    def components(self) -> list[str]:
        return list(self.deltas)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for comp in self.deltas.values() for t in comp.values())


def tensor_key(component: str, module: str) -> str:
    return f"{component}.{module}{DELTA_SUFFIX}" if component else f"{module}{DELTA_SUFFIX}"


def check_finite(deltas: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    bad = [tensor_key(c, m) for c, mods in deltas.items() for m, t in mods.items() if not torch.isfinite(t).all()]
    if bad:
        raise SpectralShiftFormatError(
            f"Spectral shift contains NaN or inf values in {len(bad)} tensor(s): {bad[:5]}"
        )


def save_shift_file(
    shift_file: SpectralShiftFile, path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None
) -> Path:
    """Write `shift_file` atomically as format v1. `dtype=torch.float16` halves the size (|error| ≤ 2⁻¹¹·|δ|)."""
    check_finite(shift_file.deltas)
    tensors = {}
    for component, modules in shift_file.deltas.items():
        for module, delta in modules.items():
            tensor = delta.detach().to("cpu", dtype or torch.float32).contiguous()
            tensors[tensor_key(component, module)] = tensor
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "components": json.dumps(shift_file.components),
        "config": json.dumps(shift_file.configs, sort_keys=True),
        "fingerprint": json.dumps(shift_file.fingerprints, sort_keys=True),
    }
    # str(): a pipeline loaded from a `Path` reports its name_or_path as a Path; safetensors metadata is text only.
    if shift_file.base_model:
        metadata["base_model"] = str(shift_file.base_model)
    if shift_file.base_revision:
        metadata["base_revision"] = str(shift_file.base_revision)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, path, metadata)
    return path


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as handle:
        head = handle.read(9)
    # A safetensors file starts with an 8-byte little-endian header length (whose first byte may well be 0x80, a
    # pickle's first byte) followed by "{".
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    pickle_like = head[:1] == b"\x80" or head[:2] == b"PK"
    if path.suffix.lower() in _PICKLE_SUFFIXES or (pickle_like and not looks_safetensors):
        raise SpectralShiftFormatError(
            f"{path} looks like a pickle/torch.save file. Spectral shifts are read from safetensors only; pickled "
            "files are never unpickled because loading them can run arbitrary code."
        )


def load_shift_file(path: Union[str, os.PathLike]) -> SpectralShiftFile:
    """Read a v1 file or an svdiff-pytorch file; raise `SpectralShiftFormatError` with the reason otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No spectral-shift file at {path}.")
    _refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise SpectralShiftFormatError(f"{path} is not a readable safetensors file (corrupt or truncated): {error}")
    return parse_state_dict(tensors, metadata, file_name=path.name)


def parse_state_dict(
    tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None, file_name: Optional[str] = None
) -> SpectralShiftFile:
    """Interpret tensors (+ safetensors metadata) as spectral shifts: format v1, or svdiff-pytorch keys."""
    metadata = dict(metadata or {})
    if not tensors:
        raise SpectralShiftFormatError("The spectral-shift file holds no tensors.")
    if metadata.get("format") == FORMAT_NAME:
        result = _parse_v1(tensors, metadata)
    elif all(key.endswith(LEGACY_SUFFIX) for key in tensors):
        result = _parse_legacy(tensors, file_name)
    elif any("lora" in key.lower() for key in tensors):
        raise SpectralShiftFormatError(
            "This is a LoRA file, not a spectral shift; load it with `pipe.load_lora_weights(...)`."
        )
    else:
        raise SpectralShiftFormatError(
            f"Unknown file format: no '{FORMAT_NAME}' metadata and keys such as {sorted(tensors)[:3]} are neither "
            f"'*{DELTA_SUFFIX}' nor svdiff-pytorch '*{LEGACY_SUFFIX}' keys."
        )
    check_finite(result.deltas)
    return result


def _json_field(metadata: Mapping[str, str], name: str, default):
    try:
        return json.loads(metadata[name]) if name in metadata else default
    except json.JSONDecodeError as error:
        raise SpectralShiftFormatError(f"Metadata field {name!r} is not valid JSON: {error}")


def _parse_v1(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> SpectralShiftFile:
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION or int(version) < 1:
        raise SpectralShiftFormatError(
            f"Unknown spectral-shift format version {version!r}; this release reads versions 1..{FORMAT_VERSION}. "
            "Upgrade svdiff-adapter to read newer files."
        )
    components = _json_field(metadata, "components", [""])
    deltas: dict[str, dict[str, torch.Tensor]] = {component: {} for component in components}
    named = sorted((c for c in components if c), key=len, reverse=True)
    for key, tensor in tensors.items():
        if not key.endswith(DELTA_SUFFIX):
            raise SpectralShiftFormatError(f"Unexpected key {key!r} (expected '*{DELTA_SUFFIX}').")
        stem = key[: -len(DELTA_SUFFIX)]
        component = next((c for c in named if stem.startswith(c + ".")), "")
        if component == "" and "" not in deltas:
            raise SpectralShiftFormatError(f"Key {key!r} belongs to none of the components {components}.")
        module = stem[len(component) + 1:] if component else stem
        if tensor.ndim != 1:
            raise SpectralShiftFormatError(f"Tensor {key!r} has shape {tuple(tensor.shape)}; shifts are 1-D.")
        deltas[component][module] = tensor.to(torch.float32)
    return SpectralShiftFile(
        deltas=deltas,
        configs=_json_field(metadata, "config", {}),
        fingerprints=_json_field(metadata, "fingerprint", {}),
        base_model=metadata.get("base_model"),
        base_revision=metadata.get("base_revision"),
        source="v1",
    )


def _parse_legacy(tensors: Mapping[str, torch.Tensor], file_name: Optional[str]) -> SpectralShiftFile:
    component = LEGACY_WEIGHT_NAMES.get(file_name or "", None)
    if component is None:
        component = "text_encoder" if any(k.startswith(LEGACY_TEXT_PREFIX) for k in tensors) else "unet"
    modules = {}
    for key, tensor in tensors.items():
        module = key[: -len(LEGACY_SUFFIX)]
        if component.startswith("text_encoder"):
            # transformers 4.27 had CLIPTextModel.text_model; current CLIPTextModel does not.
            module = module.removeprefix(LEGACY_TEXT_PREFIX)
        modules[module] = tensor.reshape(-1).to(torch.float32)
    config = {"target_kinds": ["linear", "conv2d", "embedding", "norm"], "norm_mode": "scalar"}
    return SpectralShiftFile(deltas={component: modules}, configs={component: config}, source="svdiff-pytorch")


def fingerprints_match(expected: list[float], actual: list[float], rtol: float = FINGERPRINT_RTOL) -> bool:
    if len(expected) != len(actual):
        return False
    scale = max((abs(v) for v in expected), default=0.0)
    return all(math.isclose(e, a, rel_tol=rtol, abs_tol=rtol * scale * 1e-3) for e, a in zip(expected, actual))
