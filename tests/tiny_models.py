"""Tiny models with random weights, built from configs (no downloads)."""

import torch
from torch import nn


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        sample_size=8,
    ).eval()


def unet_inputs(batch=1):
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, 4, 8, 8, generator=generator),
        torch.tensor(10),
        torch.randn(batch, 7, 32, generator=generator),
    )


def unet_output(unet, inputs=None):
    sample, timestep, hidden = inputs or unet_inputs()
    with torch.no_grad():
        return unet(sample, timestep, hidden).sample


def tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def text_inputs():
    return torch.randint(3, 1000, (2, 77), generator=torch.Generator().manual_seed(2))


class Mixed(nn.Module):
    """One module of every supported kind."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # every Mixed() is the same base model
        self.embed = nn.Embedding(50, 12)
        self.proj = nn.Linear(12, 24)
        self.norm = nn.LayerNorm(24)
        self.conv3 = nn.Conv2d(6, 10, 3, stride=2, padding=1, dilation=1)
        self.conv1 = nn.Conv2d(10, 6, 1)
        self.group_norm = nn.GroupNorm(2, 6)

    def forward(self, tokens):
        hidden = self.norm(self.proj(self.embed(tokens)))  # (B, 16, 24)
        image = hidden.reshape(hidden.shape[0], 6, 8, 8)
        return self.group_norm(self.conv1(self.conv3(image)))


def mixed_inputs():
    return torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(3))


def state_snapshot(model):
    """Everything that must come back unchanged: parameters/buffers (bit-exact) and module types."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = {name: type(module) for name, module in model.named_modules()}
    return tensors, types


def assert_unchanged(model, snapshot):
    tensors, types = snapshot
    now = model.state_dict()
    assert set(now) == set(tensors), sorted(set(now) ^ set(tensors))[:5]
    for key, value in tensors.items():
        assert torch.equal(now[key], value), key
    assert {name: type(module) for name, module in model.named_modules()} == types


def tiny_pipeline(pipeline_cls=None, seed: int = 0):
    """A tiny random-weight Stable Diffusion pipeline (UNet, VAE, CLIP text encoder, char-level tokenizer).

    `pipeline_cls` defaults to diffusers' `StableDiffusionPipeline`; any class taking the same components works
    (img2img, inpaint, svdiff_adapter's drop-in subclasses). Same `seed` → same base weights.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8, sample_size=16,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ))
    vocab = {"<|startoftext|>": 0, "<pad>": 1, "<|endoftext|>": 2}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789[]":  # digits and brackets: identifiers like "[V1]"
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    scheduler = DDIMScheduler(steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    pipeline_cls = pipeline_cls or StableDiffusionPipeline
    pipe = pipeline_cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(pipeline_cls=None, seed: int = 0):
    """A tiny random-weight SDXL pipeline: a UNet with SDXL's added conditioning ("text_time": pooled text embeddings
    and six time ids), two CLIP text encoders (the second with a projection), the char-level tokenizer of
    `tiny_pipeline` for both."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    reference = tiny_pipeline(seed=seed)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=32,
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8, sample_size=16,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
    )
    # SDXL's own scheduler class and settings (Euler, "leading" spacing, steps_offset 1).
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipeline_cls = pipeline_cls or StableDiffusionXLPipeline
    pipe = pipeline_cls(vae=vae, text_encoder=CLIPTextModel(text_config), text_encoder_2=CLIPTextModelWithProjection(
        text_config), tokenizer=reference.tokenizer, tokenizer_2=reference.tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
