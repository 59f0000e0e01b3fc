"""The CLI's subcommands (one module each, registered by :mod:`fedmerge.cli`) and their shared argument types."""

from __future__ import annotations

import argparse


def seed(text: str) -> int:
    """An argparse type: a seed, an integer >= 0 (``--seed -1`` failed only after ``--overwrite`` had emptied the
    output folder, as "expected non-negative integer", naming no flag)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed is an integer >= 0, got {text!r}")
    return value
