#!/usr/bin/env bash
# One GPU run, about 10 minutes on one H100/H200-class GPU: SVD times (full and truncated, float32 on the device) for a
# Flux-shaped transformer, bf16 forwards with and without shifts (unfused, fused), load and build times, peak memory;
# then what each factor_location costs on the device, then one training step per method (training_dit.py). Results:
# benchmarks/results/gpu/ (dit.json, factor_location.json, training_dit.json and their .log files). `--cpu` runs the same steps on a 1/24-width model on the CPU
# (a smoke test of the script, tests/test_benchmarks.py; numbers meaningless).
#
# The GPU machine has torch but not diffusers: carry its wheel (pure Python) and this package's source:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1
#   then run: PYTHONPATH=src benchmarks/gpu.sh   (with .whl carried and installed to a --target folder first)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "${1:-}" = "--cpu" ]; then
    out=${OUT_DIR:-$(mktemp -d)}
    args=(--device cpu --smoke --threads 1 --repeats 1)
else
    out=${OUT_DIR:-benchmarks/results/gpu}
    args=(--device cuda --repeats 3 --tokens 4096 --text-tokens 512)
fi
mkdir -p "$out"
"$PYTHON" benchmarks/dit.py "${args[@]}" --out "$out" 2>&1 | tee "$out/dit.log"
# Where the factors live: device memory and rebuild time with the factors on the GPU, in CPU memory, mapped from disk.
if [ "${1:-}" = "--cpu" ]; then
    fl_args=(--device cpu --smoke --threads 1 --repeats 1 --ranks 64)
else
    fl_args=(--device cuda --repeats 3 --ranks 64 --tokens 4096 --text-tokens 512)
fi
"$PYTHON" benchmarks/factor_location.py "${fl_args[@]}" --out "$out" 2>&1 | tee "$out/factor_location.log"
# One training step per method (full / truncated shift, LoRA r16, full fine-tuning) on the Flux-shaped model.
if [ "${1:-}" = "--cpu" ]; then
    td_args=(--device cpu --smoke --threads 1 --steps 1)
else
    td_args=(--device cuda --steps 3 --tokens 4096 --text-tokens 512)
fi
"$PYTHON" benchmarks/training_dit.py "${td_args[@]}" --out "$out" 2>&1 | tee "$out/training_dit.log"
echo "results in $out"
