"""The README.md (model card) pushed with a spectral shift: YAML metadata for the Hub plus a usage snippet."""

from __future__ import annotations

from typing import Optional, Sequence

from ..format import DEFAULT_WEIGHT_NAME


MODEL_CARD_TAGS = ("svdiff", "spectral-shift", "diffusers", "text-to-image")
LIBRARY_NAME = "svdiff-adapter"


def spectral_shift_model_card(
    repo_id: str,
    *,
    base_model: Optional[str] = None,
    instance_prompt: Optional[str] = None,
    image_paths: Sequence[str] = (),
    adapter_name: Optional[str] = None,
    components: Sequence[str] = ("unet",),
    num_parameters: Optional[int] = None,
    pipeline_class: str = "StableDiffusionPipeline",
    weight_name: str = DEFAULT_WEIGHT_NAME,
    drop_in_classes: Sequence[str] = (),
) -> str:
    """The text of README.md: YAML front matter (`base_model`, `library_name`, tags, `instance_prompt`, a widget
    gallery of `image_paths`, relative to the repo root) and a usage snippet with `load_spectral_shift`, importing
    `pipeline_class` from svdiff_adapter when it is one of `drop_in_classes`, else from diffusers after
    `patch_diffusers()`.

    `inference: true` is deliberately absent: the Hub's widget cannot apply a spectral shift.
    """
    from huggingface_hub import ModelCard, ModelCardData

    widget = [
        {"text": instance_prompt or "", "output": {"url": path}} for path in image_paths
    ]
    data = ModelCardData(
        base_model=base_model or None,
        library_name=LIBRARY_NAME,
        tags=list(MODEL_CARD_TAGS),
        instance_prompt=instance_prompt or None,
        widget=widget or None,
    )
    name = adapter_name or repo_id.split("/")[-1]
    prompt = instance_prompt or "a photo"
    base = base_model or "<the base model these shifts were trained on>"
    load_args = f'"{repo_id}", adapter_name="{name}"'
    if weight_name != DEFAULT_WEIGHT_NAME:
        load_args += f', weight_name="{weight_name}"'
    size = f" ({num_parameters:,} shift values)" if num_parameters else ""
    result = "frame" if any(word in pipeline_class for word in ("Video", "Wan", "Mochi", "LTX")) else "image"
    if pipeline_class in drop_in_classes:
        imports = f"from svdiff_adapter import {pipeline_class}"
    else:  # diffusers' own class, given the methods by `patch_diffusers()`
        imports = f"import svdiff_adapter\nfrom diffusers import {pipeline_class}\n\nsvdiff_adapter.patch_diffusers()"
    body = f"""
# {repo_id.split("/")[-1]}: SVDiff spectral shift

Spectral shifts (SVDiff){size} for `{base}`, shifting the singular values of the weights of
{", ".join(f"`{c}`" for c in components)}. They apply only to that exact base model: loading them into another
one fails with a fingerprint error.
{f"{chr(10)}Instance prompt: `{instance_prompt}`{chr(10)}" if instance_prompt else ""}
## Use with diffusers

```bash
pip install svdiff-adapter
```

```python
import torch
{imports}

pipe = {pipeline_class}.from_pretrained("{base}", dtype=torch.bfloat16).to("cuda")
pipe.load_spectral_shift({load_args})
{result} = pipe("{prompt}", num_inference_steps=25).{result}s[0]
```

Combine with other shifts or LoRAs through `pipe.set_adapters([...], weights=[...])`; spectral shifts combine
inside the ReLU: U·diag(ReLU(σ + Σᵢ wᵢ δᵢ))·Vᵀ. File: `{weight_name}` (svdiff-adapter format v1).
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
