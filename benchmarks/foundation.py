"""Foundation benchmark: SVD, loading and unfused-forward costs of spectral shifts vs their anchors, in one run.

On SD1.5-sized random-weight models (CPU), side by side:
- cold injection including the SVD (ours, default disk cache being filled) vs a loop of `torch.linalg.svd` with wide
  matrices transposed (the CPU floor), a plain `torch.linalg.svd` loop, and svdiff-pytorch (its own venv);
- a cached load (file → adapter ready) vs `load_lora_adapter` of an all-layer rank-4 LoRA;
- building the effective weights vs a bare loop of U·diag(σ)·Vᵀ products;
- unfused forward with shifts active vs the base model, a rank-4 LoRA, and svdiff-pytorch;
- memory of the kept factors vs svdiff-pytorch's float32 U, S, Vh.

    .venv/bin/python benchmarks/make_sd15_random.py .bench/sd15-random 0
    bash benchmarks/anchors/setup_svdiff_pytorch_env.sh          # optional: the svdiff-pytorch anchor
    .venv/bin/python benchmarks/foundation.py --models .bench/sd15-random --anchor-venv /work/venvs/svdiff-ref

Writes benchmarks/results/foundation.json and benchmarks/results/foundation.md (the table in docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import lora_state_dict, median_time, randomize_shifts, timed

import svdiff_adapter as sa
from svdiff_adapter.spectral import weight_matrix
from svdiff_adapter.svd import SVDCache
from svdiff_adapter.tuner import resolve_targets, spectral_layers


HERE = Path(__file__).resolve().parent
# The module set svdiff-pytorch shifts: Linear, Conv2d, norms (one scalar each), embeddings (text encoder).
UNET_CONFIG = dict(target_kinds=["linear", "conv2d", "norm"], norm_mode="scalar")
TEXT_CONFIG = dict(target_kinds=["linear", "embedding", "norm"], norm_mode="scalar")


def svd_loop(matrices, transpose_wide):
    for matrix in matrices:
        work = matrix.T if transpose_wide and matrix.shape[0] < matrix.shape[1] else matrix
        torch.linalg.svd(work, full_matrices=False)


def kept_factor_bytes(model):
    return sum(
        b.numel() * b.element_size() for _, layer in spectral_layers(model)
        for b in (layer.spectral_U, layer.spectral_S, layer.spectral_Vh) if b is not None
    )


def fp32_factor_bytes(matrices):
    return sum(4 * (m.shape[0] * min(m.shape) + min(m.shape) + min(m.shape) * m.shape[1]) for m in matrices)


def bench_unet(folder, repeats, skip_plain, work):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder).eval()
    config = sa.SpectralShiftConfig(**UNET_CONFIG)
    names = resolve_targets(unet, config)
    matrices = [weight_matrix(module.weight).detach() for module in names.values()]
    linear_conv = [n for n, m in names.items() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    row = {"modules": len(names)}

    row["svd_floor_s"], _ = timed(lambda: svd_loop(matrices, transpose_wide=True))
    if not skip_plain:
        row["svd_plain_s"], _ = timed(lambda: svd_loop(matrices, transpose_wide=False))
    cache = SVDCache(work / "svd-cache")
    row["inject_cold_s"], _ = timed(lambda: sa.add_spectral_shift(unet, config, "shift", svd_cache=cache))
    row["factor_bytes"] = kept_factor_bytes(unet)
    row["fp32_usv_bytes"] = fp32_factor_bytes(matrices)
    randomize_shifts(unet, "shift")
    shift_path = work / "shift.safetensors"
    sa.save_spectral_shift(shift_path, {"unet": unet}, "shift")
    row["file_bytes"] = shift_path.stat().st_size

    size, channels = unet.config.sample_size, unet.config.in_channels
    sample = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))

    def forward():
        with torch.no_grad():
            return unet(sample, 500, hidden).sample

    # Building the effective weights, vs the bare products with float32 factors prepared outside the timing.
    layers = [layer for _, layer in spectral_layers(unet) if layer.uses_factors]
    factors32 = [(l.spectral_U.float(), l.spectral_S, l.spectral_Vh.float()) for l in layers]

    def build():
        with torch.no_grad():
            for layer in layers:
                layer.reset_spectral_cache()
                layer.effective_weight()

    def bare():
        with torch.no_grad():
            for U, S, Vh in factors32:
                (U * S) @ Vh

    row["build_effective_s"] = median_time(build, repeats)
    row["bare_products_s"] = median_time(bare, repeats)
    factors32.clear()  # 4 GB that neither forward below should carry
    # Shifted and base forwards alternate (unload, reload from the SVD cache), each timed after one untimed call in its
    # state, so that slow drifts of the machine fall on both sides alike.
    shifted, base = [], []
    for index in range(repeats):
        shifted.append(median_time(forward, 1))
        sa.unload_spectral_shift(unet)
        base.append(median_time(forward, 1))
        if index < repeats - 1:
            sa.load_spectral_shift({"unet": unet}, shift_path, "shift", svd_cache=cache, progress=False)
    row["forward_shift_s"], row["forward_base_s"] = statistics.median(shifted), statistics.median(base)

    row["load_cached_s"] = median_load_time(
        lambda: sa.load_spectral_shift({"unet": unet}, shift_path, "cached", svd_cache=cache),
        lambda: sa.unload_spectral_shift(unet), repeats)
    lora_state = lora_state_dict(unet, linear_conv, "unet")
    lora_path = work / "pytorch_lora_weights.safetensors"
    from safetensors.torch import save_file

    save_file(lora_state, str(lora_path))
    row["load_lora_s"] = median_load_time(
        lambda: unet.load_lora_adapter(str(lora_path), prefix="unet", adapter_name="lora4"),
        lambda: unet.delete_adapters("lora4"), repeats)
    unet.load_lora_adapter(str(lora_path), prefix="unet", adapter_name="lora4")
    row["forward_lora_s"] = median_time(forward, repeats)
    return row


def median_load_time(load, unload, repeats):
    """Median seconds of `repeats` loads, each undone (untimed) before the next; the files stay in the page cache
    after the first, as they do for a user who loads an adapter again."""
    times = []
    for _ in range(repeats):
        times.append(timed(load)[0])
        unload()
    return statistics.median(times)


def bench_text_encoder(folder, repeats, work):
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(folder).eval()
    config = sa.SpectralShiftConfig(**TEXT_CONFIG)
    names = resolve_targets(text_encoder, config)
    matrices = [weight_matrix(module.weight).detach() for module in names.values()]
    row = {"modules": len(names)}
    row["svd_floor_s"], _ = timed(lambda: svd_loop(matrices, transpose_wide=True))
    cache = SVDCache(work / "svd-cache")
    row["inject_cold_s"], _ = timed(lambda: sa.add_spectral_shift(text_encoder, config, "shift", svd_cache=cache))
    row["factor_bytes"] = kept_factor_bytes(text_encoder)
    row["fp32_usv_bytes"] = fp32_factor_bytes(matrices)
    randomize_shifts(text_encoder, "shift")
    ids = torch.randint(0, text_encoder.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(3))

    def forward():
        with torch.no_grad():
            return text_encoder(ids).last_hidden_state

    row["forward_shift_s"] = median_time(forward, repeats * 10)
    path = work / "shift_te.safetensors"
    sa.save_spectral_shift(path, {"text_encoder": text_encoder}, "shift")
    sa.unload_spectral_shift(text_encoder)
    row["forward_base_s"] = median_time(forward, repeats * 10)
    row["load_cached_s"] = median_load_time(
        lambda: sa.load_spectral_shift({"text_encoder": text_encoder}, path, "cached", svd_cache=cache),
        lambda: sa.unload_spectral_shift(text_encoder), repeats)
    return row


def run_anchor(venv, models, repeats, threads):
    python = Path(venv) / "bin" / "python"
    if not python.exists():
        return None
    command = [str(python), str(HERE / "anchors" / "svdiff_pytorch_anchor.py"), "--unet", str(models / "unet"),
               "--text-encoder", str(models / "text_encoder"), "--repeats", str(repeats), "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(result.stdout)


def ratio(numerator, denominator):
    return None if numerator is None or not denominator else round(numerator / denominator, 3)


def markdown(results):
    unet, text, anchor = results["unet"], results["text_encoder"], results.get("svdiff_pytorch") or {}
    anchor_unet, anchor_text = anchor.get("unet", {}), anchor.get("text_encoder", {})
    a_fwd = lambda row: (row.get("forward") or {})  # noqa: E731
    lines = [
        f"Machine: {results['machine']}; torch threads: {results['threads']}; command: `{results['command']}`",
        "",
        results.get("anchor_source", "svdiff-pytorch numbers from the same run"),
        "",
        "| measure | ours | anchor | ratio (ours / anchor) | target |",
        "|---|---|---|---|---|",
        f"| UNet cold injection incl. SVD vs SVD loop, wide transposed (floor) | {unet['inject_cold_s']:.1f} s | "
        f"{unet['svd_floor_s']:.1f} s | {ratio(unet['inject_cold_s'], unet['svd_floor_s'])} | ≤ 1.0 |",
    ]
    if "svd_plain_s" in unet:
        lines.append(f"| UNet cold injection vs plain `torch.linalg.svd` loop | {unet['inject_cold_s']:.1f} s | "
                     f"{unet['svd_plain_s']:.1f} s | {ratio(unet['inject_cold_s'], unet['svd_plain_s'])} | |")
    if anchor_unet:
        lines.append(f"| UNet cold injection vs svdiff-pytorch load + SVD | {unet['inject_cold_s']:.1f} s | "
                     f"{anchor_unet['load_plus_svd_s']:.1f} s | "
                     f"{ratio(unet['inject_cold_s'], anchor_unet['load_plus_svd_s'])} | |")
    lines += [
        f"| Text encoder cold injection vs floor | {text['inject_cold_s']:.1f} s | {text['svd_floor_s']:.1f} s | "
        f"{ratio(text['inject_cold_s'], text['svd_floor_s'])} | ≤ 1.0 |",
    ]
    if anchor_text:
        lines.append(f"| Text encoder cold injection vs svdiff-pytorch load + SVD | {text['inject_cold_s']:.1f} s | "
                     f"{anchor_text['load_plus_svd_s']:.1f} s | "
                     f"{ratio(text['inject_cold_s'], anchor_text['load_plus_svd_s'])} | |")
    lines += [
        f"| UNet cached load (file → ready) vs `load_lora_adapter` rank 4 | {unet['load_cached_s']:.2f} s | "
        f"{unet['load_lora_s']:.2f} s | {ratio(unet['load_cached_s'], unet['load_lora_s'])} | ≤ 2.0 |",
        f"| UNet build effective weights vs bare U·diag·Vᵀ loop | {unet['build_effective_s']:.2f} s | "
        f"{unet['bare_products_s']:.2f} s | {ratio(unet['build_effective_s'], unet['bare_products_s'])} | ≤ 1.2 |",
        f"| UNet unfused forward, shifts active vs base | {unet['forward_shift_s']:.2f} s | "
        f"{unet['forward_base_s']:.2f} s | {ratio(unet['forward_shift_s'], unet['forward_base_s'])} | ≤ 1.05 |",
        f"| UNet unfused forward, rank-4 LoRA (all layers) vs base | {unet['forward_lora_s']:.2f} s | "
        f"{unet['forward_base_s']:.2f} s | {ratio(unet['forward_lora_s'], unet['forward_base_s'])} | (1.11 measured before) |",
        f"| Text encoder unfused forward, shifts active vs base | {text['forward_shift_s']:.3f} s | "
        f"{text['forward_base_s']:.3f} s | {ratio(text['forward_shift_s'], text['forward_base_s'])} | ≤ 1.05 |",
    ]
    if a_fwd(anchor_unet):
        lines.append(f"| svdiff-pytorch UNet forward, shifts vs its base | {a_fwd(anchor_unet)['shifted_s']:.2f} s | "
                     f"{a_fwd(anchor_unet)['base_s']:.2f} s | "
                     f"{ratio(a_fwd(anchor_unet)['shifted_s'], a_fwd(anchor_unet)['base_s'])} | (2.9 measured before) |")
    if a_fwd(anchor_text):
        lines.append(f"| svdiff-pytorch text encoder forward, shifts vs its base | "
                     f"{a_fwd(anchor_text)['shifted_s']:.3f} s | {a_fwd(anchor_text)['base_s']:.3f} s | "
                     f"{ratio(a_fwd(anchor_text)['shifted_s'], a_fwd(anchor_text)['base_s'])} | (12.9 before) |")
    for name, row, anchor_row in (("UNet", unet, anchor_unet), ("Text encoder", text, anchor_text)):
        reference = anchor_row.get("usv_bytes") or row["fp32_usv_bytes"]
        source = "svdiff-pytorch, measured" if anchor_row.get("usv_bytes") else "fp32 U,S,Vh from shapes"
        lines.append(f"| {name} kept factors vs {source} | {row['factor_bytes'] / 2**20:.0f} MiB | "
                     f"{reference / 2**20:.0f} MiB | {ratio(row['factor_bytes'], reference)} | ≤ 0.5 |")
    lines.append(f"| UNet shift file (fp32, with metadata) | {unet['file_bytes'] / 2**20:.2f} MiB | | | |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path(".bench/sd15-random"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--anchor-venv", default=os.environ.get("SVDIFF_REF_VENV", "/work/venvs/svdiff-ref"))
    parser.add_argument("--anchor-json", type=Path, help="reuse an anchor result instead of running it")
    parser.add_argument("--skip-plain", action="store_true", help="skip the slow non-transposed SVD loop")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.models / "unet").exists():
        subprocess.run([sys.executable, str(HERE / "make_sd15_random.py"), str(args.models), "0"], check=True)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": args.threads,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
    }
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        print("UNet ...", file=sys.stderr)
        results["unet"] = bench_unet(args.models / "unet", args.repeats, args.skip_plain, work)
        print("text encoder ...", file=sys.stderr)
        results["text_encoder"] = bench_text_encoder(args.models / "text_encoder", args.repeats, work)
    if args.anchor_json:
        results["svdiff_pytorch"] = json.loads(args.anchor_json.read_text())
        results["anchor_source"] = f"svdiff-pytorch numbers read from {args.anchor_json} (a separate run)"
    else:
        print("svdiff-pytorch anchor ...", file=sys.stderr)
        results["svdiff_pytorch"] = run_anchor(args.anchor_venv, args.models, 1, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "foundation.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "foundation.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
