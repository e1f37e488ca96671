"""What a truncated spectrum costs in quality on the toy world: the shipped recipe (`toyworld.ShiftRecipe`, the real
trainer, UNet + text encoder, prior preservation) with `--spectral_rank k` for k ∈ {4, 16, 64} and the full spectrum.

    .venv/bin/python benchmarks/truncation_quality.py --out benchmarks/results/truncation   # all runs, resumable
    .venv/bin/python benchmarks/truncation_quality.py --subject striped_star --rank 16     # one run
    .venv/bin/python benchmarks/truncation_quality.py --report --out benchmarks/results/truncation

Each run trains one subject at one rank and scores it as benchmarks/quality/run.py does: 8 samples per background
(trained on white / black / gray, held out blue / green), leakage of the class prompt, and ordinary prompts (40) right.
Runs are independent processes writing `<subject>-<rank>.json`; run two at a time on two cores (one thread each).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RANKS = ("4", "16", "64", "full")
SUBJECTS = ("striped_star", "dotted_square")
TRAINED, HELD_OUT = ("white", "black", "gray"), ("blue", "green")


def run(subject_name: str, rank: str, out: Path) -> dict:
    import svdiff_adapter.toyworld as tw
    from svdiff_adapter.toyworld.evaluate import evaluate_prompts
    from svdiff_adapter.toyworld.personalize import ShiftRecipe, leakage, subject_scores, train_subject_shift

    subject = tw.get_subject(subject_name)
    recipe = ShiftRecipe(extra_args=[] if rank == "full" else ["--spectral_rank", rank])
    judge = tw.load_judge()
    with tempfile.TemporaryDirectory(prefix="svdiff-trunc-") as work:
        folder = train_subject_shift(subject, Path(work) / "run", recipe=recipe)
        pipe = tw.load_toyworld_pipeline()
        pipe.load_spectral_shift(folder)
        with torch.no_grad():
            scores = subject_scores(pipe, subject, per_background=8, judge=judge)
            scores["leakage"] = leakage(pipe, subject, judge=judge)
            drift = evaluate_prompts(pipe, judge, n=40, seed=2024, batch_size=40, **tw.recommended_sampling())
        shift = pipe.read_spectral_shift(folder)
    scores["ordinary_prompts_correct"] = drift["all"]
    scores["shift_values"] = shift.num_parameters
    path = out / f"{subject_name}-{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(scores, indent=1))
    partial.replace(path)
    return scores


def report(out: Path) -> str:
    lines = ["| rank | shift values | subject + bg, trained | blue | green | leakage | ordinary prompts right |",
             "|---|---|---|---|---|---|---|"]
    for rank in RANKS:
        rows = [json.loads(p.read_text()) for s in SUBJECTS if (p := out / f"{s}-{rank}.json").exists()]
        if not rows:
            continue

        def mean(get):
            return sum(get(r) for r in rows) / len(rows)

        joint = "subject_and_background"
        lines.append(
            f"| {rank} | {mean(lambda r: r['shift_values']):,.0f} "
            f"| {mean(lambda r: sum(r[joint][b] for b in TRAINED) / 3):.0%} "
            f"| {mean(lambda r: r[joint]['blue']):.0%} | {mean(lambda r: r[joint]['green']):.0%} "
            f"| {mean(lambda r: r['leakage']):.0%} | {mean(lambda r: r['ordinary_prompts_correct']):.0%} |")
    return "\n".join(lines) + f"\n\nMeans over {', '.join(SUBJECTS)} (one seed each).\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subject", choices=SUBJECTS)
    parser.add_argument("--rank", choices=RANKS)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "truncation")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.report:
        print(report(args.out))
        return
    for subject in [args.subject] if args.subject else SUBJECTS:
        for rank in [args.rank] if args.rank else RANKS:
            if not (args.out / f"{subject}-{rank}.json").exists():
                print(subject, rank, run(subject, rank, args.out), file=sys.stderr, flush=True)
    print(report(args.out))


if __name__ == "__main__":
    main()
