"""Write randomly initialised SD1.5-sized models for benchmarks (no Hub access needed).

Runs in the project's venv::

    .venv/bin/python benchmarks/make_sd15_random.py OUT_DIR [SEED]      # e.g. .bench/sd15-random 0

Writes ``OUT_DIR/unet`` (diffusers ``UNet2DConditionModel``: default block layout
(320, 640, 1280, 1280), with SD1.5's cross_attention_dim=768, attention_head_dim=8,
sample_size=64; ~860M parameters, 3.4 GB fp32) and ``OUT_DIR/text_encoder`` (transformers
``CLIPTextModel``: hidden 768, 12 layers, 12 heads, intermediate 3072, vocab 49408,
77 positions; ~123M parameters), both with ``save_pretrained(..., safe_serialization=True)``.
A subfolder that already holds its config and weights is left untouched (delete it to
regenerate).

The text encoder's weights are re-keyed to the ``text_model.``-prefixed layout of
transformers <= 4.x (real SD1.5 checkpoints use it too). Current transformers loads that
layout unchanged, and transformers 4.27 (svdiff-pytorch's world) would otherwise silently
random-initialise every weight of an unprefixed file.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file

UNET_KWARGS = dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
TEXT_KWARGS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    vocab_size=49408,
    max_position_embeddings=77,
)


def _done(folder: str, weights: str) -> bool:
    return os.path.exists(os.path.join(folder, "config.json")) and os.path.exists(os.path.join(folder, weights))


def add_text_model_prefix(folder: str) -> None:
    path = os.path.join(folder, "model.safetensors")
    sd = load_file(path)
    if all(k.startswith("text_model.") for k in sd):
        return
    out = {(k if k.startswith("text_model.") else "text_model." + k): v.contiguous() for k, v in sd.items()}
    save_file(out, path, metadata={"format": "pt"})


def main(out_dir: str, seed: int = 0) -> None:
    unet_dir = os.path.join(out_dir, "unet")
    te_dir = os.path.join(out_dir, "text_encoder")

    if _done(unet_dir, "diffusion_pytorch_model.safetensors"):
        print(f"{unet_dir}: present, skipped")
    else:
        from diffusers import UNet2DConditionModel

        t0 = time.perf_counter()
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_KWARGS)
        unet.save_pretrained(unet_dir, safe_serialization=True, max_shard_size="100GB")
        n = sum(p.numel() for p in unet.parameters())
        del unet
        print(f"{unet_dir}: {n} params, {time.perf_counter() - t0:.1f}s")

    if _done(te_dir, "model.safetensors"):
        print(f"{te_dir}: present, skipped")
    else:
        from transformers import CLIPTextConfig, CLIPTextModel

        t0 = time.perf_counter()
        torch.manual_seed(seed)
        te = CLIPTextModel(CLIPTextConfig(**TEXT_KWARGS))
        te.save_pretrained(te_dir, safe_serialization=True, max_shard_size="100GB")
        n = sum(p.numel() for p in te.parameters())
        del te
        add_text_model_prefix(te_dir)
        print(f"{te_dir}: {n} params, {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
