"""The `svdiff` command: argparse wiring only; every subcommand calls a function of `svdiff_adapter.tools`.

Adding a subcommand (e.g. `train`, `edit` from other issues): write `add_parser(subparsers)` that creates the
subparser and sets `handler=` (a function `args -> exit code`), then register it in one line::

    from svdiff_adapter.cli import register_subcommand
    register_subcommand("train", my_module.add_parser)   # or add it to SUBCOMMANDS below

Exit codes: 0 success, 1 the tool refused (message on stderr, e.g. mismatched bases, missing file), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional, Sequence

from .format import SpectralShiftFormatError


AddParser = Callable[["argparse._SubParsersAction"], argparse.ArgumentParser]
# Subcommand name → function adding its parser. Lazy: a module imports its tool only when run.
SUBCOMMANDS: dict[str, AddParser] = {}
_ERRORS = (SpectralShiftFormatError, ValueError, OSError, KeyError, NotImplementedError)


def register_subcommand(name: str, add_parser: Optional[AddParser] = None):
    """Register a subcommand (usable as a decorator). Names must be unique."""

    def register(function: AddParser) -> AddParser:
        if name in SUBCOMMANDS and SUBCOMMANDS[name] is not function:
            raise ValueError(f"The subcommand {name!r} is already registered.")
        SUBCOMMANDS[name] = function
        return function

    return register(add_parser) if add_parser is not None else register


def _print(data, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if as_json else text)


# ------------------------------------------------------------------------------------------------------ inspect
@register_subcommand("inspect")
def _add_inspect(subparsers):
    parser = subparsers.add_parser("inspect", help="Describe a shift file; check it against a base model.")
    parser.add_argument("source", help="shift file, folder, or Hub repo id")
    parser.add_argument("--base", help="base model folder (pipeline folder with unet/, text_encoder/ or model folder)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=_run_inspect)
    return parser


def _run_inspect(args) -> int:
    from .tools import format_report, inspect_shift

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

    from .tools import merge_shifts

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
    from .tools import ToolError, read_shift, svdiff_pytorch_to_v1, v1_to_svdiff_pytorch

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
    parser.add_argument("-o", "--output", required=True, help="diffusers LoRA file (pipe.load_lora_weights)")
    parser.add_argument("--kohya", help="also write a kohya-style file (ComfyUI / A1111)")
    parser.add_argument("--fp16", action="store_true", help="store the LoRA in float16")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run_export)
    return parser


def _run_export(args) -> int:
    import torch

    from .tools import export_lora

    result = export_lora(args.source, args.base, rank=args.rank, energy=args.energy, output=args.output,
                         kohya_output=args.kohya, dtype=torch.float16 if args.fp16 else torch.float32,
                         overwrite=args.overwrite)
    report = result.report()
    lines = [f"{name}: rank {v['rank']}/{v['max_rank']}, relative error {v['relative_error']:.3g}"
             for name, v in report["layers"].items()]
    lines += [f"dropped {name}: {why}" for name, why in report["dropped"].items()]
    lines.append(f"overall relative error ‖ΔW − ΔW_R‖/‖ΔW‖ = {report['relative_error']:.4g}; "
                 f"{report['parameters']:,} LoRA parameters; wrote {', '.join(report['paths'].values())}")
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
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_run_extract)
    return parser


def _run_extract(args) -> int:
    from .tools import extract_shift

    result = extract_shift(args.base, args.tuned, args.output, target_kinds=args.kinds, norm_mode=args.norm_mode,
                           base_model=args.base_model, overwrite=args.overwrite)
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
    from .tools import push_shift

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
    from .tools import pull_shift

    for path in pull_shift(args.repo_id, args.output, weight_name=args.weight_name, revision=args.revision):
        print(path)
    return 0


# -------------------------------------------------------------------------------------------------------- train
@register_subcommand("train")
def _add_train(subparsers):
    from .training import add_train_arguments

    parser = subparsers.add_parser("train", help="Train a spectral shift, DreamBooth-style (docs/training.md).")
    add_train_arguments(parser)
    parser.set_defaults(handler=_run_train)
    return parser


def _run_train(args) -> int:
    from .training import main as train_main

    train_main(args)
    return 0


# --------------------------------------------------------------------------------------------------------- edit
@register_subcommand("edit")
def _add_edit(subparsers):
    from .editing import add_edit_arguments

    parser = subparsers.add_parser("edit", help="Edit one image with CoSINE: fine-tune shifts on it, change the "
                                                "prompt (docs/editing.md).")
    add_edit_arguments(parser)
    parser.set_defaults(handler=_run_edit)
    return parser


def _run_edit(args) -> int:
    from .editing import main as edit_main

    result = edit_main(args)
    for role, path in result.files.items():
        print(f"{role}: {path}")
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
    except _ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"svdiff {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
