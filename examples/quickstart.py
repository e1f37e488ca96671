"""Quickstart: personalise the bundled toy-world text-to-image model with a spectral shift, on a CPU, offline.

1. loads the bundled toy-world pipeline (a real, trained StableDiffusionPipeline of ~10 MB; docs/toyworld.md);
2. trains a spectral shift on 5 images of a subject the base model never saw (a green/magenta split circle, shown
   on white, black and gray backgrounds) with the package's DreamBooth-style trainer;
3. reloads the saved shift with `pipe.load_spectral_shift(...)` and draws the subject in new contexts, including
   backgrounds it was never shown on ("a sks circle on a green background");
4. composes it with a second, shipped shift (a dotted square, "zwx") through
   `pipe.set_adapters(["subject", "shipped"], weights=[a, 1 - a])` — the weights combine inside the ReLU;
5. writes outputs/quickstart.png (a labelled grid) and outputs/quickstart.json (the judge's scores).

    python examples/quickstart.py            # or: make demo
    python examples/quickstart.py --model dit   # the same on the bundled toy DiT (an SD3 pipeline, flow matching)

With ``--model dit`` the subject is trained on the toy DiT with the flow-matching loss and the outputs are
``quickstart_dit.png`` / ``quickstart_dit.json``; step 4 is skipped (the shipped shift belongs to the UNet model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from svdiff_adapter import toyworld as tw
from svdiff_adapter.toyworld.personalize import (
    DIT_RECIPE,
    ShiftRecipe,
    leakage,
    subject_scores,
    train_subject_shift,
)


SHIPPED_SHIFT = tw.ASSETS_DIR / "shifts" / "dotted_square"
SHIPPED_SUBJECT, SHIPPED_IDENTIFIER = "dotted_square", "zwx"
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subject", default="split_circle", choices=sorted(tw.SUBJECTS))
    parser.add_argument("--model", default="unet", choices=["unet", "dit"],
                        help="the bundled UNet model, or the bundled DiT (SD3 pipeline, flow matching)")
    parser.add_argument("--max_train_steps", type=int, default=None, help="default: the model's recipe")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs"))
    parser.add_argument("--per_background", type=int, default=8, help="samples per background for the scores")
    # One thread: the toy model's ops are tiny, so a second thread gains little, and when another process holds a
    # core OpenMP's barrier waits make every step many times slower (docs/performance.md, "Threads").
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    return parser.parse_args()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def labelled_grid(rows: list[tuple[str, list[Image.Image]]], column_labels: list[str], scale: int = 2) -> Image.Image:
    """Rows of 64×64 images, upscaled, with a label left of each row and above each column."""
    cell, label_width, header = 64 * scale, 300, 18
    width = label_width + cell * max(len(images) for _, images in rows)
    grid = Image.new("RGB", (width, header + len(rows) * (cell + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for column, text in enumerate(column_labels):
        draw.text((label_width + column * cell + 4, 3), text, fill="black")
    for row, (text, images) in enumerate(rows):
        top = header + row * (cell + 4)
        for line, part in enumerate(text.split("\n")):
            draw.text((6, top + 6 + 14 * line), part, fill="black")
        for column, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (label_width + column * cell, top))
    return grid


def training_images(run_dir: Path) -> list[Image.Image]:
    """The images the shift was trained on: the trainer's subjects are one folder per background,
    `instance/<background>/*.png`. Raises rather than drawing an empty grid."""
    paths = sorted((run_dir / "instance").glob("*/*.png"))
    if not paths:
        raise FileNotFoundError(f"No training images under {run_dir / 'instance'}.")
    return [Image.open(path).convert("RGB") for path in paths]


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    out = args.output_dir
    dit = args.model == "dit"
    name = "quickstart_dit" if dit else "quickstart"
    pipeline_dir = tw.DIT_DIR if dit else tw.PIPELINE_DIR
    run_dir = out / name
    subject = tw.get_subject(args.subject)
    judge = tw.load_judge()

    # 1-2. Train on 5 images of the subject (the trainer loads the bundled pipeline itself).
    recipe = DIT_RECIPE if dit else ShiftRecipe()
    if args.max_train_steps is not None:
        recipe = dataclasses.replace(recipe, max_train_steps=args.max_train_steps)
    train_started = time.time()
    train_subject_shift(subject, run_dir, pipeline_dir=pipeline_dir, recipe=recipe)
    train_seconds = time.time() - train_started

    # 3. Reload the saved shift into a pipeline, as a user would.
    pipe = tw.load_toyworld_pipeline(pipeline_dir)  # svdiff_adapter's StableDiffusion(3)Pipeline
    base_scores = subject_scores(pipe, subject, per_background=args.per_background, judge=judge)
    base_leak = leakage(pipe, subject, judge=judge)
    pipe.load_spectral_shift(run_dir, adapter_name="subject")
    scores = subject_scores(pipe, subject, per_background=args.per_background, judge=judge)
    leak = leakage(pipe, subject, judge=judge)

    new_contexts = [subject.prompt(bg) for bg in tw.BACKGROUNDS]
    shifted_images = to_pil(tw.generate(pipe, new_contexts, seed=7))
    pipe.disable_lora()  # diffusers' switch: all adapters off, the base model
    base_images = to_pil(tw.generate(pipe, new_contexts, seed=7))
    pipe.enable_lora()
    rows = [(f"base model\n'{subject.prompt('<bg>')}'", base_images),
            ("with the trained shift\n(trained on white/black/gray)", shifted_images)]

    # 4. Compose with the shipped shift (UNet model): weights a and 1 - a act inside the ReLU.
    composition = []
    if not dit:
        shipped = tw.get_subject(SHIPPED_SUBJECT)
        pipe.load_spectral_shift(SHIPPED_SHIFT, adapter_name="shipped")
        pipe.enable_spectral_switch_cache()  # each new (a, 1 - a) is then a linear update of the weights
        composed_prompts = [subject.prompt("blue"), shipped.prompt("blue", SHIPPED_IDENTIFIER)]
        composition_rows = {prompt: [] for prompt in composed_prompts}
        for alpha in ALPHAS:
            pipe.set_adapters(["subject", "shipped"], weights=[alpha, 1 - alpha])
            images = tw.generate(pipe, [p for p in composed_prompts for _ in range(4)], seed=11)
            judged = tw.judge_images(images, judge=judge)
            rates = {}
            for k, (prompt, who) in enumerate(zip(composed_prompts, (subject, shipped))):
                indices = range(4 * k, 4 * k + 4)
                rates[who.name] = sum(judged["pattern"][i] == who.pattern and judged["shape"][i] == who.shape
                                      for i in indices) / 4
                composition_rows[prompt].append(to_pil(images[4 * k:4 * k + 1])[0])
            composition.append({"a": alpha, **rates})
        rows += [(f"a = 0, .25, .5, .75, 1 (left to right)\n'{prompt}'", composition_rows[prompt])
                 for prompt in composed_prompts]

    grid = labelled_grid(rows, column_labels=list(tw.BACKGROUNDS))
    out.mkdir(parents=True, exist_ok=True)
    grid.save(out / f"{name}.png")
    labelled_grid([("training images", training_images(run_dir))], []).save(out / f"{name}_training_images.png")

    shift_file = run_dir / "spectral_shift_weights.safetensors"
    metrics = {
        "model": args.model,
        "subject": subject.name,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "shift_file_bytes": shift_file.stat().st_size,
        "trained_on_backgrounds": list(recipe.backgrounds),
        "subject_rate_base": base_scores["subject"],
        "subject_rate_shift": scores["subject"],
        "background_obeyed_shift": scores["background"],
        "class_prompt_leakage": {"base": base_leak, "shift": leak},
        "composition_on_blue": composition,
    }
    (out / f"{name}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    held_out = [bg for bg in tw.BACKGROUNDS if bg not in recipe.backgrounds]
    print(f"\nTrained '{subject.name}' in {train_seconds:.0f} s; shift file {shift_file.stat().st_size / 1024:.0f} KiB.")
    print("Judged as the subject, base -> shift: " + ", ".join(
        f"{bg}{' (held out)' if bg in held_out else ''} {base_scores['subject'][bg]:.0%} -> {scores['subject'][bg]:.0%}"
        for bg in tw.BACKGROUNDS))
    print(f"Requested background obeyed with the shift: {scores['background_mean']:.0%}; "
          f"class prompt turned into the subject: {base_leak:.0%} -> {leak:.0%}.")
    if composition:
        print("Composition a·subject + (1-a)·shipped: " + ", ".join(
            f"a={c['a']}: {c[subject.name]:.0%}/{c[SHIPPED_SUBJECT]:.0%}" for c in composition))
    print(f"Wrote {out / (name + '.png')} and {out / (name + '.json')} in {time.time() - started:.0f} s.")


if __name__ == "__main__":
    main()
