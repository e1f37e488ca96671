"""Unfused UNet forward with spectral shifts vs the base model, for comparing two versions of the package.

    python benchmarks/forward_ab.py --src src --cache .bench/svd-ab          # this checkout
    python benchmarks/forward_ab.py --src /path/to/other/checkout/src ...    # another version, same models

Loads the SD1.5-sized random UNet (benchmarks/make_sd15_random.py), injects shifts on every Linear / Conv2d / norm
(random δ), and times base and shifted forwards (2×4×64×64) alternately, after one untimed call each. Prints one JSON
line: the medians and their ratio. Run the versions one after the other, twice, and compare ratios measured close in
time (the machine's own speed drifts between runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="the `src` folder of the version to measure")
    parser.add_argument("--models", type=Path, default=Path(".bench/sd15-random"))
    parser.add_argument("--cache", type=Path, required=True, help="SVD cache folder (reused across runs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(args.src.resolve()))
    import torch
    from diffusers import UNet2DConditionModel

    import svdiff_adapter as sa
    from svdiff_adapter.tuner import spectral_layers

    torch.set_num_threads(args.threads)
    unet = UNet2DConditionModel.from_pretrained(args.models / "unet").eval()
    config = sa.SpectralShiftConfig(target_kinds=["linear", "conv2d", "norm"], norm_mode="scalar")
    sa.add_spectral_shift(unet, config, "shift", svd_cache=str(args.cache))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in spectral_layers(unet):
            base = float(layer.spectral_S.mean()) if layer.uses_factors else 1.0
            layer.spectral_delta["shift"].copy_(torch.randn(layer.shift_size, generator=generator) * 0.02 * base)
    sample = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))

    def forward_seconds() -> float:
        with torch.no_grad():
            unet(sample, 500, hidden)  # untimed: builds the effective weights
            start = time.perf_counter()
            unet(sample, 500, hidden)
            return time.perf_counter() - start

    shifted, base = [], []
    for _ in range(args.repeats):
        shifted.append(forward_seconds())
        unet.disable_adapters()
        base.append(forward_seconds())
        unet.enable_adapters()
    result = {"src": str(args.src), "shifted_s": statistics.median(shifted), "base_s": statistics.median(base)}
    result["ratio"] = result["shifted_s"] / result["base_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
