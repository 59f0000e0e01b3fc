"""Scripts under benchmarks/ that turn measured runs into reported figures: what they refuse and what they record
(aggregate_seeds.py: per-seed results.json files of separate runs aggregated as ``simulate --seeds`` does)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "aggregate_seeds.py"


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_merge_amazon_held_out_comparisons_use_the_merged_domains_models_zero_shot():
    """With --seeds and --holdout, the held-out domain's own model (trained on its private data) stood in the
    held-out column as "individual" and was compared with θ₀ as if zero-shot, and the merged domains' models on it
    (the single-domain references) were dropped."""
    from fedmerge.runners.aggregate import aggregate_runs

    as_run = _benchmark("merge_amazon").as_run
    names, merged = ["Beauty", "Pantry", "Toys"], ["Beauty", "Pantry"]
    runs = {}
    for seed in range(3):
        results = {"θ₀": {n: (0.05, 0.02) for n in names}, "average": {n: (0.07 + 0.002 * seed, 0.03) for n in names}}
        for n in names:
            results[f"individual {n}"] = {m: ((0.30 if m == n else 0.04 + 0.001 * seed), 0.04) for m in names}
        runs[seed] = as_run({"results": results}, merged)
    cell = {"recall@10": 0.30, "ndcg@10": 0.04}
    assert runs[0]["models"]["individual"] == {"Beauty": cell, "Pantry": cell, "average": cell}
    assert runs[0]["models"]["individual_Beauty"] == {"Toys": {"recall@10": 0.04, "ndcg@10": 0.04}}
    toys = aggregate_runs(runs, "recall@10", training_free=["average"])["held_out_paired"]["Toys"]["recall@10"]
    assert set(toys["best_individual"].values()) <= {"individual_Beauty", "individual_Pantry"}
    assert set(toys["models"]) == {"average"}


def test_dp_trainable_summary_keeps_domains_overrides_and_dp_settings_apart(tmp_path, capsys):
    """Rows were keyed by label and seed only: another domain's, --set's or clip norm's rows replaced earlier ones."""
    summarize = _benchmark("dp_trainable").summarize
    dp = {"model": "dp-sgd", "subset": "all", "epsilon": 8.0, "delta": 1e-5, "dp_epochs": 1.0, "q": 0.01, "lr": 0.002}
    rows = [{"domain": domain, "overrides": overrides, "seed": 0, "model": "theta0", "recall@10": value}
            for domain, overrides, value in (("Pantry", [], 0.10), ("Toys", [], 0.05), ("Toys", ["model.params.x=1"], 0.07))]
    rows += [{**dp, "domain": "Pantry", "overrides": [], "seed": 0, "clip": clip, "recall@10": value}
             for clip, value in ((1.0, 0.11), (2.0, 0.12))]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summarize([str(tmp_path / "rows.jsonl")])
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line and not line[0].isspace() and "seeds" not in line
            and not line.startswith(("θ₀", "DP-SGD"))] == ["Pantry", "Toys", "Toys (--set model.params.x=1)"]
    assert sum(line.startswith("θ₀ ") for line in out.splitlines()) == 3 and "C=1 all" in out and "C=2 all" in out
    assert "0.1000" in out and "0.0500" in out and "0.0700" in out


def test_attack_table_shows_a_dash_for_a_model_the_runs_did_not_make():
    """A --set that removes a model (baselines.fedavg_rounds=0) raised KeyError in the final table, after every run
    had finished."""
    attacks = _benchmark("attacks")
    record = {"attack": next(iter(attacks.ATTACKS)), "config": next(iter(attacks.CONFIGS)), "seed": 0, "routed": False,
              "relative": {m: 0.5 for m in list(attacks.COLUMNS)[:-1]}, "attacker": "synth-2", "rejected": {},
              "clipped": False, "warnings": [], "status": "ok", "strict_json": True}
    row = attacks.table([record]).splitlines()[-1]
    assert row.count("0.50") == len(attacks.COLUMNS) - 1 and "| - |" in row
