"""Training-step benchmark: one UNet optimizer step with spectral shifts vs a rank-4 LoRA, full fine-tuning and
svdiff-pytorch, side by side in one run (CPU; issue 4: step time and peak memory).

The step, the same for every method (inputs drawn before the timing, batch B, latent side S)::

    latents, noise ~ N(0, 1) of shape (B, 4, S, S); timestep t ~ U{0, …, 999}; encoder states ~ N(0, 1) of
    shape (B, 77, cross_attention_dim)
    noisy = √ᾱ_t · latents + √(1 − ᾱ_t) · noise        (SD's scaled-linear schedule, 1000 steps)
    loss = MSE(unet(noisy, t, states).sample, noise); loss.backward(); optimizer.step(); optimizer.zero_grad()

Methods (AdamW everywhere, the trainer's betas / weight decay / eps; all UNet weights stay float32):

- ``ours``: `add_spectral_shift` with the trainer's default targets (``--unet_target_kinds``, ``--norm_mode`` of
  `svdiff_adapter.training`; the SVD comes from the SVD cache, which a priming process fills first) and the trainer's
  `make_optimizer` over the δ parameters (2-D/4-D shifts and 1-D norm shifts in two groups);
- ``lora_r4``: PEFT LoRA rank 4 (alpha 4, gaussian init) on to_q, to_k, to_v, to_out.0 via ``unet.add_adapter``, as
  diffusers' ``train_dreambooth_lora.py``; AdamW over the LoRA parameters;
- ``full_ft``: AdamW over every UNet parameter;
- ``svdiff_pytorch``: svdiff-pytorch 0.2.0's own UNet (``load_unet_for_svdiff``, SVD done before the steps, AdamW over
  its ``delta`` parameters in its two groups, as its ``train_svdiff.py``), run by
  ``anchors/svdiff_pytorch_anchor.py --train-step`` inside its own venv (diffusers 0.14).

Each method runs in its own fresh process, one after the other, with the same torch thread count (``--threads``;
OMP/MKL thread variables are set to it as well). Per method:

- ``setup_s``: model load + adapter (ours: injection with SVD from the cache; svdiff-pytorch: load + its SVD, no
  cache) + optimizer; ``first_step_s``: the first warm-up step, reported separately;
- ``step_s``: median wall time of ``--steps`` steps after ``--warmup`` warm-up steps (``step_cpu_s``: process CPU
  seconds, all threads; on an idle machine wall ≈ CPU / threads);
- memory (Linux RSS): ``rss_after_load`` (model loaded), ``rss_after_setup`` (adapter + optimizer ready),
  ``steps_peak_rss`` (the peak during the steps: the kernel's high-water mark is reset through /proc/self/clear_refs
  after the setup) and ``peak_rss``, the whole process's peak (``ru_maxrss`` of the setup and of the steps, whichever
  is larger). A load path that briefly holds two copies of the weights (svdiff-pytorch's does) shows in
  ``peak_rss`` but not in ``steps_peak_rss``.

``loadavg`` at the start and end of the run and of each method flags a contended machine (then read CPU seconds and
ratios, not wall times).

    .venv/bin/python benchmarks/make_sd15_random.py .bench/sd15-random 0
    bash benchmarks/anchors/setup_svdiff_pytorch_env.sh          # the svdiff-pytorch anchor
    .venv/bin/python benchmarks/training.py --models .bench/sd15-random --steps 5 --threads 2

Quick check on a small model (any diffusers UNet folder works with --models)::

    .venv/bin/python benchmarks/make_small_unet.py .bench/small-unet --width 32 --sample-size 32
    .venv/bin/python benchmarks/training.py --models .bench/small-unet --sample-size 32 --out .bench/training-small

Writes OUT/training.json and OUT/training.md (default OUT: benchmarks/results).

``--flux`` runs the Flux-shaped transformer case instead (benchmarks/training_dit.py, with its options).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from procmem import max_rss, reset_peak_rss, rss_now, time_steps


HERE = Path(__file__).resolve().parent
METHODS = ("ours", "lora_r4", "full_ft", "svdiff_pytorch")
LABELS = {"ours": "spectral shift (ours)", "lora_r4": "LoRA r4 (PEFT)", "full_ft": "full fine-tuning",
          "svdiff_pytorch": "svdiff-pytorch 0.2.0"}
ADAPTER = "default"
LORA_LR, FULL_LR = 5e-4, 5e-6  # the defaults of diffusers' train_dreambooth_lora.py / train_dreambooth.py
SEQ_LEN = 77


# ------------------------------------------------------------------------------------------------------ the step
def alphas_cumprod():
    import torch

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def step_inputs(count, batch, size, channels, hidden_dim, seed):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, channels, size, size, generator=generator),
             torch.randn(batch, channels, size, size, generator=generator),
             torch.randint(0, 1000, (batch,), generator=generator),
             torch.randn(batch, SEQ_LEN, hidden_dim, generator=generator)) for _ in range(count)]


def train_step(unet, optimizer, inputs, schedule):
    import torch.nn.functional as F

    latents, noise, timesteps, states = inputs
    alpha = schedule[timesteps].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1.0 - alpha).sqrt() * noise
    prediction = unet(noisy, timesteps, states).sample
    loss = F.mse_loss(prediction.float(), noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


# ----------------------------------------------------------------------------------------------- method set-ups
def trainer_defaults(folder):
    from svdiff_adapter.training import build_parser

    return build_parser().parse_args(["--pretrained_model_name_or_path", str(folder)])


def svd_cache_arg(text):
    return None if text is None else (False if text.lower() in ("none", "0", "false", "off") else text)


def inject_ours(unet, args):
    """Spectral shifts with the trainer's default targets; returns (config, defaults, injection seconds)."""
    import svdiff_adapter as sa
    from svdiff_adapter.training.prepare import target_kinds

    defaults = trainer_defaults(args.unet_dir)
    config = sa.SpectralShiftConfig(target_kinds=target_kinds(defaults.unet_target_kinds),
                                    norm_mode=defaults.norm_mode)
    start = time.perf_counter()
    sa.add_spectral_shift(unet, config, ADAPTER, svd_cache=svd_cache_arg(args.svd_cache), progress=False)
    return config, defaults, time.perf_counter() - start


def setup_ours(unet, args, timings):
    from svdiff_adapter.training import make_optimizer

    config, defaults, timings["adapter_s"] = inject_ours(unet, args)
    timings["targets"] = {"target_kinds": config.target_kinds, "norm_mode": config.norm_mode}
    return make_optimizer({"unet": unet}, ADAPTER, defaults.learning_rate, defaults.learning_rate_1d,
                          betas=(defaults.adam_beta1, defaults.adam_beta2), weight_decay=defaults.adam_weight_decay,
                          eps=defaults.adam_epsilon)


def _adamw(params, lr, args):
    import torch

    defaults = trainer_defaults(args.unet_dir)
    return torch.optim.AdamW(params, lr=lr, betas=(defaults.adam_beta1, defaults.adam_beta2),
                             weight_decay=defaults.adam_weight_decay, eps=defaults.adam_epsilon)


def setup_lora(unet, args, timings):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                        target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    start = time.perf_counter()
    unet.add_adapter(config)
    timings["adapter_s"] = time.perf_counter() - start
    return _adamw([p for p in unet.parameters() if p.requires_grad], LORA_LR, args)


def setup_full(unet, args, timings):
    unet.requires_grad_(True)
    timings["adapter_s"] = 0.0
    return _adamw(list(unet.parameters()), FULL_LR, args)


SETUPS = {"ours": setup_ours, "lora_r4": setup_lora, "full_ft": setup_full}


# ------------------------------------------------------------------------------------------------------- workers
def worker(args) -> dict:
    """One method in this (fresh) process; returns the result row."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(args.threads)
    row = {"method": args.worker, "loadavg_start": list(os.getloadavg()), "threads": torch.get_num_threads(),
           "rss_at_start_bytes": rss_now()}
    start = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(args.unet_dir)
    unet.requires_grad_(False)
    row["load_s"] = time.perf_counter() - start
    row["rss_after_load_bytes"] = rss_now()
    if args.worker == "prime":  # fill the SVD cache for `ours`; nothing measured but its time
        _, _, row["inject_s"] = inject_ours(unet, args)
        return row

    optimizer = SETUPS[args.worker](unet, args, row)
    unet.train()
    row["setup_s"] = time.perf_counter() - start
    row["rss_after_setup_bytes"] = rss_now()
    row["setup_peak_rss_bytes"] = max_rss()
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    row["trainable_params"] = sum(p.numel() for p in trainable)
    row["total_params"] = sum(p.numel() for p in unet.parameters())
    watched = trainable[:3] + trainable[-3:]
    before = [p.detach().clone() for p in watched]

    config = unet.config
    size = args.sample_size or config.sample_size
    inputs = step_inputs(args.warmup + args.steps, args.batch, size, config.in_channels, config.cross_attention_dim,
                         args.seed)
    row["inputs"] = {"sample": [args.batch, config.in_channels, size, size],
                     "encoder_hidden_states": [args.batch, SEQ_LEN, config.cross_attention_dim]}
    schedule = alphas_cumprod()
    gc.collect()
    row["steps_peak_rss_reset"] = reset_peak_rss()
    row.update(time_steps(lambda index: train_step(unet, optimizer, inputs[index], schedule), args.warmup,
                          args.steps, args.worker, row))
    row["trainable_moved"] = any(not torch.equal(a, b.detach()) for a, b in zip(before, watched))
    row["loadavg_end"] = list(os.getloadavg())
    return row


def run_worker_main(args, work=None) -> None:
    """Run `work(args)` (default: this script's `worker`) and print its row as the only line of stdout."""
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # libraries may print; stdout carries only the JSON
        row = (work or worker)(args)
    real_stdout.write(json.dumps(row) + "\n")
    real_stdout.flush()


# -------------------------------------------------------------------------------------------------- orchestration
def unet_folder(models: Path) -> Path:
    if (models / "unet" / "config.json").exists():
        return models / "unet"
    if (models / "config.json").exists():
        return models
    raise SystemExit(f"{models}: neither a diffusers UNet folder nor a folder with unet/ in it")


def child_env(threads):
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    return env


def run_child(command, threads, label):
    print(f"{label}: {shlex.join(command)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=child_env(threads))
    wall = time.perf_counter() - start
    if result.returncode != 0:
        print(f"{label}: failed with exit status {result.returncode}", file=sys.stderr)
        return {"error": f"exit status {result.returncode}", "process_wall_s": wall}
    row = json.loads(result.stdout)
    row["process_wall_s"] = wall
    return row


def worker_command(method, args, unet_dir, size):
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--unet-dir", str(unet_dir),
               "--threads", str(args.threads), "--batch", str(args.batch), "--sample-size", str(size),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    if args.svd_cache is not None:
        command += ["--svd-cache", args.svd_cache]
    return command


def anchor_command(args, unet_dir, size):
    python = Path(args.anchor_venv) / "bin" / "python"
    if not python.exists():
        return None
    return [str(python), str(HERE / "anchors" / "svdiff_pytorch_anchor.py"), "--train-step", "--unet", str(unet_dir),
            "--threads", str(args.threads), "--batch", str(args.batch), "--latent-size", str(size),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]


def ratio(numerator, denominator):
    return None if numerator is None or not denominator else round(numerator / denominator, 3)


def ratios(methods):
    """ours / each other method, for the step times and the memory peaks."""
    ours = methods.get("ours") or {}
    out = {}
    for other in METHODS[1:]:
        row = methods.get(other) or {}
        if "error" in ours or "error" in row or not ours or not row:
            continue
        out[f"ours/{other}"] = {key: ratio(ours.get(key), row.get(key)) for key in
                                ("step_s", "step_cpu_s", "first_step_s", "setup_s", "peak_rss_bytes",
                                 "steps_peak_rss_bytes")}
    return out


def mib(value):
    return "" if value is None else f"{value / 2**20:.0f} MiB"


def seconds(value):
    if value is None:
        return ""
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


def markdown(results):
    rows = {m: r for m, r in results["methods"].items() if r and "error" not in r}
    lines = [
        f"Machine: {results['machine']}; torch threads: {results['threads']}; UNet: `{results['unet']}` "
        f"({results['unet_params'] / 1e6:.1f}M parameters); sample {results['sample']}, encoder states "
        f"{results['encoder_hidden_states']}; {results['steps']} timed steps after {results['warmup']} warm-up.",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Load average (1/5/15 min) at start {results['loadavg_start']}, at end {results['loadavg_end']}"
        + (f" — **contended machine (above {results['threads']} threads + 1): wall times are inflated; with as many "
           "threads as cores even CPU seconds are (OpenMP threads spin-wait for each other), so rerun on an idle "
           "machine or with fewer threads**" if results["contended"] else "") + ".",
    ]
    if results.get("malloc_env"):
        lines += ["", "Allocator settings: " + ", ".join(f"`{k}={v}`" for k, v in results["malloc_env"].items())]
    if results.get("prime"):
        prime = results["prime"]
        lines += ["", "SVD cache priming for ours (separate process, not measured): injection "
                  f"{seconds(prime.get('inject_s'))}."]
    lines += [
        "",
        "| method | trainable params | setup (load + adapter + optimizer) | first step | step (median) | step CPU | "
        "RSS at start (imports) | RSS after load | RSS after setup | peak RSS during steps | process peak RSS | "
        "load avg start → end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        row = results["methods"].get(method)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"| {LABELS[method]} | failed: {row['error']} | | | | | | | | | | |")
            continue
        setup = seconds(row["setup_s"])
        if method == "svdiff_pytorch":
            setup += f" (of which its SVD {seconds(row.get('svd_s'))})"
        elif method == "ours":
            setup += f" (of which injection, SVD from the cache, {seconds(row.get('adapter_s'))})"
        load = f"{row['loadavg_start'][0]:.2f} → {row['loadavg_end'][0]:.2f}"
        lines.append(f"| {LABELS[method]} | {row['trainable_params']:,} | {setup} | {seconds(row['first_step_s'])} | "
                     f"{seconds(row['step_s'])} | {seconds(row['step_cpu_s'])} | "
                     f"{mib(row.get('rss_at_start_bytes'))} | "
                     f"{mib(row['rss_after_load_bytes'])} | "
                     f"{mib(row['rss_after_setup_bytes'])} | {mib(row['steps_peak_rss_bytes'])} | "
                     f"{mib(row['peak_rss_bytes'])} | {load} |")
    ours = rows.get("ours")
    if ours:
        lines += ["", "| measure | ours | anchor | ratio (ours / anchor) | target | met? |",
                  "|---|---|---|---|---|---|"]

        def compare(label, key, anchor_method, target=None, fmt=seconds):
            anchor = rows.get(anchor_method)
            if not anchor:
                return
            value = ratio(ours.get(key), anchor.get(key))
            met = "" if target is None or value is None else ("yes" if value <= target else "no")
            lines.append(f"| {label} | {fmt(ours.get(key))} | {fmt(anchor.get(key))} | {value} | "
                         f"{'' if target is None else f'≤ {target}'} | {met} |")

        compare("step vs full fine-tuning", "step_s", "full_ft", 1.2)
        compare("step vs svdiff-pytorch", "step_s", "svdiff_pytorch", 0.5)
        compare("step vs LoRA r4", "step_s", "lora_r4")
        compare("step CPU seconds vs full fine-tuning", "step_cpu_s", "full_ft")
        compare("step CPU seconds vs svdiff-pytorch", "step_cpu_s", "svdiff_pytorch")
        compare("process peak RSS vs svdiff-pytorch", "peak_rss_bytes", "svdiff_pytorch", 1.0, mib)
        compare("peak RSS during steps vs svdiff-pytorch", "steps_peak_rss_bytes", "svdiff_pytorch", None, mib)
        compare("process peak RSS vs full fine-tuning", "peak_rss_bytes", "full_ft", None, mib)
        compare("process peak RSS vs LoRA r4", "peak_rss_bytes", "lora_r4", None, mib)
        compare("setup vs svdiff-pytorch (its SVD has no cache)", "setup_s", "svdiff_pytorch", None)
    unmoved = [m for m, r in rows.items() if not r.get("trainable_moved")]
    if unmoved:
        lines += ["", f"WARNING: the optimizer did not change the watched trainable parameters of {unmoved}."]
    return "\n".join(lines) + "\n"


def main():
    if "--flux" in sys.argv[1:]:  # the Flux-shaped transformer case lives in training_dit.py
        import training_dit

        training_dit.main([a for a in sys.argv[1:] if a != "--flux"])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path(".bench/sd15-random"),
                        help="a folder with unet/ in it (make_sd15_random.py output) or a diffusers UNet folder")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps before the timed ones (at least 1)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sample-size", type=int, default=None, help="latent side (default: the UNet's sample_size)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--svd-cache", default=None,
                        help='SVD cache folder for ours (default: the shared cache, as the trainer; "none": no cache)')
    parser.add_argument("--no-prime", action="store_true", help="do not fill the SVD cache before timing ours")
    parser.add_argument("--anchor-venv", default=os.environ.get("SVDIFF_REF_VENV", "/work/venvs/svdiff-ref"))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--worker", choices=METHODS[:3] + ("prime",), help=argparse.SUPPRESS)
    parser.add_argument("--unet-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if args.worker:
        run_worker_main(args)
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    if not args.models.exists() and args.models == Path(".bench/sd15-random"):
        subprocess.run([sys.executable, str(HERE / "make_sd15_random.py"), str(args.models), "0"], check=True)
    unet_dir = unet_folder(args.models)
    config = json.loads((unet_dir / "config.json").read_text())
    size = args.sample_size or config["sample_size"]

    import importlib.util

    if importlib.util.find_spec("svdiff_adapter") is None:
        parser.error("svdiff_adapter is not importable: run this with the project's venv (.venv/bin/python)")
    import diffusers
    import peft
    import torch

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
        "threads": args.threads,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "unet": str(unet_dir),
        "sample": [args.batch, config.get("in_channels", 4), size, size],
        "encoder_hidden_states": [args.batch, SEQ_LEN, config["cross_attention_dim"]],
        "steps": args.steps,
        "warmup": args.warmup,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "methods": {},
    }
    if "ours" in methods and not args.no_prime and args.svd_cache not in ("none", "0", "false", "off"):
        results["prime"] = run_child(worker_command("prime", args, unet_dir, size), args.threads, "prime SVD cache")
    for method in methods:
        if method == "svdiff_pytorch":
            command = anchor_command(args, unet_dir, size)
            if command is None:
                print(f"svdiff-pytorch: no venv at {args.anchor_venv}; skipped "
                      "(bash benchmarks/anchors/setup_svdiff_pytorch_env.sh)", file=sys.stderr)
                results["methods"][method] = {"error": f"no venv at {args.anchor_venv}"}
                continue
            row = run_child(command, args.threads, method)
            if "error" not in row:  # the anchor's JSON holds the row under "train_step"
                step_row = row.pop("train_step")
                row = {**row, **step_row}
        else:
            row = run_child(worker_command(method, args, unet_dir, size), args.threads, method)
        results["methods"][method] = row
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["unet_params"] = next((r["total_params"] for m, r in results["methods"].items()
                                   if m == "full_ft" and "total_params" in r), None) or _count_params(unet_dir)
    # The 1-minute load average includes this benchmark's own `threads` busy threads.
    busy = args.threads + 1
    results["contended"] = results["loadavg_start"][0] > busy or results["loadavg_end"][0] > busy or any(
        max(r.get("loadavg_start", [0])[0], r.get("loadavg_end", [0])[0]) > busy for r in results["methods"].values())
    results["ratios"] = ratios(results["methods"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "training.md").write_text(table)
    print(table)


def _count_params(unet_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in unet_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


if __name__ == "__main__":
    main()
