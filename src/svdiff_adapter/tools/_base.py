"""What every tool needs: reading shift files, loading a local base model, the base weights' σ and factors."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .. import spectral
from ..format import COMPONENTS, SpectralShiftFile, base_fingerprint, check_fingerprints, qualified_name
from ..loaders.hub import read_shift_files, resolve_shift_files
from ..svd import SpectralFactors, compute_factors
from ..tuner.targets import ShiftDoesNotFitError, fit_shifts


ShiftSource = Union[str, os.PathLike, SpectralShiftFile]
BaseSource = Union[str, os.PathLike, nn.Module, Mapping[str, nn.Module]]


class ToolError(ValueError):
    """A tool cannot do what was asked (mismatched bases, unknown mode, bad option); the message says why."""


def read_shift(source: ShiftSource, **hub_kwargs) -> SpectralShiftFile:
    """A `SpectralShiftFile` from itself, a file, a folder (v1 file, or svdiff-pytorch's one or two files) or a Hub
    repo id (`hub_kwargs`: revision, token, ... as in `loaders.hub.resolve_shift_files`)."""
    if isinstance(source, SpectralShiftFile):
        return source
    return read_shift_files(resolve_shift_files(source, **hub_kwargs))


# ------------------------------------------------------------------------------------------------- base models
def _load_model_folder(folder: Path) -> nn.Module:
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if "_class_name" in config:
        import diffusers

        cls = getattr(diffusers, config["_class_name"], None)
    else:
        import transformers

        cls = getattr(transformers, (config.get("architectures") or [""])[0], None)
    if cls is None:
        raise ToolError(f"Cannot tell which model class {config_path} describes.")
    return cls.from_pretrained(folder).eval()


def load_base(base: BaseSource, components: Optional[list[str]] = None) -> dict[str, nn.Module]:
    """The base model as `{component: model}`.

    Args:
        base: a model, a `{component: model}` dict, a local pipeline folder (subfolders `unet/`, `text_encoder/`,
            `text_encoder_2/`) or a local single-model folder (`config.json` + weights).
        components: the components needed (the shift file's). Only those subfolders are loaded. A single model is
            given the name of the file's only component.
    """
    if isinstance(base, Mapping):
        return dict(base)
    if isinstance(base, nn.Module):
        return {_single_component(components): base}
    folder = Path(os.path.expanduser(os.fspath(base)))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Base model {os.fspath(base)!r} is not a local folder. Give a pipeline folder (with unet/, "
            "text_encoder/ ...) or a model folder; download Hub models first (`hf download REPO --local-dir DIR`)."
        )
    if (folder / "config.json").is_file():
        return {_single_component(components): _load_model_folder(folder)}
    wanted = [c for c in (components or COMPONENTS) if c]
    models = {c: _load_model_folder(folder / c) for c in wanted if (folder / c / "config.json").is_file()}
    missing = [c for c in (components or []) if c not in models]
    if missing or not models:
        raise ToolError(f"Base model folder {folder} has no model for component(s) {missing or wanted}.")
    return models


def _single_component(components: Optional[list[str]]) -> str:
    components = list(components or [""])
    if len(components) != 1:
        raise ToolError(
            f"The shift covers several components {components}; give a pipeline folder or a {{component: model}} dict."
        )
    return components[0]


# ------------------------------------------------------------------------------------------- per-module facts
@dataclass
class BaseModule:
    """What a tool needs to know of one shifted module of the base model."""

    module: nn.Module
    kind: str
    factors: Optional[SpectralFactors]  # None for elementwise norm shifts (γ + δ)

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


def base_modules(
    models: Mapping[str, nn.Module], shift_file: SpectralShiftFile, svd_cache=None, progress: Optional[bool] = None,
) -> dict[str, dict[str, BaseModule]]:
    """For every module of the file: the base module, its kind and the SVD of its weight (where the shift uses one).

    Raises `ToolError` when a component is missing or a module does not exist / does not fit its δ (the loaders'
    own fit check, `tuner.targets.fit_shifts`).
    """
    missing = [c for c in shift_file.components if c not in models]
    if missing:
        raise ToolError(f"The base model has no component(s) {missing} (have: {list(models)}).")
    result: dict[str, dict[str, BaseModule]] = {}
    for component, deltas in shift_file.deltas.items():
        norm_mode = shift_file.configs.get(component, {}).get("norm_mode", "elementwise")
        try:
            targets = fit_shifts(models[component], deltas, norm_mode, what=f"the base model's {component or 'model'}")
        except ShiftDoesNotFitError as error:
            raise ToolError(str(error)) from error
        matrices = {n: spectral.weight_matrix(t.weight.detach()) for n, t in targets.items() if t.decomposed}
        factors = compute_factors(matrices, cache=svd_cache, progress=progress, desc=f"SVD of {component or 'model'}")
        result[component] = {n: BaseModule(t.module, t.kind, factors.get(n)) for n, t in targets.items()}
    return result


def guess_kind(name: str, delta: torch.Tensor, norm_mode: str = "elementwise") -> str:
    """A module's kind guessed from its path alone (when no base model is given), by UNet/CLIP naming conventions.

    Norms and embeddings are recognised; 1×1-conv projections not named "conv" (SD1's `proj_in`/`proj_out`) count as
    linear. Give the base model for exact kinds.
    """
    last = name.split(".")[-1]
    if "norm" in last or (norm_mode == "scalar" and delta.numel() == 1):
        return "norm"
    if "embed" in last or last.endswith("_embedding"):
        return "embedding"
    if "conv" in last:
        return "conv2d"
    return "linear"


def block_of(name: str) -> str:
    """The block a module belongs to: `down_blocks.0`, `mid_block`, `up_blocks.1`, `encoder.layers.3`, `conv_in`..."""
    parts = name.split(".")
    if parts[0].endswith("_block"):  # mid_block.attentions.0 → mid_block
        return parts[0]
    if len(parts) > 1 and parts[1].isdigit():
        return ".".join(parts[:2])
    if len(parts) > 2 and parts[2].isdigit():
        return ".".join(parts[:3])
    return parts[0]


qualified = qualified_name


def module_fingerprint(info: BaseModule) -> list[float]:
    """The fingerprint format v1 records for this base module (same numbers as the model loader computes)."""
    return base_fingerprint(info.factors.S if info.factors is not None else None, info.weight)


def check_base(shift_file: SpectralShiftFile, infos: Mapping[str, Mapping[str, BaseModule]]) -> None:
    """Raise `WrongBaseModelError` when the base modules differ from the ones the file was trained on."""
    for component, modules in infos.items():
        expected = shift_file.fingerprints.get(component, {})
        check_fingerprints(expected, {name: module_fingerprint(info) for name, info in modules.items()
                                      if name in expected})


def check_not_exists(path: Union[str, os.PathLike, None], overwrite: bool) -> None:
    if path is not None and Path(path).exists() and not overwrite:
        raise ToolError(f"{os.fspath(path)} exists; pass overwrite=True (CLI: --overwrite) to replace it.")
