"""benchmarks/aggregate_seeds.py (per-seed results.json files of separate runs aggregated as ``simulate --seeds``
does): what it refuses and what it records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "aggregate_seeds.py"


def _results(seed: int, average_a: float, status: str = "ok", epochs: int = 3) -> dict:
    models = {m: {"A": {"recall@10": a, "users": 10}, "B": {"recall@10": 0.2, "users": 10},
                  "average": {"recall@10": (a + 0.2) / 2}}
              for m, a in (("individual", 0.1), ("average", average_a))}
    return {"status": status, "domains": ["A", "B"], "held_out": [], "models": models, "warnings": [],
            "config": {"run": {"seed": seed}, "eval": {"primary": "recall@10"}, "model": {"params": {"epochs": epochs}}}}


def _aggregate(tmp_path: Path, runs: list[dict]) -> subprocess.CompletedProcess:
    files = []
    for k, run in enumerate(runs):
        files.append(tmp_path / f"in{k}.json")
        files[-1].write_text(json.dumps(run))
    return subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "out"), *map(str, files)],
                          capture_output=True, text=True, cwd=SCRIPT.parent.parent)


def test_a_failed_run_or_a_second_file_of_a_seed_is_refused(tmp_path):
    """Both were aggregated silently: a failed seed's partial figures, and the later file of a seed replacing the
    earlier (and its copy in OUT)."""
    failed = _aggregate(tmp_path, [_results(0, 0.1), _results(1, 0.1, status="failed")])
    assert failed.returncode != 0 and "in1.json: the run ended 'failed', not 'ok': not aggregated" in failed.stderr
    twice = _aggregate(tmp_path, [_results(0, 0.1), _results(1, 0.1), _results(0, 0.5)])
    assert twice.returncode != 0 and "in2.json: seed 0 again (already" in twice.stderr
    assert not (tmp_path / "out").exists()


def test_runs_of_other_settings_are_aggregated_with_a_warning_naming_the_settings(tmp_path):
    done = _aggregate(tmp_path, [_results(0, 0.1), _results(1, 0.12, epochs=5)])
    assert done.returncode == 0, done.stderr
    warnings = json.loads((tmp_path / "out" / "aggregate.json").read_text())["warnings"]
    assert any(w.startswith("seed 1 (") and w.endswith("differs from seed 0 in model.params.epochs") for w in warnings)
