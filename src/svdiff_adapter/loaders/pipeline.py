"""Spectral shifts on diffusers pipelines: `SpectralShiftLoaderMixin`, drop-in pipeline classes, `patch_diffusers()`.

Thin: loading, saving and unloading delegate to `svdiff_adapter.loaders.model` (one model at a time) and files move
through `svdiff_adapter.loaders.hub`; the math stays in `svdiff_adapter.tuner.layer`. What is here besides
delegation is where diffusers' own pipeline methods assume LoRA layers (integration-facts.md): per-block weight
dicts, `set_lora_device`, `load_lora_weights(adapter_name=None)`, `unload_lora_weights` removing every tuner, and
the active set after loading one kind of adapter next to the other.

Three ways to get the methods:

    from svdiff_adapter import StableDiffusionPipeline        # drop-in subclasses
    class MyPipeline(SpectralShiftLoaderMixin, SomePipeline)   # the mixin, first among the bases
    svdiff_adapter.patch_diffusers()                           # diffusers' own classes (and existing instances)
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Union

import diffusers
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..format import (
    COMPONENTS,
    DEFAULT_WEIGHT_NAME,
    DELTA_SUFFIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    SpectralShiftFile,
    SpectralShiftFormatError,
    fingerprints_match,
    parse_state_dict,
    save_shift_file,
)
from ..tuner import SpectralShiftLayer, offload_spectral_layers, spectral_layers
from .hub import read_shift_files, resolve_shift_files, upload_shift_folder
from .model import (
    enable_spectral_switch_cache,
    layer_fingerprint,
    load_spectral_shift as load_shift_into_models,
    module_path,
    set_spectral_build_dtype,
    spectral_adapter_names,
    to_shift_file,
    unload_spectral_shift as unload_shift_from_model,
)
from .model_card import spectral_shift_model_card


logger = diffusers.utils.logging.get_logger(__name__)

PIPELINE_CLASS_NAMES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
)
_BLOCK_SIDES = {"down_blocks": "down", "up_blocks": "up"}

Weight = Union[float, int, None, dict]


def _as_list(names: Union[str, Iterable[str], None]) -> Optional[list[str]]:
    return None if names is None else [names] if isinstance(names, str) else list(names)


# ------------------------------------------------------------------------------------------ per-block weights
def _check_block_weights(spec: Mapping, unet: nn.Module) -> None:
    """Validate `{"down": ..., "mid": ..., "up": ...}` against the UNet's blocks (raise before anything changes)."""
    unknown = set(spec) - {"down", "mid", "up"}
    if unknown:
        raise ValueError(f"Per-block UNet weights take the keys 'down', 'mid' and 'up'; got {sorted(unknown)}.")
    mid = spec.get("mid", 1.0)
    if isinstance(mid, list) and len(mid) != 1 or isinstance(mid, dict):
        raise ValueError(f"The 'mid' weight should be a number, got {mid!r}.")
    for side in ("down", "up"):
        value = spec.get(side, 1.0)
        if not isinstance(value, dict):
            _check_number(value, side)
            continue
        blocks = getattr(unet, f"{side}_blocks")
        for key, block_value in value.items():
            index = key.removeprefix("block_")
            if not key.startswith("block_") or not index.isdigit() or int(index) >= len(blocks):
                raise ValueError(
                    f"Unknown UNet block {side}.{key}; this UNet has block_0 .. block_{len(blocks) - 1} on the "
                    f"{side!r} side."
                )
            if isinstance(block_value, list):
                layers = len(blocks[int(index)].resnets)
                if len(block_value) not in (1, layers):
                    raise ValueError(
                        f"{side}.{key} has {layers} layer(s) but {len(block_value)} weights were given."
                    )
                for item in block_value:
                    _check_number(item, f"{side}.{key}")
            else:
                _check_number(block_value, f"{side}.{key}")


def _check_number(value, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"The weight for {where} should be a number, got {value!r}.")


def _block_weight(spec: Mapping, path: str, default: float = 1.0) -> float:
    """The weight a per-block dict gives one UNet module.

    `mid` covers `mid_block.*`; `down`/`up` cover every module of `down_blocks.*`/`up_blocks.*` (attentions,
    resnets, samplers); `{"block_i": w}` one block; `{"block_i": [w0, w1, ...]}` layer j of the block
    (`attentions.j` and `resnets.j`). Anything not named (conv_in, time embedding, conv_out, ...) gets `default`.
    """
    parts = path.split(".")
    if parts[0] == "mid_block":
        value = spec.get("mid", default)
        return float(value[0] if isinstance(value, list) else value)
    side = _BLOCK_SIDES.get(parts[0])
    if side is None or len(parts) < 2:
        return default
    value = spec.get(side, default)
    if isinstance(value, dict):
        value = value.get(f"block_{parts[1]}", default)
    if isinstance(value, list):
        if len(value) == 1:
            return float(value[0])
        if len(parts) > 3 and parts[2] in ("attentions", "resnets"):
            return float(value[int(parts[3])])
        return default
    return float(default if value is None else value)


# ------------------------------------------------------------------------------------------------- offloading
@contextlib.contextmanager
def _offloading_suspended(pipe):
    """Remove accelerate's CPU-offload hooks while adapters are added or removed, then enable them again.

    Sequential offload keeps weights on the meta device, where neither an SVD nor a module swap can work; diffusers'
    own loaders do the same (`_func_optionally_disable_offloading`, private, hence the guard).
    """
    try:
        from diffusers.loaders.lora_base import _func_optionally_disable_offloading
    except ImportError:  # pragma: no cover - a diffusers without the helper
        yield
        return
    model_offload, sequential_offload, _ = _func_optionally_disable_offloading(pipe)
    try:
        yield
    finally:
        # Back on the device the hooks served (as diffusers' `maybe_free_model_hooks` does); without `device=` diffusers
        # picks the default accelerator, which differs from the user's choice or is missing.
        device = getattr(pipe, "_offload_device", None)
        if model_offload:
            pipe.enable_model_cpu_offload(device=device)
        elif sequential_offload:
            pipe.enable_sequential_cpu_offload(device=device)


def _move_adapter(layer: BaseTunerLayer, adapter_name: str, device) -> None:
    """Move one adapter's tensors of any PEFT tuner layer (through its declared per-adapter containers)."""
    for attribute in (*layer.adapter_layer_names, *layer.other_param_names):
        container = getattr(layer, attribute, None)
        if not isinstance(container, (Mapping, nn.ModuleDict, nn.ParameterDict)) or adapter_name not in container:
            continue
        value = container[adapter_name]
        if isinstance(value, nn.Module):
            value.to(device)
        elif isinstance(value, nn.Parameter):
            container[adapter_name] = nn.Parameter(value.detach().to(device), requires_grad=value.requires_grad)
        elif isinstance(value, torch.Tensor):
            container[adapter_name] = value.to(device)


class SpectralShiftLoaderMixin:
    """Pipeline methods for SVDiff spectral shifts, next to diffusers' LoRA methods.

    Components: `unet`, `text_encoder`, `text_encoder_2` (those the pipeline has). Put the mixin FIRST among the bases
    (`class P(SpectralShiftLoaderMixin, StableDiffusionPipeline)`): it overrides the diffusers methods that assume
    LoRA layers. Methods never call `super()`, so `patch_diffusers()` can copy them into diffusers' classes.

    Activation rule: a newly loaded adapter replaces the active adapters of its own kind and joins the active
    adapters of the other kind. So `load_spectral_shift` after `load_lora_weights` applies both; two spectral shifts
    (like two LoRAs in diffusers) leave only the last one active until `set_adapters([...])`.
    """

    spectral_shift_components = COMPONENTS

    # -------------------------------------------------------------------------------------------- helpers
    def _spectral_components(self) -> dict[str, nn.Module]:
        return {
            name: model for name in self.spectral_shift_components
            if isinstance(model := getattr(self, name, None), nn.Module)
        }

    def _adapter_components(self) -> dict[str, nn.Module]:
        """Every component that may hold tuner layers (diffusers' LoRA components and ours)."""
        names = list(getattr(self, "_lora_loadable_modules", ())) + list(self.spectral_shift_components)
        return {
            name: model for name in dict.fromkeys(names) if isinstance(model := getattr(self, name, None), nn.Module)
        }

    def _spectral_names(self) -> list[str]:
        names: dict[str, None] = {}
        for model in self._spectral_components().values():
            names.update(dict.fromkeys(spectral_adapter_names(model)))
        return list(names)

    def _all_adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for model in self._adapter_components().values():
            names.update(dict.fromkeys(getattr(model, "peft_config", None) or {}))
        return list(names)

    def _unique_adapter_name(self, prefix: str = "default") -> str:
        taken, index = set(self._all_adapter_names()), 0
        while f"{prefix}_{index}" in taken:
            index += 1
        return f"{prefix}_{index}"

    def _tuner_layers(self) -> Iterable[tuple[str, str, BaseTunerLayer]]:
        for component, model in self._adapter_components().items():
            for name, module in model.named_modules():
                if isinstance(module, BaseTunerLayer):
                    yield component, name, module

    def _activate(self, adapter_names: list[str]) -> None:
        """The same active set on every tuner layer of every component (weights unchanged)."""
        for _, _, layer in self._tuner_layers():
            layer.set_adapter(list(adapter_names))

    def _single_spectral_name(self, adapter_name: Optional[str]) -> str:
        names = self._spectral_names()
        if adapter_name is not None:
            if adapter_name not in names:
                raise ValueError(f"No spectral shift named {adapter_name!r} is loaded; loaded: {names}.")
            return adapter_name
        if len(names) != 1:
            raise ValueError(
                f"Pass `adapter_name`: {'no spectral shift is loaded' if not names else f'loaded are {names}'}."
            )
        return names[0]

    def _base_model_id(self) -> Optional[str]:
        name = getattr(self, "name_or_path", None)
        return name if isinstance(name, str) and name else None

    def _to_shift_file(self, adapter_name: str, base_model: Optional[str] = None) -> SpectralShiftFile:
        components = {c: m for c, m in self._spectral_components().items() if adapter_name in spectral_adapter_names(m)}
        return to_shift_file(components, adapter_name, base_model=base_model or self._base_model_id())

    def _diffusers_method(self, name: str) -> Callable:
        """diffusers' implementation of a method this mixin overrides (what `super()` would give)."""
        own = SpectralShiftLoaderMixin.__dict__[name]
        for klass in type(self).__mro__:
            attribute = klass.__dict__.get(name)
            if attribute is not None and attribute is not own:
                return attribute.__get__(self, type(self))
        raise AttributeError(f"{type(self).__name__} has no diffusers method {name!r}.")

    # ------------------------------------------------------------------------------------------- loading
    @staticmethod
    def spectral_shift_state_dict(
        pretrained_model_name_or_path_or_dict,
        *,
        weight_name: Optional[str] = None,
        subfolder: Optional[str] = None,
        revision: Optional[str] = None,
        cache_dir: Union[str, os.PathLike, None] = None,
        force_download: bool = False,
        local_files_only: Optional[bool] = None,
        token: Union[str, bool, None] = None,
    ) -> SpectralShiftFile:
        """Read spectral shifts without loading them (the counterpart of diffusers' `lora_state_dict`).

        Args:
            pretrained_model_name_or_path_or_dict (`str`, `os.PathLike`, `dict` or `SpectralShiftFile`):
                A Hub repo id, a local folder, a file, a state dict (`{"unet.<module>.spectral_delta": δ}` or
                svdiff-pytorch's `{"<module>.delta": δ}`) or a `SpectralShiftFile`.
            weight_name (`str`, *optional*):
                The file in a folder or repo. Default: `spectral_shift_weights.safetensors`, else svdiff-pytorch's
                `spectral_shifts.safetensors` + `spectral_shifts_te.safetensors`.
            subfolder, revision, cache_dir, force_download, local_files_only, token:
                As in `huggingface_hub.hf_hub_download`; `HF_HUB_OFFLINE=1` is honoured.

        Returns:
            `SpectralShiftFile`: `.deltas[component][module]` → δ, plus `.configs`, `.fingerprints`, `.base_model`.
        """
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, SpectralShiftFile):
            return source
        if isinstance(source, Mapping):
            return _parse_state_dict(source)
        paths = resolve_shift_files(
            source, weight_name=weight_name, subfolder=subfolder, revision=revision, cache_dir=cache_dir,
            force_download=force_download, local_files_only=local_files_only, token=token,
        )
        return read_shift_files(paths)

    def load_spectral_shift(
        self,
        pretrained_model_name_or_path_or_dict,
        adapter_name: Optional[str] = None,
        *,
        weight_name: Optional[str] = None,
        subfolder: Optional[str] = None,
        revision: Optional[str] = None,
        cache_dir: Union[str, os.PathLike, None] = None,
        force_download: bool = False,
        local_files_only: Optional[bool] = None,
        token: Union[str, bool, None] = None,
        hotswap: bool = False,
        low_cpu_mem_usage: bool = False,
        svd_cache=None,
        progress: Optional[bool] = None,
    ) -> str:
        """Load spectral shifts into the UNet and text encoder(s) as one adapter; returns its name.

        Args:
            pretrained_model_name_or_path_or_dict: see `spectral_shift_state_dict` (repo id, folder, file, dict).
            adapter_name (`str`, *optional*):
                Defaults to a fresh `default_<n>` that no adapter (spectral or LoRA) of the pipeline uses.
            hotswap (`bool`, defaults to `False`):
                Replace the shifts of the existing adapter `adapter_name` in place: same modules, same shapes, no new
                layers and no new tensors, so a `torch.compile`d model is not recompiled. Modules the new file does
                not shift get δ = 0. The adapter keeps its weight and its place in the active set.
            low_cpu_mem_usage (`bool`): accepted for parity with `load_lora_weights`; shifts are tiny and the SVD
                factors are computed in place, so there is nothing to save.
            svd_cache, progress: SVD cache (`None` the default disk cache, `False` none, or a folder) and progress
                bar, see `svdiff_adapter.svd_options`.
            The other arguments: as in `spectral_shift_state_dict`.

        All or nothing: on any error (wrong base model, missing file, LoRA file, name in use, ...) the pipeline is
        left unchanged. The new adapter becomes active with weight 1 (see the class docstring for the rule).
        """
        shift_file = self.spectral_shift_state_dict(
            pretrained_model_name_or_path_or_dict, weight_name=weight_name, subfolder=subfolder, revision=revision,
            cache_dir=cache_dir, force_download=force_download, local_files_only=local_files_only, token=token,
        )
        if hotswap:
            if adapter_name is None:
                raise ValueError("`hotswap=True` needs the `adapter_name` of the loaded spectral shift to replace.")
            self._hotswap_spectral_shift(shift_file, adapter_name)
            return adapter_name
        if adapter_name is None:
            adapter_name = self._unique_adapter_name()
        elif adapter_name in self._all_adapter_names():
            raise ValueError(
                f"Adapter name {adapter_name!r} is already in use; choose another name, unload it first, or pass "
                "`hotswap=True` to replace its shifts in place."
            )
        spectral_before = set(self._spectral_names())
        active = [n for n in self.get_active_adapters() if n not in spectral_before]
        models = self._spectral_components()
        with _offloading_suspended(self):
            load_shift_into_models(models, shift_file, adapter_name, svd_cache=svd_cache, progress=progress)
        self._activate(active + [adapter_name])
        return adapter_name

    def _hotswap_spectral_shift(self, shift_file: SpectralShiftFile, adapter_name: str) -> None:
        holders = {c: m for c, m in self._spectral_components().items() if adapter_name in spectral_adapter_names(m)}
        if not holders:
            raise ValueError(
                f"Cannot hotswap into {adapter_name!r}: no spectral shift of that name is loaded "
                f"(loaded: {self._spectral_names()}). Load it first without `hotswap`."
            )
        extra = [c for c in shift_file.components if c not in holders]
        if extra:
            raise ValueError(
                f"Cannot hotswap: the new file shifts component(s) {extra}, which adapter {adapter_name!r} does not."
            )
        plan, problems, wrong_base = [], [], []
        for component, model in holders.items():
            config = model.peft_config[adapter_name]
            new_mode = shift_file.configs.get(component, {}).get("norm_mode", config.norm_mode)
            if new_mode != config.norm_mode:
                problems.append(f"{component}: norm_mode {new_mode!r} instead of {config.norm_mode!r}")
            layers = {
                module_path(name): layer for name, layer in spectral_layers(model)
                if adapter_name in layer.spectral_delta
            }
            deltas = shift_file.deltas.get(component, {})
            fingerprints = shift_file.fingerprints.get(component, {})
            problems += [f"{component}.{m}: not shifted by {adapter_name!r}" for m in deltas if m not in layers]
            for module, layer in layers.items():
                if adapter_name in layer.merged_adapters:
                    problems.append(f"{component}.{module}: fused (call `unfuse_spectral_shift()` first)")
                parameter = layer.spectral_delta[adapter_name]
                value = deltas.get(module)
                if value is None:
                    value = torch.zeros_like(parameter)
                elif value.shape != parameter.shape:
                    problems.append(f"{component}.{module}: shape {tuple(value.shape)}, needs {tuple(parameter.shape)}")
                    continue
                if module in fingerprints and not fingerprints_match(list(fingerprints[module]),
                                                                     layer_fingerprint(layer)):
                    wrong_base.append(f"{component}.{module}")
                plan.append((parameter, value))
        if problems:
            raise ValueError(
                f"Cannot hotswap into {adapter_name!r} ({len(problems)} problem(s)): " + "; ".join(problems[:6])
                + (" ..." if len(problems) > 6 else "") + ". Hotswap needs the same modules and shapes."
            )
        if wrong_base:
            raise SpectralShiftFormatError(
                f"Wrong base model: the weights of {len(wrong_base)} shifted module(s) differ from the ones the shift "
                f"was trained on (singular-value fingerprint mismatch), e.g. {wrong_base[:5]}."
            )
        with torch.no_grad():  # in place: same tensors, so compiled graphs and optimizers keep pointing at them
            for parameter, value in plan:
                parameter.copy_(value.to(device=parameter.device, dtype=parameter.dtype))

    # ------------------------------------------------------------------------------------ saving, pushing
    def save_spectral_shift(
        self,
        save_directory: Union[str, os.PathLike],
        adapter_name: Optional[str] = None,
        *,
        weight_name: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> Path:
        """Save one spectral adapter (all components that hold it) as a format-v1 file; returns its path.

        Args:
            save_directory: folder to write into (created if needed).
            adapter_name (`str`, *optional*): required when more than one spectral shift is loaded.
            weight_name (`str`, *optional*, defaults to `"spectral_shift_weights.safetensors"`).
            dtype (`torch.dtype`, *optional*): `torch.float16` halves the file (relative error ≤ 4.9e-4 per value).
        """
        name = self._single_spectral_name(adapter_name)
        path = Path(save_directory) / (weight_name or DEFAULT_WEIGHT_NAME)
        return save_shift_file(self._to_shift_file(name), path, dtype=dtype)

    def push_spectral_shift_to_hub(
        self,
        repo_id: str,
        adapter_name: Optional[str] = None,
        *,
        private: Optional[bool] = None,
        token: Union[str, bool, None] = None,
        commit_message: Optional[str] = None,
        instance_prompt: Optional[str] = None,
        base_model: Optional[str] = None,
        images=None,
    ):
        """Push one spectral adapter to a Hub model repo with a model card; returns the upload's `CommitInfo`.

        Creates the repo if needed (`private` applies then), uploads `spectral_shift_weights.safetensors`,
        `README.md` (YAML: `base_model`, `library_name`, tags, `instance_prompt`, a widget gallery of `images`) and
        the images (`PIL.Image`s or file paths) under `images/`. `base_model` defaults to the pipeline's
        `name_or_path`.
        """
        name = self._single_spectral_name(adapter_name)
        base_model = base_model or self._base_model_id()
        shift_file = self._to_shift_file(name, base_model)
        with tempfile.TemporaryDirectory(prefix="svdiff-push-") as folder:
            save_shift_file(shift_file, Path(folder) / DEFAULT_WEIGHT_NAME)
            image_paths = []
            for index, image in enumerate(images or []):
                relative = f"images/image_{index}.png"
                (Path(folder) / "images").mkdir(exist_ok=True)
                if isinstance(image, (str, os.PathLike)):
                    from PIL import Image

                    image = Image.open(image)
                image.save(Path(folder) / relative)
                image_paths.append(relative)
            card = spectral_shift_model_card(
                repo_id, base_model=base_model, instance_prompt=instance_prompt, image_paths=image_paths,
                adapter_name=name, components=shift_file.components, num_parameters=shift_file.num_parameters,
                pipeline_class=_drop_in_name(type(self)),
            )
            (Path(folder) / "README.md").write_text(card, encoding="utf-8")
            return upload_shift_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)

    # ---------------------------------------------------------------------------------- fuse / unload / device
    def _models_for(self, components: Optional[list[str]]) -> dict[str, nn.Module]:
        available = self._spectral_components()
        if components is None:
            return available
        unknown = [c for c in components if c not in available]
        if unknown:
            raise ValueError(f"Unknown component(s) {unknown}; this pipeline has {list(available)}.")
        return {c: available[c] for c in components}

    def fuse_spectral_shift(
        self, adapter_names: Union[str, list[str], None] = None, components: Optional[list[str]] = None
    ) -> None:
        """Write W_δ of the given (default: the active) spectral shifts into the weights of `components` (default:
        all). Inference then costs exactly the base model; `unfuse_spectral_shift()` restores the weights bit for
        bit. Shifts fused later join the fused ones inside the same ReLU. A LoRA on the same modules is not fused.
        """
        adapter_names = _as_list(adapter_names)
        loaded = self._spectral_names()
        if not loaded:
            raise ValueError("Nothing to fuse: no spectral shift is loaded.")
        unknown = [n for n in adapter_names or [] if n not in loaded]
        if unknown:
            raise ValueError(f"Unknown spectral shift(s) {unknown}; loaded: {loaded}.")
        models = self._models_for(components)
        if adapter_names is None and not set(self.get_active_adapters()) & set(loaded):
            raise ValueError(f"Nothing to fuse: no spectral shift is active (loaded: {loaded}); pass `adapter_names`.")
        for model in models.values():
            for _, layer in spectral_layers(model):
                layer.merge(adapter_names=adapter_names)
        self._sync_merged_names()

    def unfuse_spectral_shift(self, components: Optional[list[str]] = None) -> None:
        """Undo `fuse_spectral_shift` (bit-exact); a LoRA fused meanwhile stays fused."""
        for model in self._models_for(components).values():
            for _, layer in spectral_layers(model):
                layer.unmerge()
        self._sync_merged_names()

    def _sync_merged_names(self) -> None:
        # diffusers' `fused_loras` / `num_fused_loras` read `_merged_adapters` (a private set); keep it truthful.
        merged = {n for _, _, layer in self._tuner_layers() for n in layer.merged_adapters}
        self._merged_adapters = merged

    def unload_spectral_shift(self, adapter_names: Union[str, list[str], None] = None) -> None:
        """Remove spectral shifts (default: all) from every component; modules and weights come back bit for bit
        (fused ones are unfused first). LoRA adapters stay loaded, active and weighted as they were.
        """
        adapter_names = _as_list(adapter_names)
        loaded = self._spectral_names()
        unknown = [n for n in adapter_names or [] if n not in loaded]
        if unknown:
            raise ValueError(f"Unknown spectral shift(s) {unknown}; loaded: {loaded}.")
        removed = set(loaded if adapter_names is None else adapter_names)
        active = [n for n in self.get_active_adapters() if n not in removed]
        with _offloading_suspended(self):
            for model in self._spectral_components().values():
                names = [n for n in spectral_adapter_names(model) if n in removed]
                if names:
                    unload_shift_from_model(model, names)
        self._activate(active)
        self._sync_merged_names()

    def set_spectral_shift_device(self, adapter_names: Union[str, list[str]], device) -> None:
        """Move the shifts δ of the given spectral adapters to `device`.

        A layer none of whose adapters stays with its base weight also moves its SVD factors (the memory that
        matters: U and Vᵀ are as large as the weight in float16), and they come back when an adapter does. As with
        `set_lora_device`, an adapter must be back on the model's device before it is used.
        """
        adapter_names = _as_list(adapter_names)
        loaded = self._spectral_names()
        unknown = [n for n in adapter_names if n not in loaded]
        if unknown:
            raise ValueError(f"Unknown spectral shift(s) {unknown}; loaded: {loaded}.")
        device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        for model in self._spectral_components().values():
            for _, layer in spectral_layers(model):
                names = [n for n in adapter_names if n in layer.spectral_delta]
                if not names:
                    continue
                for name in names:
                    _move_adapter(layer, name, device)
                home = layer.base_layer.weight.device
                at_home = [d.device == home for d in layer.spectral_delta.values()]
                target = home if any(at_home) else device
                if layer.spectral_S is not None and layer.spectral_S.device != target:
                    layer.spectral_U = layer.spectral_U.to(target)
                    layer.spectral_S = layer.spectral_S.to(target)
                    layer.spectral_Vh = layer.spectral_Vh.to(target)
                layer.reset_spectral_cache()
                for name in names:
                    layer._spectral_adapter_deltas.pop(name, None)  # rebuilt where the factors are, when used

    def set_spectral_shift_build_dtype(self, dtype: torch.dtype = torch.float32,
                                       components: Optional[list[str]] = None) -> None:
        """Build effective (and fused) weights with products in `dtype` (`torch.bfloat16`: about 2× faster on CPUs
        with bfloat16 instructions, ΔW rounded to ~2⁻⁸ relative, W exact). See `set_spectral_build_dtype`."""
        for model in self._models_for(components).values():
            set_spectral_build_dtype(model, dtype)

    def enable_spectral_switch_cache(self, components: Optional[list[str]] = None) -> None:
        """Make `set_adapters` (new weights or a new active set) cheap for spectral shifts, e.g. for interpolation.

        Each shifted layer keeps U·diag(δᵢ)·Vᵀ per adapter and rebuilds W_δ linearly, correcting only the singular
        values the ReLU clips; the result equals the direct rebuild up to float rounding. Memory: one copy of every
        shifted weight per adapter used (in the weight's dtype). `disable_spectral_switch_cache()` frees it.
        """
        for model in self._models_for(components).values():
            enable_spectral_switch_cache(model, True)

    def disable_spectral_switch_cache(self, components: Optional[list[str]] = None) -> None:
        """Free the per-adapter matrices of `enable_spectral_switch_cache`; switches rebuild weights directly again."""
        for model in self._models_for(components).values():
            enable_spectral_switch_cache(model, False)

    # ------------------------------------------------------------------ diffusers methods made type-aware
    def set_adapters(
        self,
        adapter_names: Union[str, list[str]],
        adapter_weights: Union[Weight, list[Weight]] = None,
        *,
        weights: Union[Weight, list[Weight]] = None,
    ) -> None:
        """Activate adapters (spectral shifts and LoRAs alike) with weights; the others become inactive.

        Args:
            adapter_names (`str` or `list[str]`): adapters to activate.
            adapter_weights / weights (*optional*, same meaning; `weights=` is the model-level spelling):
                one value per adapter (or one for all): a number (`None` = 1), a per-component dict
                `{"unet": w, "text_encoder": w}` (missing components: 1), where the UNet's value may be a per-block
                dict `{"down": w, "mid": w, "up": {"block_1": [w0, w1, w2]}}` (see `_block_weight`).

        For spectral shifts wᵢ scales δᵢ inside the ReLU: W_δ = U·diag(ReLU(σ + Σᵢ wᵢδᵢ))·Vᵀ, so
        `weights=[a, 1 - a]` interpolates two shifts and `[1, 1]` adds them. Invalid names, lengths or keys raise
        `ValueError` before anything changes.
        """
        if weights is not None and adapter_weights is not None:
            raise ValueError("Pass the weights once: `adapter_weights=` or `weights=`, not both.")
        weights = adapter_weights if weights is None else weights
        names = _as_list(adapter_names)
        if len(set(names)) != len(names):
            raise ValueError(f"Adapter names repeat: {names}.")
        available = self._all_adapter_names()
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; loaded: {available}.")
        per_adapter = weights if isinstance(weights, list) else [weights] * len(names)
        if len(per_adapter) != len(names):
            raise ValueError(
                f"{len(names)} adapter name(s) {names} but {len(per_adapter)} weight(s) {per_adapter}: give one "
                "weight per adapter, or a single weight for all."
            )
        components = self._adapter_components()
        functions: dict[str, list[Callable[[str], float]]] = {c: [] for c in components}
        for name, weight in zip(names, per_adapter):
            if isinstance(weight, dict):
                stray = [k for k in weight if k not in components]
                if stray:
                    raise ValueError(
                        f"Weight dict for {name!r} has key(s) {stray}; keys are components {list(components)} "
                        "(per-block weights go inside, e.g. {'unet': {'down': 1.0, 'up': 0.5}})."
                    )
            for component, model in components.items():
                value = weight.get(component) if isinstance(weight, dict) else weight
                functions[component].append(_weight_function(value, component, model, name))
        for component, module_name, layer in list(self._tuner_layers()):
            layer.set_adapter(list(names))
            path = module_path(module_name)
            for name, function in zip(names, functions[component]):
                layer.set_scale(name, function(path))

    def get_active_adapters(self) -> list[str]:
        """Active adapters of the pipeline (spectral and LoRA), in activation order."""
        active: dict[str, None] = {}
        for component, _, layer in self._tuner_layers():
            held = getattr(self._adapter_components()[component], "peft_config", {}) or {}
            active.update(dict.fromkeys(n for n in layer.active_adapters if n in held))
        return list(active)

    def delete_adapters(self, adapter_names: Union[str, list[str]]) -> None:
        """Delete adapters of either kind: spectral shifts through `unload_spectral_shift`, LoRAs through diffusers."""
        names = _as_list(adapter_names)
        unknown = [n for n in names if n not in self._all_adapter_names()]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; loaded: {self._all_adapter_names()}.")
        spectral = [n for n in names if n in self._spectral_names()]
        others = [n for n in names if n not in spectral]
        if spectral:
            self.unload_spectral_shift(spectral)
        if others:
            self._diffusers_method("delete_adapters")(others)

    def unload_lora_weights(self) -> None:
        """Remove the LoRA (and other non-spectral) adapters; spectral shifts stay loaded as they are.

        Like diffusers, a fused LoRA is not unfused: its change stays in the weights. Use
        `unload_spectral_shift()` for spectral shifts.
        """
        if not self._spectral_names():
            return self._diffusers_method("unload_lora_weights")()
        spectral = set(self._spectral_names())
        active = [n for n in self.get_active_adapters() if n in spectral]
        for model in self._adapter_components().values():
            for name, module in list(model.named_modules()):
                if isinstance(module, BaseTunerLayer) and not isinstance(module, SpectralShiftLayer):
                    parent_name, _, attribute = name.rpartition(".")
                    parent = model.get_submodule(parent_name) if parent_name else model
                    if isinstance(parent, BaseTunerLayer) and not isinstance(parent, SpectralShiftLayer):
                        continue  # the outermost wrapper of this chain is replaced
                    keep = module
                    while isinstance(keep, BaseTunerLayer) and not isinstance(keep, SpectralShiftLayer):
                        keep = keep.base_layer
                    setattr(parent, attribute, keep)
            config = getattr(model, "peft_config", None)
            if isinstance(config, dict):
                for adapter in [a for a in config if a not in spectral]:
                    del config[adapter]
                if not config:  # as diffusers leaves a model without adapters
                    del model.peft_config
                    if hasattr(model, "_hf_peft_config_loaded"):
                        model._hf_peft_config_loaded = None
        self._activate(active)
        self._sync_merged_names()

    def set_lora_device(self, adapter_names: list[str], device) -> None:
        """`set_lora_device` for any adapter kind (diffusers' version reads `lora_A` on every tuner layer)."""
        names = _as_list(adapter_names)
        spectral = [n for n in names if n in self._spectral_names()]
        if spectral:
            self.set_spectral_shift_device(spectral, device)
        others = [n for n in names if n not in spectral]
        for _, _, layer in self._tuner_layers():
            if not isinstance(layer, SpectralShiftLayer):
                for name in others:
                    _move_adapter(layer, name, device)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: Optional[str] = None,
                          hotswap: bool = False, **kwargs) -> None:
        """diffusers' `load_lora_weights`, plus: `adapter_name=None` picks a free `default_<n>` (diffusers' naming
        reads LoRA-only attributes), names are checked against spectral shifts, and the activation rule of this
        class applies (the new LoRA replaces the active LoRAs and joins the active spectral shifts).
        """
        spectral = set(self._spectral_names())
        if adapter_name is None:
            adapter_name = self._unique_adapter_name()
        elif adapter_name in spectral:
            raise ValueError(f"Adapter name {adapter_name!r} is already used by a spectral shift; choose another.")
        active = [n for n in self.get_active_adapters() if n in spectral]
        self._diffusers_method("load_lora_weights")(
            pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, hotswap=hotswap, **kwargs
        )
        if not hotswap:
            self._activate(active + [adapter_name])

    def enable_sequential_cpu_offload(self, gpu_id: Optional[int] = None, device=None) -> None:
        """diffusers' `enable_sequential_cpu_offload`, with spectral layers hooked by `offload_spectral_layers`: their
        W_δ is built and kept on the CPU and only it (and the bias) goes to the device per call. Loading and unloading
        shifts later keeps the offload on (hooks are taken off and put back, as diffusers' LoRA loaders do)."""
        self._diffusers_method("enable_sequential_cpu_offload")(gpu_id=gpu_id, device=device)
        excluded = set(getattr(self, "_exclude_from_cpu_offload", ()))
        for name, model in self._spectral_components().items():
            if name not in excluded:
                offload_spectral_layers(model, self._offload_device)


def _weight_function(value: Weight, component: str, model: nn.Module, adapter: str) -> Callable[[str], float]:
    """Module path → weight of one adapter in one component (validating the value first)."""
    if isinstance(value, dict):
        if not hasattr(model, "down_blocks"):
            raise ValueError(
                f"Per-block weights (a dict) for {adapter!r} in {component!r}: only a UNet takes them; give a number."
            )
        _check_block_weights(value, model)
        return lambda path: _block_weight(value, path)
    _check_number(value, f"adapter {adapter!r} in {component!r}")
    weight = 1.0 if value is None else float(value)
    return lambda path: weight


def _parse_state_dict(tensors: Mapping) -> SpectralShiftFile:
    """A state dict in memory: format-v1 keys `<component>.<module>.spectral_delta`, svdiff-pytorch keys, or a
    nested `{component: {module: δ}}` dict (no fingerprints: the base model cannot be checked)."""
    if tensors and all(isinstance(v, Mapping) for v in tensors.values()):
        deltas = {c: {m: torch.as_tensor(t, dtype=torch.float32) for m, t in d.items()} for c, d in tensors.items()}
        return SpectralShiftFile(deltas=deltas)
    keys = [k for k in tensors if k.endswith(DELTA_SUFFIX)]
    if keys and len(keys) == len(tensors):
        components = sorted({c for c in COMPONENTS for k in keys if k.startswith(c + ".")}, key=len, reverse=True)
        stray = [k for k in keys if not any(k.startswith(c + ".") for c in components)]
        if stray:
            raise SpectralShiftFormatError(
                f"State dict keys must start with a component ({list(COMPONENTS)}); e.g. {stray[:3]}."
            )
        metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "components": json.dumps(components)}
        return parse_state_dict(tensors, metadata)
    return parse_state_dict(tensors)


def _drop_in_name(cls: type) -> str:
    for klass in cls.__mro__:
        if klass.__name__ in PIPELINE_CLASS_NAMES:
            return klass.__name__
    return "StableDiffusionPipeline"


# ------------------------------------------------------------------------------ drop-ins and patching
class StableDiffusionPipeline(SpectralShiftLoaderMixin, diffusers.StableDiffusionPipeline):
    """diffusers' `StableDiffusionPipeline` with `SpectralShiftLoaderMixin`."""


class StableDiffusionImg2ImgPipeline(SpectralShiftLoaderMixin, diffusers.StableDiffusionImg2ImgPipeline):
    """diffusers' `StableDiffusionImg2ImgPipeline` with `SpectralShiftLoaderMixin`."""


class StableDiffusionInpaintPipeline(SpectralShiftLoaderMixin, diffusers.StableDiffusionInpaintPipeline):
    """diffusers' `StableDiffusionInpaintPipeline` with `SpectralShiftLoaderMixin`."""


class StableDiffusionXLPipeline(SpectralShiftLoaderMixin, diffusers.StableDiffusionXLPipeline):
    """diffusers' `StableDiffusionXLPipeline` with `SpectralShiftLoaderMixin`."""


class StableDiffusionXLImg2ImgPipeline(SpectralShiftLoaderMixin, diffusers.StableDiffusionXLImg2ImgPipeline):
    """diffusers' `StableDiffusionXLImg2ImgPipeline` with `SpectralShiftLoaderMixin`."""


class StableDiffusionXLInpaintPipeline(SpectralShiftLoaderMixin, diffusers.StableDiffusionXLInpaintPipeline):
    """diffusers' `StableDiffusionXLInpaintPipeline` with `SpectralShiftLoaderMixin`."""


_MIXIN_ATTRIBUTES = [
    name for name, value in SpectralShiftLoaderMixin.__dict__.items()
    if not (name.startswith("__") and name.endswith("__"))
]


def patch_diffusers(*extra_classes: type) -> list[type]:
    """Give diffusers' own pipeline classes the mixin's methods (idempotent); returns the classes patched now.

    Patches the Stable Diffusion / SDXL text-to-image, img2img and inpaint pipelines, every already imported subclass
    of diffusers' SD/SDXL LoRA loader mixins, and `extra_classes`. The methods are set on the classes, so pipelines
    built before the call get them too. `isinstance(pipe, SpectralShiftLoaderMixin)` stays False for patched
    diffusers classes; test `hasattr(pipe, "load_spectral_shift")`.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    classes = [getattr(diffusers, name) for name in PIPELINE_CLASS_NAMES] + list(extra_classes)
    pending = [StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin]
    while pending:
        for sub in pending.pop().__subclasses__():
            pending.append(sub)
            if issubclass(sub, diffusers.DiffusionPipeline):
                classes.append(sub)
    patched = []
    for cls in dict.fromkeys(classes):
        if issubclass(cls, SpectralShiftLoaderMixin) or cls.__dict__.get("_svdiff_patched"):
            continue
        for name in _MIXIN_ATTRIBUTES:
            setattr(cls, name, SpectralShiftLoaderMixin.__dict__[name])
        cls._svdiff_patched = True
        patched.append(cls)
    return patched
