"""`SpectralShiftLoaderMixin`: spectral shifts on diffusers pipelines, next to diffusers' LoRA methods.

Thin: loading, saving, hotswapping and unloading delegate to the model-level functions (`loaders.model`,
`loaders.hotswap`) one component at a time, and files move through `loaders.hub`. The methods diffusers has for
LoRAs that must know about both kinds live in `loaders.diffusers_methods`; the drop-in pipeline classes and
`patch_diffusers()` in `loaders.pipelines`.

Three ways to get the methods:

    from svdiff_adapter import StableDiffusionPipeline        # drop-in subclasses
    class MyPipeline(SpectralShiftLoaderMixin, SomePipeline)   # the mixin, first among the bases
    svdiff_adapter.patch_diffusers()                           # diffusers' own classes (and existing instances)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..format import DEFAULT_WEIGHT_NAME, SpectralShiftFile, hub_id_or_none, parse_in_memory, save_shift_file
from ..tuner import spectral_layers
from ..tuner.merge_storage import check_storage
from .diffusers_compat import offloading_suspended
from .diffusers_methods import DiffusersAdapterMethods, _move_adapter, as_list
from .hotswap import hotswap_spectral_shift
from .hub import read_shift_files, resolve_shift_files, upload_shift_folder
from .model import (
    check_adapter_name,
    enable_spectral_switch_cache,
    load_spectral_shift_adapter,
    set_spectral_factor_location,
    set_spectral_shift_build_dtype,
    spectral_adapter_names,
    to_shift_file,
    unload_spectral_shift,
)
from .model_card import spectral_shift_model_card


class SpectralShiftLoaderMixin(DiffusersAdapterMethods):
    """Pipeline methods for SVDiff spectral shifts, next to diffusers' LoRA methods.

    Components: those diffusers' LoRA loader of the pipeline manages (`unet` or `transformer` / `transformer_2`,
    and the text encoders diffusers trains LoRAs on), or `spectral_shift_components`. Put the mixin FIRST among the bases
    (`class P(SpectralShiftLoaderMixin, StableDiffusionPipeline)`): it overrides the diffusers methods that assume
    LoRA layers (see `loaders.diffusers_methods`). Methods never call `super()`, so `patch_diffusers()` can copy them
    into diffusers' classes.

    Activation rule: a newly loaded adapter replaces the active adapters of its own kind and joins the active
    adapters of the other kind. So `load_spectral_shift` after `load_lora_weights` applies both; two spectral shifts
    (like two LoRAs in diffusers) leave only the last one active until `set_adapters([...])`.
    """

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
        return hub_id_or_none(getattr(self, "name_or_path", None))

    def _to_shift_file(self, adapter_name: str, base_model: Optional[str] = None) -> SpectralShiftFile:
        components = {c: m for c, m in self._spectral_components().items() if adapter_name in spectral_adapter_names(m)}
        return to_shift_file(components, adapter_name, base_model=base_model or self._base_model_id())

    def _models_for(self, components: Optional[list[str]]) -> dict[str, nn.Module]:
        available = self._spectral_components()
        if components is None:
            return available
        unknown = [c for c in components if c not in available]
        if unknown:
            raise ValueError(f"Unknown component(s) {unknown}; this pipeline has {list(available)}.")
        return {c: available[c] for c in components}

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def read_spectral_shift(cls, pretrained_model_name_or_path_or_dict, **hub_kwargs) -> SpectralShiftFile:
        """Read spectral shifts without loading them (the counterpart of diffusers' `lora_state_dict`).

        Args:
            pretrained_model_name_or_path_or_dict (`str`, `os.PathLike`, `dict` or `SpectralShiftFile`):
                A Hub repo id, a local folder, a file, a state dict (`{"<component>.<module>.spectral_delta": δ}`
                with a component of this pipeline, e.g. `unet` or `transformer`, or svdiff-pytorch's
                `{"<module>.delta": δ}`) or a `SpectralShiftFile`.
            hub_kwargs: `weight_name` (the file in a folder or repo; default `spectral_shift_weights.safetensors`,
                else svdiff-pytorch's `spectral_shifts.safetensors` + `spectral_shifts_te.safetensors`), and
                `subfolder`, `revision`, `cache_dir`, `force_download`, `local_files_only`, `token` as in
                `huggingface_hub.hf_hub_download` (`HF_HUB_OFFLINE=1` is honoured); see
                `loaders.hub.resolve_shift_files`.

        Returns:
            `SpectralShiftFile`: `.deltas[component][module]` → δ, plus `.configs`, `.fingerprints`, `.base_model`.
        """
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, SpectralShiftFile):
            return source
        if isinstance(source, dict):
            return parse_in_memory(source, components=tuple(cls._spectral_component_names()))
        return read_shift_files(resolve_shift_files(source, **hub_kwargs))

    spectral_shift_state_dict = read_spectral_shift  # the earlier name

    def load_spectral_shift(
        self,
        pretrained_model_name_or_path_or_dict,
        adapter_name: Optional[str] = None,
        *,
        hotswap: bool = False,
        low_cpu_mem_usage: bool = False,
        svd_cache=None,
        progress: Optional[bool] = None,
        factor_dtype: Union[torch.dtype, str, None] = None,
        factor_location: str = "auto",
        **hub_kwargs,
    ) -> str:
        """Load spectral shifts into the denoiser (UNet or transformer(s)) and text encoder(s) as one adapter;
        returns its name.

        Args:
            pretrained_model_name_or_path_or_dict: see `read_spectral_shift` (repo id, folder, file, dict).
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
            factor_dtype (*optional*): storage dtype of new SVD factors, `torch.float16` (default) or
                `torch.float32` (twice the memory; see `SpectralShiftConfig.factor_dtype`).
            factor_location (`str`, defaults to `"auto"`): where new SVD factors are kept between the moments they
                are used: `"device"` (with the weights), `"cpu"`, `"disk"` (memory-mapped from the SVD cache), or
                `"auto"`: with the weights unless on an accelerator they would take over half its free memory,
                then on the CPU. Outputs are the same; docs/performance.md says what each costs.
            hub_kwargs: `weight_name`, `subfolder`, `revision`, `cache_dir`, `force_download`, `local_files_only`,
                `token`, as in `read_spectral_shift`.

        All or nothing: on any error (wrong base model, missing file, LoRA file, name in use, ...) the pipeline is
        left unchanged. The new adapter becomes active with weight 1 (see the class docstring for the rule); shifts
        fused earlier stay fused, and the new one applies on top of them inside the same ReLU.
        """
        if adapter_name is not None:
            check_adapter_name(adapter_name)
        shift_file = self.read_spectral_shift(pretrained_model_name_or_path_or_dict, **hub_kwargs)
        if hotswap:
            if adapter_name is None:
                raise ValueError("`hotswap=True` needs the `adapter_name` of the loaded spectral shift to replace.")
            hotswap_spectral_shift(self._spectral_components(), shift_file, adapter_name)
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
        with offloading_suspended(self):
            load_spectral_shift_adapter(self._spectral_components(), shift_file, adapter_name, svd_cache=svd_cache,
                                        progress=progress, factor_dtype=factor_dtype,
                                        factor_location=factor_location)
        self._activate(active + [adapter_name], holding=adapter_name)
        self._sync_fused_names()
        return adapter_name

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
            dtype (`torch.dtype`, *optional*): `torch.float16` halves the file (relative error ≤ 4.9e-4 per value);
                float32 (default), float16 or bfloat16.
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
        `name_or_path` when that is a Hub id.
        """
        from .pipelines import PIPELINE_CLASS_NAMES, diffusers_pipeline_name

        name = self._single_spectral_name(adapter_name)
        base_model = hub_id_or_none(base_model) or self._base_model_id()
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
                pipeline_class=diffusers_pipeline_name(type(self)), drop_in_classes=PIPELINE_CLASS_NAMES,
            )
            (Path(folder) / "README.md").write_text(card, encoding="utf-8")
            return upload_shift_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)

    # ---------------------------------------------------------------------------------- fuse / unload / device
    def fuse_spectral_shift(
        self, adapter_names: Union[str, list[str], None] = None, components: Optional[list[str]] = None,
        safe_fusing: bool = False, original_storage: Union[str, os.PathLike, None] = None,
    ) -> None:
        """Write W_δ of the given (default: the active) spectral shifts into the weights of `components` (default:
        all). Inference then costs exactly the base model; `unfuse_spectral_shift()` restores the weights bit for
        bit. Shifts fused later join the fused ones inside the same ReLU. A LoRA on the same modules is not fused.

        `safe_fusing=True` (as in diffusers' `fuse_lora`) first checks that every fused weight is finite (a float16
        weight can overflow) and raises with nothing fused. Shifts and adapter weights are finite by construction
        (both are checked where they come in).

        `original_storage` says where each fused layer keeps its original weight for `unfuse_spectral_shift`:
        `None` / `"device"` beside the weight (fastest; a second copy of every shifted weight), `"cpu"` (off the
        accelerator: device memory stays at the base model's), or a folder (raw files, memory-mapped back at unfuse
        and deleted: for CPU inference of models that fill the RAM). Unfuse is bit-exact with each.
        """
        check_storage(original_storage)
        adapter_names = as_list(adapter_names)
        loaded = self._spectral_names()
        if not loaded:
            raise ValueError("Nothing to fuse: no spectral shift is loaded.")
        unknown = [n for n in adapter_names or [] if n not in loaded]
        if unknown:
            raise ValueError(f"Unknown spectral shift(s) {unknown}; loaded: {loaded}.")
        models = self._models_for(components)
        if adapter_names is None and not set(self.get_active_adapters()) & set(loaded):
            raise ValueError(f"Nothing to fuse: no spectral shift is active (loaded: {loaded}); pass `adapter_names`.")
        layers = [layer for model in models.values() for _, layer in spectral_layers(model)]
        if safe_fusing:
            unsafe = [layer for layer in layers if not layer.merge_is_finite(adapter_names)]
            if unsafe:
                raise ValueError(f"NaNs or infs detected in {len(unsafe)} fused weight(s); nothing was fused.")
        for layer in layers:
            layer.merge(adapter_names=adapter_names, original_storage=original_storage)
        self._sync_fused_names()

    def unfuse_spectral_shift(self, components: Optional[list[str]] = None) -> None:
        """Undo `fuse_spectral_shift` (bit-exact); a LoRA fused meanwhile stays fused."""
        for model in self._models_for(components).values():
            for _, layer in spectral_layers(model):
                layer.unmerge()
        self._sync_fused_names()

    def unload_spectral_shift(self, adapter_names: Union[str, list[str], None] = None) -> None:
        """Remove spectral shifts (default: all) from every component; modules and weights come back bit for bit
        (fused ones are unfused first). LoRA adapters stay loaded, active and weighted as they were.
        """
        adapter_names = as_list(adapter_names)
        loaded = self._spectral_names()
        unknown = [n for n in adapter_names or [] if n not in loaded]
        if unknown:
            raise ValueError(f"Unknown spectral shift(s) {unknown}; loaded: {loaded}.")
        removed = set(loaded if adapter_names is None else adapter_names)
        active = [n for n in self.get_active_adapters() if n not in removed]
        with offloading_suspended(self):
            for model in self._spectral_components().values():
                names = [n for n in spectral_adapter_names(model) if n in removed]
                if names:
                    unload_spectral_shift(model, names)
        self._activate(active)
        self._sync_fused_names()

    def set_spectral_shift_device(self, adapter_names: Union[str, list[str]], device) -> None:
        """Move the shifts δ of the given spectral adapters to `device`.

        A layer none of whose adapters stays with its base weight also moves its SVD factors (the memory that
        matters: U and Vᵀ are as large as the weight in float16), and they come back when an adapter does. As with
        `set_lora_device`, an adapter must be back on the model's device before it is used.
        """
        adapter_names = as_list(adapter_names)
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
                at_home = any(d.device == home for d in layer.spectral_delta.values())
                layer.move_factors(home if at_home else device)

    def set_spectral_shift_build_dtype(self, dtype: torch.dtype = torch.float32,
                                       components: Optional[list[str]] = None) -> None:
        """Build effective (and fused) weights with products in `dtype` (`torch.bfloat16`: faster on CPUs with
        bfloat16 instructions, ΔW rounded to ~2⁻⁸ relative, W exact). See `set_spectral_shift_build_dtype`."""
        for model in self._models_for(components).values():
            set_spectral_shift_build_dtype(model, dtype)

    def set_spectral_factor_location(self, location: str, components: Optional[list[str]] = None,
                                     svd_cache=None) -> None:
        """Keep the SVD factors of the loaded shifts in `location` ("device", "cpu" or "disk", memory-mapped from
        the SVD cache `svd_cache`); outputs do not change. All or nothing across `components` (default: all). See
        `load_spectral_shift`'s `factor_location` and `svdiff_adapter.set_spectral_factor_location`."""
        set_spectral_factor_location(self._models_for(components), location, svd_cache=svd_cache)

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
