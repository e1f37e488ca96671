"""Train the toy-world judge (a small CNN: shape, colour, second colour, background, pattern heads).

    nice -n 19 python examples/toyworld/train_judge.py --out /work/toyworld-judge
    # to refresh the bundled copy:
    python examples/toyworld/train_judge.py --out src/svdiff_adapter/toyworld/assets

Writes ``judge.safetensors`` (safetensors only) and ``judge_log.txt`` (per-head accuracy on fresh images) to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from svdiff_adapter.toyworld.judge import evaluate_judge, save_judge, train_judge


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pattern-fraction", type=float, default=0.35)
    p.add_argument("--eval-images", type=int, default=4000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "judge_log.txt"
    log_f = open(log_path, "w")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_f.write(line + "\n")
        log_f.flush()

    log(f"config {json.dumps(vars(args))}")
    t0 = time.time()
    model = train_judge(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        pattern_fraction=args.pattern_fraction,
        log=log,
    )
    train_s = time.time() - t0
    log(f"trained in {train_s:.0f}s ({args.steps / train_s:.2f} steps/s), {sum(p.numel() for p in model.parameters())} params")
    clean = evaluate_judge(model, n=args.eval_images, pattern_fraction=args.pattern_fraction)
    plain = evaluate_judge(model, n=args.eval_images, seed=555_555, pattern_fraction=0.0)
    aug = evaluate_judge(model, n=args.eval_images, pattern_fraction=args.pattern_fraction, augmented=True)
    log(f"accuracy on {args.eval_images} fresh images (35% patterned): " + json.dumps({k: round(v, 4) for k, v in clean.items()}))
    log(f"accuracy on {args.eval_images} fresh plain images: " + json.dumps({k: round(v, 4) for k, v in plain.items()}))
    log(f"accuracy on {args.eval_images} fresh augmented images: " + json.dumps({k: round(v, 4) for k, v in aug.items()}))
    info = {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "train_seconds": round(train_s, 1),
            "fresh_accuracy": clean, "fresh_plain_accuracy": plain, "augmented_accuracy": aug}
    save_judge(model, out / "judge.safetensors", extra=info)
    (out / "judge_metrics.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"saved {out / 'judge.safetensors'}")
    worst = min(v for k, v in clean.items())
    if worst < 0.99:
        log(f"WARNING: lowest head accuracy {worst:.4f} < 0.99")


if __name__ == "__main__":
    main()
