"""What each `factor_location` costs on a Flux-shaped transformer, every location in one run.

    .venv/bin/python benchmarks/factor_location.py --heads 24 --ranks 64 --out benchmarks/results/factor_location/full-width
    .venv/bin/python benchmarks/factor_location.py --heads 6 --ranks 64 full --out benchmarks/results/factor_location/quarter-width
    .venv/bin/python benchmarks/factor_location.py --smoke --out /tmp/factor-location-smoke

The model is `FluxTransformer2DModel` with Flux.1-dev's structure (`--double` double- and `--single` single-stream
blocks, attention heads of 128, MLP 4× the hidden size) and `--heads` heads (24: Flux.1-dev's 3072 wide), random
float32 weights, a shift on every Linear. Each (rank, location) runs in its own process, with a fresh SVD cache:

- memory: process memory (RssAnon) and file-backed pages (RssFile) above the model's, after the load and after the
  first forward (which builds and caches every W_δ); the factors' bytes;
- times: the cold load (SVDs and, for "disk", the cache writes), the first forward (builds every W_δ), a forward after
  `set_adapters` to weight 0.5 (rebuilds every W_δ) and a steady forward, vs the base forward measured in the same
  process before the load.

On a CPU "device" and "cpu" are the same memory (the rows show the noise); the difference that a CPU can show is
"disk": the factors become clean file pages the kernel may drop and read again, instead of process memory. With
`--device cuda` (benchmarks/gpu.sh) the model is bfloat16 on the GPU and the table adds the device memory after the
load and the device peak from the first forward on: what "cpu" and "disk" keep off the accelerator, and what their
copy per rebuild costs in time.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LOCATIONS = ("device", "cpu", "disk")


def flux_of_width(heads: int, double: int, single: int, smoke: bool):
    from diffusers import FluxTransformer2DModel

    from dit import flux_shaped

    if smoke:
        return flux_shaped(double, single, smoke=True)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                                  attention_head_dim=128, num_attention_heads=heads, joint_attention_dim=4096,
                                  pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def memory_now(device: torch.device) -> dict:
    """Process memory and file-backed resident pages (/proc/self/status), and the accelerator's allocated memory,
    bytes."""
    from procmem import status_bytes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    on_device = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    return {"anon": status_bytes("RssAnon"), "file": status_bytes("RssFile"), "device": on_device}


def warm_up_code_pages() -> None:
    """Touch the SVD and cache code once (LAPACK, safetensors): their library pages are file-backed too, and would
    otherwise count as file pages of whichever location loads first."""
    from svdiff_adapter.svd import SVDCache, TruncatedSVD, compute_factors

    with tempfile.TemporaryDirectory(prefix="svdiff-warm-up-") as folder:
        matrix = torch.randn(96, 80)
        for truncation in (None, TruncatedSVD(8)):
            compute_factors({"warm": matrix}, cache=SVDCache(folder), progress=False, truncation=truncation,
                            factor_location="disk")


def forward_seconds(model, inputs) -> float:
    from dit import synchronize

    device = next(model.parameters()).device
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs)
    synchronize(device)
    return time.perf_counter() - start


def measure_child(args) -> dict:
    """One (rank, location) in this fresh process."""
    import svdiff_adapter as sa
    from svdiff_adapter.tuner import spectral_layers

    from dit import flux_inputs

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    model = flux_of_width(args.heads, args.double, args.single, args.smoke).eval().to(device, dtype)
    inputs = flux_inputs(model, args.tokens, args.text_tokens, device, dtype)
    base_forward = statistics.median(forward_seconds(model, inputs) for _ in range(args.repeats + 1))
    warm_up_code_pages()
    before = memory_now(device)
    start = time.perf_counter()
    sa.load_spectral_shift_adapter({"transformer": model}, args.shift_file, "bench", svd_cache=args.cache_dir,
                                   factor_location=args.location)
    load = time.perf_counter() - start
    loaded = memory_now(device)
    layers = [layer for _, layer in spectral_layers(model) if layer.uses_factors]
    assert all(layer.spectral_factor_location == args.location for layer in layers)
    factor_bytes = sum(t.numel() * t.element_size() for layer in layers
                       for t in (layer.spectral_U, layer.spectral_S, layer.spectral_Vh))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = forward_seconds(model, inputs)
    built = memory_now(device)
    model.set_adapters(["bench"], weights=[0.5])
    reweighted = forward_seconds(model, inputs)
    steady = statistics.median(forward_seconds(model, inputs) for _ in range(args.repeats))
    peak = torch.cuda.max_memory_allocated(device) - before["device"] if device.type == "cuda" else 0
    return {"device": str(device), "device_peak_bytes": peak,
        "rank": args.rank, "location": args.location, "factor_bytes": factor_bytes,
        "weight_bytes": sum(layer.base_layer.weight.numel() * layer.base_layer.weight.element_size()
                            for layer in layers),
        "load_s": load, "base_forward_s": base_forward, "first_forward_s": first, "reweighted_forward_s": reweighted,
        "steady_forward_s": steady,
        "after_load": {kind: loaded[kind] - before[kind] for kind in before},
        "after_first_forward": {kind: built[kind] - before[kind] for kind in before},
    }


def make_shift_file(args, rank, folder: Path) -> Path:
    from dit import make_shift_file as dit_shift_file

    torch.manual_seed(0)
    model = flux_of_width(args.heads, args.double, args.single, args.smoke).eval()
    return dit_shift_file(model, rank, folder)


def markdown(rows, command: str) -> str:
    mib = 2 ** 20
    on_device = any(row["device"] != "cpu" for row in rows)
    device_header = " device memory after load | device peak from first forward on |" if on_device else ""
    lines = [f"Command: `{command}`", "",
             "| rank | location | factors | factors / shifted weights | process memory after load | file pages after "
             "load | process memory after first forward |" + device_header + " cold load | first forward (builds "
             "W_δ) | forward after set_adapters | steady forward / base |",
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if on_device else "")]
    for row in rows:
        device_cells = (f" {row['after_load']['device'] / mib:.0f} MiB | {row['device_peak_bytes'] / mib:.0f} MiB |"
                        if on_device else "")
        lines.append(
            f"| {row['rank'] or 'full'} | {row['location']} | {row['factor_bytes'] / mib:.0f} MiB "
            f"| {row['factor_bytes'] / row['weight_bytes']:.3f} | {row['after_load']['anon'] / mib:.0f} MiB "
            f"| {row['after_load']['file'] / mib:.0f} MiB | {row['after_first_forward']['anon'] / mib:.0f} MiB "
            f"|{device_cells} {row['load_s']:.2f} s | {row['first_forward_s']:.2f} s "
            f"| {row['reweighted_forward_s']:.2f} s | {row['steady_forward_s'] / row['base_forward_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=24, help="attention heads of 128 (24: Flux.1-dev's width)")
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--ranks", nargs="+", default=["64"], help="spectral ranks; 'full' for the full spectrum")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (a bfloat16 model)")
    parser.add_argument("--smoke", action="store_true", help="1/24 of the width: checks the script, not the numbers")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "factor_location")
    parser.add_argument("--location", choices=LOCATIONS, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shift-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.location:
        print(json.dumps(measure_child(args)))
        return
    rows = []
    shared = ["--heads", str(args.heads), "--double", str(args.double), "--single", str(args.single),
              "--repeats", str(args.repeats), "--threads", str(args.threads), "--tokens", str(args.tokens),
              "--text-tokens", str(args.text_tokens), "--device", args.device] + (["--smoke"] if args.smoke else [])
    with tempfile.TemporaryDirectory(prefix="svdiff-factor-location-") as work:
        for rank in [None if r == "full" else int(r) for r in args.ranks]:
            path = make_shift_file(args, rank, Path(work))
            for location in LOCATIONS:
                command = [sys.executable, str(Path(__file__).resolve()), "--location", location, "--shift-file",
                           str(path), "--cache-dir", str(Path(work) / f"cache-{rank}-{location}")] + shared + (
                           ["--rank", str(rank)] if rank else [])
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(output.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "factor_location.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows, " ".join(sys.argv))
    (args.out / "factor_location.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
