"""Spectral shifts end to end on a tiny random-weight Stable Diffusion pipeline (no downloads, CPU, ~1 minute).

Trains a shift for a few steps, saves it (format v1), reloads it into a fresh pipeline, composes it with a second
shift inside the ReLU, and writes outputs/quickstart_tiny.png plus outputs/quickstart_tiny.json.
The images are noise (random weights); the point is the workflow and the checks it prints.

    python examples/quickstart_tiny.py
"""

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import svdiff_adapter as sa


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
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
    folder = Path(tempfile.mkdtemp())
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 2, "<pad>": 1}
    for char in letters:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    scheduler = DDIMScheduler(steps_offset=1, set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def train_shift(pipe, name: str, prompt: str, steps: int, seed: int) -> None:
    """A few DreamBooth-style steps on one random 'photo' (the real training script is issue 4)."""
    config = sa.SpectralShiftConfig()
    sa.add_spectral_shift(pipe.unet, config, name, svd_cache=False)
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(image).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(prompt, padding="max_length", return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0]
    parameters = [p for n, p in pipe.unet.named_parameters() if f"spectral_delta.{name}" in n]
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    for _ in tqdm(range(steps), desc=f"train {name}"):
        noise = torch.randn(latents.shape, generator=generator)
        timestep = torch.randint(0, 1000, (1,), generator=generator)
        noisy = pipe.scheduler.add_noise(latents, noise, timestep)
        loss = F.mse_loss(pipe.unet(noisy, timestep, hidden).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def generate(pipe, prompt: str) -> Image.Image:
    generator = torch.Generator().manual_seed(42)
    return pipe(prompt, num_inference_steps=4, guidance_scale=3.0, height=64, width=64, generator=generator,
                output_type="pil").images[0]


def same(first: Image.Image, second: Image.Image) -> bool:
    return np.array_equal(np.asarray(first), np.asarray(second))


def main() -> None:
    out = Path("outputs")
    out.mkdir(exist_ok=True)
    trainer = tiny_pipeline()
    train_shift(trainer, "dog", "a sks dog", steps=30, seed=1)
    train_shift(trainer, "cat", "a zwx cat", steps=30, seed=2)
    for name in ("dog", "cat"):
        sa.save_spectral_shift(out / f"{name}.safetensors", {"unet": trainer.unet}, name, base_model="tiny-random")

    pipe = tiny_pipeline()  # the same base weights, fresh
    base_image = generate(pipe, "a sks dog")
    for name in ("dog", "cat"):
        sa.load_spectral_shift({"unet": pipe.unet}, out / f"{name}.safetensors", name)
    images, checks = [("base", base_image)], {}
    for a in (0.0, 0.5, 1.0):
        pipe.unet.set_adapters(["dog", "cat"], weights=[a, 1 - a])  # ReLU(σ + a·δ_dog + (1−a)·δ_cat)
        images.append((f"a={a}", generate(pipe, "a sks dog")))
    pipe.unet.set_adapters(["dog"])
    checks["a=1 equals dog alone"] = same(generate(pipe, "a sks dog"), images[-1][1])
    sa.unload_spectral_shift(pipe.unet)
    checks["unload restores the base image"] = same(generate(pipe, "a sks dog"), base_image)
    file_size = (out / "dog.safetensors").stat().st_size
    grid = Image.new("RGB", (64 * len(images), 64))
    for index, (_, image) in enumerate(images):
        grid.paste(image, (64 * index, 0))
    grid.save(out / "quickstart_tiny.png")
    summary = {"columns": [label for label, _ in images], "checks": checks, "shift_file_bytes": file_size}
    (out / "quickstart_tiny.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    if not all(checks.values()):
        raise SystemExit("a check failed")


if __name__ == "__main__":
    main()
