"""The `svdiff` command, re-exported: it lives in the top-level `svdiff_cli` package so that `svdiff --help` does
not import torch (see that package's docstring)."""

from svdiff_cli import SUBCOMMANDS, build_parser, main, register_subcommand

__all__ = ["SUBCOMMANDS", "build_parser", "main", "register_subcommand"]
