"""Multi-subject phase of the quality benchmark: two subjects trained jointly into one shift, with and without
Cut-Mix-Unmix, judged on two-object prompts ("a sks circle and a zwx square on a blue background").

Needs a base model that draws two objects side by side (64x128): `examples/toyworld/train_pair_model.py`, which this
phase runs first when its pipeline is missing. Cut-Mix in this world joins one image of each subject side by side
(same background), prompt "a sks circle and a zwx square on a white background" (the first named on the left, as in
the pair model's training data) and masks = the two halves; the prior samples are the same joins of class images
("a circle and a square on a white background"). The unmix regularisation is the trainer's (`training.attention`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from methods import MethodSpec, save

from svdiff_adapter import toyworld as tw
from svdiff_adapter.toyworld.personalize import is_subject, subject_scores, write_subject_images
from svdiff_adapter.toyworld.world import IMAGE_SIZE, PAIR_WIDTH, PairSpec, Subject, pair_prompt
from svdiff_adapter.training.data import Batch
from svdiff_adapter.training.images import ImageTransform, load_images
from svdiff_adapter.training.prior import ensure_class_images

REPO = Path(__file__).resolve().parents[2]
SUBJECTS = (Subject("split_circle", shape="circle", pattern="split", colors=("green", "magenta"), identifier="sks"),
            Subject("dotted_square", shape="square", pattern="dots", colors=("blue", "yellow"), identifier="zwx"))
CONDITIONS = {  # name: (Cut-Mix probability per step, unmix weight)
    "joint": (0.0, 0.0),
    "cut-mix": (0.6, 0.0),
    "cut-mix-unmix-0.1": (0.6, 0.1),  # the weight examples/train_dreambooth_svdiff.py suggests
    "cut-mix-unmix-1": (0.6, 1.0),  # the unmix term is ~0.004 beside a ~0.04 denoising loss: 0.1 weighs little
}
PAIR_SAMPLES = 8  # per background and per order (sks left / zwx left)


def pair_model(out: Path) -> Path:
    """The two-object base model's pipeline folder, trained by the example script when missing (resumable)."""
    folder = out / "pair-model"
    if not (folder / "pipeline" / "model_index.json").is_file():
        subprocess.run([sys.executable, str(REPO / "examples" / "toyworld" / "train_pair_model.py"), "--out",
                        str(folder)], check=True)
    return folder / "pipeline"


class PairData:
    """Batches for two subjects trained jointly: single-subject samples (64x64), or, with probability `cutmix_prob`
    per step, a whole batch of Cut-Mix joins (64x128) with their region masks and identifiers."""

    def __init__(self, out: Path, pipeline_dir: Path, backgrounds, num_images: int, num_class_images: int,
                 seed: int, cutmix_prob: float):
        self.backgrounds, self.cutmix_prob = list(backgrounds), cutmix_prob
        self.transform = ImageTransform(IMAGE_SIZE)
        self.instance, self.classes = {}, {}
        for subject in SUBJECTS:
            for index, background in enumerate(self.backgrounds):
                count = len(range(index, num_images, len(self.backgrounds)))
                folder = out / "data" / f"multi-{subject.name}-seed{seed}" / background
                if not folder.is_dir():
                    write_subject_images(subject, folder, count, [background], seed=seed + index)
                self.instance[subject.name, background] = load_images(str(folder), what="instance image")
                class_dir = out / "data" / f"multi-class-{subject.shape}" / background
                ensure_class_images(str(class_dir), subject.class_prompt(background), num_class_images,
                                    lambda: tw.load_toyworld_pipeline(pipeline_dir), resolution=IMAGE_SIZE,
                                    sample_batch_size=25, num_inference_steps=25, seed=index)
                self.classes[subject.name, background] = load_images(str(class_dir), what="class image")

    def _pick(self, images, generator) -> torch.Tensor:
        return self.transform(images[int(torch.randint(0, len(images), (1,), generator=generator))], generator)

    def _background(self, generator) -> str:
        return self.backgrounds[int(torch.randint(0, len(self.backgrounds), (1,), generator=generator))]

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Batch:
        cutmix = float(torch.rand(1, generator=generator)) < self.cutmix_prob
        images, prompts, priors, prior_prompts, pairs, masks = [], [], [], [], [], []
        for _ in range(batch_size):
            background = self._background(generator)
            order = list(SUBJECTS) if float(torch.rand(1, generator=generator)) < 0.5 else list(SUBJECTS)[::-1]
            if not cutmix:
                subject = order[0]
                images.append(self._pick(self.instance[subject.name, background], generator))
                priors.append(self._pick(self.classes[subject.name, background], generator))
                prompts.append(subject.prompt(background))
                prior_prompts.append(subject.class_prompt(background))
                pairs.append(None)
                masks.append(torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE))
                continue
            left, right = order
            images.append(torch.cat([self._pick(self.instance[s.name, background], generator) for s in order], -1))
            priors.append(torch.cat([self._pick(self.classes[s.name, background], generator) for s in order], -1))
            scene = PairSpec(left.spec(background), right.spec(background))
            prompts.append(pair_prompt(scene, (left.identifier, right.identifier)))
            prior_prompts.append(f"a {left.shape} and a {right.shape} on a {background} background")
            pairs.append((left.identifier, right.identifier))
            region = torch.zeros(2, IMAGE_SIZE, PAIR_WIDTH)
            region[0, :, :IMAGE_SIZE], region[1, :, IMAGE_SIZE:] = 1, 1
            masks.append(region)
        return Batch(pixel_values=torch.stack(images + priors), prompts=prompts + prior_prompts,
                     num_instance=batch_size, pairs=pairs, masks=torch.stack(masks))


def pair_scores(pipe, judge, backgrounds, seed: int = 5) -> dict:
    """Judge "a sks circle and a zwx square on a <bg> background" and the reversed order at 64x128.

    Per image: `both` = the left half is the first-named subject and the right half the second (shape, pattern and
    both colours); `mixed` = an object carries the other subject's pattern (a dotted circle, a split square), the
    mixing of features Cut-Mix-Unmix is meant to prevent; `swapped` = each half shows the other subject's pattern.
    """
    prompts, expected = [], []
    for background in backgrounds:
        for order in (SUBJECTS, SUBJECTS[::-1]):
            scene = PairSpec(order[0].spec(background), order[1].spec(background))
            prompts += [pair_prompt(scene, (order[0].identifier, order[1].identifier))] * PAIR_SAMPLES
            expected += [order] * PAIR_SAMPLES
    with torch.no_grad():
        judged = tw.judge_pairs(tw.generate(pipe, prompts, seed=seed, width=PAIR_WIDTH), judge=judge)
    n = len(prompts)
    left = [is_subject(judged["left"], i, expected[i][0]) for i in range(n)]
    right = [is_subject(judged["right"], i, expected[i][1]) for i in range(n)]
    left_foreign = [judged["left"]["pattern"][i] == expected[i][1].pattern for i in range(n)]
    right_foreign = [judged["right"]["pattern"][i] == expected[i][0].pattern for i in range(n)]
    mixed = [a or b for a, b in zip(left_foreign, right_foreign)]
    return {"pair_samples": n, "pair_both": sum(a and b for a, b in zip(left, right)) / n,
            "pair_left": sum(left) / n, "pair_right": sum(right) / n, "pair_mixed": sum(mixed) / n,
            "pair_swapped": sum(a and b for a, b in zip(left_foreign, right_foreign)) / n,
            "pair_both_unmixed": sum(a and b and not m for a, b, m in zip(left, right, mixed)) / n}


def run_multi(out: Path, judge, condition: str, seed: int, steps: int, train, write_json, spectral_lr: float,
              backgrounds, num_images: int, num_class_images: int) -> dict:
    run_id = f"multi-{condition}-s{seed}"
    path = out / "runs" / f"{run_id}.json"
    if path.exists():
        return json.loads(path.read_text())
    print(f"== {run_id}", flush=True)
    pipeline_dir = pair_model(out)
    cutmix_prob, unmix_weight = CONDITIONS[condition]
    data = PairData(out, pipeline_dir, backgrounds, num_images, num_class_images, seed, cutmix_prob)
    pipe = tw.load_toyworld_pipeline(pipeline_dir)
    result = {"kind": "multi", "id": run_id, "condition": condition, "cutmix_prob": cutmix_prob,
              "unmix_weight": unmix_weight, "seed": seed, "steps": steps, "subjects": [s.name for s in SUBJECTS]}
    spec = MethodSpec("spectral", spectral_lr)
    result.update(train(pipe, spec, data, seed, steps, unmix_weight=unmix_weight))
    save(spec, pipe, out / "weights" / run_id)  # kept, so that the scores can be recomputed without training
    result.update(pair_scores(pipe, judge, tw.BACKGROUNDS))
    with torch.no_grad():
        for subject in tqdm(SUBJECTS, desc="single prompts", leave=False):
            scores = subject_scores(pipe, subject, per_background=4, judge=judge)
            result[f"{subject.name}_alone"] = scores["subject_mean"]
    write_json(path, result)
    return result


def run_pair_base(out: Path, judge, write_json) -> dict:
    """The pair model before personalisation: the same pair prompts (the identifiers mean nothing yet)."""
    path = out / "runs" / "multi-base.json"
    if path.exists():
        return json.loads(path.read_text())
    pipeline_dir = pair_model(out)
    pipe = tw.load_toyworld_pipeline(pipeline_dir)
    metrics = json.loads((pipeline_dir.parent / "metrics.json").read_text())
    result = {"kind": "multi-base", **pair_scores(pipe, judge, tw.BACKGROUNDS),
              "pair_model": {key: metrics[key]["all"] for key in ("pairs", "pairs_one_patterned", "single")}}
    write_json(path, result)
    return result


def montage(out: Path, path: Path, seed: int = 0, samples: int = 6) -> None:
    """Samples of "a sks circle and a zwx square on a blue background" per condition (rows), as a PNG: the pair model
    alone, then each condition's seed-`seed` shift (from the weights each run saves)."""
    from PIL import Image, ImageDraw

    import svdiff_adapter as sa

    sa.patch_diffusers()
    pipeline_dir = pair_model(out)
    scene = PairSpec(SUBJECTS[0].spec("blue"), SUBJECTS[1].spec("blue"))
    prompts = [pair_prompt(scene, (SUBJECTS[0].identifier, SUBJECTS[1].identifier))] * samples
    rows = [("pair model", None)] + [(name, out / "weights" / f"multi-{name}-s{seed}") for name in CONDITIONS]
    label_width, gap = 150, 4
    sheet = Image.new("RGB", (label_width + samples * (PAIR_WIDTH + gap), len(rows) * (IMAGE_SIZE + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (label, weights) in enumerate(rows):
        pipe = tw.load_toyworld_pipeline(pipeline_dir)
        if weights is not None:
            pipe.load_spectral_shift(str(weights), adapter_name="pair", svd_cache=False)
        with torch.no_grad():
            images = tw.generate(pipe, prompts, seed=11, width=PAIR_WIDTH)
        pixels = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        y = index * (IMAGE_SIZE + gap)
        draw.text((4, y + IMAGE_SIZE // 2 - 6), label, fill="black")
        for column, image in enumerate(pixels):
            sheet.paste(Image.fromarray(image), (label_width + column * (PAIR_WIDTH + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(path)
