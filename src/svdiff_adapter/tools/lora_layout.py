"""Key names and metadata of the files `svdiff export-lora` writes, as their readers expect them.

The diffusers-format file (`-o`), read by diffusers' `load_lora_weights` / `load_lora_adapter` and by ComfyUI:

- UNet: diffusers' pre-PEFT layout — `unet.<block>.attnN.processor.to_q_lora.down.weight` (`to_k`, `to_v`,
  `to_out`) for attention projections, `unet.<module>.lora.down.weight` / `.lora.up.weight` elsewhere. diffusers 0.42
  reads it (`loaders/peft.py` converts every key when the first has no `lora_A`, `utils/state_dict_utils.py`
  `UNET_TO_DIFFUSERS` drops `.processor.` and maps `_lora.down` / `.lora.down` to `lora_A`). ComfyUI
  (`comfy/lora.py` at commit 17358c8, `model_lora_keys_unet`) maps a diffusers UNet key only with `.to_` spelt `.processor.to_` and
  `to_out.0` spelt `to_out`, so the PEFT layout `…attn1.to_q.lora_A.weight` (what `save_lora_weights` writes from
  `get_peft_model_state_dict`) loses every attention projection there.
- Text encoders: the PEFT layout of the checkpoint names, `text_encoder.text_model.encoder.layers.0.self_attn.q_proj
  .lora_A.weight`: the layout ComfyUI maps (`model_lora_keys_clip`), which diffusers reads for flattened and
  unflattened CLIP text models alike (`loaders/lora_base.py` strips `text_model.` where the model has none).
  Embeddings: PEFT's `lora_embedding_A` (r × vocab) / `lora_embedding_B` (dim × r), which diffusers loads, plus the
  same ΔW under ComfyUI's generic names `text_encoders.clip_l.transformer.text_model.embeddings.token_embedding
  .lora_B.weight` / `.lora_A.weight`, which diffusers ignores (no `text_encoder.` prefix).
- DiT denoisers (`transformer`): PEFT's keys prefixed by the component, `transformer.<module>.lora_A.weight` /
  `.lora_B.weight`, what `save_lora_weights` of diffusers' `FluxLoraLoaderMixin` / `SD3LoraLoaderMixin` writes
  (diffusers 0.42 loaders/lora_pipeline.py, `_save_lora_weights` → `pack_weights`). Never the `processor` spelling
  of UNet attention keys: Flux's `lora_state_dict` takes any key containing "processor" for an XLabs file.
  ComfyUI maps these diffusers names for Flux and SD3 (comfy/lora.py `model_lora_keys_unet`, "regular diffusers
  flux/sd3 lora format"; read, not run here). Wan 2.2's second expert (`transformer_2`) goes to a file of its own,
  again under `transformer.`: diffusers' `WanLoraLoaderMixin.load_lora_weights` reads only `transformer.` keys and
  puts them into `transformer_2` with `load_into_transformer_2=True`, as Wan 2.2 LoRAs ship (one file per expert).
  Components no diffusers LoRA loader reads (SD3's T5 `text_encoder_3`, Flux's T5 `text_encoder_2`) are left out
  and reported (`unreadable_reason`).

The kohya file (`--kohya`, ComfyUI / A1111 / LyCORIS / diffusers' kohya converter): `lora_unet_<module>`,
`lora_te_…` (SD 1/2) or `lora_te1_…` / `lora_te2_…` (SDXL, as kohya's sd-scripts `networks/lora.py` names them), the
module path in the transformers 4.x CLIP layout (`text_model.encoder…`, `text_projection`) with `_` for `.`.
Embeddings have no kohya form these readers share: diffusers 0.42's kohya converter refuses any key it cannot rename
(`_convert_non_diffusers_lora_to_diffusers`), and ComfyUI reads embedding changes only under its own
`text_encoders.` names, which would make diffusers treat the whole file as non-kohya. A1111 (webui 1.x
`extensions-builtin/Lora/networks.py`) patches no embedding modules either. kohya files are written for Stable
Diffusion 1/2 and SDXL only (`model_family`): kohya-style readers of DiT LoRAs expect the original checkpoints' module
names (for Flux, BFL's `double_blocks.0.img_attn.qkv` with q, k, v fused and the modulation chunks in another order,
which diffusers 0.42 `_convert_kohya_flux_lora_to_diffusers` undoes), not the diffusers modules a shift is stored on.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

from torch import nn


# `ss_base_model_version` values of kohya's sd-scripts (`library/model_util.py` `get_model_version_str_for_sd1_sd2`,
# `library/sdxl_model_util.py` `MODEL_VERSION_SDXL_BASE_V1_0`).
SD_V1, SD_V2, SDXL = "sd_v1", "sd_v2", "sdxl_base_v1-0"
# ComfyUI's CLIP model names per text encoder, as `comfy/lora.py` (commit 17358c8) `model_lora_keys_clip` uses them.
COMFYUI_CLIP = {SD_V1: {"text_encoder": "clip_l"}, SD_V2: {"text_encoder": "clip_h"},
                SDXL: {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}}
# sd-scripts' SDXL (sgm) names of the added-conditioning MLP: diffusers 0.42's kohya converter garbles the diffusers
# spelling `add_embedding_linear_1` (its SDXL "emb" rule drops the index) but maps these back; ComfyUI and A1111 know
# the sgm names natively.
_SDXL_KOHYA_UNET_NAMES = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
# Text-encoder modules that ComfyUI maps under diffusers names (comfy/lora.py LORA_CLIP_MAP); it reads the others
# (embeddings, text_projection) only under its generic `text_encoders.` names.
_COMFYUI_DIFFUSERS_CLIP = re.compile(r"(^|\.)encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
# Attention projections, named `<attn>.processor.<proj>_lora.{down,up}.weight` in diffusers' old layout.
_ATTENTION_PROJECTION = re.compile(r"\.(to_q|to_k|to_v|to_out)$")


# Components some diffusers pipeline loads LoRA weights into (`_lora_loadable_modules`, diffusers 0.42
# loaders/lora_pipeline.py); "" is a bare model (`unet.load_lora_adapter(file)` without a prefix).
DIFFUSERS_LORA_COMPONENTS = ("", "unet", "transformer", "transformer_2", "text_encoder", "text_encoder_2")
# Wan 2.2's second expert: its LoRA is a file of its own, keyed like the first expert's (see the module docstring).
SECOND_TRANSFORMER, FIRST_TRANSFORMER = "transformer_2", "transformer"
# The components of a Stable Diffusion 1/2 or SDXL pipeline: the only ones kohya's sd-scripts names (`lora_unet_`,
# `lora_te_`, `lora_te1_`, `lora_te2_`).
SD_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def model_family(models: Mapping[str, nn.Module], pipeline_class: Optional[type] = None) -> Optional[str]:
    """sd-scripts' `ss_base_model_version` of a Stable Diffusion base, None for every other model (DiT pipelines:
    Flux, SD3, Wan, ...), from what was loaded and the pipeline class when known (`BaseModels.pipeline_class`).

    SDXL has a second text encoder and "text_time" added conditioning, SD 2 1024-wide cross attention / text states.
    A component outside `SD_COMPONENTS`, a first text encoder with a projection (SD3's) or a pipeline whose LoRA
    loader is not diffusers' SD / SDXL one means another family. A text-encoder-only SDXL shift cannot be told
    apart from SD 1 and counts as SD 1; a text-encoder-only shift of Flux's CLIP, given as a model rather than a
    pipeline folder, counts as SD 1 too.
    """
    if pipeline_class is not None:
        from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

        if not issubclass(pipeline_class, (StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin)):
            return None
    if any(component not in SD_COMPONENTS for component in models):
        return None
    unet = models.get("unet")
    text_encoder = models.get("text_encoder")
    if type(text_encoder).__name__ == "CLIPTextModelWithProjection":  # SD3's first encoder; SDXL's is CLIPTextModel
        return None
    if "text_encoder_2" in models:
        return SDXL
    if unet is not None and hasattr(unet, "config"):
        if unet.config.get("addition_embed_type") == "text_time":
            return SDXL
        return SD_V2 if unet.config.get("cross_attention_dim") == 1024 else SD_V1
    if text_encoder is not None and hasattr(text_encoder, "config"):
        return SD_V2 if getattr(text_encoder.config, "hidden_size", None) == 1024 else SD_V1
    return None


def unreadable_reason(component: str, pipeline_class: Optional[type] = None) -> Optional[str]:
    """Why diffusers would not load a component's part of a LoRA file (it is then left out of the export), or None:
    the pipeline's `load_lora_weights` reads only its `_lora_loadable_modules`; without a known pipeline, only the
    components some diffusers pipeline reads."""
    if pipeline_class is not None:
        modules = list(getattr(pipeline_class, "_lora_loadable_modules", None) or [])
        if component not in modules:
            return f"{pipeline_class.__name__}.load_lora_weights reads LoRAs of {modules} only"
        return None
    if component not in DIFFUSERS_LORA_COMPONENTS:
        return f"no diffusers pipeline loads LoRA weights into {component} (diffusers 0.42 `_lora_loadable_modules`)"
    return None


def file_component(component: str) -> str:
    """The component prefix a module's keys get in the file that holds it (`transformer_2` → `transformer`)."""
    return FIRST_TRANSFORMER if component == SECOND_TRANSFORMER else component


def checkpoint_name(model: nn.Module, name: str) -> str:
    """A module's name in the checkpoint layout every LoRA reader uses: transformers 5 flattens `CLIPTextModel`
    (no `text_model` submodule) but keeps `text_model.` in its checkpoints; `CLIPTextModelWithProjection` keeps it."""
    if type(model).__name__.startswith("CLIPText") and not hasattr(model, "text_model"):
        return f"text_model.{name}"
    return name


def diffusers_keys(component: str, model: nn.Module, name: str, kind: str) -> tuple[str, str]:
    """(down key, up key) of a module in the diffusers-format file; the module's ΔW = up @ down (for embeddings the
    PEFT tensors are stored transposed, see `export_lora`)."""
    if component == "unet":
        path = f"unet.{name}"
        if kind == "embedding":
            return f"{path}.lora_embedding_A", f"{path}.lora_embedding_B"
        # ComfyUI's spelling of a diffusers module; diffusers undoes both changes.
        path = path.replace(".to_", ".processor.to_")
        if path.endswith(".to_out.0"):
            path = path[: -len(".0")]
        if _ATTENTION_PROJECTION.search(path):
            return f"{path}_lora.down.weight", f"{path}_lora.up.weight"
        return f"{path}.lora.down.weight", f"{path}.lora.up.weight"
    path = checkpoint_name(model, name)
    path = f"{component}.{path}" if component else path
    if kind == "embedding":
        return f"{path}.lora_embedding_A", f"{path}.lora_embedding_B"
    return f"{path}.lora_A.weight", f"{path}.lora_B.weight"


def comfyui_generic_key(component: str, model: nn.Module, name: str, family: Optional[str]) -> Optional[str]:
    """ComfyUI's generic key (`comfy/lora.py` `model_lora_keys_clip`: `text_encoders.<its state-dict name>`) for a
    text-encoder module that ComfyUI does not read under its diffusers name; None for the others and where ComfyUI's
    CLIP name for the component is unknown."""
    clip = COMFYUI_CLIP.get(family, {}).get(component)
    if clip is None or _COMFYUI_DIFFUSERS_CLIP.search(name):
        return None
    return f"text_encoders.{clip}.transformer.{checkpoint_name(model, name)}"


def kohya_name(component: str, model: nn.Module, name: str, family: Optional[str]) -> str:
    """`lora_unet_…` / `lora_te_…` / `lora_te1_…` / `lora_te2_…`: the module's checkpoint name with `_` for `.`."""
    if component == "unet":
        return "lora_unet_" + (_SDXL_KOHYA_UNET_NAMES.get(name, name) if family == SDXL else name).replace(".", "_")
    if component == "text_encoder":
        prefix = "lora_te1_" if family == SDXL else "lora_te_"
    elif component == "text_encoder_2":
        prefix = "lora_te2_"
    else:
        prefix = "lora_"
    return prefix + checkpoint_name(model, name).replace(".", "_")


def peft_target_name(component: str, name: str) -> str:
    """The module name written in `lora_adapter_metadata`. Text encoders: without `text_model.`, which PEFT's suffix
    match (`(.*\\.)?name$`) finds in the flattened and the unflattened CLIP layout."""
    if component.startswith("text_encoder"):
        return name.removeprefix("text_model.")
    return name


__all__ = ["DIFFUSERS_LORA_COMPONENTS", "SDXL", "SD_COMPONENTS", "SD_V1", "SD_V2", "SECOND_TRANSFORMER", "checkpoint_name",
           "comfyui_generic_key", "diffusers_keys", "file_component", "kohya_name", "model_family", "peft_target_name",
           "unreadable_reason"]
