"""Training-step benchmark on a Flux-shaped transformer: spectral shifts (full spectrum and truncated), LoRA r16 and
full fine-tuning, side by side in one run (step time and peak memory; docs/performance.md).

    .venv/bin/python benchmarks/training_dit.py --out benchmarks/results/training_dit     # CPU, full width
    .venv/bin/python benchmarks/training_dit.py --smoke --out /tmp/training-dit-smoke     # tiny, checks the script
    .venv/bin/python benchmarks/training.py --flux ...                                    # the same, from training.py

The model is benchmarks/dit.py's: FluxTransformer2DModel at Flux.1-dev's widths (hidden 3072, MLP 12288, joint
attention 4096) with `--double` double-stream and `--single` single-stream blocks, random weights, float32. The step,
the same for every method (inputs drawn before the timing)::

    x₀, ε ~ N(0, 1) over `--tokens` packed image tokens; σ ~ U(0, 1); text states ~ N(0, 1) over `--text-tokens`
    x_σ = (1 − σ)·x₀ + σ·ε;  loss = MSE(transformer(x_σ, σ, text, guidance 3.5), ε − x₀)
    loss.backward(); optimizer.step(); optimizer.zero_grad()

Methods, each in its own fresh process with the same thread count (AdamW with the trainer's betas / decay / eps):

- ``shift_full``: `add_spectral_shift` on every Linear and norm (the trainer's default kinds), full spectrum;
- ``shift_k<k>``: the same with `spectral_rank` k (`--rank`, default 64, the rank docs/pipelines.md recommends);
- ``lora_r16``: PEFT LoRA r16 on to_q, to_k, to_v, to_out.0 — the default targets of diffusers'
  train_dreambooth_lora_flux.py — via ``transformer.add_adapter``;
- ``full_ft``: AdamW over every parameter.

Per method: ``setup_s`` (model build + adapter with its SVD, no cache + optimizer), ``step_s`` (median of `--steps`
after `--warmup`), ``steps_peak_rss`` (the RSS high-water mark during the steps, reset after the setup) and
``peak_rss`` (the whole process, the SVD included). Targets: truncated step ≤ 1.3× LoRA r16's time and ≤ 1.2× its
peak memory; full-spectrum step ≤ 1.2× full fine-tuning's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from procmem import max_rss, reset_peak_rss, rss_now, time_steps  # noqa: E402

ADAPTER = "default"
LORA_LR, FULL_LR = 1e-4, 1e-5  # diffusers' Flux DreamBooth LoRA default / a full fine-tuning rate
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def methods_for(rank: int) -> tuple[str, ...]:
    return ("shift_full", f"shift_k{rank}", "lora_r16", "full_ft")


def labels_for(rank: int) -> dict[str, str]:
    return {"shift_full": "spectral shift, full spectrum", f"shift_k{rank}": f"spectral shift, k = {rank}",
            "lora_r16": "LoRA r16 (PEFT)", "full_ft": "full fine-tuning"}


# ------------------------------------------------------------------------------------------------------ the step
def step_inputs(model, count: int, tokens: int, text_tokens: int, seed: int, device) -> list[dict]:
    import torch

    from dit import flux_inputs

    generator = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(count):
        inputs = flux_inputs(model, tokens, text_tokens, device, torch.float32)
        clean = torch.randn(inputs["hidden_states"].shape, generator=generator).to(device)
        noise = torch.randn(inputs["hidden_states"].shape, generator=generator).to(device)
        sigma = torch.rand(1, generator=generator).to(device)
        inputs["hidden_states"] = (1 - sigma) * clean + sigma * noise
        inputs["timestep"] = sigma
        steps.append((inputs, noise - clean))
    return steps


def train_step(model, optimizer, step) -> float:
    import torch.nn.functional as F

    inputs, target = step
    prediction = model(**inputs)[0]
    loss = F.mse_loss(prediction.float(), target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


# ----------------------------------------------------------------------------------------------- method set-ups
def trainer_defaults():
    from svdiff_adapter.training import build_parser

    return build_parser().parse_args(["--pretrained_model_name_or_path", "unused"])


def setup(method: str, model, rank: int):
    import torch

    import svdiff_adapter as sa
    from svdiff_adapter.training import make_optimizer
    from svdiff_adapter.training.prepare import target_kinds

    defaults = trainer_defaults()
    adamw = dict(betas=(defaults.adam_beta1, defaults.adam_beta2), weight_decay=defaults.adam_weight_decay,
                 eps=defaults.adam_epsilon)
    if method.startswith("shift"):
        config = sa.SpectralShiftConfig(target_kinds=target_kinds(defaults.unet_target_kinds),
                                        norm_mode=defaults.norm_mode,
                                        spectral_rank=None if method == "shift_full" else rank)
        sa.add_spectral_shift(model, config, ADAPTER, svd_cache=False, progress=False)
        return make_optimizer({"transformer": model}, ADAPTER, defaults.learning_rate, defaults.learning_rate_1d,
                              **adamw)
    if method == "lora_r16":
        from peft import LoraConfig

        model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LORA_LR, **adamw)
    model.requires_grad_(True)
    return torch.optim.AdamW(list(model.parameters()), lr=FULL_LR, **adamw)


def worker(args) -> dict:
    import torch

    from dit import flux_shaped

    torch.set_num_threads(args.threads)
    row = {"method": args.worker, "loadavg_start": list(os.getloadavg()), "rss_at_start_bytes": rss_now()}
    start = time.perf_counter()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = flux_shaped(args.double, args.single, args.smoke).to(device)  # the SVDs then run on the device too
    model.requires_grad_(False)
    row["rss_after_load_bytes"] = rss_now()
    optimizer = setup(args.worker, model, args.rank)
    model.train()
    row["setup_s"] = time.perf_counter() - start
    row["rss_after_setup_bytes"] = rss_now()
    row["setup_peak_rss_bytes"] = max_rss()
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    row["trainable_params"] = sum(p.numel() for p in trainable)
    row["total_params"] = sum(p.numel() for p in model.parameters())
    watched = trainable[:3] + trainable[-3:]
    before = [p.detach().clone() for p in watched]
    steps = step_inputs(model, args.warmup + args.steps, args.tokens, args.text_tokens, args.seed, device)
    gc.collect()
    row["steps_peak_rss_reset"] = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The loss's .item() waits for the device, so the step times are complete.
    row.update(time_steps(lambda index: train_step(model, optimizer, steps[index]), args.warmup, args.steps,
                          args.worker, row))
    if device.type == "cuda":
        row["steps_peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    row["trainable_moved"] = any(not torch.equal(a, b.detach()) for a, b in zip(before, watched))
    row["loadavg_end"] = list(os.getloadavg())
    return row


# -------------------------------------------------------------------------------------------------- orchestration
def markdown(results) -> str:
    from training import mib, ratio, seconds

    rank = results["rank"]
    labels = labels_for(rank)
    # On a GPU the memory that matters is the device's: its peak during the steps replaces the host RSS.
    peak = "steps_peak_device_bytes" if results.get("device", "cpu").startswith("cuda") else "steps_peak_rss_bytes"
    rows = {m: r for m, r in results["methods"].items() if r and "error" not in r}
    lines = [f"Machine: {results['machine']}; torch threads: {results['threads']}; model: {results['model']}; "
             f"{results['tokens']} image tokens + {results['text_tokens']} text tokens, batch 1; {results['steps']} "
             f"timed steps after {results['warmup']} warm-up.", "", f"Command: `{results['command']}`", "",
             f"Load average (1 min) at start {results['loadavg_start'][0]}, at end {results['loadavg_end'][0]}.", "",
             "| method | trainable params | setup (build + adapter + optimizer) | step (median) | step CPU | "
             "RSS after setup | peak memory during steps | process peak RSS |", "|---|---|---|---|---|---|---|---|"]
    for method, row in results["methods"].items():
        if "error" in row:
            lines.append(f"| {labels[method]} | failed: {row['error']} | | | | | | |")
            continue
        lines.append(f"| {labels[method]} | {row['trainable_params']:,} | {seconds(row['setup_s'])} | "
                     f"{seconds(row['step_s'])} | {seconds(row['step_cpu_s'])} | {mib(row['rss_after_setup_bytes'])} | "
                     f"{mib(row.get(peak))} | {mib(row['peak_rss_bytes'])} |")
    lines += ["", "| measure | ratio | target | met? |", "|---|---|---|---|"]
    for label, method, anchor, key, target in (
            (f"k = {rank} step / LoRA r16 step", f"shift_k{rank}", "lora_r16", "step_s", 1.3),
            (f"k = {rank} peak memory during steps / LoRA r16's", f"shift_k{rank}", "lora_r16", peak, 1.2),
            (f"k = {rank} process peak RSS / LoRA r16's", f"shift_k{rank}", "lora_r16", "peak_rss_bytes", None),
            ("full-spectrum step / full fine-tuning step", "shift_full", "full_ft", "step_s", 1.2),
            ("full-spectrum peak memory during steps / full fine-tuning's", "shift_full", "full_ft", peak, None)):
        if method in rows and anchor in rows:
            value = ratio(rows[method].get(key), rows[anchor].get(key))
            met = "" if target is None or value is None else ("yes" if value <= target else "no")
            lines.append(f"| {label} | {value} | {'' if target is None else f'≤ {target}'} | {met} |")
    unmoved = [m for m, r in rows.items() if not r.get("trainable_moved")]
    if unmoved:
        lines += ["", f"WARNING: the optimizer did not change the watched trainable parameters of {unmoved}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64, help="k of the truncated-spectrum shift")
    parser.add_argument("--methods", default=None, help="comma-separated subset (default: all four)")
    parser.add_argument("--tokens", type=int, default=256, help="image tokens (a square; 256 = 256×256 px)")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="1/24 of the width: checks the script, not the numbers")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (float32 weights either way)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "training_dit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from training import run_worker_main

        run_worker_main(args, worker)
        return {}

    import torch

    from training import run_child

    methods = args.methods.split(",") if args.methods else list(methods_for(args.rank))
    unknown = sorted(set(methods) - set(methods_for(args.rank)))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {methods_for(args.rank)}")
    width = "1/24 of Flux.1-dev's width (smoke)" if args.smoke else "Flux.1-dev's width"
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                          f"{torch.__version__}",
               "threads": args.threads, "device": args.device, "rank": args.rank, "tokens": args.tokens, "text_tokens": args.text_tokens,
               "steps": args.steps, "warmup": args.warmup,
               "model": f"FluxTransformer2DModel, {args.double} double + {args.single} single blocks at {width}",
               "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
               "loadavg_start": [round(x, 2) for x in os.getloadavg()], "methods": {}}
    common = ["--double", str(args.double), "--single", str(args.single), "--rank", str(args.rank), "--tokens",
              str(args.tokens), "--text-tokens", str(args.text_tokens), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--threads", str(args.threads), "--seed", str(args.seed), "--device", args.device] + (
        ["--smoke"] if args.smoke else [])
    for method in methods:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", method, *common]
        results["methods"][method] = run_child(command, args.threads, method)
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training_dit.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "training_dit.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
