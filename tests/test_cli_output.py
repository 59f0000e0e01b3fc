"""What the CLI prints and how fast it answers: light --help, quiet logging by default, the run summary."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from fedmerge.cli import COMMAND_MODULES
from fedmerge.logs import configure_logging
from fedmerge.runners.results import run_summary

HEAVY = ("torch", "flwr", "ray", "transformers", "matplotlib", "scipy")


@pytest.mark.parametrize("argv", [["--help"], *([name, "--help"] for name in COMMAND_MODULES)])
def test_help_imports_no_heavy_module(argv):
    """``--help`` (top level and every command; merge's lists the torch-free merge registry) builds the parser
    without importing torch, Flower, Ray, transformers, matplotlib or scipy."""
    code = (f"import sys\nfrom fedmerge.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print('IMPORTED', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "IMPORTED []" in done.stderr, done.stderr[-500:]
    assert "usage: fedmerge" in done.stdout


def test_default_logging_is_quiet_and_verbose_brings_frameworks_back():
    root = logging.getLogger()
    saved = (root.level, {n: logging.getLogger(n).level for n in ("flwr", "alembic")})
    try:
        configure_logging()
        assert not logging.getLogger("fedmerge.x").isEnabledFor(logging.INFO)
        assert not logging.getLogger("flwr").isEnabledFor(logging.WARNING)
        assert not logging.getLogger("alembic.runtime").isEnabledFor(logging.INFO)
        logging.getLogger("flwr").setLevel(logging.NOTSET)
        configure_logging(verbose=True)
        assert logging.getLogger("fedmerge.x").isEnabledFor(logging.INFO)
        assert logging.getLogger("flwr").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(saved[0])
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)


def test_summary_has_ndcg_a_timings_table_and_marks_the_joint_oracle():
    metrics = {"recall@10": 0.5, "ndcg@10": 0.25}
    results = {"run": {"engine": "inprocess", "seed": 7}, "domains": ["a"], "held_out": [],
               "models": {"ties": {"a": metrics, "average": metrics},
                          "joint": {"a": metrics, "average": metrics, "non_private": True}},
               "timings_s": {"merging": 1.5, "evaluation": 0.5}}
    text = run_summary(json.loads(json.dumps(results)), "recall@10")
    assert text.count("recall@10 (") == 1 and "ndcg@10 (inprocess engine)" in text
    # a single run's table names its seed and that it has no interval, and what unmasked means
    assert text.count("seed 7, a single run: no interval (several seeds give means and 95 % intervals") == 1
    assert "unmasked: history items stay in the ranking" in text
    assert "joint†" in text and "† = trained on the pooled private data" in text
    assert "merging     1.5\n" in text and "evaluation  0.5" in text
