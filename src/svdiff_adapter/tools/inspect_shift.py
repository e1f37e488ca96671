"""`svdiff inspect`: what a spectral-shift file holds, and whether a base model fits it."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

import torch

from ..format import FORMAT_VERSION, fingerprints_match
from ._base import (
    BaseSource,
    ShiftSource,
    ToolError,
    base_modules,
    block_of,
    guess_kind,
    load_base,
    module_fingerprint,
    read_shift,
)


def inspect_shift(source: ShiftSource, base: Optional[BaseSource] = None, *, svd_cache=None) -> dict:
    """Describe a spectral-shift file (format v1 or svdiff-pytorch), optionally against a base model.

    Args:
        source (`str`, `os.PathLike` or `SpectralShiftFile`):
            A file, a folder holding one (or svdiff-pytorch's two), or a Hub repo id (downloaded through
            huggingface_hub, as `pipe.load_spectral_shift` does).
        base (`str`, `nn.Module` or `dict[str, nn.Module]`, *optional*):
            A local base model folder, a model or `{component: model}`. With it the report is exact (module kinds
            from the modules, σ of every weight for the clip counts) and says whether the base matches the file's
            fingerprints.
        svd_cache (*optional*): passed to `compute_factors` (`False` disables the disk cache).

    Returns:
        `dict`: JSON-serialisable report with keys `path`, `size_bytes`, `format` (`"v1"` or `"svdiff-pytorch"`),
        `format_version`, `base_model`, `base_revision`, `components` (per component: config, `layers`,
        `layers_by_kind`, `parameters`), `parameters`, `kinds_from` (`"base model"` or `"module names"`),
        `blocks` (per block: `layers`, `parameters`, `mean_abs_delta`, `max_abs_delta`, `clipped` — how many shifted
        values the ReLU clips, σ + δ < 0 — with `clipped_exact`), and `base_match` (`None` without a base).

    Without a base, `clipped` counts the values known to clip: the file's fingerprint holds the 4 leading σ, and
    every later σ is at most the 4th, so δⱼ ≤ −σ₄ surely clips; `clipped_max` counts those that may (δⱼ < 0).
    """
    shift_file = read_shift(source)
    path = None if not isinstance(source, (str, os.PathLike)) else Path(os.path.expanduser(os.fspath(source)))
    size = None
    if path is not None and path.is_file():
        size = path.stat().st_size
    elif path is not None and path.is_dir():
        size = sum(p.stat().st_size for p in path.glob("*.safetensors"))

    infos = None
    if base is not None:
        infos = base_modules(load_base(base, shift_file.components), shift_file, svd_cache=svd_cache)

    components, blocks, match = {}, defaultdict(lambda: defaultdict(float)), None
    if infos is not None:
        match = {"matches": True, "checked": 0, "mismatched": [], "no_fingerprint": 0}
    for component, deltas in shift_file.deltas.items():
        config = shift_file.configs.get(component, {})
        norm_mode = config.get("norm_mode", "elementwise")
        fingerprints = shift_file.fingerprints.get(component, {})
        kinds = Counter()
        for name, delta in deltas.items():
            info = infos[component][name] if infos is not None else None
            kind = info.kind if info is not None else guess_kind(name, delta, norm_mode)
            kinds[kind] += 1
            elementwise_norm = kind == "norm" and norm_mode == "elementwise"
            if info is not None:
                sure = maybe = 0 if info.factors is None else int((info.factors.S + delta < 0).sum())
            elif elementwise_norm:
                sure = maybe = 0
            else:
                sure, maybe = _clip_bounds(delta, fingerprints.get(name))
            block = blocks[f"{component}:{block_of(name)}" if component else block_of(name)]
            block["layers"] += 1
            block["parameters"] += delta.numel()
            block["abs_sum"] += float(delta.abs().sum())
            block["max_abs_delta"] = max(block["max_abs_delta"], float(delta.abs().max()))
            block["clipped"] += sure
            block["clipped_max"] += maybe
            if match is not None:
                if name not in fingerprints:
                    match["no_fingerprint"] += 1
                    continue
                match["checked"] += 1
                if not fingerprints_match(list(fingerprints[name]), module_fingerprint(info)):
                    match["mismatched"].append(f"{component}.{name}" if component else name)
        components[component] = {
            "config": config,
            "layers": len(deltas),
            "layers_by_kind": dict(sorted(kinds.items())),
            "parameters": sum(t.numel() for t in deltas.values()),
        }
    if match is not None:
        match["matches"] = not match["mismatched"] and match["checked"] > 0
        if match["checked"] == 0:
            match["reason"] = "the file has no fingerprints, e.g. an svdiff-pytorch file; `svdiff convert` adds them"
    return {
        "path": os.fspath(path) if path is not None else None,
        "size_bytes": size,
        "format": shift_file.source,
        "format_version": FORMAT_VERSION if shift_file.source == "v1" else None,
        "base_model": shift_file.base_model,
        "base_revision": shift_file.base_revision,
        "components": components,
        "parameters": shift_file.num_parameters,
        "kinds_from": "base model" if infos is not None else "module names",
        "blocks": {
            name: {
                "layers": int(b["layers"]),
                "parameters": int(b["parameters"]),
                "mean_abs_delta": b["abs_sum"] / max(b["parameters"], 1),
                "max_abs_delta": b["max_abs_delta"],
                "clipped": int(b["clipped"]),
                "clipped_max": int(b["clipped_max"]),
                "clipped_exact": infos is not None or b["clipped"] == b["clipped_max"],
            }
            for name, b in blocks.items()
        },
        "base_match": match,
    }


def _clip_bounds(delta: torch.Tensor, fingerprint: Optional[list]) -> tuple[int, int]:
    """(surely clipped, possibly clipped) from δ and the leading σ of the fingerprint (σ descending, σ ≥ 0)."""
    negative = delta < 0
    if not fingerprint:
        return 0, int(negative.sum())
    lead = torch.tensor([float(v) for v in fingerprint], dtype=torch.float32)[: delta.numel()]
    head = int((lead + delta[: lead.numel()] < 0).sum())
    tail = delta[lead.numel():]
    return head + int((tail + lead[-1] <= 0).sum()), head + int((tail < 0).sum())


def format_report(report: dict) -> str:
    """The human-readable form of `inspect_shift`'s report (what the CLI prints)."""
    lines = [
        f"file:         {report['path']}" + (f" ({report['size_bytes']:,} bytes)" if report["size_bytes"] else ""),
        "format:       " + (f"svdiff-adapter v{report['format_version']}" if report["format_version"] else report["format"]),
        f"base model:   {report['base_model'] or '(not recorded)'}"
        + (f" @ {report['base_revision']}" if report["base_revision"] else ""),
        f"parameters:   {report['parameters']:,}",
    ]
    for component, info in report["components"].items():
        kinds = ", ".join(f"{k} {n}" for k, n in info["layers_by_kind"].items())
        lines.append(f"component {component or '(model)'}: {info['layers']} layers ({kinds}; kinds from "
                     f"{report['kinds_from']}), {info['parameters']:,} parameters, config {info['config']}")
    lines.append(f"{'block':40s} {'layers':>6s} {'params':>8s} {'mean|δ|':>10s} {'max|δ|':>10s} clipped")
    for name, block in report["blocks"].items():
        clipped = str(block["clipped"]) if block["clipped_exact"] else f"{block['clipped']}..{block['clipped_max']}"
        lines.append(f"{name:40s} {block['layers']:6d} {block['parameters']:8d} {block['mean_abs_delta']:10.4g} "
                     f"{block['max_abs_delta']:10.4g} {clipped}")
    match = report["base_match"]
    if match is not None:
        if match["matches"]:
            lines.append(f"base model: MATCHES the fingerprints ({match['checked']} modules checked)")
        elif match["checked"] == 0:
            lines.append(f"base model: cannot be checked ({match.get('reason')})")
        else:
            lines.append(f"base model: DOES NOT MATCH ({len(match['mismatched'])} of {match['checked']} modules differ, "
                         f"e.g. {match['mismatched'][:3]})")
    return "\n".join(lines)


__all__ = ["inspect_shift", "format_report", "ToolError"]
