"""Train the toy world's DiT: a small MMDiT (`SD3Transformer2DModel`) with rectified flow, on CPU, sharing the
bundled pipeline's VAE, tokenizer and text encoder (all frozen).

Phases (resumable; checkpoints are written atomically under OUT/checkpoints):

1. ``cache`` - encode a fixed set of generator images once with the bundled VAE (train_base_model.py's cache).
2. ``dit``   - the transformer alone: x_σ = (1 − σ)·x₀ + σ·ε, target ε − x₀ (SD3 paper §2), σ logit-normal
               (mean 0, std 1; §3.1), AdamW, warm-up then a cosine decay over the last half, grad clip 1.0, EMA,
               10 % empty prompts for classifier-free guidance.
3. ``final`` - save the EMA weights as a `StableDiffusion3Pipeline` folder (transformer and VAE stored fp16), reload it
               with diffusers' class and judge samples of fresh prompts.

Text conditioning is what `StableDiffusion3Pipeline.encode_prompt` builds from two CLIP encoders and no T5: the
bundled text encoder serves as both CLIP encoders (with an identity projection, so the pooled vector is its pooled
output twice), and the pipeline appends `max_sequence_length` zero "T5" tokens. Those are identical tokens (SD3 has
no positions on the text stream), so their number only shifts one attention logit by its log: training draws 1 zero
token on most steps and the pipeline's default 256 on `--long-text-fraction` of them, so that plain
`pipe(prompt)` calls and cheap `max_sequence_length=1` calls both work.

    python examples/toyworld/train_dit_model.py --out /work/toyworld-dit   # 2 idle cores: 40 min of training, 49 with evaluations

Running the same command again resumes; Ctrl-C (or SIGTERM) saves a checkpoint first. Smoke run: ``--num-images 512
--steps 20 --eval-every 0 --sweep-prompts 10 --eval-prompts 10 --guidance 3``. Outputs in OUT: ``pipeline/``,
``training_config.json``, ``training_log.txt``, ``metrics.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_base_model as base  # noqa: E402  (checkpoint helpers, the latent cache, the lr schedule)

from svdiff_adapter import toyworld as tw  # noqa: E402
from svdiff_adapter.toyworld import world as W  # noqa: E402
from svdiff_adapter.toyworld.evaluate import evaluate_prompts, format_scores  # noqa: E402

TRAINING_KEYS = ("seed", "num_images", "pattern_fraction", "drop_color", "drop_background", "steps", "batch_size",
                 "lr", "warmup", "weight_decay", "ema", "prompt_dropout", "layers", "width", "head_dim",
                 "long_text_fraction")
PIPELINE_T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (checkpoints, pipeline, logs)")
    p.add_argument("--judge", default=None, help="judge .safetensors for evaluation (default: bundled judge)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-images", type=int, default=40_000, help="images whose latents are cached")
    p.add_argument("--pattern-fraction", type=float, default=0.15)
    p.add_argument("--drop-color", type=float, default=0.05)
    p.add_argument("--drop-background", type=float, default=0.05)
    p.add_argument("--layers", type=int, default=7, help="joint transformer blocks")
    p.add_argument("--width", type=int, default=128, help="hidden size (heads × head dim)")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--decay-start", type=float, default=0.5)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--prompt-dropout", type=float, default=0.1)
    p.add_argument("--long-text-fraction", type=float, default=0.1,
                   help="steps with the pipeline's default 256 zero T5 tokens (else 1)")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=1000, help="quick judge evaluation every N steps (0: off)")
    p.add_argument("--quick-eval-prompts", type=int, default=100)
    p.add_argument("--sweep-prompts", type=int, default=100)
    p.add_argument("--eval-prompts", type=int, default=300)
    p.add_argument("--guidance", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    p.add_argument("--inference-steps", type=int, default=25)
    p.add_argument("--fresh", action="store_true", help="delete OUT/checkpoints and start over")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ components
def shared_components():
    """The bundled pipeline's VAE (with SD3's shift factor 0), tokenizer, and its text encoder as a CLIP encoder
    with an identity projection (what `StableDiffusion3Pipeline` expects twice)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    bundled = tw.load_toyworld_pipeline()
    vae = copy.deepcopy(bundled.vae).eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)
    config = CLIPTextConfig(**{**bundled.text_encoder.config.to_dict(),
                               "projection_dim": bundled.text_encoder.config.hidden_size})
    encoder = CLIPTextModelWithProjection(config)
    encoder.text_model.load_state_dict(bundled.text_encoder.state_dict())  # transformers 5: no text_model level
    with torch.no_grad():
        encoder.text_projection.weight.copy_(torch.eye(config.hidden_size))
    return vae, bundled.tokenizer, encoder.eval().requires_grad_(False)


def make_transformer(args):
    from diffusers import SD3Transformer2DModel

    text_width = 2 * 64  # the two (identical) CLIP encoders side by side
    return SD3Transformer2DModel(sample_size=W.IMAGE_SIZE // 4, patch_size=2, in_channels=4, out_channels=4,
                                 num_layers=args.layers, attention_head_dim=args.head_dim,
                                 num_attention_heads=args.width // args.head_dim, joint_attention_dim=text_width,
                                 caption_projection_dim=args.width, pooled_projection_dim=text_width,
                                 pos_embed_max_size=W.IMAGE_SIZE // 4)


def build_pipeline(transformer, vae, tokenizer, encoder):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                                    vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                                    text_encoder_2=copy.deepcopy(encoder), tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class PromptEncoder:
    """The joint text sequence (CLIP part only) and pooled vector per prompt, memoised (the encoder is frozen)."""

    def __init__(self, tokenizer, encoder) -> None:
        self.tokenizer, self.encoder, self.memo = tokenizer, encoder, {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        new = sorted({p for p in prompts if p not in self.memo})
        if new:
            ids = self.tokenizer(new, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            output = self.encoder(ids, output_hidden_states=True)
            for k, prompt in enumerate(new):
                hidden = output.hidden_states[-2][k]
                self.memo[prompt] = (torch.cat([hidden, hidden], -1), torch.cat([output[0][k], output[0][k]], -1))
        hidden, pooled = zip(*(self.memo[p] for p in prompts))
        return torch.stack(hidden), torch.stack(pooled)


# ------------------------------------------------------------------------------------------------ training
def train_dit(args, vae, cache, prompts_of, text, get_judge, ckdir: Path, log) -> tuple:
    torch.manual_seed(args.seed + 1)
    model = make_transformer(args)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    done_path = ckdir / "dit_done.json"
    phase = base.ResumablePhase("dit", ckdir / "dit.safetensors", {"model.": model, "ema.": ema}, opt,
                                args.checkpoint_minutes, log)
    if not phase.resumed:
        log(f"dit: {sum(p.numel() for p in params)} transformer parameters, {args.steps} steps, batch "
            f"{args.batch_size}")
    if done_path.is_file() and phase.step >= args.steps:
        return ema, phase.history, phase.elapsed

    mean, std = cache["mean"], cache["std"]
    scaling = vae.config.scaling_factor

    model.train()
    losses = []
    with phase.running(args.steps) as bar:
        while phase.step < args.steps:
            lr = base.cosine_lr(phase.step, args.steps, args.lr, args.warmup, args.decay_start)
            for group in opt.param_groups:
                group["lr"] = lr
            gen = base.step_generator(args.seed, 5, phase.step)
            size = args.batch_size
            index = torch.randint(0, mean.shape[0], (size,), generator=gen)
            clean = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=gen)) * scaling
            hidden, pooled = text(prompts_of(index.tolist(), gen))
            t5_tokens = PIPELINE_T5_TOKENS if float(torch.rand(1, generator=gen)) < args.long_text_fraction else 1
            hidden = torch.cat([hidden, torch.zeros(size, t5_tokens, hidden.shape[-1])], dim=1)
            sigma = torch.sigmoid(torch.randn(size, generator=gen))
            noise = torch.randn(clean.shape, generator=gen)
            s = sigma.view(-1, 1, 1, 1)
            prediction = model(hidden_states=(1 - s) * clean + s * noise, timestep=sigma * 1000,
                               encoder_hidden_states=hidden, pooled_projections=pooled).sample
            loss = F.mse_loss(prediction, noise - clean)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            phase.step += 1
            step = phase.step
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.1e}")
            if step % args.log_every == 0 or step == args.steps:
                log(f"dit step {step}/{args.steps} loss {np.mean(losses):.4f} lr {lr:.2e} "
                    f"elapsed {phase.seconds():.0f}s")
                losses = []
            if args.eval_every and step % args.eval_every == 0 and step < args.steps and get_judge() is not None:
                now = phase.seconds()
                with phase.paused():
                    pipe = build_pipeline(ema, vae, text.tokenizer, text.encoder)
                    result = evaluate_prompts(pipe, get_judge(), args.quick_eval_prompts, seed=4242,
                                              guidance_scale=args.guidance[min(1, len(args.guidance) - 1)],
                                              num_inference_steps=args.inference_steps)
                phase.history.append({"step": step, "train_seconds": round(now), **result})
                log(f"dit quick eval @ step {step} (EMA weights, 256 zero T5 tokens): " + format_scores(result))
            phase.after_step()
    done_path.write_text(json.dumps({"steps": phase.step, "seconds": phase.elapsed}) + "\n")
    log(f"dit: done, {phase.step} steps in {phase.elapsed:.0f}s")
    return ema, phase.history, phase.elapsed


def save_pipeline(pipe, out_dir: Path, log) -> Path:
    pipe = copy.deepcopy(pipe)
    pipe.transformer.to(torch.float16)  # fp16 storage of the big parts; diffusers loads float32 by default
    pipe.vae.to(torch.float16)
    size = base.save_pipeline_atomic(pipe, out_dir)
    log(f"pipeline: saved to {out_dir} ({size / 1e6:.2f} MB)")
    return out_dir


def final_evaluation(args, pipe_dir: Path, judge, log) -> dict:
    from diffusers import StableDiffusion3Pipeline

    # No T5: diffusers' documented way to load SD3 without it.
    pipe = StableDiffusion3Pipeline.from_pretrained(pipe_dir, text_encoder_3=None, tokenizer_3=None,
                                                    dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    results: dict = {"sweep": []}
    best = None
    for guidance in args.guidance:
        result = evaluate_prompts(pipe, judge, args.sweep_prompts, seed=9001, guidance_scale=guidance,
                                  num_inference_steps=args.inference_steps)
        results["sweep"].append(result)
        log(f"eval sweep (seed 9001) guidance {guidance}: " + format_scores(result))
        if best is None or result["all"] > best["all"]:
            best = result
    final = evaluate_prompts(pipe, judge, args.eval_prompts, seed=123_457, guidance_scale=best["guidance_scale"],
                             num_inference_steps=args.inference_steps)
    results["final"] = final
    log(f"EVAL {args.eval_prompts} fresh random seen prompts (seed 123457), guidance {best['guidance_scale']}, "
        f"Euler {args.inference_steps} steps, EMA weights, diffusers' StableDiffusion3Pipeline with its default 256 "
        "zero T5 tokens: " + format_scores(final))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base.install_signal_handlers()
    out = Path(args.out)
    ckdir = out / "checkpoints"
    if args.fresh and ckdir.exists():
        shutil.rmtree(ckdir)
    ckdir.mkdir(parents=True, exist_ok=True)
    log = base.Logger(out / "training_log.txt")
    wall = time.time()
    args_path, current = ckdir / "args.json", vars(args)
    if args_path.is_file():
        previous = json.loads(args_path.read_text())
        diff = {k: (previous.get(k), current[k]) for k in TRAINING_KEYS if previous.get(k) != current[k]}
        if diff:
            log(f"ERROR: arguments differ from the checkpointed run: {diff}; use --fresh to start over")
            return 2
    else:
        args_path.write_text(json.dumps(current, indent=2) + "\n")
    log(f"start: {' '.join(sys.argv)}; torch {torch.__version__}, threads {torch.get_num_threads()}")
    judge = tw.load_judge(args.judge)

    vae, tokenizer, encoder = shared_components()
    cache, cache_meta = base.build_cache(args, vae, ckdir, log)
    specs = base.specs_from_labels(cache)

    def prompts_of(indices, gen):
        chosen = []
        for i in indices:
            u = torch.rand(3, generator=gen)
            chosen.append("" if u[0] < args.prompt_dropout else W.prompt_for(
                specs[i], drop_color=bool(u[1] < args.drop_color), drop_background=bool(u[2] < args.drop_background)))
        return chosen

    text = PromptEncoder(tokenizer, encoder)
    try:
        ema, history, seconds = train_dit(args, vae, cache, prompts_of, text, lambda: judge, ckdir, log)
    except base.Interrupted:
        log(f"stopped; resume with the same command: python {' '.join(sys.argv)}")
        return 130
    pipe_dir = save_pipeline(build_pipeline(ema, vae, tokenizer, encoder), out / "pipeline", log)
    metrics = {"cache_seconds": cache_meta["seconds"], "dit": {"steps": args.steps, "seconds": seconds,
                                                               "quick_evals": history},
               "evaluation": final_evaluation(args, pipe_dir, judge, log),
               "pipeline_mb": sum(f.stat().st_size for f in pipe_dir.rglob("*") if f.is_file()) / 1e6}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    recommended = {"guidance_scale": metrics["evaluation"]["final"]["guidance_scale"],
                   "num_inference_steps": args.inference_steps}
    (pipe_dir / "toyworld.json").write_text(json.dumps(recommended, indent=2) + "\n")
    config = {"args": current, "command": " ".join(sys.argv), "recommended": recommended, "metrics": metrics,
              "transformer": dict(make_transformer(args).config)}
    (out / "training_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    log(f"done in {(time.time() - wall) / 60:.1f} min of wall time for this invocation; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
