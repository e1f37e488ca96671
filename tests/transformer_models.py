"""Tiny random-weight transformer (DiT) pipelines of every family the tests cover, built offline in well under a second.

The transformer configs are those of diffusers' own LoRA tests (tests/lora/test_lora_layers_<family>.py, diffusers
0.42). Text encoders, tokenizers and the VAE are left out: every call passes `prompt_embeds` and asks for
`output_type="latent"`, so only the transformer(s) and the scheduler run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler


@dataclass
class Family:
    name: str
    pipeline_class: str  # the diffusers class (and svdiff_adapter's drop-in of the same name)
    build: Callable[[type], diffusers.DiffusionPipeline]
    inputs: Callable[[], dict]
    scale_kwarg: str  # where the pipeline takes diffusers' LoRA `scale`
    components: tuple[str, ...]

    def pipeline(self, pipeline_cls=None):
        torch.manual_seed(0)
        return self.build(pipeline_cls)

    def call(self, pipe, **extra):
        """One short denoising run; returns the final latents."""
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            output = pipe(**self.inputs(), **extra, num_inference_steps=2, output_type="latent", generator=generator)
        return output[0]


def _embeds(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _flux(cls):
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    return (cls or diffusers.FluxPipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def _sd3(cls):
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    return (cls or diffusers.StableDiffusion3Pipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, transformer=transformer)


def _flux2(cls):
    transformer = diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4])
    return (cls or diffusers.Flux2Pipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        transformer=transformer)


def _qwen_image(cls):
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    return (cls or diffusers.QwenImagePipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        transformer=transformer)


def _wan_transformer():
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)


def _wan(cls):
    # Wan 2.2's two experts: `transformer` for high noise, `transformer_2` below the boundary.
    return (cls or diffusers.WanPipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        transformer=_wan_transformer(), transformer_2=_wan_transformer(), boundary_ratio=0.5)


def _sana(cls):
    transformer = diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=32)
    return (cls or diffusers.SanaPipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
        transformer=transformer)


def _mask(length):
    return torch.ones(1, length, dtype=torch.long)


FAMILIES = {
    "flux": Family("flux", "FluxPipeline", _flux, lambda: dict(
        prompt_embeds=_embeds(1, 8, 32), pooled_prompt_embeds=_embeds(1, 32), height=32, width=32),
        "joint_attention_kwargs", ("transformer", "text_encoder")),
    "sd3": Family("sd3", "StableDiffusion3Pipeline", _sd3, lambda: dict(
        prompt_embeds=_embeds(1, 8, 32), pooled_prompt_embeds=_embeds(1, 64),
        negative_prompt_embeds=_embeds(1, 8, 32) * 0.5, negative_pooled_prompt_embeds=_embeds(1, 64) * 0.5,
        height=16, width=16), "joint_attention_kwargs", ("transformer", "text_encoder", "text_encoder_2")),
    "flux2": Family("flux2", "Flux2Pipeline", _flux2, lambda: dict(prompt_embeds=_embeds(1, 8, 16), height=32, width=32),
                    "attention_kwargs", ("transformer",)),
    "qwen_image": Family("qwen_image", "QwenImagePipeline", _qwen_image, lambda: dict(
        prompt_embeds=_embeds(1, 8, 16), prompt_embeds_mask=_mask(8), height=32, width=32),
        "attention_kwargs", ("transformer",)),
    "wan": Family("wan", "WanPipeline", _wan, lambda: dict(
        prompt_embeds=_embeds(1, 8, 32), negative_prompt_embeds=_embeds(1, 8, 32) * 0.5, height=16, width=16,
        num_frames=5), "attention_kwargs", ("transformer", "transformer_2")),
    "sana": Family("sana", "SanaPipeline", _sana, lambda: dict(
        prompt_embeds=_embeds(1, 8, 8), prompt_attention_mask=_mask(8), negative_prompt_embeds=_embeds(1, 8, 8) * 0.5,
        negative_prompt_attention_mask=_mask(8), negative_prompt=None, height=32, width=32),
        "attention_kwargs", ("transformer",)),
}
