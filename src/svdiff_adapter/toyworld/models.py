"""Builders for the toy world's latent-diffusion components (standard diffusers / transformers classes).

* ``AutoencoderKL``: blocks (16, 32, 64), one layer per block, 64x64x3 -> 16x16x4 (~0.7M parameters).
* ``CLIPTextModel``: hidden 64, 2 layers, 4 heads, 16 positions (~0.1M parameters), vocabulary of the toy
  tokenizer.
* ``UNet2DConditionModel``: blocks (32, 64, 128) [Down, CrossAttnDown x2], one layer per block,
  cross-attention dim 64 (~4M parameters).
* DDPM training scheduler (1000 steps, linear betas 1e-4..0.02) and the matching DDIM sampling scheduler
  (``steps_offset=1``, ``set_alpha_to_one=False``).

Sizes are arguments so tests can build tiny versions.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "BETA_START",
    "BETA_END",
    "NUM_TRAIN_TIMESTEPS",
    "make_vae",
    "make_text_encoder",
    "make_unet",
    "make_train_scheduler",
    "make_sample_scheduler",
    "build_pipeline",
    "count_params",
]

BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS = 1e-4, 0.02, 1000


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_vae(block_out_channels: Sequence[int] = (16, 32, 64), latent_channels: int = 4, norm_num_groups: int = 8):
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=64,
        scaling_factor=1.0,  # set from data after VAE training
    )


def make_text_encoder(tokenizer, hidden_size: int = 64, layers: int = 2, heads: int = 4):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_unet(
    block_out_channels: Sequence[int] = (32, 64, 128),
    cross_attention_dim: int = 64,
    attention_head_dim: int = 4,
    norm_num_groups: int = 16,
    latent_channels: int = 4,
    sample_size: int = 16,
):
    from diffusers import UNet2DConditionModel

    n = len(block_out_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
    )


# The noise schedule shared by training (DDPM) and sampling (DDIM).
_NOISE_SCHEDULE = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS,
    beta_start=BETA_START,
    beta_end=BETA_END,
    beta_schedule="linear",
    prediction_type="epsilon",
    clip_sample=False,
)


def make_train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**_NOISE_SCHEDULE)


def make_sample_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**_NOISE_SCHEDULE, set_alpha_to_one=False, steps_offset=1)


def build_pipeline(vae, text_encoder, tokenizer, unet, scheduler=None):
    """A ``StableDiffusionPipeline`` without safety checker / feature extractor."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler if scheduler is not None else make_sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
