"""Tools for spectral-shift files: inspect, merge, convert, export to LoRA, extract, push/pull.

Each tool is a documented function returning data; `svdiff_adapter.cli` wires them to the `svdiff` command.
"""

from ._base import ToolError, load_base, read_shift
from .convert import svdiff_pytorch_to_v1, v1_to_svdiff_pytorch
from .export_lora import LoraExport, export_lora
from .extract import Extraction, extract_shift
from .hub import pull_shift, push_shift
from .inspect_shift import format_report, inspect_shift
from .merge import MERGE_MODES, merge_shifts


__all__ = [
    "Extraction",
    "LoraExport",
    "MERGE_MODES",
    "ToolError",
    "export_lora",
    "extract_shift",
    "format_report",
    "inspect_shift",
    "load_base",
    "merge_shifts",
    "pull_shift",
    "push_shift",
    "read_shift",
    "svdiff_pytorch_to_v1",
    "v1_to_svdiff_pytorch",
]
