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


# ------------------------------------------------------------------------------------------------ for training
def _char_tokenizer():
    from .tiny_models import tiny_pipeline

    return tiny_pipeline().tokenizer  # a char-level CLIP tokenizer (77 tokens), also standing in for T5's


def _clip(projection: bool, hidden_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=300, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                            pad_token_id=1, projection_dim=32)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5():
    from transformers import T5Config, T5EncoderModel

    # eval(): built from a config, T5 would apply its dropout (from_pretrained returns models in eval mode).
    return T5EncoderModel(T5Config(vocab_size=300, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0)).eval()


def _vae(latent_channels: int, shift_factor: float):
    from diffusers import AutoencoderKL

    # Three blocks: 4× downsampling, so 32 px images are 8×8 latents.
    return AutoencoderKL(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=latent_channels, norm_num_groups=8,
                         scaling_factor=1.5, shift_factor=shift_factor)


def tiny_sd3_training_pipeline(seed: int = 0):
    """A complete tiny SD3 pipeline (two CLIP encoders with projections, T5, VAE with a shift factor), for training:
    CLIP widths 16 + 16 fill T5's 32, pooled 32 + 32 = the transformer's pooled_projection_dim."""
    torch.manual_seed(seed)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    tokenizer = _char_tokenizer()
    pipe = diffusers.StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(4, 0.0609), text_encoder=_clip(True, 16),
        tokenizer=tokenizer, text_encoder_2=_clip(True, 16), tokenizer_2=tokenizer, text_encoder_3=_t5(),
        tokenizer_3=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_training_pipeline(seed: int = 0):
    """A complete tiny Flux.1 pipeline with the guidance embedding (as Flux.1-dev): CLIP (pooled 32), T5 (32 wide),
    a one-channel VAE (the transformer's 4 input channels are 2×2 packed latents)."""
    torch.manual_seed(seed)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    tokenizer = _char_tokenizer()
    pipe = diffusers.FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(1, 0.1159), text_encoder=_clip(False, 32),
        tokenizer=tokenizer, text_encoder_2=_t5(), tokenizer_2=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
