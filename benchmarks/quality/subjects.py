"""Multi-subject phase of the quality benchmark (docs/quality.md, "Across subjects"): every method on six subjects,
three of them kept out of every tuning decision, several seeds, 16 samples per background.

    python benchmarks/quality/subjects.py --out .bench/quality --worker 0 --workers 2 &   # two processes, one
    python benchmarks/quality/subjects.py --out .bench/quality --worker 1 --workers 2     # thread each
    python benchmarks/quality/subjects.py --out .bench/quality --base-limits              # the base model's ceiling
    python benchmarks/quality/subjects.py --out .bench/quality --report                   # the tables

Subjects: the world's three registered ones (the **tuning set**: the recipe and the learning rates were chosen on
the split circle) and three colour variants of the same (shape, pattern) pairs, which the base model never drew
either (the **held-out set**, never used to choose anything). Colours of the held-out set avoid blue and green so
that the held-out blue and green backgrounds cannot hide half of the subject.

Training and scores are run.py's (the same loop, data recipe, prior images and judge): trained on white, black and
gray; judged on all five backgrounds (16 samples each), on 40 fixed ordinary prompts (drift), and on 16 samples of
the class prompt (leakage). Each run writes ``<out>/subjects/<id>.json`` and is skipped when it exists (resumable);
runs go seed by seed, so an interrupted benchmark has whole seeds. A run is claimed by the process that runs it
(``<id>.claim``), so workers can be added at any time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402
from methods import MethodSpec  # noqa: E402

from svdiff_adapter import toyworld as tw  # noqa: E402
from svdiff_adapter.toyworld.evaluate import evaluate_prompts  # noqa: E402
from svdiff_adapter.toyworld.personalize import leakage, subject_scores  # noqa: E402
from svdiff_adapter.toyworld import world as W  # noqa: E402
from svdiff_adapter.toyworld.world import Subject  # noqa: E402
from svdiff_adapter.training.images import load_images  # noqa: E402
from svdiff_adapter.training.prior import ensure_class_images  # noqa: E402

TUNING = tuple(tw.SUBJECTS[name] for name in ("striped_star", "dotted_square", "split_circle"))
HELD_OUT = (Subject("striped_star_cm", shape="star", pattern="stripes", colors=("cyan", "magenta")),
            Subject("dotted_square_rc", shape="square", pattern="dots", colors=("red", "cyan")),
            Subject("split_circle_yr", shape="circle", pattern="split", colors=("yellow", "red")))
SEEDS = (0, 1, 2)
PER_BACKGROUND, DRIFT_PROMPTS, LEAKAGE_SAMPLES = 16, 40, 16
HELD_OUT_BACKGROUNDS = ("blue", "green")
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Variant:
    """A method and how it trains: `spec` plus the prior weight λ and AdamW's weight decay (run.train)."""

    spec: MethodSpec
    prior_loss_weight: float = 1.0
    weight_decay: float = 1e-2
    prior_contexts: str = "trained"  # which prior samples: see `prior_pool`
    step_scale: str = "uniform"  # make_optimizer's: "sigma" steps δᵢ relative to σᵢ
    denoiser_targets: Optional[str] = None  # a regex of the UNet modules to shift (None: all)
    ema_decay: Optional[float] = None  # end with an EMA of the trained values (run.train)
    tag: str = ""  # names an ablation of the recipe; empty for a method at its defaults

    @property
    def label(self) -> str:
        return self.spec.label + (f" [{self.tag}]" if self.tag else "")

    @property
    def slug(self) -> str:
        return self.spec.slug + (f"-{self.tag}" if self.tag else "")


# Each method at the rate the single-subject sweep chose (run.py's SWEEPS on the split circle, docs/quality.md).
METHODS = (Variant(MethodSpec("spectral", 2e-2)), Variant(MethodSpec("lora", 3e-3, rank=4)),
           Variant(MethodSpec("lora", 3e-3, rank=16)), Variant(MethodSpec("full", 2e-4)))
# Ablations of the shift recipe, measured on one seed first: a stronger prior, a trust region (AdamW decays δ by
# lr·wd per step: 0.1 pulls it back by a factor e^(-1.2) over 600 steps), a smaller step.
ABLATIONS = (Variant(MethodSpec("spectral", 2e-2), prior_loss_weight=2.0, tag="prior2"),
             Variant(MethodSpec("spectral", 2e-2), weight_decay=0.1, tag="wd0.1"),
             Variant(MethodSpec("spectral", 1e-2), tag="lr1e-2"),
             # Prior samples beyond the training contexts (prior_pool), and the text encoder's share.
             Variant(MethodSpec("spectral", 2e-2), prior_contexts="all", tag="prior-all"),
             Variant(MethodSpec("spectral", 2e-2), prior_contexts="all+ordinary", tag="prior-wide"),
             Variant(MethodSpec("spectral", 2e-2), prior_contexts="trained+ordinary", tag="prior-ordinary"),
             Variant(MethodSpec("spectral", 2e-2, train_text_encoder=False)),
             # δ relative to σ (a relative rate; mean σ ≈ 0.7 in the toy UNet, so 3e-2 moves δ as far on average).
             Variant(MethodSpec("spectral", 3e-2), step_scale="sigma", tag="sigma-step"),
             # Custom Diffusion's choice (Kumari et al., CVPR 2023, §3.1): in the UNet only the cross-attention keys
             # and values, the maps from text into the image, plus the text encoder.
             Variant(MethodSpec("spectral", 2e-2), denoiser_targets=r".*attn2\.to_[kv]", tag="kv-only"),
             # Polyak averaging: an EMA of δ (time constant 100 of the 600 steps) keeps what the steps agree on.
             Variant(MethodSpec("spectral", 2e-2), ema_decay=0.99, tag="ema0.99"))
PRIOR_POOL_SIZE = 50  # images per background of the class prompt, and ordinary prompts, in a prior pool


def run_id(subject: Subject, variant: Variant, seed: int) -> str:
    return f"{subject.name}-{variant.slug}-s{seed}"


def plan(seeds, ablation_seeds) -> list[tuple[Subject, Variant, int]]:
    """Seed by seed: the methods, then the ablations (on `ablation_seeds`)."""
    runs = []
    for seed in seeds:
        variants = METHODS + (ABLATIONS if seed in ablation_seeds else ())
        runs += [(subject, variant, seed) for variant in variants for subject in TUNING + HELD_OUT]
    return runs


def evaluate(pipe, subject: Subject, judge) -> dict:
    sampling = tw.recommended_sampling()
    with torch.no_grad():
        scores = subject_scores(pipe, subject, per_background=PER_BACKGROUND, judge=judge)
        scores["leakage"] = leakage(pipe, subject, samples=LEAKAGE_SAMPLES, judge=judge)
        drift = evaluate_prompts(pipe, judge, n=DRIFT_PROMPTS, seed=2024, batch_size=DRIFT_PROMPTS, **sampling)
    scores["ordinary_prompts_correct"] = drift["all"]
    return scores


def prior_pool(out: Path, subject: Subject, contexts: str) -> list[tuple[object, str]]:
    """(image, prompt) pairs of the base model for the prior rows: "all" = the class prompt on every background
    (the trained ones and the held-out ones: class images cost nothing but sampling the base model); "all+ordinary"
    adds as many base-model samples of ordinary world prompts (none of them one of the 40 drift prompts);
    "trained+ordinary" = the class prompt on the training backgrounds only, plus the ordinary prompts."""
    pool = []
    backgrounds = run.TRAIN_BACKGROUNDS if contexts.startswith("trained") else tw.BACKGROUNDS
    for index, background in enumerate(tw.BACKGROUNDS):
        if background not in backgrounds:
            continue
        folder = out / "data" / f"class-{subject.shape}" / background
        ensure_class_images(str(folder), subject.class_prompt(background), PRIOR_POOL_SIZE,
                            lambda: tw.load_toyworld_pipeline(), resolution=64, sample_batch_size=25,
                            num_inference_steps=25, seed=index)
        pool += [(image, subject.class_prompt(background))
                 for image in load_images(str(folder), what="class image")[:PRIOR_POOL_SIZE]]
    if contexts.endswith("+ordinary"):
        drift = {W.prompt_for(s) for s in W.sample_specs(DRIFT_PROMPTS, 2024)}
        prompts = [p for p in (W.prompt_for(s) for s in W.sample_specs(4 * len(pool), 77)) if p not in drift]
        prompts = prompts[:len(pool)]
        folder = out / "data" / "ordinary"
        if len(list(folder.glob("*.png"))) < len(prompts):
            folder.mkdir(parents=True, exist_ok=True)
            with torch.no_grad():
                images = tw.generate(tw.load_toyworld_pipeline(), prompts, seed=77)
            pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for k, image in enumerate(pixels):
                Image.fromarray(image).save(folder / f"{k:04d}.png")
        pool += [(Image.open(folder / f"{k:04d}.png").convert("RGB"), prompt) for k, prompt in enumerate(prompts)]
    return pool


class PoolPrior:
    """`data`'s batches with their prior rows drawn from `pool` instead of each subject's own class images."""

    def __init__(self, data, pool):
        self.data, self.pool = data, pool

    def sample(self, batch_size, generator):
        batch = self.data.sample(batch_size, generator)
        picks = torch.randint(0, len(self.pool), (batch_size,), generator=generator).tolist()
        rows = [self.data.transform(self.pool[k][0], generator) for k in picks]
        batch.pixel_values = torch.cat([batch.pixel_values[:batch_size], torch.stack(rows)])
        batch.prompts = batch.prompts[:batch_size] + [self.pool[k][1] for k in picks]
        return batch


def claim(path: Path) -> bool:
    """Take a run for this process (a `.claim` file made exclusively), so that workers started at any time never
    run the same one; a claim of a killed worker must be deleted by hand."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path.with_suffix(".claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def run_one(out: Path, judge, subject: Subject, variant: Variant, seed: int, steps: int) -> None:
    path = out / "subjects" / f"{run_id(subject, variant, seed)}.json"
    if path.exists() or not claim(path):
        return
    print(f"== {path.stem}", flush=True)
    data = run.training_data(out, subject, seed, with_prior=True)
    if variant.prior_contexts != "trained":
        data = PoolPrior(data, prior_pool(out, subject, variant.prior_contexts))
    torch.manual_seed(seed)  # LoRA's gaussian init
    pipe = tw.load_toyworld_pipeline()
    result = {"subject_name": subject.name, "set": "tuning" if subject in TUNING else "held-out",
              "method": variant.label, "slug": variant.slug, "seed": seed, "steps": steps,
              "prior_loss_weight": variant.prior_loss_weight, "weight_decay": variant.weight_decay,
              "step_scale": variant.step_scale, "denoiser_targets": variant.denoiser_targets,
              "ema_decay": variant.ema_decay, "started": time.strftime("%Y-%m-%d %H:%M")}
    result.update(run.train(pipe, variant.spec, data, seed, steps, prior_loss_weight=variant.prior_loss_weight,
                            weight_decay=variant.weight_decay, step_scale=variant.step_scale,
                            denoiser_targets=variant.denoiser_targets, ema_decay=variant.ema_decay))
    result.update(evaluate(pipe, subject, judge))
    run.write_json(path, result)


def base_limits(out: Path, judge) -> dict:
    """What the base model draws when told the subject outright ("a cyan and magenta striped star on a blue
    background", `Subject.description`): per subject and background, the rate judged to be the subject on the
    requested background. Not a personalisation: a reference for what each background allows."""
    path = out / "subjects" / "base-limits.json"
    if path.exists():
        return json.loads(path.read_text())
    from svdiff_adapter.toyworld.personalize import is_subject

    pipe = tw.load_toyworld_pipeline()
    limits = {}
    for subject in TUNING + HELD_OUT:
        prompts = [subject.description(bg) for bg in tw.BACKGROUNDS for _ in range(PER_BACKGROUND)]
        with torch.no_grad():
            judged = tw.judge_images(tw.generate(pipe, prompts, seed=1), judge=judge)
        limits[subject.name] = {
            bg: sum(is_subject(judged, i, subject) and judged["background"][i] == bg
                    for i in range(k * PER_BACKGROUND, (k + 1) * PER_BACKGROUND)) / PER_BACKGROUND
            for k, bg in enumerate(tw.BACKGROUNDS)}
    run.write_json(path, limits)
    return limits


# ------------------------------------------------------------------------------------------------ report
def _mean(values) -> float:
    values = list(values)
    return 100 * statistics.fmean(values) if values else float("nan")


def summary(rows: list[dict]) -> dict:
    trained = [bg for bg in tw.BACKGROUNDS if bg not in HELD_OUT_BACKGROUNDS]
    return {
        "trained": _mean(statistics.fmean(r["subject_and_background"][bg] for bg in trained) for r in rows),
        **{bg: _mean(r["subject_and_background"][bg] for r in rows) for bg in HELD_OUT_BACKGROUNDS},
        "ordinary": _mean(r["ordinary_prompts_correct"] for r in rows),
        "leakage": _mean(r["leakage"] for r in rows),
        "runs": len(rows),
        "params": rows[0]["trainable_parameters"] if rows else 0,
    }


def report(out: Path, command: str) -> str:
    # The subject's name is the run id's first part (`subject_scores` owns the "subject" key: rates per background).
    rows = [{**json.loads(p.read_text()), "subject_name": p.stem.split("-")[0]}
            for p in sorted((out / "subjects").glob("*.json"))]
    base = json.loads((out / "runs" / "base.json").read_text()) if (out / "runs" / "base.json").exists() else None
    lines = ["# Quality across subjects (generated by benchmarks/quality/subjects.py --report)", "",
             f"Command: `{command}`. Rates in %: subject + requested background, mean over the trained backgrounds "
             "(white, black, gray) and on each held-out one; ordinary prompts right (drift: 40 fixed prompts"
             + (f", base model {100 * base['ordinary_prompts_correct']:.0f} %" if base else "")
             + "); leakage of the class prompt. 16 samples per background and run.", ""]
    labels = [variant.label for variant in METHODS + ABLATIONS]
    limits_path = out / "subjects" / "base-limits.json"
    limits = json.loads(limits_path.read_text()) if limits_path.exists() else {}
    for title, subjects in (("Tuning set", TUNING), ("Held-out set (no tuning decision saw these)", HELD_OUT)):
        lines += [f"## {title}", "", "| subject | method | seeds | subject + bg, trained | blue | green | ordinary "
                  "prompts | leakage |", "|---|---|---|---|---|---|---|---|"]
        for subject in subjects:
            for label in labels:
                chosen = [r for r in rows if r["subject_name"] == subject.name and r["method"] == label]
                if chosen:
                    s = summary(chosen)
                    lines.append(f"| {subject.name} | {label} | {s['runs']} | {s['trained']:.0f} | {s['blue']:.0f} "
                                 f"| {s['green']:.0f} | {s['ordinary']:.0f} | {s['leakage']:.0f} |")
        lines += ["", f"Means over the {title.split(' (')[0].lower()}:", "",
                  "| method | runs | subject + bg, trained | blue | green | ordinary prompts | leakage | trainable |",
                  "|---|---|---|---|---|---|---|---|"]
        names = {subject.name for subject in subjects}
        for label in labels:
            chosen = [r for r in rows if r["subject_name"] in names and r["method"] == label]
            if chosen:
                s = summary(chosen)
                lines.append(f"| {label} | {s['runs']} | {s['trained']:.0f} | {s['blue']:.0f} | {s['green']:.0f} "
                             f"| {s['ordinary']:.0f} | {s['leakage']:.0f} | {s['params']:,} |")
        # The ablations ran on fewer seeds: the default on those seeds is their fair reference.
        ablation_seeds = {r["seed"] for r in rows if r.get("method") in {v.label for v in ABLATIONS}}
        default = METHODS[0].label
        chosen = [r for r in rows if r["subject_name"] in names and r["method"] == default
                  and r["seed"] in ablation_seeds]
        if chosen:
            s = summary(chosen)
            seeds = ", ".join(str(seed) for seed in sorted(ablation_seeds))
            lines.append(f"| {default}, seed {seeds} only (the ablations' reference) | {s['runs']} | "
                         f"{s['trained']:.0f} | {s['blue']:.0f} | {s['green']:.0f} | {s['ordinary']:.0f} | "
                         f"{s['leakage']:.0f} | {s['params']:,} |")
        lines.append("")
    if limits:
        lines += ["## What the base model draws when told the subject outright", "",
                  "The description prompt (\"a cyan and magenta striped star on a blue background\"), no "
                  "personalisation: subject + requested background, %.", "",
                  "| subject | " + " | ".join(tw.BACKGROUNDS) + " |", "|---|" + "---|" * len(tw.BACKGROUNDS)]
        for name, rates in limits.items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * rates[bg]:.0f}" for bg in tw.BACKGROUNDS) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".bench/quality"))
    parser.add_argument("--worker", type=int, default=0, help="this process's starting share: index ...")
    parser.add_argument("--workers", type=int, default=1, help="... out of this many processes (runs are claimed, "
                                                               "so any number of workers can run at once)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--ablation-seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--steps", type=int, default=run.STEPS)
    parser.add_argument("--only", nargs="+", default=None, metavar="SLUG",
                        help="run only the variants with these slugs (e.g. spectral-lr0.03-sigma-step)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="write benchmarks/results/quality_subjects.md")
    parser.add_argument("--base-limits", action="store_true", help="only measure what the base model draws when "
                                                                   "told each subject outright")
    args = parser.parse_args()
    if args.report:
        text = report(args.out, " ".join(["python", *sys.argv]))
        (REPO / "benchmarks" / "results" / "quality_subjects.md").write_text(text)
        print(text)
        return
    torch.set_num_threads(args.threads)
    judge = tw.load_judge()
    if args.base_limits:
        print(json.dumps(base_limits(args.out, judge), indent=1))
        return
    if args.worker == 0:
        run.run_base(args.out, judge)  # the base model's drift score (one process writes it)
    runs = plan(args.seeds, args.ablation_seeds)
    if args.only:
        unknown = set(args.only) - {variant.slug for _, variant, _ in runs}
        if unknown:
            raise SystemExit(f"--only: no planned variant has the slug(s) {sorted(unknown)}")
        runs = [r for r in runs if r[1].slug in args.only]
    # Each worker starts at its own offset and takes any run not claimed yet.
    for subject, variant, seed in runs[args.worker::args.workers] + runs:
        run_one(args.out, judge, subject, variant, seed, args.steps)


if __name__ == "__main__":
    main()
