"""Anchor benchmark: what the reference implementation (mkshing/svdiff-pytorch 0.2.0) costs.

Runs INSIDE the svdiff-pytorch reference venv (see setup_svdiff_pytorch_env.sh), not in the
project's venv, and prints ONE JSON object on stdout (everything else goes to stderr)::

    bash benchmarks/anchors/setup_svdiff_pytorch_env.sh
    .venv/bin/python benchmarks/make_sd15_random.py .bench/sd15-random 0
    nice -n 10 /work/venvs/svdiff-ref/bin/python benchmarks/anchors/svdiff_pytorch_anchor.py \
        --unet .bench/sd15-random/unet --text-encoder .bench/sd15-random/text_encoder \
        --repeats 1 --threads 2 > .bench/svdiff_pytorch_anchor.json

Model folders are ``save_pretrained(..., safe_serialization=True)`` output of our own venv.
A text-encoder file without the ``text_model.`` key prefix (transformers 5 layout) is
re-keyed into a temporary folder first, because transformers 4.27 would otherwise silently
random-initialise every weight; loaded weights are always checked against the file.

For each model it measures:

* ``load_s``: ``load_unet_for_svdiff(dir)`` / ``load_text_encoder_for_svdiff(dir)`` (no shift
  file). svdiff-pytorch's layers call ``torch.linalg.svd`` in ``__init__``, but the loader
  builds the model under ``accelerate.init_empty_weights()`` so that SVD runs on meta tensors
  (free); the real SVD is lazy: each layer's ``forward`` calls ``self.perform_svd()`` the first
  time (``done_svd`` False). ``svd_s`` times exactly those ``perform_svd()`` calls, for every
  spectral layer, before any forward. ``load_plus_svd_s`` = time until a usable model.
* ``forward``: median of ``--repeats`` (after one warm-up) ``torch.no_grad`` forwards of the
  plain diffusers 0.14 ``UNet2DConditionModel`` / transformers 4.27 ``CLIPTextModel`` loaded from
  the same folder (``base_s``), and of the svdiff-pytorch model with small random deltas
  (``shifted_s``); svdiff-pytorch recomposes every weight ``U diag(ReLU(S + scale*delta)) Vh``
  on every call. UNet: sample (2, in_ch, 64, 64), timestep 500, encoder_hidden_states
  (2, 77, cross_attention_dim); text encoder: input_ids (2, 77).
* ``*_cpu_s``: process CPU seconds for the same spans (all threads); with ``--threads T`` on an
  idle machine wall ~ cpu/T. ``loadavg_start``/``loadavg_end`` flag a contended machine.
* ``usv_bytes``: bytes of the U, S, Vh tensors the layers keep (plain attributes, fp32).

``--train-step`` (UNet only) instead measures one training step of svdiff-pytorch's own UNet, for
``benchmarks/training.py`` (which launches it in this venv and reads ``train_step`` from the JSON)::

    /work/venvs/svdiff-ref/bin/python benchmarks/anchors/svdiff_pytorch_anchor.py --train-step \\
        --unet .bench/sd15-random/unet --batch 1 --latent-size 64 --steps 5 --warmup 1 --threads 2

Setup as its ``train_svdiff.py``: ``load_unet_for_svdiff``, ``perform_svd()`` on every spectral layer (timed as
``svd_s``, before the steps, so no step pays it), ``requires_grad_(False)``, the ``delta`` parameters trainable,
AdamW (lr 1e-3; 1e-6 for the ``norm`` deltas; betas (0.9, 0.999), weight decay 1e-2, eps 1e-8), ``unet.train()``.
The step is the one of ``benchmarks/training.py`` (kept identical by hand: same inputs from the same seed, same
noising, MSE to the noise, backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)``); the row has the same
keys as that script's rows (times, RSS after load/setup, peak RSS during the steps and of the whole process).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path as _Path

sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))  # benchmarks/procmem.py
from procmem import max_rss, reset_peak_rss, rss_now, time_steps  # noqa: E402

warnings.filterwarnings("ignore")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def spectral_modules(model):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "delta") and hasattr(m, "perform_svd")]


def check_weights(model, weights_file, prefix=""):
    import torch
    from safetensors import safe_open

    sd = model.state_dict()
    n = 0
    with safe_open(weights_file, "pt") as f:
        for k in f.keys():
            key = k if k.startswith(prefix) else prefix + k
            if key not in sd:
                raise SystemExit(f"{weights_file}: tensor {k} not found in loaded model")
            if not torch.equal(sd[key], f.get_tensor(k)):
                raise SystemExit(f"{weights_file}: tensor {k} was not loaded unchanged")
            n += 1
    return n


def prepare_text_encoder_dir(src, tmp_root):
    """Return a folder transformers 4.27 loads correctly (``text_model.``-prefixed keys)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    wf = os.path.join(src, "model.safetensors")
    if not os.path.exists(wf):
        raise SystemExit(f"{src}: no model.safetensors (save with safe_serialization=True, unsharded)")
    with safe_open(wf, "pt") as f:
        keys = list(f.keys())
        if all(k.startswith("text_model.") for k in keys):
            return src, False
        tensors = {("text_model." + k if not k.startswith("text_model.") else k): f.get_tensor(k) for k in keys}
    dst = os.path.join(tmp_root, "text_encoder")
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst, True


def timed_forwards(fn, repeats):
    """Median wall seconds of ``repeats`` calls after one warm-up; also process CPU seconds."""
    fn()  # warm-up
    ts, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(ts), ts, statistics.median(cpu)


def bench_model(kind, folder, args):
    import torch
    import svdiff_pytorch

    res = {"folder": os.path.abspath(folder)}
    g = torch.Generator().manual_seed(args.seed)

    # ---------------- plain model (base forward) ----------------
    t0 = time.perf_counter()
    if kind == "unet":
        from diffusers import UNet2DConditionModel

        plain = UNet2DConditionModel.from_pretrained(folder).eval()
        cfg = plain.config
        weights_file = os.path.join(folder, "diffusion_pytorch_model.safetensors")
        prefix = ""
        inputs = (
            torch.randn((args.batch, cfg.in_channels, args.latent_size, args.latent_size), generator=g),
            torch.tensor([500] * args.batch, dtype=torch.int64),
            torch.randn((args.batch, 77, cfg.cross_attention_dim), generator=g),
        )
        res["inputs"] = {
            "sample": list(inputs[0].shape),
            "timestep": 500,
            "encoder_hidden_states": list(inputs[2].shape),
        }

        def run(m):
            with torch.no_grad():
                return m(*inputs).sample

    else:
        from transformers import CLIPTextModel

        plain = CLIPTextModel.from_pretrained(folder).eval()
        cfg = plain.config
        weights_file = os.path.join(folder, "model.safetensors")
        prefix = "text_model."
        ids = torch.randint(0, cfg.vocab_size, (args.batch, 77), generator=g)
        res["inputs"] = {"input_ids": list(ids.shape)}

        def run(m):
            with torch.no_grad():
                return m(ids).last_hidden_state

    res["plain_load_s"] = time.perf_counter() - t0
    res["checked_tensors"] = check_weights(plain, weights_file, prefix)
    res["params"] = sum(p.numel() for p in plain.parameters())
    res["weight_bytes"] = sum(p.numel() * p.element_size() for p in plain.parameters())
    log(f"[{kind}] plain model loaded in {res['plain_load_s']:.1f}s; timing base forward")
    base_med, base_all, base_cpu = timed_forwards(lambda: run(plain), args.repeats)
    out_plain = run(plain)
    del plain
    gc.collect()

    # ---------------- svdiff-pytorch model ----------------
    t0 = time.perf_counter()
    if kind == "unet":
        model = svdiff_pytorch.load_unet_for_svdiff(folder)
    else:
        model = svdiff_pytorch.load_text_encoder_for_svdiff(folder)
    res["load_s"] = time.perf_counter() - t0
    check_weights(model, weights_file, prefix)
    mods = spectral_modules(model)
    lazy = all(not m.done_svd for _, m in mods)
    res["svd_lazy_after_load"] = lazy
    res["U_device_after_load"] = str(mods[0][1].U.device)
    log(f"[{kind}] svdiff-pytorch model loaded in {res['load_s']:.1f}s; {len(mods)} spectral layers; SVD...")

    per_type = {}
    slowest = []
    t_svd, c_svd = time.perf_counter(), time.process_time()
    for name, m in mods:
        t1 = time.perf_counter()
        m.perform_svd()
        dt = time.perf_counter() - t1
        tname = type(m).__name__
        d = per_type.setdefault(tname, {"count": 0, "svd_s": 0.0, "singular_values": 0})
        d["count"] += 1
        d["svd_s"] += dt
        d["singular_values"] += m.S.numel()
        slowest.append((dt, name, list(m.weight.shape)))
    res["svd_s"] = time.perf_counter() - t_svd
    res["svd_cpu_s"] = time.process_time() - c_svd
    res["load_plus_svd_s"] = res["load_s"] + res["svd_s"]
    res["spectral_layers"] = len(mods)
    res["per_type"] = per_type
    res["slowest_svd"] = [{"module": n, "weight_shape": s, "s": dt} for dt, n, s in sorted(slowest, reverse=True)[:5]]
    m0 = mods[0][1]
    res["svd_dtype"] = str(m0.S.dtype)
    res["singular_values"] = sum(m.S.numel() for _, m in mods)
    usv = {"U": 0, "S": 0, "Vh": 0}
    for _, m in mods:
        for key, t in (("U", m.U), ("S", m.S), ("Vh", m.Vh)):
            usv[key] += t.numel() * t.element_size()
    res["usv_bytes"] = sum(usv.values())
    res["usv_bytes_by_factor"] = usv
    res["delta_bytes"] = sum(m.delta.numel() * m.delta.element_size() for _, m in mods)
    log(f"[{kind}] SVD {res['svd_s']:.1f}s, U/S/Vh {res['usv_bytes'] / 2**20:.1f} MiB; timing shifted forward")

    with torch.no_grad():
        for _, m in mods:
            m.delta.copy_(args.delta_std * m.S[0] * torch.randn(m.delta.shape, generator=g))
    shifted_med, shifted_all, shifted_cpu = timed_forwards(lambda: run(model), args.repeats)
    out_shift = run(model)
    res["forward"] = {
        "base_s": base_med,
        "shifted_s": shifted_med,
        "ratio": shifted_med / base_med,
        "base_all_s": base_all,
        "base_cpu_s": base_cpu,
        "shifted_cpu_s": shifted_cpu,
        "shifted_all_s": shifted_all,
        "output_max_abs_diff_shifted_vs_base": float((out_shift - out_plain).abs().max()),
        "delta_std_rel_sigma0": args.delta_std,
    }
    del model
    gc.collect()
    log(f"[{kind}] forward base {base_med:.3f}s, shifted {shifted_med:.3f}s")
    return res


# ------------------------------------------------------------------ training step (--train-step)
def bench_train_step(folder, args):
    """One training step of svdiff-pytorch's UNet; same step and keys as benchmarks/training.py."""
    import torch
    import torch.nn.functional as F
    import svdiff_pytorch

    row = {"method": "svdiff_pytorch", "loadavg_start": list(os.getloadavg()), "threads": torch.get_num_threads(),
           "rss_at_start_bytes": rss_now()}
    t0 = time.perf_counter()
    unet = svdiff_pytorch.load_unet_for_svdiff(folder)
    row["load_s"] = time.perf_counter() - t0
    row["rss_after_load_bytes"] = rss_now()
    mods = spectral_modules(unet)
    t1 = time.perf_counter()
    for _, m in mods:
        m.perform_svd()
    row["svd_s"] = time.perf_counter() - t1
    row["spectral_layers"] = len(mods)
    row["usv_bytes"] = sum(t.numel() * t.element_size() for _, m in mods for t in (m.U, m.S, m.Vh))
    unet.requires_grad_(False)
    params, params_1d = [], []
    for n, p in unet.named_parameters():
        if "delta" in n:
            p.requires_grad = True
            (params_1d if "norm" in n else params).append(p)
    optimizer = torch.optim.AdamW([{"params": params}, {"params": params_1d, "lr": 1e-6}], lr=1e-3,
                                  betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    unet.train()
    row["setup_s"] = time.perf_counter() - t0
    row["adapter_s"] = row["svd_s"]
    row["rss_after_setup_bytes"] = rss_now()
    row["setup_peak_rss_bytes"] = max_rss()
    trainable = params + params_1d
    row["trainable_params"] = sum(p.numel() for p in trainable)
    row["total_params"] = sum(p.numel() for p in unet.parameters())
    row["attention_processor"] = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    watched = trainable[:3] + trainable[-3:]
    before = [p.detach().clone() for p in watched]

    cfg = unet.config
    size, channels, dim = args.latent_size, cfg.in_channels, cfg.cross_attention_dim
    g = torch.Generator().manual_seed(args.seed)
    inputs = [(torch.randn(args.batch, channels, size, size, generator=g),
               torch.randn(args.batch, channels, size, size, generator=g),
               torch.randint(0, 1000, (args.batch,), generator=g),
               torch.randn(args.batch, args.seq_len, dim, generator=g)) for _ in range(args.warmup + args.steps)]
    row["inputs"] = {"sample": [args.batch, channels, size, size],
                     "encoder_hidden_states": [args.batch, args.seq_len, dim]}
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    schedule = torch.cumprod(1.0 - betas, dim=0).float()

    def step(latents, noise, timesteps, states):
        alpha = schedule[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1.0 - alpha).sqrt() * noise
        prediction = unet(noisy, timesteps, states).sample
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    gc.collect()
    row["steps_peak_rss_reset"] = reset_peak_rss()
    row.update(time_steps(lambda index: step(*inputs[index]), args.warmup, args.steps, "svdiff_pytorch", row))
    row["trainable_moved"] = any(not torch.equal(a, b.detach()) for a, b in zip(before, watched))
    row["loadavg_end"] = list(os.getloadavg())
    # Last, so that reading the file cannot touch the measured peaks: the weights really came from the folder.
    row["checked_tensors"] = check_weights(unet, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--unet", help="diffusers UNet2DConditionModel folder (safetensors)")
    ap.add_argument("--text-encoder", help="transformers CLIPTextModel folder (safetensors)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent-size", type=int, default=64)
    ap.add_argument("--delta-std", type=float, default=0.01, help="delta ~ N(0, (x*sigma_0)^2)")
    ap.add_argument("--train-step", action="store_true",
                    help="measure one training step of the UNet instead (for benchmarks/training.py)")
    ap.add_argument("--steps", type=int, default=5, help="--train-step: timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="--train-step: warm-up steps before the timed ones")
    ap.add_argument("--seq-len", type=int, default=77, help="--train-step: encoder-state tokens")
    args = ap.parse_args()
    if not args.unet and not args.text_encoder:
        ap.error("give --unet and/or --text-encoder")
    if args.train_step and (not args.unet or args.text_encoder):
        ap.error("--train-step measures the UNet only: give --unet and no --text-encoder")
    if args.train_step and (args.steps < 1 or args.warmup < 1):
        ap.error("--steps and --warmup must be at least 1")

    real_stdout = sys.stdout
    out = {}
    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory() as tmp:
        import torch
        import diffusers
        import transformers

        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        out = {
            "anchor": "svdiff-pytorch",
            "versions": {
                "svdiff_pytorch": "0.2.0",
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "threads": args.threads,
            "repeats": args.repeats,
            "cpu_count": os.cpu_count(),
            # wall times are only meaningful if this was low; compare *_cpu_s otherwise
            "loadavg_start": list(os.getloadavg()),
        }
        if args.train_step:
            out["train_step"] = bench_train_step(args.unet, args)
        elif args.unet:
            out["unet"] = bench_model("unet", args.unet, args)
        if args.text_encoder:
            te_dir, rekeyed = prepare_text_encoder_dir(args.text_encoder, tmp)
            r = bench_model("text_encoder", te_dir, args)
            r["folder"] = os.path.abspath(args.text_encoder)
            r["rekeyed_to_text_model_prefix"] = rekeyed
            out["text_encoder"] = r
        out["loadavg_end"] = list(os.getloadavg())
        if not args.train_step:  # (its row has its own peaks; the high-water mark was reset before the steps)
            out["max_rss_bytes"] = max_rss()
    real_stdout.write(json.dumps(out, indent=1) + "\n")
    real_stdout.flush()


if __name__ == "__main__":
    main()
