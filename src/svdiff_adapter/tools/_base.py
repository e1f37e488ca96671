"""What every tool needs: reading shift files, loading a local base model, the base weights' σ and factors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .. import spectral
from ..format import SpectralShiftFile, base_fingerprint, check_fingerprints, qualified_name
from ..loaders.hub import read_shift_files, resolve_shift_files
from ..svd import SpectralFactors, compute_factors
from ..tuner.targets import ShiftDoesNotFitError, fit_shifts
from .base_folder import (
    MODEL_INDEX, BaseFolderError, BaseModels, load_model_folder, load_pipeline_folder, read_model_index,
)


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
def load_base(base: BaseSource, components: Optional[list[str]] = None) -> BaseModels:
    """The base model as `{component: model}` (a `BaseModels` dict; `pipeline_class` is the diffusers pipeline a
    folder's `model_index.json` names).

    Args:
        base: a model, a `{component: model}` dict, a local pipeline folder (its `model_index.json` says which
            components exist and their classes: `unet`, `transformer`, `transformer_2`, `text_encoder`, ...; a folder
            of model subfolders without one works too) or a local single-model folder (`config.json` + weights).
            Only diffusers and transformers model classes are loaded (`base_folder`).
        components: the components needed (the shift file's). Only those subfolders are loaded; without it, the
            denoisers and text encoders present (`base_folder.PIPELINE_COMPONENTS`). A single model is given the
            name of the file's only component.
    """
    if isinstance(base, BaseModels):
        return base
    if isinstance(base, Mapping):
        return BaseModels(base)
    if isinstance(base, nn.Module):
        return BaseModels({_single_component(components): base})
    folder = Path(os.path.expanduser(os.fspath(base)))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Base model {os.fspath(base)!r} is not a local folder. Give a pipeline folder (with model_index.json, "
            "or unet/, transformer/, text_encoder/ ...) or a model folder; download Hub models first "
            "(`hf download REPO --local-dir DIR`)."
        )
    try:
        if (folder / "config.json").is_file() and not (folder / MODEL_INDEX).is_file():
            return BaseModels({_single_component(components): load_model_folder(folder)})
        return load_pipeline_folder(folder, [c for c in components or [] if c] or None)
    except BaseFolderError as error:
        raise ToolError(str(error)) from error


def base_pipeline_class(base: BaseSource) -> Optional[type]:
    """The diffusers pipeline class of a base, without loading it: a `BaseModels`' own, the one a local folder's
    `model_index.json` names, or None."""
    if isinstance(base, BaseModels):
        return base.pipeline_class
    if isinstance(base, (str, os.PathLike)):
        folder = Path(os.path.expanduser(os.fspath(base)))
        if (folder / MODEL_INDEX).is_file():
            try:
                return read_model_index(folder)[0]
            except (BaseFolderError, ValueError) as error:
                raise ToolError(f"Cannot read {folder / MODEL_INDEX}: {error}") from error
    return None


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


# Embedding modules by their last path segment: names with "embed" (CLIP's `token_embedding`, `embed_tokens`) and
# these, T5's and GPT-2's. DiT input projections called `*_embedder` (Flux's `x_embedder`, `context_embedder`) are
# linear layers.
_EMBEDDING_NAMES = ("shared", "relative_attention_bias", "wte", "wpe")
# Patch embeddings whose `proj` is a convolution (SD3's and Sana's `pos_embed.proj` / `patch_embed.proj`).
_PATCH_EMBEDDINGS = ("pos_embed", "patch_embed")


def guess_kind(name: str, delta: torch.Tensor, norm_mode: str = "elementwise") -> str:
    """A module's kind guessed from its path alone (when no base model is given), by UNet, DiT, CLIP and T5 naming
    conventions.

    Norms and embeddings are recognised; 1×1-conv projections not named "conv" (SD1's `proj_in`/`proj_out`) count as
    linear. Give the base model for exact kinds.
    """
    parts = name.split(".")
    last = parts[-1]
    if "norm" in last or (norm_mode == "scalar" and delta.numel() == 1):
        return "norm"
    if last.endswith("_embedder"):
        return "linear"
    if last in _EMBEDDING_NAMES or "embed" in last:
        return "embedding"
    if "conv" in last or (last == "proj" and len(parts) > 1 and parts[-2] in _PATCH_EMBEDDINGS):
        return "conv2d"
    return "linear"


def block_of(name: str) -> str:
    """The block a module belongs to, for per-block reports: the path up to its first layer index.

    UNets: `down_blocks.0`, `mid_block`, `up_blocks.1`, `conv_in`; DiTs: `transformer_blocks.3`,
    `single_transformer_blocks.7` (Flux), `blocks.0` (Wan), `x_embedder`, `time_text_embed`; text encoders:
    `encoder.layers.3` (CLIP, with or without `text_model.`), `encoder.block.5` (T5), `embeddings`.
    """
    parts = name.split(".")
    if parts[0] == "text_model" and len(parts) > 1:  # CLIPTextModelWithProjection: the same blocks as CLIPTextModel
        parts = parts[1:]
    if parts[0].endswith("_block"):  # mid_block.attentions.0 → mid_block
        return parts[0]
    index = next((i for i, part in enumerate(parts) if i > 0 and part.isdigit()), None)
    return ".".join(parts[: index + 1]) if index is not None else parts[0]


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
