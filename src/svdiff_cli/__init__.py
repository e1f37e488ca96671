"""The `svdiff` command: argparse wiring only; every subcommand calls a function of `svdiff_adapter.tools`,
`svdiff_adapter.training` or `svdiff_adapter.editing` when it runs.

It lives beside the `svdiff_adapter` package, not inside it: importing `svdiff_adapter` registers the tuner with
PEFT, which imports torch and transformers (seconds), and `svdiff --help` or a usage error needs neither. The
options of `svdiff train` and `svdiff edit` are defined here too (`train_options`, `edit_options`), for the same
reason; `svdiff_adapter.training` and `svdiff_adapter.editing` re-export them.

Adding a subcommand: write `add_parser(subparsers)` that creates the subparser and sets `handler=` (a function
`args -> exit code`), then register it in one line::

    from svdiff_adapter.cli import register_subcommand
    register_subcommand("my-command", my_module.add_parser)   # or add it to SUBCOMMANDS below

Exit codes: 0 success, 1 the tool refused (message on stderr, e.g. mismatched bases, missing file), 2 bad usage,
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence


AddParser = Callable[["argparse._SubParsersAction"], argparse.ArgumentParser]
# Subcommand name → function adding its parser. Lazy: a module imports its tool only when run.
SUBCOMMANDS: dict[str, AddParser] = {}
INTERRUPTED = 130  # the shell's exit status for a process stopped by SIGINT (128 + 2)


def _refused_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the tool refused" and are printed as one line. Imported when an error happens: the modules
    defining them import torch."""
    from safetensors import SafetensorError

    from svdiff_adapter.format import SpectralShiftFormatError

    return SpectralShiftFormatError, SafetensorError, ValueError, OSError, KeyError, NotImplementedError


def register_subcommand(name: str, add_parser: Optional[AddParser] = None):
    """Register a subcommand (usable as a decorator). Names must be unique."""

    def register(function: AddParser) -> AddParser:
        if name in SUBCOMMANDS and SUBCOMMANDS[name] is not function:
            raise ValueError(f"The subcommand {name!r} is already registered.")
        SUBCOMMANDS[name] = function
        return function

    return register(add_parser) if add_parser is not None else register


def _describe(error: Exception) -> str:
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    return str(error)


def _print(data, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if as_json else text)


def _check_output_location(path: str) -> None:
    """Refuse an output below a file (``-o notes.txt/out.safetensors``) before any work is done, instead of the
    "[Errno 17] File exists" of the folder creation at the end."""
    for parent in Path(path).absolute().parents:
        if parent.is_dir():
            return
        if parent.exists():
            raise ValueError(f"Cannot write {path}: {parent} is a file, not a folder.")


# ------------------------------------------------------------------------------------------------------ inspect
@register_subcommand("inspect")
def _add_inspect(subparsers):
    parser = subparsers.add_parser("inspect", help="Describe a shift file; check it against a base model.")
    parser.add_argument("source", help="shift file, folder, or Hub repo id")
    parser.add_argument("--base", help="base model folder (pipeline folder with model_index.json, or a model folder)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=_run_inspect)
    return parser


def _run_inspect(args) -> int:
    from svdiff_adapter.tools import format_report, inspect_shift

    report = inspect_shift(args.source, base=args.base)
    _print(report, args.json, format_report(report))
    match = report["base_match"]
    return 1 if match is not None and match["checked"] and not match["matches"] else 0


# -------------------------------------------------------------------------------------------------------- merge
@register_subcommand("merge")
def _add_merge(subparsers):
    parser = subparsers.add_parser("merge", help="Merge shift files into one (Σ wᵢδᵢ, exactly set_adapters).")
    parser.add_argument("sources", nargs="+", help="shift files A B ... (same base model)")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per file (add: default 1 each)")
    parser.add_argument("--mode", default="add", help="add (default) or interpolate (weights normalised to sum 1)")
    parser.add_argument("--blocks", nargs="+", metavar="LABEL:PREFIX[,PREFIX]",
                        help="style mixing, e.g. A:down_blocks,mid_block B:up_blocks (A = first file)")
    parser.add_argument("-o", "--output", required=True, help="output file")
    parser.add_argument("--fp16", action="store_true", help="store δ in float16 (half the size)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run_merge)
    return parser


def _parse_blocks(items: Optional[Sequence[str]]) -> Optional[dict]:
    if not items:
        return None
    blocks = {}
    for item in items:
        label, sep, prefixes = item.partition(":")
        if not sep or not prefixes:
            raise ValueError(f"--blocks entries look like A:down_blocks,mid_block, got {item!r}.")
        blocks.setdefault(label, []).extend(p for p in prefixes.split(",") if p)
    return blocks


def _run_merge(args) -> int:
    import torch

    from svdiff_adapter.tools import merge_shifts

    _check_output_location(args.output)
    merged = merge_shifts(args.sources, args.weights, args.mode, blocks=_parse_blocks(args.blocks),
                          output=args.output, overwrite=args.overwrite,
                          dtype=torch.float16 if args.fp16 else None)
    data = {"output": args.output, "components": merged.components, "parameters": merged.num_parameters,
            "layers": sum(len(d) for d in merged.deltas.values()), "base_model": merged.base_model}
    _print(data, args.json, f"wrote {args.output}: {data['layers']} layers, {data['parameters']:,} parameters")
    return 0


# ------------------------------------------------------------------------------------------------------ convert
@register_subcommand("convert")
def _add_convert(subparsers):
    parser = subparsers.add_parser(
        "convert", help="svdiff-pytorch files → format v1 (needs --base), or v1 → svdiff-pytorch files.")
    parser.add_argument("source", help="svdiff-pytorch folder/file, or a v1 file")
    parser.add_argument("-o", "--output", required=True, help="v1 file (or folder), or the svdiff-pytorch folder")
    parser.add_argument("--to", choices=("v1", "svdiff-pytorch"), help="target format (default: the other one)")
    parser.add_argument("--base", help="base model folder (required for → v1: fingerprints)")
    parser.add_argument("--base-model", help="base model id to record in the v1 file")
    parser.add_argument("--base-revision", help="base model revision to record")
    parser.add_argument("--drop-norms", action="store_true", help="→ svdiff-pytorch: leave out elementwise norm shifts")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run_convert)
    return parser


def _run_convert(args) -> int:
    from svdiff_adapter.tools import ToolError, read_shift, svdiff_pytorch_to_v1, v1_to_svdiff_pytorch

    _check_output_location(args.output)
    target = args.to or ("v1" if read_shift(args.source).source == "svdiff-pytorch" else "svdiff-pytorch")
    if target == "v1":
        if not args.base:
            raise ToolError("Converting to format v1 needs --base MODEL (the fingerprints come from its weights).")
        result = svdiff_pytorch_to_v1(args.source, args.base, args.output, base_model=args.base_model,
                                      base_revision=args.base_revision, overwrite=args.overwrite)
        data = {"output": args.output, "components": result.components, "parameters": result.num_parameters}
    else:
        paths = v1_to_svdiff_pytorch(args.source, args.output, base=args.base, drop_norms=args.drop_norms,
                                     overwrite=args.overwrite)
        data = {"output": {c: str(p) for c, p in paths.items()}}
    _print(data, args.json, f"wrote {data['output']}")
    return 0


# -------------------------------------------------------------------------------------------------- export-lora
@register_subcommand("export-lora")
def _add_export(subparsers):
    parser = subparsers.add_parser("export-lora", help="Export a shift as a LoRA (diffusers + kohya files).")
    parser.add_argument("source", help="shift file")
    parser.add_argument("--base", required=True, help="base model folder")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int, help="rank of every layer")
    group.add_argument("--energy", type=float, help="per layer, keep this fraction of ‖ΔW‖² (e.g. 0.99)")
    parser.add_argument("-o", "--output", required=True,
                        help="diffusers-format LoRA file (pipe.load_lora_weights, ComfyUI)")
    parser.add_argument("--kohya", help="also write a kohya file (ComfyUI / A1111 / LyCORIS; no embeddings)")
    parser.add_argument("--fp16", action="store_true", help="store the LoRA in float16")
    parser.add_argument("--no-probe", action="store_true",
                        help="skip measuring how much of the shift's output change each file reproduces")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run_export)
    return parser


def _run_export(args) -> int:
    import torch

    from svdiff_adapter.tools import export_lora

    for output in (args.output, args.kohya):
        if output:
            _check_output_location(output)
    result = export_lora(args.source, args.base, rank=args.rank, energy=args.energy, output=args.output,
                         kohya_output=args.kohya, dtype=torch.float16 if args.fp16 else torch.float32,
                         overwrite=args.overwrite, probe=not args.no_probe)
    report = result.report()
    lines = [f"{name}: rank {v['rank']}/{v['max_rank']}, relative error {v['relative_error']:.3g}"
             for name, v in report["layers"].items()]
    lines += [f"dropped {name}: {why}" for name, why in report["dropped"].items()]
    if args.kohya:
        lines += [f"not in the kohya file {name}: {why}" for name, why in report["kohya_skipped"].items()]
    lines.append(f"overall relative error ‖ΔW − ΔW_R‖/‖ΔW‖ = {report['relative_error']:.4g}; "
                 f"{report['parameters']:,} LoRA parameters; wrote {', '.join(report['paths'].values())}")
    for component, scores in report["output_change_reproduced"].items():
        if scores is None:
            lines.append(f"{component or 'model'}: no probe input for this model, output change not measured")
            continue
        files = [(label, scores[label]) for label in ("diffusers", "kohya") if label == "diffusers" or args.kohya]
        lines.append(f"{component or 'model'}: the files reproduce " + ", ".join(
            f"{'—' if score is None else f'{100 * score:.1f}%'} ({label} file)" for label, score in files)
            + " of the shift's output change (1 − ‖out_lora − out_shift‖/‖out_shift − out_base‖)")
    _print(report, args.json, "\n".join(lines))
    return 0


# ------------------------------------------------------------------------------------------------------ extract
@register_subcommand("extract")
def _add_extract(subparsers):
    parser = subparsers.add_parser("extract", help="Project a fine-tuned model onto spectral shifts of its base.")
    parser.add_argument("--base", required=True, help="base model folder")
    parser.add_argument("--tuned", required=True, help="fine-tuned model folder (same architecture)")
    parser.add_argument("-o", "--output", required=True, help="output shift file")
    parser.add_argument("--kinds", nargs="+", default=["linear", "conv2d", "norm"], help="module kinds to extract")
    parser.add_argument("--norm-mode", default="elementwise", help="elementwise (default) or scalar")
    parser.add_argument("--base-model", help="base model id to record in the file")
    parser.add_argument("--components", nargs="+",
                        help="pipeline components to compare (default: the denoisers and text encoders in both)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run_extract)
    return parser


def _run_extract(args) -> int:
    from svdiff_adapter.tools import extract_shift

    _check_output_location(args.output)
    result = extract_shift(args.base, args.tuned, args.output, target_kinds=args.kinds, norm_mode=args.norm_mode,
                           base_model=args.base_model, components=args.components, overwrite=args.overwrite)
    report = result.report()
    _print(report, args.json, f"wrote {args.output}: {report['parameters']:,} parameters; the shift keeps "
                              f"{100 * report['kept']:.2f}% of ‖W_tuned − W_base‖² (relative residual "
                              f"{report['relative_residual']:.3g})")
    return 0


# ------------------------------------------------------------------------------------------------- push / pull
@register_subcommand("push")
def _add_push(subparsers):
    parser = subparsers.add_parser("push", help="Upload a shift file or folder to a Hub repo.")
    parser.add_argument("source", help="shift file or folder")
    parser.add_argument("repo_id")
    parser.add_argument("--private", action="store_true", default=None)
    parser.add_argument("--message", help="commit message")
    parser.set_defaults(handler=_run_push)
    return parser


def _run_push(args) -> int:
    from svdiff_adapter.tools import push_shift

    info = push_shift(args.source, args.repo_id, private=args.private, commit_message=args.message)
    print(f"pushed to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


@register_subcommand("pull")
def _add_pull(subparsers):
    parser = subparsers.add_parser("pull", help="Download the shift file(s) of a Hub repo.")
    parser.add_argument("repo_id")
    parser.add_argument("-o", "--output", help="folder to copy the files to (default: just the Hub cache)")
    parser.add_argument("--weight-name")
    parser.add_argument("--revision")
    parser.set_defaults(handler=_run_pull)
    return parser


def _run_pull(args) -> int:
    from svdiff_adapter.tools import pull_shift

    for path in pull_shift(args.repo_id, args.output, weight_name=args.weight_name, revision=args.revision):
        print(path)
    return 0


# -------------------------------------------------------------------------------------------------------- train
@register_subcommand("train")
def _add_train(subparsers):
    from .train_options import DefaultsHelpFormatter, add_train_arguments

    parser = subparsers.add_parser("train", help="Train a spectral shift, DreamBooth-style (docs/training.md).",
                                   formatter_class=DefaultsHelpFormatter)
    add_train_arguments(parser)
    parser.set_defaults(handler=_run_train)
    return parser


def _run_train(args) -> int:
    from svdiff_adapter.training import TrainingInterrupted
    from svdiff_adapter.training import main as train_main

    try:
        train_main(args)
    except TrainingInterrupted as interrupted:
        if interrupted.checkpoint is None:
            print(f"svdiff train: interrupted at step {interrupted.global_step}; no checkpoint was saved.",
                  file=sys.stderr)
        else:
            print(f"svdiff train: interrupted at step {interrupted.global_step}; saved {interrupted.checkpoint}. "
                  "To continue, run the same command with --resume_from_checkpoint latest.", file=sys.stderr)
        return INTERRUPTED
    return 0


# --------------------------------------------------------------------------------------------------------- edit
@register_subcommand("edit")
def _add_edit(subparsers):
    from .edit_options import add_edit_arguments
    from .train_options import DefaultsHelpFormatter

    parser = subparsers.add_parser("edit", help="Edit one image with CoSINE: fine-tune shifts on it, change the "
                                                "prompt (docs/editing.md).", formatter_class=DefaultsHelpFormatter)
    add_edit_arguments(parser)
    parser.set_defaults(handler=_run_edit)
    return parser


def _run_edit(args) -> int:
    from svdiff_adapter.editing import main as edit_main

    result = edit_main(args)
    for role, path in result.files.items():
        print(f"{role}: {path}")
    return 0


# ---------------------------------------------------------------------------------------------------------- app
@register_subcommand("app")
def _add_app(subparsers):
    parser = subparsers.add_parser("app", help="A web app to look at shifts: compose, interpolate, train, edit "
                                               "(docs/app.md; needs the app extra, Gradio).")
    parser.add_argument("--model", help="pipeline folder or Hub id (default: the bundled toy world, offline)")
    parser.add_argument("--shift", action="append", default=[], metavar="SOURCE",
                        help="a shift to load at start (folder, file or Hub id; repeat for several; default for the "
                             "toy world: its shipped dotted-square shift)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    parser.add_argument("--work-dir", help="where training runs and edits are written (default: a temporary folder)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available; the toy world: cpu)")
    parser.set_defaults(handler=_run_app)
    return parser


def _run_app(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("svdiff app needs Gradio: pip install 'svdiff-adapter[app]'.") from None
    from svdiff_adapter.app import TOY_PROMPT, open_studio
    from svdiff_adapter.app.ui import launch

    studio = open_studio(args.model, args.shift, work_dir=args.work_dir, device=args.device)
    print(f"svdiff app: serving {args.model or 'the bundled toy world'} with {studio.shifts or 'no shift'} on "
          f"http://{args.host}:{args.port}", file=sys.stderr)
    launch(studio, host=args.host, port=args.port, share=args.share,
           default_prompt=TOY_PROMPT if args.model is None else "")
    return 0


# --------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svdiff", description="Tools for SVDiff spectral-shift files.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add_parser in SUBCOMMANDS.values():
        add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `svdiff` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"svdiff {args.command}: interrupted.", file=sys.stderr)
        return INTERRUPTED
    except Exception as error:
        if not isinstance(error, _refused_errors()):
            raise
        print(f"svdiff {args.command}: error: {_describe(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
