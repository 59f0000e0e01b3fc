"""The CLI's subcommands (one module each, registered by :mod:`fedmerge.cli`) and their shared argument types."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def seed(text: str) -> int:
    """An argparse type: a seed, an integer >= 0 (``--seed -1`` failed only after ``--overwrite`` had emptied the
    output folder, as "expected non-negative integer", naming no flag) and below 2**63, as ``run.seed``."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed is an integer >= 0, got {text!r}")
    from fedmerge.config import SEED_LIMIT, SEED_LIMIT_REASON

    if value >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"a seed is an integer below 2**63 ({SEED_LIMIT_REASON}), got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0 (``--timeout nan`` never timed out, the deadline test never
    being true, and a negative one failed only after every process had started)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"a finite number of seconds > 0, got {text!r}")
    return value


@contextmanager
def json_on_failure(enabled: bool, results_path: Path) -> Iterator[None]:
    """With ``--json`` (``enabled``), a run that fails still prints its one JSON object on stdout: ``status``
    "failed", the ``error``, ``results`` (``results_path`` when this run wrote it, else null: an earlier run's file
    is not this one's) and that file's ``warnings``; the error then goes on to the CLI (its line on stderr, a
    non-zero exit code). Without it, stdout held nothing and a script reading it had no object to parse."""
    from fedmerge.runners.simulation import file_identity

    before = file_identity(results_path)
    try:
        yield
    except (Exception, KeyboardInterrupt) as exc:
        if enabled:
            fresh = file_identity(results_path) not in (None, before)
            warnings: list = []
            if fresh:
                try:
                    warnings = list(json.loads(results_path.read_text()).get("warnings", []))
                except (OSError, ValueError, AttributeError, TypeError):
                    pass
            error = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc) or type(exc).__name__
            print(json.dumps({"status": "failed", "error": error, "results": str(results_path) if fresh else None,
                              "warnings": warnings}))
        raise
