"""Which readers load which parts of `svdiff export-lora`'s two files, and how close each gets to the shift.

    python benchmarks/export_check.py [--rank R]

Tiny random SD 1.5 and SDXL pipelines (tests/tiny_models.py) get a random shift on every linear, conv and embedding
layer of the UNet and the text encoder(s); the shift is exported at rank R (default: full rank, so a reader that
loads everything reproduces the shift to float32 round-off). Each file is then loaded by

- diffusers 0.42 `pipe.load_lora_weights` (both files);
- ComfyUI: `comfyui_key_map` / `comfyui_patches` below re-implement, from reading ComfyUI's `comfy/lora.py`
  (`model_lora_keys_unet`, `model_lora_keys_clip`, `load_lora`), `comfy/weight_adapter/lora.py` and `comfy/utils.py`
  (`unet_to_diffusers`), which LoRA key patches which model weight and how (ComfyUI itself cannot be installed here);
  the patches are added to the diffusers/transformers weights that ComfyUI's own modules correspond to;
- LyCORIS 4.1 `lycoris.kohya.create_network_from_weights` + `merge_to` (it reads kohya names only).

The table gives, per reader × file × model, the keys it used / ignored and the output error of each component,
‖out_reader − out_shift‖ / ‖out_shift − out_base‖ on the probe inputs of `svdiff_adapter.tools.lora_probe`, next to
the error the export itself predicts (1 − `LoraExport.reproduced`).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/tiny_models.py

import svdiff_adapter as sa  # noqa: E402
from svdiff_adapter import SpectralShiftConfig  # noqa: E402
from svdiff_adapter.tools import export_lora  # noqa: E402
from svdiff_adapter.tools.lora_layout import checkpoint_name  # noqa: E402
from svdiff_adapter.tools.lora_probe import probe_inputs  # noqa: E402
from svdiff_adapter.tuner import spectral_layers  # noqa: E402
from tests.tiny_models import tiny_pipeline, tiny_sdxl_pipeline  # noqa: E402


PIPELINES = {"SD 1.5": tiny_pipeline, "SDXL": tiny_sdxl_pipeline}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def components(pipe) -> dict[str, nn.Module]:
    return {name: getattr(pipe, name) for name in ("unet", *TEXT_ENCODERS) if getattr(pipe, name, None) is not None}


def component_output(model: nn.Module) -> torch.Tensor:
    """The probe's output of one component (same input and fields as `lora_probe`)."""
    inputs = probe_inputs(model)
    with torch.no_grad():
        output = model(**inputs)
    parts = [getattr(output, field) for field in ("sample", "last_hidden_state", "text_embeds", "pooler_output")
             if getattr(output, field, None) is not None]
    return torch.cat([part.flatten().double() for part in parts])


def shifted_pipeline(model_name: str, folder: Path, seed: int = 3, scale: float = 0.3):
    """A tiny pipeline with a random shift on every linear, conv and embedding layer, saved to `folder`; returns
    (shift path, base outputs, shifted outputs) per component."""
    make = PIPELINES[model_name]
    base = {name: component_output(model) for name, model in components(make()).items()}
    pipe = make()
    generator = torch.Generator().manual_seed(seed)
    for model in components(pipe).values():
        sa.add_spectral_shift(model, SpectralShiftConfig(target_kinds=["linear", "conv2d", "embedding"]), "a",
                              svd_cache=False)
        with torch.no_grad():
            for _, layer in spectral_layers(model):
                layer.spectral_delta["a"].copy_(torch.randn(layer.shift_size, generator=generator) * scale)
    shifted = {name: component_output(model) for name, model in components(pipe).items()}
    path = folder / f"{model_name.replace(' ', '_')}-shift.safetensors"
    sa.save_spectral_shift(path, components(pipe), "a")
    return path, base, shifted


def output_errors(models: dict[str, nn.Module], base: dict, shifted: dict) -> dict[str, float]:
    return {name: float((component_output(model) - shifted[name]).norm() / (shifted[name] - base[name]).norm())
            for name, model in models.items()}


# ------------------------------------------------------------------------------------------------------ diffusers
def diffusers_load(model_name: str, path: Path):
    """A fresh tiny pipeline with the file loaded by `load_lora_weights`, and the file keys it used: a key counts as
    used when a loaded adapter tensor equals it (kohya `.alpha` keys with their module); keys without a component
    or kohya prefix never are (diffusers' loaders select keys by prefix)."""
    pipe = PIPELINES[model_name]()
    pipe.load_lora_weights(str(path))
    loaded = [p.detach() for model in components(pipe).values() for n, p in model.named_parameters() if "lora_" in n]
    used = set()
    for key, tensor in load_file(path).items():
        readable = key.startswith(("unet.", "text_encoder.", "text_encoder_2.", "lora_"))
        equal = (p.shape == tensor.shape and torch.equal(p.float(), tensor.float()) for p in loaded)
        if readable and tensor.ndim and any(equal):
            used.add(key)
    used |= {key.removesuffix(".lora_down.weight") + ".alpha" for key in used if key.endswith(".lora_down.weight")}
    return components(pipe), used


# -------------------------------------------------------------------------------------------------------- ComfyUI
# ComfyUI's names of a diffusers UNet's weights (comfy/utils.py unet_to_diffusers): resnet parts, the attention
# parts it lists, the blocks outside the down/mid/up structure.
_RESNET_TO_LDM = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
                  "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_ATTENTION_PARTS = ("proj_in", "proj_out", "norm")
_TRANSFORMER_PARTS = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                      "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_OUTSIDE_BLOCKS = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                   "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                   "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                   "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2"}
# The CLIP modules ComfyUI maps under kohya and diffusers names (comfy/lora.py LORA_CLIP_MAP).
_CLIP_LAYER_PARTS = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj",
                     "self_attn.out_proj")
_COMFYUI_CLIP = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # SD 1.x and SDXL


def _unet_module_to_ldm(unet) -> dict[str, str]:
    """diffusers module path → ComfyUI (ldm) module path, for the modules ComfyUI's map covers."""
    mapping, per_block = {}, unet.config.layers_per_block
    for x, block in enumerate(unet.down_blocks):
        n = 1 + (per_block + 1) * x
        for i in range(per_block):
            for part, ldm in _RESNET_TO_LDM.items():
                mapping[f"down_blocks.{x}.resnets.{i}.{part}"] = f"input_blocks.{n}.0.{ldm}"
            if getattr(block, "attentions", None):
                _map_attention(mapping, f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", block.attentions[i])
            n += 1
        mapping[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    _map_attention(mapping, "mid_block.attentions.0", "middle_block.1", unet.mid_block.attentions[0])
    for i, n in enumerate((0, 2)):
        for part, ldm in _RESNET_TO_LDM.items():
            mapping[f"mid_block.resnets.{i}.{part}"] = f"middle_block.{n}.{ldm}"
    for x, block in enumerate(unet.up_blocks):
        n = (per_block + 1) * x
        for i in range(per_block + 1):
            for part, ldm in _RESNET_TO_LDM.items():
                mapping[f"up_blocks.{x}.resnets.{i}.{part}"] = f"output_blocks.{n}.0.{ldm}"
            upsampler_index = 1
            if getattr(block, "attentions", None):
                _map_attention(mapping, f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", block.attentions[i])
                upsampler_index = 2
            if i == per_block:
                mapping[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{upsampler_index}.conv"
            n += 1
    mapping.update(_OUTSIDE_BLOCKS)
    present = {name for name, _ in unet.named_modules()}
    return {d: ldm for d, ldm in mapping.items() if d in present}


def _map_attention(mapping: dict, diffusers_path: str, ldm_path: str, attention) -> None:
    for part in _ATTENTION_PARTS:
        mapping[f"{diffusers_path}.{part}"] = f"{ldm_path}.{part}"
    for t in range(len(attention.transformer_blocks)):
        for part in _TRANSFORMER_PARTS:
            mapping[f"{diffusers_path}.transformer_blocks.{t}.{part}"] = f"{ldm_path}.transformer_blocks.{t}.{part}"


def comfyui_key_map(models: dict[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """LoRA key (without the `.lora_up.weight`-like suffix) → (component, module path of our model) for every key
    ComfyUI maps on an SD 1.x / SDXL model."""
    key_map = {}
    unet = models.get("unet")
    if unet is not None:
        for module, ldm in _unet_module_to_ldm(unet).items():
            target = ("unet", module)
            # Its own (ldm) names: kohya's lora_unet_ spelling and the generic diffusion_model. one.
            key_map["lora_unet_" + ldm.replace(".", "_")] = target
            key_map["diffusion_model." + ldm] = target
            # diffusers names: kohya, SimpleTuner's lycoris_, and diffusers LoRAs with and without "unet.".
            key_map["lora_unet_" + module.replace(".", "_")] = target
            key_map["lycoris_" + module.replace(".", "_")] = target
            diffusers_key = module.replace(".to_", ".processor.to_")
            if diffusers_key.endswith(".to_out.0"):
                diffusers_key = diffusers_key[: -len(".0")]
            key_map[diffusers_key] = target
            key_map["unet." + diffusers_key] = target
    clip_l_present = "text_encoder" in models and "text_encoder_2" in models
    for component in TEXT_ENCODERS:
        model = models.get(component)
        if model is None:
            continue
        clip = _COMFYUI_CLIP[component]
        modules = {name for name, module in model.named_modules() if isinstance(getattr(module, "weight", None),
                                                                                   torch.Tensor)}
        for module in modules:  # ComfyUI's generic keys: its own state-dict names
            key_map[f"text_encoders.{clip}.transformer.{checkpoint_name(model, module)}"] = (component, module)
        prefix = "text_model." if hasattr(model, "text_model") else ""
        for b in range(32):
            for part in _CLIP_LAYER_PARTS:
                module = f"{prefix}encoder.layers.{b}.{part}"
                if module not in modules:
                    continue
                kohya = f"text_model_encoder_layers_{b}_{part.replace('.', '_')}"
                if clip == "clip_l":
                    diffusers = f"text_encoder.text_model.encoder.layers.{b}.{part}"
                    for key in (f"lora_te_{kohya}", f"lora_te1_{kohya}", diffusers):
                        key_map[key] = (component, module)
                elif clip_l_present:
                    for key in (f"lora_te2_{kohya}", f"text_encoder_2.text_model.encoder.layers.{b}.{part}"):
                        key_map[key] = (component, module)
        if "text_projection" in modules and clip == "clip_g":
            key_map["lora_prior_te_text_projection"] = (component, "text_projection")
            key_map["lora_te2_text_projection"] = (component, "text_projection")
    return key_map


# LoRA tensor pairs ComfyUI's LoRAAdapter.load recognises after a mapped key x: (up, down) suffixes.
_COMFYUI_LORA_FORMS = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                       (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                       (".lora_B", ".lora_A"), (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
                       (".lora_B.default.weight", ".lora_A.default.weight"))


def comfyui_patches(lora: dict[str, torch.Tensor], key_map: dict) -> tuple[dict, set[str]]:
    """(target → list of weight changes at strength 1, loaded keys), as ComfyUI's `load_lora` + `calculate_weight`:
    the first LoRA form found, scaled alpha / rank when `.alpha` is given, and full differences (`.diff`)."""
    patches, loaded = {}, set()
    for x, target in key_map.items():
        alpha = lora.get(f"{x}.alpha")
        for up_suffix, down_suffix in _COMFYUI_LORA_FORMS:
            if f"{x}{up_suffix}" in lora:
                up, down = lora[f"{x}{up_suffix}"].float(), lora[f"{x}{down_suffix}"].float()
                scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
                patches.setdefault(target, []).append(scale * (up.flatten(1) @ down.flatten(1)))
                loaded |= {f"{x}{up_suffix}", f"{x}{down_suffix}"} | ({f"{x}.alpha"} if alpha is not None else set())
                break
        if f"{x}.diff" in lora:
            patches.setdefault(target, []).append(lora[f"{x}.diff"].float())
            loaded.add(f"{x}.diff")
    return patches, loaded


def comfyui_load(model_name: str, path: Path):
    """A fresh tiny pipeline patched as ComfyUI patches it, and the keys ComfyUI's loader takes."""
    models = components(PIPELINES[model_name]())
    patches, loaded = comfyui_patches(load_file(path), comfyui_key_map(models))
    with torch.no_grad():
        for (component, module), changes in patches.items():
            weight = models[component].get_submodule(module).weight
            for change in changes:
                weight += change.reshape(weight.shape).to(weight.dtype)
    return models, loaded


# -------------------------------------------------------------------------------------------------------- LyCORIS
class TransformersV4Layout(nn.Module):
    """A flattened transformers 5 `CLIPTextModel` under `text_model`, the layout LyCORIS (like kohya) names."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_model = text_encoder


def lycoris_load(model_name: str, path: Path):
    """A fresh tiny pipeline with the kohya file merged by LyCORIS, and the keys of the modules it built."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # its progress lines go to stdout
    models = components(PIPELINES[model_name]())
    text_encoders = [m if hasattr(m, "text_model") else TransformersV4Layout(m)
                     for name, m in models.items() if name in TEXT_ENCODERS]
    weights = load_file(path)
    # LyCORIS 4.1.3 builds its default modules first and, on a diffusers UNet, names time_embedding.linear_1 twice
    # (as a TimestepEmbedding part and by name): drop the by-name entries for the call.
    names = LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME
    LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME = [n for n in names if not n.startswith("time_embedding.")]
    try:
        network, _ = create_network_from_weights(1.0, str(path), None, text_encoders if len(text_encoders) > 1 else
                                                 text_encoders[0], models["unet"], weights_sd=weights)
    finally:
        LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME = names
    network.merge_to(text_encoders, models["unet"], weights, torch.float32, "cpu")
    names = {lora.lora_name for lora in network.unet_loras + network.text_encoder_loras}
    return models, {key for key in weights if key.split(".")[0] in names}


READERS = {"diffusers": diffusers_load, "ComfyUI (mapping)": comfyui_load, "LyCORIS": lycoris_load}


def check(model_name: str, folder: Path, rank: int) -> list[dict]:
    shift_path, base, shifted = shifted_pipeline(model_name, folder)
    stem = model_name.replace(" ", "_")
    files = {"diffusers": folder / f"{stem}-lora.safetensors", "kohya": folder / f"{stem}-kohya.safetensors"}
    result = export_lora(shift_path, components(PIPELINES[model_name]()), rank=rank, output=files["diffusers"],
                         kohya_output=files["kohya"], svd_cache=False, overwrite=True)
    rows = []
    for file_format, path in files.items():
        keys = set(load_file(path))
        rows.append({"reader": "export report", "format": file_format, "model": model_name, "used": "", "ignored": "",
                     "errors": {c: 1 - scores[file_format] for c, scores in result.reproduced.items()}})
        for reader, load in READERS.items():
            if reader == "LyCORIS" and file_format != "kohya":
                continue
            models, used = load(model_name, path)
            rows.append({"reader": reader, "format": file_format, "model": model_name, "used": len(used & keys),
                         "ignored": len(keys - used), "errors": output_errors(models, base, shifted),
                         "ignored_keys": sorted(keys - used)})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=10_000, help="export rank (default: full rank)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        rows = [row for name in PIPELINES for row in check(name, Path(folder), args.rank)]
    print("| reader | file | model | keys used | keys ignored | UNet error | text encoder error "
          "| text encoder 2 error |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        errors = [f"{row['errors'][c]:.2g}" if c in row["errors"] else "—" for c in ("unet", *TEXT_ENCODERS)]
        print(f"| {row['reader']} | {row['format']} | {row['model']} | {row['used']} | {row['ignored']} | "
              + " | ".join(errors) + " |")
    print()
    for row in rows:
        if row.get("ignored_keys"):
            kinds = sorted({re.sub(r"\d+", "N", k) for k in row["ignored_keys"]})
            print(f"{row['reader']} / {row['format']} / {row['model']} ignores: {', '.join(kinds)}")


if __name__ == "__main__":
    main()
