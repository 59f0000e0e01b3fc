"""Aggregation over seeds against hand-computed means, intervals, ratios and paired tests; ``--seeds`` parsing; a
multi-seed run with per-seed resume."""

from __future__ import annotations

import json
import math

import pytest

from fedmerge.config import apply_overrides, load_scenario, parse_seeds
from fedmerge.errors import FedmergeError
from fedmerge.runners.aggregate import aggregate_runs, interval, paired_test

T_975_DF2 = 4.302652729911275  # Student t quantile 0.975, 2 degrees of freedom (tables: 4.303)


def test_interval_of_three_values_by_hand():
    stats = interval([0.1, 0.2, 0.3])
    # mean 0.2; s = sqrt((0.01 + 0 + 0.01) / 2) = 0.1; half-width t · s / sqrt(3)
    assert stats["n"] == 3 and stats["mean"] == pytest.approx(0.2)
    assert stats["std"] == pytest.approx(0.1)
    assert stats["half_width"] == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3))
    assert (stats["low"], stats["high"]) == pytest.approx((0.2 - 0.248413771, 0.2 + 0.248413771))


def test_one_value_has_no_interval_and_equal_differences_no_test():
    assert interval([0.5]) == {"n": 1, "mean": 0.5, "std": None, "half_width": None, "low": None, "high": None,
                               "values": [0.5]}
    assert interval([0.3, 0.3])["half_width"] == 0.0
    assert paired_test([0.2, 0.3], [0.1, 0.2]) == {"t": None, "p": None}
    with pytest.raises(ValueError, match="non-empty"):
        interval([])


def test_paired_t_test_by_hand():
    # d = (.02, .01, .03): mean .02, s_d = .01, t = .02 / (.01 / sqrt 3) = 2 sqrt 3; with 2 degrees of freedom
    # the t CDF is 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - t / sqrt(2 + t^2) (two-sided).
    t = 2 * math.sqrt(3)
    result = paired_test([0.12, 0.11, 0.15], [0.10, 0.10, 0.12])
    assert result["t"] == pytest.approx(t)
    assert result["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))


def _run(values: dict[str, tuple[float, float]], warnings: list[str] = ()) -> dict:
    """A results.json-like dict: model -> (domain A, domain B) recall@10, average = their mean."""
    models = {m: {"A": {"recall@10": a, "users": 10}, "B": {"recall@10": b, "users": 10},
                  "average": {"recall@10": (a + b) / 2}} for m, (a, b) in values.items()}
    return {"domains": ["A", "B"], "held_out": [], "models": models, "warnings": list(warnings)}


def test_an_average_over_fewer_training_domains_is_not_paired_and_is_named():
    """A seed whose individual model lacked domain B averaged A alone, and that average was paired with the merges'
    average over A and B (the ratio moved by the missing domain only); the dropped individual × B cell was silent."""
    runs = {s: _run({"individual": (0.10, 0.04), "ties": (0.09, 0.05), "mergerec": (0.11, 0.05)}) for s in range(3)}
    del runs[1]["models"]["individual"]["B"]
    runs[1]["models"]["individual"]["average"] = {"recall@10": 0.10}
    agg = aggregate_runs(runs, "recall@10", training_free=["ties"])
    assert "vs_individual" not in agg["paired"]["merges"]["mergerec"]
    assert agg["paired"]["merges"]["mergerec"]["vs_best_training_free"]["ratios"] == pytest.approx(
        {s: 0.08 / 0.07 for s in range(3)})
    assert "B" not in agg["models"]["individual"]
    assert "average" not in agg["models"]["individual"]  # its mean mixed averages over A + B and over A alone
    assert any("individual on B is missing from seed(s) [1]" in w for w in agg["warnings"])
    assert any("the average of individual covers only some training domains (seed 1 lacks B): individual is left out "
               "of the paired comparisons and its average cell" in w for w in agg["warnings"])
    runs[2]["models"]["ties"]["B"] = None  # a null entry (hand-edited results) is a missing cell, not a crash
    assert "ties" not in aggregate_runs(runs, "recall@10", training_free=["ties"])["paired"]["merges"]


def test_aggregate_runs_by_hand():
    runs = {
        0: _run({"individual": (0.10, 0.10), "average": (0.08, 0.08), "ties": (0.09, 0.07), "mergerec": (0.12, 0.12)}),
        1: _run({"individual": (0.11, 0.09), "average": (0.10, 0.10), "ties": (0.12, 0.10), "mergerec": (0.11, 0.11)}),
        2: _run({"individual": (0.12, 0.12), "average": (0.11, 0.11), "ties": (0.10, 0.10), "mergerec": (0.15, 0.15)},
                warnings=["local training of B was cut by max_seconds"]),
    }
    agg = aggregate_runs(runs, "recall@10", training_free=["average", "task_arithmetic", "ties"])
    assert agg["seeds"] == [0, 1, 2] and agg["domains"] == ["A", "B"] and "note" not in agg
    # by default the reference is chosen from every registry method; a misspelt metric gave empty comparisons
    assert aggregate_runs(runs, "recall@10")["paired"] == agg["paired"]
    with pytest.raises(FedmergeError, match=r"metric 'recal@10' is not in the runs' results; valid: \["):
        aggregate_runs(runs, "recal@10")
    ind_a = agg["models"]["individual"]["A"]["recall@10"]
    assert ind_a["mean"] == pytest.approx(0.11) and ind_a["std"] == pytest.approx(0.01)
    assert ind_a["half_width"] == pytest.approx(T_975_DF2 * 0.01 / math.sqrt(3))
    assert "users" not in agg["models"]["individual"]["A"]
    # best training-free per seed: average .08 vs ties .08 (tie: first listed), ties .11 vs .10, average .11 vs .10
    assert agg["paired"]["best_training_free"] == {0: "average", 1: "ties", 2: "average"}
    vs_best = agg["paired"]["merges"]["mergerec"]["vs_best_training_free"]
    assert vs_best["ratios"] == pytest.approx({0: 0.12 / 0.08, 1: 0.11 / 0.11, 2: 0.15 / 0.11})
    ratios = [1.5, 1.0, 0.15 / 0.11]
    mean = sum(ratios) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in ratios) / 2)
    assert vs_best["ratio"]["mean"] == pytest.approx(mean)
    assert vs_best["ratio"]["half_width"] == pytest.approx(T_975_DF2 * std / math.sqrt(3))
    vs_ind = agg["paired"]["merges"]["mergerec"]["vs_individual"]
    assert vs_ind["ratios"] == pytest.approx({0: 1.2, 1: 1.1, 2: 1.25})
    assert vs_ind["test"]["t"] == pytest.approx(2 * math.sqrt(3))  # differences .02, .01, .03 as above
    assert set(agg["paired"]["merges"]) == {"average", "ties", "mergerec"}  # individual is a reference
    assert agg["warnings"] == ["seed 2: local training of B was cut by max_seconds"]
    single = aggregate_runs({0: runs[0]}, "recall@10", training_free=["average"])
    assert single["models"]["ties"]["average"]["recall@10"]["half_width"] is None and "one seed" in single["note"]
    # a model one seed lacks (a merge that failed there) is left out of the aggregate, and said so
    partial = {s: {**r, "models": {m: v for m, v in r["models"].items() if not (s == 1 and m == "ties")}}
               for s, r in runs.items()}
    agg = aggregate_runs(partial, "recall@10", training_free=["average", "ties"])
    assert not agg["models"].get("ties")  # no domain, no metric
    assert "ties is missing from seed(s) [1]: left out of the aggregate" in agg["warnings"]


def _held_out_run(recall: dict[str, float], ndcg_scale: float = 0.5) -> dict:
    """A results.json-like dict with training domain A and held-out domain H: model -> recall@10 on H."""
    models = {m: {"H": {"recall@10": r, "ndcg@10": r * ndcg_scale, "recall@5": r / 2, "users": 5}}
              for m, r in recall.items()}
    for m in ("theta0", "individual", "mergerec"):
        models.setdefault(m, {})["A"] = {"recall@10": 0.2, "ndcg@10": 0.1, "users": 5}
        models[m]["average"] = {"recall@10": 0.2, "ndcg@10": 0.1}
    return {"domains": ["A", "H"], "held_out": ["H"], "models": models, "warnings": []}


def test_held_out_domains_compare_every_model_with_theta0_and_the_best_single_domain_model_by_hand():
    runs = {
        0: _held_out_run({"theta0": 0.10, "individual_A": 0.04, "individual_B": 0.05, "mergerec": 0.11}),
        1: _held_out_run({"theta0": 0.10, "individual_A": 0.06, "individual_B": 0.03, "mergerec": 0.12}),
        2: _held_out_run({"theta0": 0.20, "individual_A": 0.08, "individual_B": 0.02, "mergerec": 0.26}),
    }
    agg = aggregate_runs(runs, "recall@10", training_free=["average"])
    held = agg["held_out_paired"]["H"]
    assert list(held) == ["recall@10", "ndcg@10"]  # the primary metric and the other one at its cut-off
    recall = held["recall@10"]
    assert recall["best_individual"] == {0: "individual_B", 1: "individual_A", 2: "individual_A"}
    assert set(recall["models"]) == {"mergerec"}  # references and single-domain models are not compared
    vs_theta0 = recall["models"]["mergerec"]["vs_theta0"]
    assert vs_theta0["ratios"] == pytest.approx({0: 1.1, 1: 1.2, 2: 1.3})
    assert vs_theta0["ratio"]["mean"] == pytest.approx(1.2)
    assert vs_theta0["ratio"]["half_width"] == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3))
    # paired t-test of (.11, .12, .26) against (.10, .10, .20): d = (.01, .02, .06)
    d = [0.01, 0.02, 0.06]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    assert vs_theta0["test"]["t"] == pytest.approx(mean / (sd / math.sqrt(3)))
    vs_single = recall["models"]["mergerec"]["vs_best_individual"]
    assert vs_single["ratios"] == pytest.approx({0: 0.11 / 0.05, 1: 0.12 / 0.06, 2: 0.26 / 0.08})
    assert held["ndcg@10"]["models"]["mergerec"]["vs_theta0"]["ratios"] == pytest.approx({0: 1.1, 1: 1.2, 2: 1.3})
    from fedmerge.runners.multiseed import aggregate_summary

    summary = aggregate_summary(agg)
    assert "held-out H*, per-seed ratios of recall@10" in summary and "mergerec: theta0 1.2000 [0.9516, 1.4484]" in summary


def test_a_ratio_interval_that_excludes_one_is_printed_with_the_digits_that_show_it():
    """"1.0000 ± 0.0000" read as a tie for an interval of [1.000015, 1.000065]."""
    from fedmerge.runners.multiseed import _ratio_cell

    assert _ratio_cell(interval([1.00003, 1.00004, 1.00005])) == "1.0000 [1.00002, 1.0001]"
    assert _ratio_cell(interval([0.98, 1.0, 1.02])) == "1.0000 [0.9503, 1.0497]"
    assert _ratio_cell(interval([1.07])) == "1.0700" and _ratio_cell(None) == "-"


def test_parse_seeds_and_run_seeds_validation():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,2,5") == [0, 2, 5]
    assert parse_seeds("0-2, 7") == [0, 1, 2, 7]
    for bad in ("4-0", "a", "1,,2", "-1", "1,1"):
        with pytest.raises(FedmergeError, match="--seeds"):
            parse_seeds(bad)
    cfg = load_scenario("quickstart")
    assert apply_overrides(cfg, ["run.seeds=[0, 1]"]).run.seeds == (0, 1)
    with pytest.raises(FedmergeError, match="run.seeds"):
        apply_overrides(cfg, ["run.seeds=[1, 1]"])
    # a huge range is refused before it is built (0-1000000000 ran out of time building a billion seeds)
    with pytest.raises(FedmergeError, match=r"'0-1000000000' names more than 10000 seeds"):
        parse_seeds("0-1000000000")
    with pytest.raises(FedmergeError, match="names 10001 seeds, more than 10000"):
        parse_seeds("0-9999,10000")
    # --resume with --overwrite is refused for several seeds too (a single run refused it; seeds reached the engine)
    from fedmerge.runners.simulation import simulate

    with pytest.raises(FedmergeError, match="pass only one"):
        simulate(apply_overrides(cfg, ["run.seeds=[0]"]), "unused", resume=True, overwrite=True)
    # run.name is the default output folder runs/<run.name>: a path there pointed --overwrite anywhere
    for name in ("", "..", "a/b", "/tmp"):
        with pytest.raises(FedmergeError, match="run.name must be a name, not a path"):
            apply_overrides(cfg, [f"run.name={name!r}"])


def test_simulate_with_seeds_writes_seed_folders_and_aggregate_and_resumes_per_seed(tmp_path, capsys):
    from fedmerge.cli import main

    out = tmp_path / "run"
    args = ["simulate", "quickstart", "--engine", "inprocess", "--out", str(out), "--seeds", "0,1",
            *[f"--set={o}" for o in (
                "run.progress=false", "data.synthetic.n_users=30", "data.synthetic.n_items=20",
                "data.synthetic.max_len=6", "model.params.hidden=16", "model.params.n_layers=1",
                "model.params.max_len=6", "model.params.max_epochs=1", "baselines.fedavg_rounds=0",
                "baselines.joint=false", "merge.mergerec.steps=2", 'merge.methods=["average","dare","mergerec_taskwise"]',
                "encoder.name=hashing", "encoder.params.dim=16", f"encoder.cache_dir={tmp_path / 'cache'}")]]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "± " in printed and "best_training_free" in printed
    agg = json.loads((out / "aggregate.json").read_text())
    seeds = {s: json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)}
    assert [r["run"]["seed"] for r in seeds.values()] == [0, 1]
    assert seeds[1]["config"]["run"]["seed"] == 1 and seeds[0]["models"]["theta0"] != seeds[1]["models"]["theta0"]
    mean = (seeds[0]["models"]["dare"]["average"]["recall@10"] + seeds[1]["models"]["dare"]["average"]["recall@10"]) / 2
    assert agg["models"]["dare"]["average"]["recall@10"]["mean"] == pytest.approx(mean)
    assert (out / "aggregate.csv").read_text().startswith("model,domain,metric,n,mean")
    # self-describing: the scenario as run (overrides included), versions, seed folders relative to the aggregate
    assert agg["seed_folders"] == {"0": "seed-0", "1": "seed-1"}
    assert agg["config"]["run"]["seeds"] == [0, 1] and agg["config"]["model"]["params"]["hidden"] == 16
    assert agg["versions"]["fedmerge_commit"] == seeds[0]["versions"]["fedmerge_commit"]
    assert (out / "per_domain.png").stat().st_size > 0
    stamp = (out / "seed-0" / "results.json").stat().st_mtime_ns
    (out / "seed-1" / "results.json").unlink()
    assert main([*args, "--resume"]) == 0
    assert (out / "seed-0" / "results.json").stat().st_mtime_ns == stamp  # complete seed kept
    again = json.loads((out / "seed-1" / "results.json").read_text())
    assert again["models"] == seeds[1]["models"] and "resumed" not in again  # interrupted: re-run, the same figures
    (aside,) = out.glob("seed-1.unfinished-*")  # the interrupted run's trained clients were deleted before
    assert sorted(p.name for p in (aside / "clients").glob("*.safetensors")) == sorted(
        p.name for p in (out / "seed-1" / "clients").glob("*.safetensors")) != []
    # another merge configuration (no FedAvg rounds): every seed merged again from its saved client weights
    assert main([*args, "--resume", '--set=merge.methods=["average","ties"]']) == 0
    remerged = json.loads((out / "seed-0" / "results.json").read_text())
    assert remerged["resumed"]["clients"] == seeds[0]["domains"] and "ties" in remerged["models"]
    assert remerged["models"]["average"] == seeds[0]["models"]["average"]
    stamp = (out / "seed-0" / "results.json").stat().st_mtime_ns
    args = [*args, '--set=merge.methods=["average","ties"]']
    # another training configuration: a complete seed is refused, not deleted
    weights = sorted((out / "seed-0" / "clients").glob("*.safetensors"))
    assert main([*args, "--resume", "--set=model.params.hidden=8"]) == 1
    assert "holds a complete run of another configuration" in capsys.readouterr().err
    assert sorted((out / "seed-0" / "clients").glob("*.safetensors")) == weights
    assert (out / "seed-0" / "results.json").stat().st_mtime_ns == stamp


def test_dare_masks_follow_the_run_seed_unless_set():
    import torch

    from fedmerge.merging import merge
    from fedmerge.runners.server import merge_replies

    g = torch.Generator().manual_seed(0)
    theta0 = {"w": torch.zeros(50)}
    models = {d: {"w": torch.randn(50, generator=g)} for d in ("a", "b")}
    for seed in (0, 3):
        cfg = load_scenario("quickstart", [f"run.seed={seed}", 'merge.methods=["dare"]'])
        merged, _ = merge_replies(theta0, models, {}, cfg)
        assert torch.equal(merged["dare"]["w"], merge("dare", theta0, models, seed=seed)["w"])
    fixed = load_scenario("quickstart", ["run.seed=3", 'merge.methods=["dare"]', "merge.params.dare={seed = 0}"])
    assert torch.equal(merge_replies(theta0, models, {}, fixed)[0]["dare"]["w"], merge("dare", theta0, models, seed=0)["w"])
    assert not torch.equal(merge("dare", theta0, models, seed=0)["w"], merge("dare", theta0, models, seed=3)["w"])


def test_a_seed_folder_counts_as_complete_only_for_an_ok_run_of_the_same_configuration(tmp_path):
    from fedmerge.runners.multiseed import completed_run, seed_config

    cfg = seed_config(load_scenario("quickstart", ["run.seeds=[0, 1]"]), 1)
    assert cfg.run.seed == 1 and cfg.run.seeds == ()
    folder = tmp_path / "seed-1"
    folder.mkdir()
    assert completed_run(folder, cfg) is None  # no results.json
    write = lambda status, config: (folder / "results.json").write_text(  # noqa: E731
        json.dumps({"status": status, "config": config}))
    write("ok", apply_overrides(cfg, ["run.progress=false"]).to_mapping())
    assert completed_run(folder, cfg)["status"] == "ok"  # run.progress does not matter
    write("failed", cfg.to_mapping())
    assert completed_run(folder, cfg) is None
    write("ok", apply_overrides(cfg, ["model.params.max_epochs=7"]).to_mapping())
    assert completed_run(folder, cfg) is None


def test_a_run_recorded_before_a_setting_existed_is_the_same_configuration_at_its_default():
    """Results written before fedmerge gained a setting (e.g. privacy.release_diagnostics) still count as this
    configuration while the scenario leaves the setting at its default; not once it changes it."""
    from fedmerge.config import apply_overrides, load_scenario
    from fedmerge.runners.multiseed import same_config

    cfg = load_scenario("quickstart")
    recorded = json.loads(json.dumps(cfg.to_mapping(), default=str))
    del recorded["privacy"]["release_diagnostics"]
    assert same_config(cfg, recorded)
    assert not same_config(apply_overrides(cfg, ["privacy.release_diagnostics=true"]), recorded)
    recorded["model"]["params"]["hidden"] = 7
    assert not same_config(cfg, recorded)


def test_settings_that_change_no_figure_do_not_make_another_configuration():
    """A seed run with another embedding-cache folder or run name counted as another configuration: --resume
    refused it and advised --overwrite, which deletes every seed. A reply timeout is not neutral: a client that
    missed it is left out of a run that still completes."""
    from fedmerge.config import apply_overrides, load_scenario
    from fedmerge.runners.multiseed import same_config

    cfg = load_scenario("quickstart")
    recorded = json.loads(json.dumps(apply_overrides(cfg, [
        'encoder.cache_dir="/tmp/elsewhere"', 'run.name="renamed"', "run.progress=false"]).to_mapping(), default=str))
    assert same_config(cfg, recorded)
    assert not same_config(apply_overrides(cfg, ["run.torch_threads=2"]), recorded)  # forward passes at 2 threads
    assert not same_config(apply_overrides(cfg, ["federation.timeout_s=60"]), recorded)


def test_identical_values_have_exactly_zero_spread():
    """x.std(ddof=1) of [0.1, 0.1, 0.1] is 4e-17, not the documented 0."""
    stats = interval([0.1, 0.1, 0.1])
    assert stats["std"] == 0.0 and stats["half_width"] == 0.0 and stats["low"] == stats["high"] == stats["mean"]


def test_a_zero_reference_leaves_its_seed_out_of_the_ratio_instead_of_losing_the_aggregate(tmp_path):
    """A reference of 0 on one seed made that ratio NaN: the interval was NaN and aggregate.json refused to write."""
    from fedmerge.runners.multiseed import aggregate_summary, write_aggregate

    runs = {
        0: _run({"individual": (0.0, 0.0), "average": (0.08, 0.08), "mergerec": (0.12, 0.12)}),
        1: _run({"individual": (0.10, 0.10), "average": (0.10, 0.10), "mergerec": (0.11, 0.11)}),
        2: _run({"individual": (0.12, 0.12), "average": (0.11, 0.11), "mergerec": (0.15, 0.15)}),
    }
    agg = aggregate_runs(runs, "recall@10", training_free=["average"])
    vs_individual = agg["paired"]["merges"]["mergerec"]["vs_individual"]
    assert vs_individual["ratios"] == {1: pytest.approx(1.1), 2: pytest.approx(1.25)}
    assert vs_individual["ratio"]["n"] == 2 and vs_individual["ratio"]["mean"] == pytest.approx(1.175)
    assert vs_individual["excluded_seeds"] == {"0": "reference is 0"}
    write_aggregate(agg, tmp_path)  # strict JSON: no NaN reached it
    assert "excluded seed(s) [0]: reference is 0" in aggregate_summary(agg)
    one_left = {s: r for s, r in runs.items() if s < 2}
    assert aggregate_runs(one_left, "recall@10", ["average"])["paired"]["merges"]["mergerec"]["vs_individual"][
        "ratio"]["half_width"] is None


def test_a_metric_one_seed_could_not_report_is_left_out_not_a_crash():
    """results.json stores a NaN metric as null: seed_averages called float(None)."""
    runs = {s: _run({"individual": (0.10, 0.10), "average": (0.08, 0.08), "mergerec": (0.12, 0.12)}) for s in (0, 1)}
    runs[1]["models"]["mergerec"]["average"]["recall@10"] = None
    runs[1]["models"]["mergerec"]["A"]["recall@10"] = None
    agg = aggregate_runs(runs, "recall@10", training_free=["average"])
    assert "mergerec" not in agg["paired"]["merges"] and "recall@10" not in agg["models"]["mergerec"]["A"]
    assert "individual" in agg["models"] and agg["models"]["average"]["A"]["recall@10"]["n"] == 2


def test_a_model_no_seed_reports_on_every_domain_has_no_empty_entry():
    runs = {0: _run({"individual": (0.1, 0.1), "fedavg": (0.1, 0.1)}), 1: _run({"individual": (0.1, 0.1)})}
    agg = aggregate_runs(runs, "recall@10", training_free=[])
    assert "fedavg" not in agg["models"]
    assert any("fedavg is missing from seed(s) [1]" in w for w in agg["warnings"])


def test_the_seed_summary_marks_the_non_private_joint_model_and_the_training_average():
    """The single-run table marked `joint` with † and the multi-seed one did not; with a held-out domain the
    average column is over the training domains only and now says so."""
    from fedmerge.runners.multiseed import aggregate_summary

    runs = {s: _run({"individual": (0.1, 0.1), "average": (0.1, 0.1), "joint": (0.2, 0.2)}) for s in (0, 1)}
    for r in runs.values():
        r["models"]["joint"]["non_private"] = True
    text = aggregate_summary(aggregate_runs(runs, "recall@10", training_free=["average"]))
    assert "joint†" in text and "† = trained on the pooled private data" in text
    assert "average (training domains)" not in text
    for r in runs.values():
        r["held_out"] = ["B"]
    text = aggregate_summary(aggregate_runs(runs, "recall@10", training_free=["average"]))
    assert "average (training domains)" in text


def test_missing_cell_warnings_name_real_cells_only_and_any_seeds_gap():
    """The joint oracle's non_private flag was warned about as a cell missing from every seed (on every default
    multi-seed run), and a cell missing only from the first seed was dropped without a warning."""
    runs = {s: _run({"individual": (0.1, 0.1), "joint": (0.2, 0.2), "ties": (0.1, 0.1)}) for s in (0, 1, 2)}
    for r in runs.values():
        r["models"]["joint"]["non_private"] = True
    assert aggregate_runs(runs, "recall@10", training_free=["ties"])["warnings"] == []
    del runs[0]["models"]["ties"]["B"]
    agg = aggregate_runs(runs, "recall@10", training_free=["ties"])
    assert "ties on B is missing from seed(s) [0]: that cell is left out of the aggregate" in agg["warnings"]


def test_each_seed_of_a_seeded_dp_run_draws_its_own_noise():
    """seed_config changed run.seed only: with privacy.noise_seed >= 0 every seed of `simulate --seeds` drew the
    same DP noise and sampling, so the interval over seeds left the noise out. Now each seed's noise seed moves as
    a privacy study's does (study_noise_base); unseeded noise (-1, OS entropy) stays unseeded."""
    from fedmerge.privacy.study import study_noise_base
    from fedmerge.runners.client import noise_seed
    from fedmerge.runners.multiseed import seed_config

    dp = ['encoder.name="hashing"', "run.seeds=[0, 1, 2]", "privacy.enabled=true", "privacy.noise_multiplier=1.0"]
    seeded = load_scenario("quickstart", [*dp, "privacy.noise_seed=5"])
    configs = [seed_config(seeded, s) for s in (0, 1, 2)]
    assert [c.privacy.noise_seed for c in configs] == [study_noise_base(5, s) for s in (0, 1, 2)]
    assert len({c.privacy.noise_seed for c in configs}) == 3 and configs[0].privacy.noise_seed == 5
    assert len({noise_seed(c, "synth-0", 0) for c in configs}) == 3  # the clients' noise differs too
    unseeded = load_scenario("quickstart", [*dp, "privacy.noise_seed=-1"])
    assert {seed_config(unseeded, s).privacy.noise_seed for s in (0, 1, 2)} == {-1}


def test_a_resumed_run_records_each_seeds_versions_and_warns_when_they_differ(tmp_path, capsys):
    """aggregate.json recorded only the versions of the process that aggregated: a resumed run that kept a seed
    produced by other code or packages said nothing of it. Each seed's versions (from its results.json) are now
    recorded, and seeds that differ in code or a package are warned about."""
    from fedmerge.cli import main

    out = tmp_path / "run"
    args = ["simulate", "quickstart", "--engine", "inprocess", "--out", str(out), "--seeds", "0,1",
            *[f"--set={o}" for o in (
                "run.progress=false", "data.synthetic.n_users=30", "data.synthetic.n_items=20",
                "data.synthetic.max_len=6", "model.params.hidden=8", "model.params.n_layers=1",
                "model.params.max_len=6", "model.params.max_epochs=1", "baselines.fedavg_rounds=0",
                "baselines.joint=false", 'merge.methods=["average"]',
                "encoder.name=hashing", "encoder.params.dim=16", f"encoder.cache_dir={tmp_path / 'cache'}")]]
    assert main(args) == 0
    agg = json.loads((out / "aggregate.json").read_text())
    recorded = {s: json.loads((out / f"seed-{s}" / "results.json").read_text())["versions"] for s in (0, 1)}
    assert agg["seed_versions"] == {"0": recorded[0], "1": recorded[1]}
    assert not [w for w in agg["warnings"] if "versions" in w]
    path = out / "seed-1" / "results.json"
    edited = json.loads(path.read_text())
    edited["versions"] |= {"fedmerge_source": "0123456789abcdef", "torch": "1.0.0"}
    path.write_text(json.dumps(edited))
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0  # seed 1 is a complete run of this configuration: kept
    agg = json.loads((out / "aggregate.json").read_text())
    assert agg["seed_versions"]["1"]["torch"] == "1.0.0" and agg["seed_versions"]["0"] == recorded[0]
    warning = next(w for w in agg["warnings"] if "versions" in w)
    assert ("fedmerge_source" in warning and "0123456789abcdef (seed(s) [1])" in warning
            and f"{recorded[0]['fedmerge_source']} (seed(s) [0])" in warning and "torch" in warning)
    assert "python" not in warning  # equal on both seeds
    assert f"WARNING: {warning}" in capsys.readouterr().out


def test_a_metric_a_seed_could_not_report_is_named_in_a_warning():
    """A metric null (NaN) in one seed's results.json was left out of its aggregate cell without a word, while a
    missing cell or model was warned about."""
    runs = {s: _run({"individual": (0.10, 0.10), "ties": (0.12, 0.10)}) for s in (0, 1, 2)}
    for r in runs.values():
        for cell in r["models"]["ties"].values():
            cell["ndcg@10"] = cell["recall@10"] / 2
    runs[1]["models"]["ties"]["A"]["recall@10"] = None
    runs[2]["models"]["ties"]["A"]["recall@10"] = float("nan")
    del runs[2]["models"]["ties"]["B"]["ndcg@10"]
    agg = aggregate_runs(runs, "recall@10", training_free=["ties"])
    assert "recall@10" not in agg["models"]["ties"]["A"] and agg["models"]["ties"]["A"]["ndcg@10"]["n"] == 3
    assert ("ties on A: recall@10 is missing from seed(s) [1, 2] (null or not a finite number there): left out of "
            "that cell of the aggregate") in agg["warnings"]
    assert any("ties on B: ndcg@10 is missing from seed(s) [2]" in w for w in agg["warnings"])
    assert not any("individual" in w for w in agg["warnings"])
