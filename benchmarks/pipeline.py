"""Pipeline benchmark: spectral shifts vs a rank-4 LoRA on an SD1.5-sized random-weight pipeline (CPU), one run.

Measures `pipe.load_spectral_shift` (cold SVD and warm SVD cache) vs `pipe.load_lora_weights` (rank 4, same UNet and
text-encoder modules); the `set_adapters` switch (including rebuilding the effective weights, which a shift needs and
a LoRA does not), also with `enable_spectral_switch_cache()` and the memory that costs; fuse / unfuse; the unfused
UNet forward vs the base and vs the LoRA; and the time to a first image (load + 25 guided DDIM steps) vs the same with
the LoRA, also with bfloat16 weight builds (`set_spectral_shift_build_dtype`).

To fit a 2-core CPU: images are 256×256 (32×32 latents) by default and the pipeline stops at the latents
(`output_type="latent"`, no VAE decode; the VAE is a tiny stand-in). Both leave the comparison stricter, not looser:
the shared work is smaller. `--resolution 512 --first-image-only` measures only the time to first image at SD1.5's
native size.

    .venv/bin/python benchmarks/make_sd15_random.py .bench/sd15-random 0
    .venv/bin/python benchmarks/pipeline.py --models .bench/sd15-random
    .venv/bin/python benchmarks/pipeline.py --models .bench/sd15-random --resolution 512 --first-image-only \
        --out benchmarks/results/pipeline-512

Writes benchmarks/results/pipeline.json and benchmarks/results/pipeline.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from common import lora_state_dict, median_time, randomize_shifts, timed
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

import svdiff_adapter as sa
from svdiff_adapter.svd import SVDCache
from svdiff_adapter.tuner import resolve_targets, spectral_layers


HERE = Path(__file__).resolve().parent
PROMPT = "a photo of a sks dog"


def pipeline(models: Path):
    unet = UNet2DConditionModel.from_pretrained(models / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(models / "text_encoder").eval()
    # A stand-in VAE with SD's 8× latent scale; unused with output_type="latent".
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4)
    vocab = {"<|startoftext|>": 0, "<pad>": 1, "<|endoftext|>": 2}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pipe = sa.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, set_alpha_to_one=False, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_files(pipe, work: Path, cache: SVDCache):
    """Two random shifts (UNet + text encoder) and a rank-4 LoRA on the same modules, as files."""
    configs = {"unet": sa.SpectralShiftConfig(), "text_encoder": sa.SpectralShiftConfig(target_kinds=["linear"])}
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    paths = {}
    for index, name in enumerate(("a", "b")):
        for component, model in models.items():
            sa.add_spectral_shift(model, configs[component], name, svd_cache=cache, progress=False)
            randomize_shifts(model, name, seed=index)
        paths[name] = work / f"{name}.safetensors"
        sa.save_spectral_shift(paths[name], models, name)
    for model in models.values():
        sa.unload_spectral_shift(model)
    lora = {}
    for component, model in models.items():
        lora.update(lora_state_dict(model, resolve_targets(model, configs[component]), component))
    paths["lora"] = work / "pytorch_lora_weights.safetensors"
    save_file(lora, str(paths["lora"]))
    return paths


def unet_forward(pipe, repeats):
    sample = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))

    def run():
        with torch.no_grad():
            pipe.unet(sample, 500, hidden)

    return median_time(run, repeats)


def first_image(pipe, load, resolution):
    def run():
        load()
        pipe(PROMPT, num_inference_steps=25, guidance_scale=7.5, height=resolution, width=resolution,
             output_type="latent", generator=torch.Generator().manual_seed(0))

    return timed(run)[0]


def first_image_rows(pipe, paths, cold, work, resolution) -> dict:
    """Load + 25 guided steps: a rank-4 LoRA; a shift with a warm SVD cache, float32 and bfloat16 builds; cold."""
    row = {"first_image_lora_s": first_image(
        pipe, lambda: pipe.load_lora_weights(str(paths["lora"]), adapter_name="first"), resolution)}
    pipe.unload_lora_weights()
    row["first_image_shift_cached_s"] = first_image(
        pipe, lambda: pipe.load_spectral_shift(paths["a"], "first", svd_cache=cold), resolution)
    pipe.unload_spectral_shift()

    def load_bfloat16_build():
        pipe.load_spectral_shift(paths["a"], "first", svd_cache=cold)
        pipe.set_spectral_shift_build_dtype(torch.bfloat16)

    row["first_image_shift_cached_bf16_s"] = first_image(pipe, load_bfloat16_build, resolution)
    pipe.unload_spectral_shift()
    fresh = SVDCache(work / f"fresh-cache-{resolution}")
    row["first_image_shift_cold_s"] = first_image(
        pipe, lambda: pipe.load_spectral_shift(paths["a"], "first", svd_cache=fresh), resolution)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path(".bench/sd15-random"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--resolution", type=int, default=256, help="image side for the time to first image")
    parser.add_argument("--first-image-only", action="store_true", help="measure only the time to first image")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    row = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": args.threads,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
    }
    pipe = pipeline(args.models)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        files_cache = SVDCache(work / "files-cache")
        paths = make_files(pipe, work, files_cache)
        row["shift_file_bytes"] = paths["a"].stat().st_size
        row["lora_file_bytes"] = paths["lora"].stat().st_size
        row["resolution"] = args.resolution
        if args.first_image_only:  # making the files filled `files_cache`: it is the warm cache here
            row.update(first_image_rows(pipe, paths, files_cache, work, args.resolution))
            return write_results(args.out, row)

        row["forward_base_s"] = unet_forward(pipe, args.repeats)
        cold = SVDCache(work / "cold-cache")
        row["load_shift_cold_s"], _ = timed(lambda: pipe.load_spectral_shift(paths["a"], "a", svd_cache=cold))
        pipe.unload_spectral_shift()
        row["load_shift_cached_s"], _ = timed(lambda: pipe.load_spectral_shift(paths["a"], "a", svd_cache=cold))
        row["load_second_shift_s"], _ = timed(lambda: pipe.load_spectral_shift(paths["b"], "b", svd_cache=cold))
        pipe.set_adapters(["a"])
        row["forward_shift_s"] = unet_forward(pipe, args.repeats)

        layers = [layer for model in (pipe.unet, pipe.text_encoder) for _, layer in spectral_layers(model)]

        def switch(weights):
            pipe.set_adapters(["a", "b"], weights=weights)
            with torch.no_grad():  # what the next (no-grad) pipeline call would do lazily
                for layer in layers:
                    layer.effective_weight() if layer._spectral_active() else None

        switch([0.5, 0.5])
        row["switch_shift_s"] = statistics.median(timed(lambda w=w: switch(w))[0] for w in ([0.3, 0.7], [0.7, 0.3],
                                                                                            [0.4, 0.6]))
        # With the switch cache: the first switch builds U·diag(δᵢ)·Vᵀ per adapter, later ones are linear.
        pipe.enable_spectral_switch_cache()
        row["switch_cache_first_s"], _ = timed(lambda: switch([0.5, 0.5]))
        row["switch_cached_s"] = statistics.median(timed(lambda w=w: switch(w))[0] for w in ([0.3, 0.7], [0.7, 0.3],
                                                                                             [0.4, 0.6]))
        row["switch_cache_bytes"] = sum(matrix.numel() * matrix.element_size() for layer in layers
                                        for _, matrix in layer._spectral_adapter_deltas.values())
        pipe.disable_spectral_switch_cache()
        row["fuse_s"], _ = timed(lambda: pipe.fuse_spectral_shift())
        row["unfuse_s"], _ = timed(lambda: pipe.unfuse_spectral_shift())
        pipe.unload_spectral_shift()

        row["load_lora_s"], _ = timed(lambda: pipe.load_lora_weights(str(paths["lora"]), adapter_name="lora"))
        row["forward_lora_s"] = unet_forward(pipe, args.repeats)
        pipe.load_lora_weights(str(paths["lora"]), adapter_name="lora2")
        row["switch_lora_s"] = statistics.median(
            timed(lambda w=w: pipe.set_adapters(["lora", "lora2"], adapter_weights=w))[0]
            for w in ([0.3, 0.7], [0.7, 0.3], [0.4, 0.6])
        )
        pipe.unload_lora_weights()

        row.update(first_image_rows(pipe, paths, cold, work, args.resolution))
        row["inference_weight_bytes"] = sum(
            layer.spectral_weight.numel() * layer.spectral_weight.element_size()
            for model in (pipe.unet, pipe.text_encoder) for _, layer in spectral_layers(model)
            if layer.spectral_weight is not None
        )
    write_results(args.out, row)


def write_results(out: Path, row: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(row, indent=2))
    table = markdown(row)
    (out / "pipeline.md").write_text(table)
    print(table)


def first_image_lines(row, r):
    side = row.get("resolution", 256)
    return [
        f"| time to first image ({side}×{side}), warm SVD cache (load + 25 guided steps) | "
        f"{row['first_image_shift_cached_s']:.1f} s | {row['first_image_lora_s']:.1f} s | "
        f"{r('first_image_shift_cached_s', 'first_image_lora_s')} | ≤ 1.10 |",
        f"| — the same with bfloat16 weight builds (`set_spectral_shift_build_dtype`) | "
        f"{row['first_image_shift_cached_bf16_s']:.1f} s | {row['first_image_lora_s']:.1f} s | "
        f"{r('first_image_shift_cached_bf16_s', 'first_image_lora_s')} | ≤ 1.10 |",
        f"| time to first image ({side}×{side}), cold SVD cache | {row['first_image_shift_cold_s']:.1f} s | "
        f"{row['first_image_lora_s']:.1f} s | {r('first_image_shift_cold_s', 'first_image_lora_s')} | ≤ 1.35 |",
    ]


def markdown(row):
    r = lambda a, b: f"{row[a] / row[b]:.3f}"  # noqa: E731
    lines = [
        f"Machine: {row['machine']}; torch threads: {row['threads']}; command: `{row['command']}`",
        "",
        "| measure | spectral shift | LoRA rank 4 / base | ratio | target |",
        "|---|---|---|---|---|",
    ]
    if "load_shift_cold_s" not in row:  # --first-image-only
        return "\n".join(lines + first_image_lines(row, r)) + "\n"
    lines += [
        f"| load, cold SVD cache | {row['load_shift_cold_s']:.2f} s | {row['load_lora_s']:.2f} s | "
        f"{r('load_shift_cold_s', 'load_lora_s')} | |",
        f"| load, warm SVD cache | {row['load_shift_cached_s']:.2f} s | {row['load_lora_s']:.2f} s | "
        f"{r('load_shift_cached_s', 'load_lora_s')} | |",
        f"| load a second adapter (factors already on the layers) | {row['load_second_shift_s']:.2f} s | "
        f"{row['load_lora_s']:.2f} s | {r('load_second_shift_s', 'load_lora_s')} | |",
        f"| `set_adapters` switch (incl. rebuilding effective weights) | {row['switch_shift_s'] * 1000:.0f} ms | "
        f"{row['switch_lora_s'] * 1000:.0f} ms | {r('switch_shift_s', 'switch_lora_s')} | as cheap as the maths allows |",
        f"| `set_adapters` switch with `enable_spectral_switch_cache()` (two adapters) | "
        f"{row['switch_cached_s'] * 1000:.0f} ms | {row['switch_lora_s'] * 1000:.0f} ms | "
        f"{r('switch_cached_s', 'switch_lora_s')} | as cheap as the maths allows |",
        f"| — its first switch (builds U·diag(δᵢ)·Vᵀ per adapter) / memory it holds | "
        f"{row['switch_cache_first_s']:.2f} s / {row['switch_cache_bytes'] / 2**20:.0f} MiB | | | |",
        f"| fuse / unfuse | {row['fuse_s']:.2f} s / {row['unfuse_s']:.2f} s | | | |",
        f"| unfused UNet forward (2×4×32×32) vs base | {row['forward_shift_s']:.2f} s | {row['forward_base_s']:.2f} s | "
        f"{r('forward_shift_s', 'forward_base_s')} | ≤ 1.05 |",
        f"| unfused UNet forward vs LoRA unfused | {row['forward_shift_s']:.2f} s | {row['forward_lora_s']:.2f} s | "
        f"{r('forward_shift_s', 'forward_lora_s')} | |",
        *first_image_lines(row, r),
        f"| file size (UNet + text encoder) | {row['shift_file_bytes'] / 2**20:.2f} MiB | "
        f"{row['lora_file_bytes'] / 2**20:.2f} MiB | {r('shift_file_bytes', 'lora_file_bytes')} | |",
        f"| memory of the inference weights (one copy of each shifted weight) | "
        f"{row['inference_weight_bytes'] / 2**20:.0f} MiB | 0 | | |",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
