"""Teach the toy-world base model two-object scenes, for the multi-subject benchmark (docs/quality.md).

The bundled model draws one object per 64x64 image. Multi-subject personalisation ("a sks circle and a zwx square on
a blue background") needs a base that can draw two objects side by side, so this script fine-tunes the bundled UNet
and text encoder on a mix of the base distribution (64x64) and two-object scenes (64x128, ``world.make_pair_batch``:
"a red star and a blue ring on a green background", the first named object on the left). The tokenizer is unchanged
("and" is already a world word). Images are drawn and encoded on the fly (the VAE stays frozen); otherwise the recipe
is the base model's: epsilon prediction, min-SNR-5, AdamW, warm-up then a cosine decay over the second half, EMA.

    python examples/toyworld/train_pair_model.py --out .bench/toyworld-pairs

Resumable (the same command continues from OUT/checkpoints; Ctrl-C saves first). Writes ``OUT/pipeline`` (a
StableDiffusionPipeline folder), ``OUT/metrics.json`` (judge scores on fresh single and two-object prompts) and
``OUT/training_log.txt``. Not bundled: the benchmark builds it when it needs it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_base_model import (  # noqa: E402
    Interrupted,
    Logger,
    ResumablePhase,
    cosine_lr,
    denoising_loss,
    install_signal_handlers,
    save_pipeline,
    step_generator,
)

from svdiff_adapter import toyworld as tw  # noqa: E402
from svdiff_adapter.toyworld import models as M  # noqa: E402
from svdiff_adapter.toyworld import world as W  # noqa: E402
from svdiff_adapter.toyworld.evaluate import evaluate_pair_prompts, evaluate_prompts, format_scores  # noqa: E402

TRAINING_KEYS = ("seed", "steps", "batch_size", "pair_fraction", "pattern_fraction", "lr", "warmup", "ema",
                 "prompt_dropout", "min_snr_gamma", "init")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--init", default=str(tw.PIPELINE_DIR), help="pipeline to start from (default: the bundled one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32, help="single-object images per step (pairs: half as many)")
    p.add_argument("--pair-fraction", type=float, default=0.6, help="fraction of steps that train on pairs")
    p.add_argument("--pattern-fraction", type=float, default=0.15)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--prompt-dropout", type=float, default=0.1)
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-prompts", type=int, default=100, help="fresh prompts per evaluation (single and pair)")
    p.add_argument("--guidance", type=float, default=None, help="default: the init pipeline's recommended value")
    return p.parse_args(argv)


def training_batch(args, vae, tokenizer, step: int, gen: torch.Generator):
    """Latents and token ids of one step: a pair batch (64x128) or a single-object batch (64x64)."""
    pair_step = float(torch.rand(1, generator=gen)) < args.pair_fraction
    seed = args.seed * 1_000_003 + step
    if pair_step:
        batch = W.make_pair_batch(args.batch_size // 2, seed, pattern_fraction=args.pattern_fraction)
    else:
        batch = W.make_batch(args.batch_size, seed, pattern_fraction=args.pattern_fraction,
                             drop_color=0.05, drop_background=0.05)
    dropped = torch.rand(len(batch), generator=gen) < args.prompt_dropout
    prompts = ["" if drop else prompt for prompt, drop in zip(batch.prompts, dropped.tolist())]
    with torch.no_grad():
        posterior = vae.encode(W.to_tensor(batch.images)).latent_dist
        latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen))
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return latents * vae.config.scaling_factor, ids


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    install_signal_handlers()
    out = Path(args.out)
    ckdir = out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "training_log.txt")
    args_path = ckdir / "args.json"
    if args_path.is_file():
        previous = json.loads(args_path.read_text())
        changed = {k: (previous.get(k), vars(args)[k]) for k in TRAINING_KEYS if previous.get(k) != vars(args)[k]}
        if changed:
            log(f"ERROR: arguments differ from the checkpointed run: {changed}; use another --out")
            return 2
    else:
        args_path.write_text(json.dumps(vars(args), indent=2) + "\n")
    log(f"start: {' '.join(sys.argv)}")

    init = tw.load_toyworld_pipeline(args.init)
    guidance = args.guidance or tw.recommended_sampling(Path(args.init))["guidance_scale"]
    vae, tokenizer = init.vae.eval(), init.tokenizer
    unet, te = init.unet.train(), init.text_encoder.train()
    unet_ema, te_ema = copy.deepcopy(unet).eval().requires_grad_(False), copy.deepcopy(te).eval().requires_grad_(False)
    params = list(unet.parameters()) + list(te.parameters())
    ema_params = list(unet_ema.parameters()) + list(te_ema.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = M.make_train_scheduler()

    phase = ResumablePhase("pairs", ckdir / "model.safetensors",
                           {"unet.": unet, "te.": te, "unet_ema.": unet_ema, "te_ema.": te_ema}, opt,
                           args.checkpoint_minutes, log)
    losses = []
    with phase.running(args.steps) as bar:
        while phase.step < args.steps:
            lr = cosine_lr(phase.step, args.steps, args.lr, args.warmup, 0.5)
            for group in opt.param_groups:
                group["lr"] = lr
            gen = step_generator(args.seed, 5, phase.step)
            latents, ids = training_batch(args, vae, tokenizer, phase.step, gen)
            loss, per_sample = denoising_loss(unet, te, latents, ids, gen, sched, args.min_snr_gamma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            phase.step += 1
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - args.ema)
            losses.append(per_sample.mean().item())
            bar.update(1)
            if phase.step % args.log_every == 0 or phase.step == args.steps:
                log(f"step {phase.step}/{args.steps} loss {sum(losses) / len(losses):.4f} lr {lr:.2e} "
                    f"elapsed {phase.seconds():.0f}s")
                losses = []
            phase.after_step()
    log(f"trained {phase.step} steps in {phase.elapsed:.0f}s")
    elapsed = phase.elapsed

    pipe_dir = save_pipeline(vae, te_ema, tokenizer, unet_ema, vae.config.scaling_factor, out / "pipeline", log)
    (pipe_dir / "toyworld.json").write_text(json.dumps(tw.recommended_sampling(Path(args.init))) + "\n")
    pipe = tw.load_toyworld_pipeline(pipe_dir)
    judge = tw.load_judge()
    pairs = evaluate_pair_prompts(pipe, judge, args.eval_prompts, guidance_scale=guidance)
    pairs_patterned = evaluate_pair_prompts(pipe, judge, args.eval_prompts, seed=2026, guidance_scale=guidance,
                                            pattern_fraction=1.0)
    single = evaluate_prompts(pipe, judge, args.eval_prompts, seed=123_457, guidance_scale=guidance)
    log(f"EVAL {args.eval_prompts} fresh two-object prompts, guidance {guidance}: " + format_scores(pairs))
    log("EVAL two-object prompts with one patterned object: " + format_scores(pairs_patterned))
    log(f"EVAL {args.eval_prompts} fresh single-object prompts: " + format_scores(single))
    metrics = {"pairs": pairs, "pairs_one_patterned": pairs_patterned, "single": single, "train_seconds": elapsed,
               "args": vars(args)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Interrupted:
        sys.exit(130)
