"""File format v1 of spectral shifts (the spec is docs/format.md), reading svdiff-pytorch files and state dicts,
the base-model fingerprints that tie a file to the weights it was trained on, and the factor fingerprints that tie
a truncated spectrum to the singular vectors it was trained on.

Pure data: tensors, names and metadata; nothing here knows torch modules.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from .atomic import atomic_save_safetensors


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
# Shifts are stored in these dtypes; anything else (integers, bool, float8, complex) is not a shift.
DELTA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# A Hub repo id: "name" or "namespace/name" (huggingface_hub's own rules are stricter; this only tells ids from paths).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_CONFIG_TYPES = {"target_kinds": list, "norm_mode": str, "spectral_rank": int, "spectral_oversampling": int,
                 "spectral_power_iterations": int, "spectral_seed": int, "spectral_svd_dtype": str,
                 "spectral_factor_devices": list}
# With `spectral_rank`, these rebuild the same top-k factors; a file must record every one of them.
TRUNCATION_CONFIG_KEYS = ("spectral_oversampling", "spectral_power_iterations", "spectral_seed", "spectral_svd_dtype")
FACTOR_FINGERPRINT_SEED = 20110  # fixed forever: the probes of every factor fingerprint
FACTOR_FINGERPRINT_PAIR_SUMS = 4
# Absolute, on numbers of order 1: above the change that rounding the factors to float16 causes (≤ 1.5·10⁻³
# measured), ~10²× the float32 round-off of the randomized SVD on well-separated singular values (docs/format.md).
FACTOR_FINGERPRINT_TOLERANCE = 5e-3


class SpectralShiftFormatError(ValueError):
    """A file or state dict that is not a valid spectral-shift file."""


class WrongBaseModelError(SpectralShiftFormatError):
    """The base weights differ from the ones a shift was trained on (fingerprint mismatch)."""


class SpectralFactorMismatchError(WrongBaseModelError):
    """The top-k singular vectors rebuilt here differ from the ones a truncated shift was trained on (factor
    fingerprint mismatch): the shift would act on other directions of the same base weights."""


@dataclass
class SpectralShiftFile:
    """The content of a spectral-shift file.

    Attributes:
        deltas: component → module path → δ (1-D). The component is "" for a bare model.
        configs: component → adapter config options (`target_kinds`, `norm_mode`, ...).
        fingerprints: component → module path → leading singular values (or norm values) of the base weight.
        factor_fingerprints: component → module path → `factor_fingerprint` of the kept singular vectors, for every
            module whose spectrum is truncated (`spectral_rank` in its component's config).
        base_model, base_revision: the Hub id (and revision) of the base model the shifts were trained on, when
            known; local paths are never recorded (the fingerprints identify the base wherever it lies).
        source: "v1" (a file), "svdiff-pytorch" (its files) or "state_dict" (tensors given in memory).
    """

    deltas: dict[str, dict[str, torch.Tensor]]
    configs: dict[str, dict] = field(default_factory=dict)
    fingerprints: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    factor_fingerprints: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    base_model: Optional[str] = None
    base_revision: Optional[str] = None
    source: str = "v1"

    @property
    def components(self) -> list[str]:
        return list(self.deltas)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for comp in self.deltas.values() for t in comp.values())


    def unfingerprinted(self, components: Optional[list[str]] = None) -> list[str]:
        """Modules (as `component.module`) of `components` (default: all) that have no fingerprint."""
        return [qualified_name(c, m) for c, mods in self.deltas.items() if components is None or c in components
                for m in mods if m not in self.fingerprints.get(c, {})]


def qualified_name(component: str, module: str) -> str:
    return f"{component}.{module}" if component else module


def tensor_key(component: str, module: str) -> str:
    return f"{qualified_name(component, module)}{DELTA_SUFFIX}"


def hub_id_or_none(base_model: Union[str, os.PathLike, None]) -> Optional[str]:
    """`base_model` if it names a Hub repo, None for a local path (absolute, relative or existing) or nothing."""
    if base_model is None or not isinstance(base_model, str):
        return None
    if base_model.startswith((".", "/", "~")) or "\\" in base_model or os.path.exists(base_model):
        return None
    return base_model if _HUB_ID.match(base_model) else None


def check_finite(deltas: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    bad = [tensor_key(c, m) for c, mods in deltas.items() for m, t in mods.items() if not torch.isfinite(t).all()]
    if bad:
        raise SpectralShiftFormatError(
            f"Spectral shift contains NaN or inf values in {len(bad)} tensor(s): {bad[:5]}"
        )


def save_shift_file(
    shift_file: SpectralShiftFile, path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None
) -> Path:
    """Write `shift_file` atomically as format v1. `dtype=torch.float16` halves the size (|error| ≤ 2⁻¹¹·|δ|);
    float32 (default), float16 and bfloat16 are the storage dtypes. A `base_model` that is a local path is not
    written."""
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"Shifts are stored as torch.float32, torch.float16 or torch.bfloat16, not {dtype}.")
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
    if any(shift_file.factor_fingerprints.values()):
        metadata["factor_fingerprint"] = json.dumps(shift_file.factor_fingerprints, sort_keys=True)
    base_model = hub_id_or_none(shift_file.base_model)
    if base_model:
        metadata["base_model"] = base_model
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
    tensors: Mapping[str, Any], metadata: Optional[Mapping[str, str]] = None, file_name: Optional[str] = None
) -> SpectralShiftFile:
    """Interpret tensors (+ safetensors metadata) as spectral shifts: format v1, or svdiff-pytorch keys."""
    metadata = dict(metadata or {})
    if not tensors:
        raise SpectralShiftFormatError("The spectral-shift file holds no tensors.")
    _check_tensors(tensors)
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


def parse_in_memory(state_dict: Mapping[str, Any], components: tuple[str, ...] = COMPONENTS) -> SpectralShiftFile:
    """Shifts given in memory: format-v1 keys `<component>.<module>.spectral_delta`, svdiff-pytorch keys, or a
    nested `{component: {module: δ}}` dict. They carry no fingerprints, so the base model cannot be checked."""
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise SpectralShiftFormatError(f"Expected a non-empty dict of shifts, got {type(state_dict).__name__}.")
    if all(isinstance(value, Mapping) for value in state_dict.values()):
        nested = {f"{component}.{module}{DELTA_SUFFIX}": delta for component, modules in state_dict.items()
                  for module, delta in modules.items()}
        _check_tensors(nested)
        result = _parse_v1(nested, _state_dict_metadata(list(state_dict)))
    else:
        _check_tensors(state_dict)
        keys = list(state_dict)
        if all(key.endswith(DELTA_SUFFIX) for key in keys):
            named = sorted({c for c in components for k in keys if k.startswith(c + ".")}, key=len, reverse=True)
            stray = [k for k in keys if not any(k.startswith(c + ".") for c in named)]
            if stray:
                raise SpectralShiftFormatError(
                    f"State dict keys must start with a component ({list(components)}); e.g. {stray[:3]}."
                )
            result = _parse_v1(state_dict, _state_dict_metadata(named))
        else:
            result = parse_state_dict(state_dict)
    check_finite(result.deltas)
    result.source = "state_dict" if result.source == "v1" else result.source
    return result


def _state_dict_metadata(components: list[str]) -> dict[str, str]:
    return {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "components": json.dumps(components)}


def _check_tensors(tensors: Mapping[str, Any]) -> None:
    """Every value a real-valued float tensor (δ of another dtype would be truncated or lose its imaginary part)."""
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise SpectralShiftFormatError(f"Shift names must be strings, got {key!r}.")
        if not isinstance(value, torch.Tensor):
            raise SpectralShiftFormatError(f"{key!r} holds a {type(value).__name__}, not a tensor.")
        if value.dtype not in DELTA_DTYPES:
            raise SpectralShiftFormatError(
                f"Tensor {key!r} has dtype {value.dtype}; shifts are float32, float16, bfloat16 or float64."
            )


def _json_field(metadata: Mapping[str, str], name: str, default, expected: type):
    try:
        value = json.loads(metadata[name]) if name in metadata else default
    except (json.JSONDecodeError, TypeError) as error:
        raise SpectralShiftFormatError(f"Metadata field {name!r} is not valid JSON: {error}")
    if not isinstance(value, expected):
        raise SpectralShiftFormatError(
            f"Metadata field {name!r} should be a JSON {expected.__name__}, got {type(value).__name__}: {value!r:.80}."
        )
    return value


def _per_component(field: str, value: dict) -> dict:
    """A metadata object of per-component objects (`config`, `fingerprint`), checked one level down."""
    for component, inner in value.items():
        if not isinstance(inner, dict):
            raise SpectralShiftFormatError(f"Metadata field {field!r} of {component!r} should be an object.")
    return value


def _checked_configs(configs: dict) -> dict:
    for component, config in _per_component("config", configs).items():
        for key, expected in _CONFIG_TYPES.items():
            value = config.get(key)
            if key == "spectral_rank" and value is None:
                continue  # null: the full spectrum
            if key in config and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
                raise SpectralShiftFormatError(
                    f"Metadata field 'config' of {component!r}: {key!r} should be a {expected.__name__}, got "
                    f"{value!r}."
                )
        if config.get("spectral_rank") is not None:
            missing = [key for key in TRUNCATION_CONFIG_KEYS if key not in config]
            if config["spectral_rank"] < 1 or missing:
                raise SpectralShiftFormatError(
                    f"Metadata field 'config' of {component!r}: 'spectral_rank' {config['spectral_rank']} needs to be "
                    f">= 1 and to come with {list(TRUNCATION_CONFIG_KEYS)} (missing: {missing}), the parameters "
                    "that rebuild the factors the shift was trained with."
                )
    return configs


def _is_number_list(values) -> bool:
    return isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _checked_fingerprints(fingerprints: dict, name: str = "fingerprint") -> dict:
    for component, modules in _per_component(name, fingerprints).items():
        bad = next((m for m, values in modules.items() if not _is_number_list(values)), None)
        if bad is not None:
            raise SpectralShiftFormatError(
                f"Metadata field {name!r} of {qualified_name(component, bad)!r} should be a list of numbers, "
                f"got {modules[bad]!r:.80}."
            )
    return fingerprints


def _parse_v1(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> SpectralShiftFile:
    version = metadata.get("format_version", "")
    if not (isinstance(version, str) and re.fullmatch(r"[0-9]+", version)) or not 1 <= int(version) <= FORMAT_VERSION:
        raise SpectralShiftFormatError(
            f"Unknown spectral-shift format version {version!r}; this release reads versions 1..{FORMAT_VERSION}. "
            "Upgrade svdiff-adapter to read newer files."
        )
    components = _json_field(metadata, "components", [""], list)
    if not components or not all(isinstance(c, str) for c in components):
        raise SpectralShiftFormatError(f"Metadata field 'components' should be a list of names, got {components!r}.")
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
        configs=_checked_configs(_json_field(metadata, "config", {}, dict)),
        fingerprints=_checked_fingerprints(_json_field(metadata, "fingerprint", {}, dict)),
        factor_fingerprints=_checked_fingerprints(_json_field(metadata, "factor_fingerprint", {}, dict),
                                                  "factor_fingerprint"),
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


# ---------------------------------------------------------------------------------------------- fingerprints
def base_fingerprint(singular_values: Optional[torch.Tensor], weight: torch.Tensor) -> list[float]:
    """What a file records of one base weight: its 4 leading singular values, or — for a norm weight shifted
    elementwise (no SVD) — ‖γ‖ and γ₀, γ₁, γ₂; 7 significant digits, well inside the match tolerance."""
    if singular_values is not None:
        values = list(singular_values[:FINGERPRINT_LENGTH])
    else:
        flat = weight.detach().float().reshape(-1)
        values = [flat.norm()] + list(flat[: FINGERPRINT_LENGTH - 1])
    return [float(f"{float(v):.7g}") for v in values]


def fingerprints_match(expected: list[float], actual: list[float], rtol: float = FINGERPRINT_RTOL) -> bool:
    if len(expected) != len(actual):
        return False
    scale = max((abs(v) for v in expected), default=0.0)
    return all(math.isclose(e, a, rel_tol=rtol, abs_tol=rtol * scale * 1e-3) for e, a in zip(expected, actual))


def check_fingerprints(expected: Mapping[str, list[float]], actual: Mapping[str, list[float]]) -> None:
    """Raise `WrongBaseModelError` naming the modules (of `actual`) whose base weights differ from `expected`."""
    mismatched = [name for name, values in actual.items()
                  if name in expected and not fingerprints_match(list(expected[name]), values)]
    if mismatched:
        raise WrongBaseModelError(
            f"Wrong base model: the weights of {len(mismatched)} of {len(actual)} shifted module(s) differ from the "
            f"ones the shift was trained on (singular-value fingerprint mismatch), e.g. {mismatched[:5]}. Spectral "
            "shifts only apply to the exact base model they were trained on."
        )


def factor_fingerprint(U: torch.Tensor, Vh: torch.Tensor) -> list[float]:
    """What a file records of the kept singular vectors of one truncated module: 4 + k' sign-invariant numbers of
    order 1.

    With fixed unit probes a (m) and b (n), p = √m·U_kᵀa and q = √n·V_k·b (entries ~ N(0, 1)): first Σⱼ gᵣⱼ·pⱼqⱼ/√k'
    for 4 fixed Gaussian weight vectors gᵣ (they follow U and V together, as W_δ does: another kept subspace or
    another pairing moves them by O(1)), then |pⱼ| for every kept vector (a rotation by θ of uⱼ towards a
    neighbour uₗ — near-equal singular values decomposed with other round-off — moves |pⱼ| by about θ·|pₗ|; vⱼ
    follows uⱼ, Vᵀ = diag(σ)⁻¹·Uᵀ·W). Flipping the signs of a pair (uⱼ, vⱼ), which leaves W_δ unchanged, changes
    none of them. Computed in float64 on the CPU from the stored factors; 5 decimals.
    """
    U = U.detach().to("cpu", torch.float64)
    V = Vh.detach().to("cpu", torch.float64).T
    rows, kept = U.shape
    cols = V.shape[0]
    generator = torch.Generator().manual_seed(FACTOR_FINGERPRINT_SEED)
    probe_rows = torch.randn(rows, generator=generator, dtype=torch.float64)
    probe_cols = torch.randn(cols, generator=generator, dtype=torch.float64)
    weights = torch.randn(FACTOR_FINGERPRINT_PAIR_SUMS, kept, generator=generator, dtype=torch.float64)
    p = (U.T @ probe_rows) * (math.sqrt(rows) / float(probe_rows.norm()))
    q = (V.T @ probe_cols) * (math.sqrt(cols) / float(probe_cols.norm()))
    pair_sums = weights @ (p * q) / math.sqrt(max(kept, 1))
    return [round(float(v), 5) for v in (*pair_sums, *p.abs())]


def check_factor_fingerprints(expected: Mapping[str, list[float]], actual: Mapping[str, list[float]],
                              tolerance: float = FACTOR_FINGERPRINT_TOLERANCE) -> list[str]:
    """The modules (of `actual`) whose factor fingerprint differs from `expected` by more than `tolerance`."""
    return [name for name, values in actual.items() if name in expected and (
        len(values) != len(expected[name])
        or any(abs(a - e) > tolerance for a, e in zip(values, expected[name])))]
