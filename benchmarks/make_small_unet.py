"""Write a small randomly initialised UNet with SD1.5's layout, for quick checks of the benchmarks (no Hub access).

Runs in the project's venv::

    .venv/bin/python benchmarks/make_small_unet.py OUT_DIR [--width 32] [--sample-size 32] [--seed 0]

Writes ``OUT_DIR/unet``: a diffusers ``UNet2DConditionModel`` with SD1.5's block types, two layers per block,
8 attention heads and cross_attention_dim=768 (so the (B, 77, 768) encoder states of the full-size benchmarks fit),
but channels (W, 2W, 4W, 4W) instead of (320, 640, 1280, 1280) and ``sample_size`` (the latent side) as given.
Width 32 gives ~10M parameters (SD1.5: ~860M): every module kind and code path of the full-size model is there,
only the shapes are small. The folder is ``save_pretrained(..., safe_serialization=True)`` output, which the
svdiff-pytorch reference venv (diffusers 0.14) loads as well. An existing folder is left untouched (delete it to
regenerate).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--width", type=int, default=32, help="channels of the first block (SD1.5: 320)")
    parser.add_argument("--sample-size", type=int, default=32, help="latent side stored in the config (SD1.5: 64)")
    parser.add_argument("--cross-attention-dim", type=int, default=768)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.width % 32:
        parser.error("--width must be a multiple of 32 (GroupNorm with 32 groups)")

    unet_dir = os.path.join(args.out_dir, "unet")
    if os.path.exists(os.path.join(unet_dir, "config.json")) and os.path.exists(
            os.path.join(unet_dir, "diffusion_pytorch_model.safetensors")):
        print(f"{unet_dir}: present, skipped")
        return
    from diffusers import UNet2DConditionModel

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    width = args.width
    unet = UNet2DConditionModel(block_out_channels=(width, 2 * width, 4 * width, 4 * width),
                                cross_attention_dim=args.cross_attention_dim, attention_head_dim=8,
                                sample_size=args.sample_size)
    unet.save_pretrained(unet_dir, safe_serialization=True, max_shard_size="100GB")
    count = sum(p.numel() for p in unet.parameters())
    print(f"{unet_dir}: {count} params, {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
