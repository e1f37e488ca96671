"""Loading a base model from a local folder: a diffusers pipeline folder or a single model folder.

A pipeline folder's `model_index.json` (written by diffusers' `DiffusionPipeline.save_pretrained`, diffusers 0.42
pipelines/pipeline_utils.py) names each component as `[library, class]`, `[null, null]` for a component saved as
None. Only classes of the diffusers and transformers libraries are loaded — `ModelMixin` and `PreTrainedModel`
subclasses found by name in those packages — so a folder can never make the tools import or run its own code
(custom pipelines name their module as the library; they are refused). Folders without `model_index.json` (a few
model subfolders side by side) are read by each subfolder's `config.json`: `_class_name` for diffusers,
`architectures` for transformers.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Optional, Sequence

from torch import nn


# The components a tool looks for in a pipeline folder when the shift file does not say which (`svdiff extract`):
# the denoisers and text encoders that diffusers' LoRA loaders name (`_lora_loadable_modules`, diffusers 0.42
# loaders/lora_pipeline.py), never the VAE.
PIPELINE_COMPONENTS = ("unet", "transformer", "transformer_2", "text_encoder", "text_encoder_2", "text_encoder_3")
MODEL_INDEX = "model_index.json"
MODEL_LIBRARIES = ("diffusers", "transformers")


class BaseFolderError(ValueError):
    """A base-model folder cannot be loaded (unknown or disallowed class, missing component); says why."""


class BaseModels(dict):
    """`{component: model}`, plus the diffusers pipeline class the folder's `model_index.json` names
    (`pipeline_class`, None when unknown: a single model, a dict given in Python, a custom pipeline)."""

    pipeline_class: Optional[type] = None


def model_class(library: Optional[str], class_name: Optional[str], where: str) -> type:
    """The diffusers `ModelMixin` / transformers `PreTrainedModel` subclass `library.class_name`; refuses any other
    library or class (`where` names the file that asked for it)."""
    if library not in MODEL_LIBRARIES or not isinstance(class_name, str):
        raise BaseFolderError(
            f"{where} names the class {library}.{class_name}: the tools load only model classes of diffusers and "
            "transformers (never code from the model folder). Load the model yourself and pass it in Python as a "
            "{component: model} dict."
        )
    package = importlib.import_module(library)
    if library == "diffusers":
        from diffusers import ModelMixin as required
    else:
        from transformers import PreTrainedModel as required
    cls = getattr(package, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, required)):
        raise BaseFolderError(f"{where} names {library}.{class_name}, which is not a {required.__name__} class of "
                              f"{library} {package.__version__}.")
    return cls


def load_model_folder(folder: Path, cls: Optional[type] = None) -> nn.Module:
    """One model from its folder, in eval mode; the class from `config.json` unless given."""
    if cls is None:
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        if "_class_name" in config:
            cls = model_class("diffusers", config["_class_name"], str(config_path))
        else:
            architectures = config.get("architectures") or [None]
            cls = model_class("transformers", architectures[0], str(config_path))
    return cls.from_pretrained(folder).eval()


def read_model_index(folder: Path) -> tuple[Optional[type], dict[str, tuple]]:
    """(pipeline class or None, component → (library, class name)) of the model components a pipeline folder's
    `model_index.json` lists; components saved as None are left out."""
    path = folder / MODEL_INDEX
    index = json.loads(path.read_text())
    if not isinstance(index, dict):
        raise BaseFolderError(f"{path} should hold a JSON object.")
    components = {name: tuple(entry) for name, entry in index.items()
                  if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2 and entry[0] is not None}
    return _pipeline_class(index.get("_class_name")), components


def _pipeline_class(name) -> Optional[type]:
    """diffusers' pipeline class of that name (its LoRA loader tells which components LoRA files may hold)."""
    if not isinstance(name, str):
        return None
    import diffusers

    cls = getattr(diffusers, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline) else None


def load_pipeline_folder(folder: Path, components: Optional[Sequence[str]]) -> BaseModels:
    """The models `components` (default: the `PIPELINE_COMPONENTS` present) of a pipeline folder.

    Raises `BaseFolderError` when a wanted component is missing, is not a model, or names a class outside
    diffusers / transformers.
    """
    models = BaseModels()
    wanted = list(components) if components else None
    if (folder / MODEL_INDEX).is_file():
        pipeline_class, index = read_model_index(folder)
        models.pipeline_class = pipeline_class
        for name in wanted or [c for c in PIPELINE_COMPONENTS if c in index]:
            if name not in index:
                continue
            library, class_name = index[name]
            models[name] = load_model_folder(folder / name, model_class(library, class_name,
                                                                         f"{folder / MODEL_INDEX} ({name})"))
    else:
        for name in wanted or PIPELINE_COMPONENTS:
            if name and (folder / name / "config.json").is_file():
                models[name] = load_model_folder(folder / name)
    missing = [c for c in (wanted or []) if c not in models]
    if missing or not models:
        raise BaseFolderError(f"Base model folder {folder} has no model for component(s) "
                              f"{missing or list(wanted or PIPELINE_COMPONENTS)}.")
    return models


__all__ = ["BaseFolderError", "BaseModels", "PIPELINE_COMPONENTS", "load_model_folder", "load_pipeline_folder",
           "model_class", "read_model_index"]
