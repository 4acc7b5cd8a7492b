"""The command-line parser every stage starts from: its name, what it does, and ``--params``."""

from __future__ import annotations

import argparse


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser for ``prog`` (``lm-sleep <command>``) with ``--params`` (default params.yaml: the file whose folder
    every relative path in it starts from)."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    return ap
