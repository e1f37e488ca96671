"""Tables and plots from the quality benchmark's runs (``run.py``): writes ``benchmarks/results/quality.md`` and the
plots under ``docs/images/``.

    python benchmarks/quality/report.py --out .bench/quality
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent))

from multi import CONDITIONS  # noqa: E402
from run import table_specs  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BACKGROUNDS = ("white", "black", "gray", "blue", "green")
HELD_OUT = ("blue", "green")
METHOD_ORDER = ("shift (UNet+TE)", "shift (UNet)", "LoRA r1 (UNet+TE)", "LoRA r4 (UNet+TE)", "LoRA r16 (UNet+TE)",
                "full FT (UNet+TE)")


def load_runs(out: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((out / "runs").glob("*.json"))]


def pct(value: float) -> str:
    return f"{100 * value:.0f}"


def spread(values: list[float]) -> str:
    """Mean over seeds, with the per-seed values when there are several."""
    if len(values) == 1:
        return pct(values[0])
    return f"{pct(mean(values))} ({'/'.join(pct(v) for v in values)})"


def table_runs(runs: list[dict], out: Path) -> dict[tuple[str, bool], list[dict]]:
    """The main table's runs (each method at the learning rate its sweep chose) grouped by (method label, prior)."""
    chosen = {f"single-{spec.slug}-" for spec in table_specs(out)}
    groups: dict[tuple[str, bool], list[dict]] = defaultdict(list)
    for run in runs:
        if run["kind"] == "single" and any(run["id"].startswith(prefix) for prefix in chosen):
            groups[(run["label"], run["prior"])].append(run)
    return groups


def single_table(groups: dict, base: dict) -> list[str]:
    lines = ["| method | prior | lr | subject + bg, all bgs | subject: white / black / gray (trained) | subject: "
             "blue / green (held out) | requested bg obeyed | ordinary prompts correct | leakage | trainable params "
             "| file | train s |", "|" + "---|" * 12]
    lines.append(f"| base model | – | – | {pct(base['subject_and_background_mean'])} | – | – | "
                 f"{pct(base['background_mean'])} | {pct(base['ordinary_prompts_correct'])} | {pct(base['leakage'])} "
                 "| 0 | – | – |")
    for label in METHOD_ORDER:
        for prior in (True, False):
            group = sorted(groups.get((label, prior), []), key=lambda r: r["seed"])
            if not group:
                continue
            per_bg = {bg: mean(r["subject"][bg] for r in group) for bg in BACKGROUNDS}
            lines.append(
                f"| {label} | {'yes' if prior else 'no'} | {group[0]['learning_rate']:g} | "
                f"{spread([r['subject_and_background_mean'] for r in group])} | "
                f"{' / '.join(pct(per_bg[bg]) for bg in BACKGROUNDS[:3])} | "
                f"{' / '.join(pct(per_bg[bg]) for bg in HELD_OUT)} | "
                f"{spread([r['background_mean'] for r in group])} | "
                f"{spread([r['ordinary_prompts_correct'] for r in group])} | "
                f"{spread([r['leakage'] for r in group])} | {group[0]['trainable_parameters']:,} | "
                f"{group[0]['file_bytes'] / 1e3:,.0f} kB | {mean(r['train_seconds'] for r in group):.0f} |")
    return lines


def sweep_table(runs: list[dict]) -> list[str]:
    sweep = [r for r in runs if r["kind"] == "single" and r["seed"] == 0 and r["prior"] and r["train_text_encoder"]
             and r.get("rank") in (None, 4)]
    lines = ["| method | lr | subject + bg | subject | requested bg | ordinary prompts | leakage |", "|" + "---|" * 7]
    for run in sorted(sweep, key=lambda r: (r["method"], r["learning_rate"])):
        lines.append(f"| {run['label']} | {run['learning_rate']:g} | {pct(run['subject_and_background_mean'])} | "
                     f"{pct(run['subject_mean'])} | {pct(run['background_mean'])} | "
                     f"{pct(run['ordinary_prompts_correct'])} | {pct(run['leakage'])} |")
    return lines


def interpolation_table(result: dict) -> list[str]:
    first, second = result["subjects"]
    lines = [f"| α (weight of {first}) | judged {first} | judged {second} | {first} pattern | {second} pattern | "
             "circle |", "|---|---|---|---|---|---|"]
    for point in result["curve"]:
        lines.append(f"| {point['alpha']:.1f} | {pct(point[first])} | {pct(point[second])} | "
                     f"{pct(point[first + '_pattern'])} | {pct(point[second + '_pattern'])} | {pct(point['circle'])} |")
    return lines


def editing_table(result: dict) -> list[str]:
    lines = ["| source | target prompt | noise | judged edit (shape, colour, bg) | obeys target | keeps shape |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        judged = row["judged"]
        lines.append(f"| {row['source']} | {row['target']} | {row.get('variant', 'inversion')} | "
                     f"{judged['shape']}, {judged['color']}, {judged['background']} | "
                     f"{'yes' if row['obeys_target'] else 'no'} | {'yes' if row['keeps_shape'] else 'no'} |")
    variants = sorted({row.get("variant", "inversion") for row in result["rows"]})
    for variant in variants:
        rows = [r for r in result["rows"] if r.get("variant", "inversion") == variant]
        rate = mean(r["obeys_target"] and r["keeps_shape"] for r in rows)
        lines.append(f"\n{variant}: edits that obey the target and keep the shape: {pct(rate)} % of {len(rows)}.")
    return lines


def multi_table(runs: list[dict]) -> list[str]:
    base = next((r for r in runs if r["kind"] == "multi-base"), None)
    lines = ["| condition (Cut-Mix probability, unmix weight) | both subjects right, in the asked order | first-named "
             "right (left) | second-named right (right) | mixed: an object shows the other's pattern | swapped: both "
             "do | split circle alone | dotted square alone |", "|" + "---|" * 8]
    if base:
        lines.append(f"| pair base model (no shift) | {pct(base['pair_both'])} | {pct(base['pair_left'])} | "
                     f"{pct(base['pair_right'])} | {pct(base['pair_mixed'])} | {pct(base['pair_swapped'])} "
                     "| – | – |")
    conditions: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        if run["kind"] == "multi":
            conditions[run["condition"]].append(run)
    for condition in sorted(conditions, key=list(CONDITIONS).index):
        group = conditions[condition]
        group.sort(key=lambda r: r["seed"])
        cells = [spread([r[key] for r in group]) for key in ("pair_both", "pair_left", "pair_right", "pair_mixed",
                                                             "pair_swapped", "split_circle_alone",
                                                             "dotted_square_alone")]
        setting = f"{group[0]['cutmix_prob']}, {group[0]['unmix_weight']}"
        lines.append(f"| {condition} ({setting}) | " + " | ".join(cells) + " |")
    unmixed = [r for r in runs if r["kind"] == "multi" and "unmix_loss_start" in r]
    for run in sorted(unmixed, key=lambda r: r["id"]):
        lines.append(f"\n{run['id']}: unmix term {run['unmix_loss_start']:.4f} over the first tenth of the Cut-Mix "
                     f"steps, {run['unmix_loss_end']:.4f} over the last tenth.")
    if base:
        model = base["pair_model"]
        lines.append(f"\nPair base model (examples/toyworld/train_pair_model.py), fresh prompts judged fully right: "
                     f"two plain objects {pct(model['pairs'])} %, one patterned {pct(model['pairs_one_patterned'])} %, "
                     f"single objects {pct(model['single'])} %.")
    return lines


def plot_single(groups: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label in METHOD_ORDER if (label, True) in groups or (label, False) in groups]
    panels = [("subject rate, trained backgrounds", lambda r: mean(r["subject"][bg] for bg in BACKGROUNDS[:3])),
              ("subject rate, held-out backgrounds", lambda r: mean(r["subject"][bg] for bg in HELD_OUT)),
              ('leakage: "a circle" drawn as the subject', lambda r: r["leakage"])]
    figure, axes = plt.subplots(1, len(panels), figsize=(16, 3.8), sharey=True)
    width = 0.38
    for axis, (title, measure) in zip(axes, panels):
        for offset, prior in ((-width / 2, True), (width / 2, False)):
            values = [mean(measure(r) for r in groups[(label, prior)]) if groups.get((label, prior)) else 0
                      for label in labels]
            axis.bar([i + offset for i in range(len(labels))], values, width,
                     label="with prior preservation" if prior else "without prior")
        axis.set_xticks(range(len(labels)), [label.replace(" (", "\n(") for label in labels], fontsize=7)
        axis.set_title(title, fontsize=10)
        axis.set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def editing_montage(out: Path, path: Path) -> None:
    """One row per edited image: its side-by-side strip with inversion, then the one with inversion + slerp."""
    from PIL import Image

    rows = []
    for folder in sorted(p for p in (out / "edits").iterdir() if p.is_dir()):
        strips = [Image.open(folder / "side_by_side.png")]
        strips += [Image.open(sub / "side_by_side.png") for sub in sorted(folder.iterdir())
                   if (sub / "side_by_side.png").is_file()]
        row = Image.new("RGB", (sum(s.width for s in strips) + 8 * (len(strips) - 1), strips[0].height), "white")
        x = 0
        for strip in strips:
            row.paste(strip, (x, 0))
            x += strip.width + 8
        rows.append(row)
    montage = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 4 for r in rows)), "white")
    for index, row in enumerate(rows):
        montage.paste(row, (0, index * (row.height + 4)))
    montage.resize((montage.width * 2, montage.height * 2), Image.NEAREST).save(path)


def plot_tradeoff(groups: dict, path: Path) -> None:
    """Subject fidelity against what the model keeps of ordinary prompts, one point per method and prior setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.6))
    markers = dict(zip(METHOD_ORDER, "o^sDvP"))
    for label in METHOD_ORDER:
        for prior in (True, False):
            group = groups.get((label, prior))
            if not group:
                continue
            axis.scatter(mean(r["ordinary_prompts_correct"] for r in group),
                         mean(r["subject_and_background_mean"] for r in group), marker=markers[label], s=60,
                         facecolors=f"C{METHOD_ORDER.index(label)}" if prior else "none",
                         edgecolors=f"C{METHOD_ORDER.index(label)}",
                         label=f"{label}, {'prior' if prior else 'no prior'}")
    axis.set_xlabel("ordinary prompts still drawn right (base model: 1.0)")
    axis.set_ylabel("subject + requested background (5 backgrounds)")
    axis.set_xlim(0, 1.02)
    axis.set_ylim(0, 1)
    axis.legend(fontsize=6.5, loc="upper left", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_interpolation(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, second = result["subjects"]
    alphas = [p["alpha"] for p in result["curve"]]
    figure, axis = plt.subplots(figsize=(5, 3.4))
    for index, (name, style) in enumerate(((first, "o-"), (second, "s-"))):
        axis.plot(alphas, [p[name] for p in result["curve"]], style, color=f"C{index}",
                  label=f"judged {name.replace('_', ' ')}")
        axis.plot(alphas, [p[f"{name}_pattern"] for p in result["curve"]], style[0] + "--", color=f"C{index}",
                  alpha=0.6, label=f"its pattern only ({name.split('_')[0]})")
    axis.set_xlabel(f"α  (weights [α, 1−α] for [{first}, {second}])")
    axis.set_ylabel("rate of samples")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".bench/quality"))
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "quality.md")
    args = parser.parse_args()
    runs = load_runs(args.out)
    by_kind = {r["kind"]: r for r in runs if r["kind"] in ("base", "interpolation", "editing")}
    sections = ["# Quality benchmark results (generated by benchmarks/quality/report.py)", "",
                "Command: `python benchmarks/quality/run.py --out .bench/quality && "
                "python benchmarks/quality/report.py --out .bench/quality` (analysis: docs/quality.md).", "",
                "## Single subject (split circle; rates in %, mean over seeds with per-seed values)", ""]
    groups = table_runs(runs, args.out)
    sections += single_table(groups, by_kind["base"]) + ["", "## Learning-rate sweep (seed 0, prior)", ""]
    sections += sweep_table(runs)
    images = REPO / "docs" / "images"
    plot_single(groups, images / "quality_single_subject.png")
    plot_tradeoff(groups, images / "quality_tradeoff.png")
    if "interpolation" in by_kind:
        sections += ["", "## Interpolation", ""] + interpolation_table(by_kind["interpolation"])
        plot_interpolation(by_kind["interpolation"], images / "quality_interpolation.png")
    if "editing" in by_kind:
        sections += ["", "## CoSINE edits", ""] + editing_table(by_kind["editing"])
        editing_montage(args.out, images / "quality_editing.png")
    if any(r["kind"] == "multi" for r in runs):
        sections += ["", "## Two subjects (split circle = sks, dotted square = zwx; rates in %)", ""]
        sections += multi_table(runs)
    args.results.write_text("\n".join(sections) + "\n")
    print("\n".join(sections))


if __name__ == "__main__":
    main()
