"""Spectral shifts on a Flux-shaped transformer, diffusers' LoRA r16 on the same model, in one run.

    .venv/bin/python benchmarks/dit.py --out benchmarks/results/transformers          # CPU, ~15-25 min
    .venv/bin/python benchmarks/dit.py --smoke --out /tmp/transformers-smoke           # tiny, ~1 min

The model is FluxTransformer2DModel with Flux.1-dev's widths (hidden 3072 = 24 heads × 128, MLP 12288, joint
attention 4096, pooled 768, 64 latent channels) and `--double` double-stream + `--single` single-stream blocks
(Flux.1-dev has 19 + 38), random weights. Measured, in this order, in one process (memory in subprocesses):

- full-spectrum SVD: one `torch.linalg.svd` per distinct matrix shape (the real path, `svd.decompose`), times the
  number of matrices of that shape (labelled "extrapolated": a cold full-spectrum load of even one block is minutes
  here);
- truncated cold load (`spectral_rank` k, no SVD cache) of a shift on every Linear, from its file; cached load
  (warm SVD cache) vs `load_lora_adapter` of an r16 LoRA on the same Linears;
- the weight build, and unfused / fused forwards vs the base forward, alternating;
- peak memory (RSS on a CPU, `torch.cuda.max_memory_allocated` on a GPU) of base, shift unfused, shift fused, LoRA.

Totals for a whole Flux.1-dev are extrapolated from per-block times and labelled so.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FLUX_DEV_BLOCKS = (19, 38)


def flux_shaped(double: int, single: int, smoke: bool):
    from diffusers import FluxTransformer2DModel

    if smoke:  # same structure, 1/24 of the width
        return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=double, num_single_layers=single,
                                      attention_head_dim=16, num_attention_heads=8, joint_attention_dim=64,
                                      pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                  pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def flux_inputs(model, tokens: int, text_tokens: int, device, dtype):
    config = model.config
    generator = torch.Generator().manual_seed(0)
    side = int(tokens ** 0.5)
    image_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(), indexing="ij"),
                            -1).reshape(-1, 3)
    return dict(
        hidden_states=torch.randn(1, side * side, config.in_channels, generator=generator).to(device, dtype),
        encoder_hidden_states=torch.randn(1, text_tokens, config.joint_attention_dim,
                                          generator=generator).to(device, dtype),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator).to(device, dtype),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=dtype),
        img_ids=image_ids.to(device), txt_ids=torch.zeros(text_tokens, 3, device=device),
        return_dict=False,
    )


def linear_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, device):
    gc.collect()
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def block_of(name: str) -> str:
    parts = name.split(".")
    return "double" if parts[0] == "transformer_blocks" else "single" if parts[0] == "single_transformer_blocks" \
        else "outside"


def full_svd_times(model, device):
    """Seconds of one full SVD per distinct shape, and the matrix count per (shape, block kind)."""
    from svdiff_adapter.svd import decompose

    shapes = {}
    counts = Counter()
    for name in linear_names(model):
        weight = model.get_submodule(name).weight
        shape = tuple(weight.shape)
        counts[(shape, block_of(name))] += 1
        if shape not in shapes:
            matrix = weight.detach().to(device, torch.float32)
            shapes[shape] = timed(lambda: decompose(matrix), device)[0]
            print(f"full SVD {shape}: {shapes[shape]:.2f} s", file=sys.stderr, flush=True)
    return shapes, counts


def make_shift_file(model, rank, folder: Path) -> Path:
    assert not any(name.endswith("base_layer") for name in linear_names(model)), "the model holds adapter wrappers"
    """A file with random δ (2 % of the mean σ) on every Linear, truncated to `rank` (None: full spectrum)."""
    import svdiff_adapter as sa
    from common import randomize_shifts

    maker = copy.deepcopy(model)
    config = sa.SpectralShiftConfig(target_modules=linear_names(model), spectral_rank=rank)
    sa.add_spectral_shift(maker, config, "bench", svd_cache=False)
    randomize_shifts(maker, "bench")
    path = folder / f"rank-{rank}" / "spectral_shift_weights.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    sa.save_spectral_shift(path, {"transformer": maker}, "bench")
    return path


def measure_loads(model, path, lora, repeats, device, cache_dir):
    import svdiff_adapter as sa

    results = {}
    cold = []
    for _ in range(repeats):
        seconds, _ = timed(lambda: sa.load_spectral_shift_adapter({"transformer": model}, path, "bench",
                                                                  svd_cache=False), device)
        cold.append(seconds)
        sa.unload_spectral_shift(model)
    results["cold_load_s"] = statistics.median(cold)
    sa.load_spectral_shift_adapter({"transformer": model}, path, "bench", svd_cache=cache_dir)  # fill the cache
    sa.unload_spectral_shift(model)
    cached, lora_times = [], []
    for _ in range(repeats):  # alternate ours and the LoRA
        seconds, _ = timed(lambda: sa.load_spectral_shift_adapter({"transformer": model}, path, "bench",
                                                                  svd_cache=cache_dir), device)
        cached.append(seconds)
        sa.unload_spectral_shift(model)
        seconds, _ = timed(lambda: model.load_lora_adapter(lora, adapter_name="lora", prefix="transformer"), device)
        lora_times.append(seconds)
        model.unload_lora()  # the wrappers too: later base forwards must run the plain model
    results["cached_load_s"] = statistics.median(cached)
    results["lora_load_s"] = statistics.median(lora_times)
    return results


def measure_forwards(model, path, lora, inputs, repeats, device):
    """Median forward seconds: base, shift unfused, shift fused, LoRA r16 unfused — alternating, warm-up first."""
    import svdiff_adapter as sa
    from svdiff_adapter.tuner import spectral_layers

    def forward():
        with torch.no_grad():
            return model(**inputs)

    times = {"base": [], "unfused": [], "fused": [], "lora": []}
    sa.load_spectral_shift_adapter({"transformer": model}, path, "bench", svd_cache=False)
    layers = [layer for _, layer in spectral_layers(model)]
    build, _ = timed(lambda: [layer.refresh_spectral_weight() for layer in layers], device)
    sa.unload_spectral_shift(model)
    for _ in range(repeats):
        forward()
        times["base"].append(timed(forward, device)[0])
        sa.load_spectral_shift_adapter({"transformer": model}, path, "bench", svd_cache=False)
        forward()
        times["unfused"].append(timed(forward, device)[0])
        for layer in layers_of(model):
            layer.merge()
        times["fused"].append(timed(forward, device)[0])
        sa.unload_spectral_shift(model)
        model.load_lora_adapter(lora, adapter_name="lora", prefix="transformer")
        forward()
        times["lora"].append(timed(forward, device)[0])
        model.unload_lora()  # the wrappers too: later base forwards must run the plain model
    result = {f"{key}_forward_s": statistics.median(value) for key, value in times.items()}
    result["build_s"] = build
    return result


MEMORY_MODES = ("base", "unfused", "fused", "fused-offloaded", "lora")


def measure_memory_child(args, device, dtype) -> dict:
    """One mode in this (fresh) process: peak memory of a forward after the model is ready, and of getting ready."""
    import ctypes

    import svdiff_adapter as sa
    from procmem import reset_peak_rss, status_bytes

    import diffusers  # noqa: F401  (the imports belong to the baseline, not to the model)

    baseline = torch.cuda.memory_allocated() if device.type == "cuda" else status_bytes("VmRSS")
    torch.manual_seed(0)
    model = flux_shaped(args.double, args.single, args.smoke).to(device, dtype).eval()
    inputs = flux_inputs(model, args.tokens, args.text_tokens, device, dtype)
    mode = args.memory
    if mode in ("unfused", "fused", "fused-offloaded"):
        sa.load_spectral_shift_adapter({"transformer": model}, args.shift_file, "bench", svd_cache=False)
        storage = None if mode != "fused-offloaded" else ("cpu" if device.type == "cuda" else args.offload_dir)
        for layer in layers_of(model) if mode != "unfused" else []:
            layer.merge(original_storage=storage)
    elif mode == "lora":
        from common import lora_state_dict

        model.load_lora_adapter(lora_state_dict(model, linear_names(model), "transformer", 16), adapter_name="lora",
                                prefix="transformer")
    gc.collect()
    if device.type == "cuda":
        ready_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed originals back to the system before measuring
        ready_peak = status_bytes("VmHWM")
        reset_peak_rss()
    with torch.no_grad():
        model(**inputs)
    synchronize(device)
    forward_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else status_bytes("VmHWM")
    return {"mode": mode, "baseline_bytes": baseline, "ready_peak_bytes": ready_peak,
            "forward_peak_bytes": forward_peak}


def measure_memory(args, path: Path, work: Path) -> dict:
    """Each mode in its own process (peaks only grow within a process)."""
    results = {}
    for mode in MEMORY_MODES:
        command = [sys.executable, str(Path(__file__).resolve()), "--memory", mode, "--shift-file", str(path),
                   "--offload-dir", str(work / "originals"), "--device", args.device, "--threads", str(args.threads),
                   "--double", str(args.double), "--single", str(args.single), "--tokens", str(args.tokens),
                   "--text-tokens", str(args.text_tokens)] + (["--dtype", args.dtype] if args.dtype else []) + (
                   ["--smoke"] if args.smoke else [])
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
        print(json.dumps(results[mode]), file=sys.stderr, flush=True)
    return results


def layers_of(model):
    from svdiff_adapter.tuner import spectral_layers

    return [layer for _, layer in spectral_layers(model)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256, help="image tokens (a square), e.g. 256 = 256×256 px")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="model dtype (default float32 on a CPU, bfloat16 on a GPU)")
    parser.add_argument("--smoke", action="store_true", help="1/24 of the width: checks the script, not the numbers")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "dit")
    parser.add_argument("--memory", choices=MEMORY_MODES, help=argparse.SUPPRESS)  # one memory mode (child process)
    parser.add_argument("--shift-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--offload-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    if args.memory:
        print(json.dumps(measure_memory_child(args, device, dtype)))
        return
    torch.manual_seed(0)
    model = flux_shaped(args.double, args.single, args.smoke).to(device, dtype).eval()
    names = linear_names(model)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "linears": len(names),
               "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}
    shapes, counts = full_svd_times(model, device)
    per_kind = Counter()
    for (shape, kind), count in counts.items():
        per_kind[kind] += shapes[shape] * count
    results["full_svd_s"] = {kind: seconds for kind, seconds in per_kind.items()}
    results["full_svd_total_s"] = sum(per_kind.values())
    from common import lora_state_dict

    lora = lora_state_dict(model, names, "transformer", 16)
    with tempfile.TemporaryDirectory(prefix="svdiff-bench-") as work:
        inputs = flux_inputs(model, args.tokens, args.text_tokens, device, dtype)
        for rank in args.ranks:
            path = make_shift_file(model, rank, Path(work))
            row = measure_loads(model, path, lora, args.repeats, device, Path(work) / f"cache-{rank}")
            row.update(measure_forwards(model, path, lora, inputs, args.repeats, device))
            row["memory"] = measure_memory(args, path, Path(work))
            results[f"rank_{rank}"] = row
            print(json.dumps({f"rank_{rank}": row}), file=sys.stderr, flush=True)
    results["flux_dev_extrapolation"] = extrapolate(model, args, results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dit.json").write_text(json.dumps(results, indent=2))
    (args.out / "dit.md").write_text(markdown(results, " ".join(sys.argv)))
    print(markdown(results, " ".join(sys.argv)))


def extrapolate(model, args, results) -> dict:
    """Whole-model figures for Flux.1-dev (19 double + 38 single blocks) from this model's, by weight elements per
    block kind (SVD and load time grow with the matrices' elements at a fixed rank)."""
    elements = Counter()
    for name in linear_names(model):
        elements[block_of(name)] += model.get_submodule(name).weight.numel()
    double, single = FLUX_DEV_BLOCKS
    scale_up = (elements["outside"] + elements["double"] / args.double * double
                + elements["single"] / args.single * single) / sum(elements.values())
    full = results["full_svd_s"]
    return {
        "weight_elements_factor": scale_up,
        "full_svd_s": full.get("outside", 0) + full.get("double", 0) / args.double * double
        + full.get("single", 0) / args.single * single,
        **{f"rank_{rank}_cold_load_s": results[f"rank_{rank}"]["cold_load_s"] * scale_up for rank in args.ranks},
    }


def markdown(results, command: str) -> str:
    """The results table: every target of docs/performance.md's transformer section as a ratio from this run."""
    def ratio(a, b):
        return f"{a / b:.3f}" if b else "n/a"

    extra = results["flux_dev_extrapolation"]
    lines = [f"Command: `{command}`; torch {results['torch']}; {results['parameters'] / 1e6:.0f}M parameters, "
             f"{results['linears']} Linear layers.", "",
             "| measure | ours | anchor | ratio | target |", "|---|---|---|---|---|"]
    full = results["full_svd_total_s"]
    for key in [k for k in results if k.startswith("rank_")]:
        row, k = results[key], key.removeprefix("rank_")
        memory = row["memory"]

        def model_bytes(mode, field="forward_peak_bytes"):
            return memory[mode][field] - memory[mode]["baseline_bytes"]

        lines += [
            f"| k={k}: cold load (randomized SVD) vs full-spectrum SVD (per shape, extrapolated) | {row['cold_load_s']:.2f} s "
            f"| {full:.1f} s | {ratio(row['cold_load_s'], full)} | ≤ 0.05 |",
            f"| k={k}: cached load vs `load_lora_adapter` r16 | {row['cached_load_s']:.3f} s | {row['lora_load_s']:.3f} s "
            f"| {ratio(row['cached_load_s'], row['lora_load_s'])} | |",
            f"| k={k}: build of all effective weights | {row['build_s']:.3f} s | | | |",
            f"| k={k}: unfused forward vs base | {row['unfused_forward_s']:.3f} s | {row['base_forward_s']:.3f} s "
            f"| {ratio(row['unfused_forward_s'], row['base_forward_s'])} | ≤ 1.05 |",
            f"| k={k}: fused forward vs base | {row['fused_forward_s']:.3f} s | {row['base_forward_s']:.3f} s "
            f"| {ratio(row['fused_forward_s'], row['base_forward_s'])} | |",
            f"| k={k}: LoRA r16 unfused forward vs base | {row['lora_forward_s']:.3f} s | {row['base_forward_s']:.3f} s "
            f"| {ratio(row['lora_forward_s'], row['base_forward_s'])} | |",
        ]
        for mode in ("unfused", "fused", "fused-offloaded", "lora"):
            lines.append(f"| k={k}: peak memory of a forward, {mode} vs base (above the process baseline) "
                         f"| {model_bytes(mode) / 2**20:.0f} MiB | {model_bytes('base') / 2**20:.0f} MiB "
                         f"| {ratio(model_bytes(mode), model_bytes('base'))} | {'≤ 1.10' if mode == 'fused-offloaded' else ''} |")
        lines.append(f"| k={k}: cold load of a whole Flux.1-dev, extrapolated | "
                     f"{extra[f'rank_{k}_cold_load_s'] / 60:.1f} min | | | ≤ 10 min |")
    lines.append(f"| full-spectrum SVD of a whole Flux.1-dev, extrapolated | {extra['full_svd_s'] / 60:.1f} min | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
