"""``fedmerge train`` end to end on a tiny generated domain (hashing encoder, no network, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedmerge.cli import main
from fedmerge.data.generic import save_generic_domain
from fedmerge.data.synthetic import make_synthetic_domains
from fedmerge.metrics import DEFAULT_KS


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def domain_dir(tmp_path_factory) -> Path:
    domain = make_synthetic_domains(n_domains=1, n_users=80, n_items=40, n_topics=4, max_len=10, seed=0)[0]
    return save_generic_domain(domain, tmp_path_factory.mktemp("data") / "synth")


def metric_keys() -> set[str]:
    return {f"{m}@{k}{s}" for m in ("recall", "ndcg") for k in DEFAULT_KS for s in ("", "_masked")}


@pytest.mark.parametrize("model,params", [("popularity", []), ("ease", ["--set", "lam=[1,10]"]),
                                          ("rdlae", ["--set", "lam=5", "--set", "dropout=0.25", "--set", "xi=[0,0.2]"]),
                                          ("l3ae", ["--set", "lam=5", "--set", "reg_x=[0,-2]", "--set", "lam_sem=1"])])
def test_train_recommender_writes_metrics(domain_dir, tmp_path, monkeypatch, model, params) -> None:
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["train", "--data", str(domain_dir), "--model", model, "--encoder", "hashing", "--out", str(out),
                 *params]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert metric_keys() <= set(report)
    assert all(0.0 <= report[k] <= 1.0 for k in metric_keys())
    assert report["users"] > 0 and report["fit_seconds"] >= 0 and report["eval_seconds"] >= 0
    if model == "ease":
        assert report["hyperparameters"]["lam"] in (1.0, 10.0) and len(report["validation"]) == 2
    if model == "rdlae":
        assert set(report["hyperparameters"]) == {"lam", "dropout", "xi", "diagonal"}
        assert report["hyperparameters"]["diagonal"] == "zero"  # the released code's scoring, named in the report


def test_train_text_lae_writes_weights(domain_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["train", "--data", str(domain_dir), "--model", "text-lae", "--encoder", "hashing", "--out", str(out),
                 "--set", "lam=[1,100]"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert metric_keys() <= set(report)
    assert report["training"]["lam"] in (1.0, 100.0)
    weights = load_file(out / "weights.safetensors")
    assert set(weights) == {"W"} and weights["W"].shape[0] == weights["W"].shape[1]
    assert not torch.allclose(weights["W"], torch.eye(weights["W"].shape[0]))


def test_unknown_model_is_one_line_error(domain_dir, tmp_path, capsys) -> None:
    assert main(["train", "--data", str(domain_dir), "--model", "nope", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nope" in err and "ease" in err and "text-lae" in err


def test_a_second_training_into_the_same_folder_is_refused_unless_overwrite(domain_dir, tmp_path, capsys) -> None:
    """The default runs/train/<domain>-<model> is the same for every seed and --set: each training replaced the
    last one's metrics and weights."""
    out = tmp_path / "out"
    args = ["train", "--data", str(domain_dir), "--model", "ease", "--out", str(out), "--set", "lam=10"]
    assert main(args) == 0
    first = (out / "metrics.json").read_text()
    assert main([*args[:-1], "lam=500"]) == 1
    assert "already holds an earlier run's files (metrics.json)" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == first
    assert main([*args[:-1], "lam=500", "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["hyperparameters"]["lam"] == 500


@pytest.mark.parametrize("model", ["text-lae", "l3ae"])
def test_a_missing_encoder_folder_fails_before_overwrite_empties_the_folder(domain_dir, tmp_path, capsys, model):
    """--encoder /missing failed when the catalog was encoded, after --overwrite had deleted the last training."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    missing = tmp_path / "no-such-model"
    assert main(["train", "--data", str(domain_dir), "--model", model, "--encoder", str(missing), "--out", str(out),
                 "--overwrite"]) == 1
    assert f"{missing} does not exist" in capsys.readouterr().err and (out / "metrics.json").read_text() == "{}"


def test_a_negative_seed_is_refused_before_overwrite_empties_the_folder(domain_dir, tmp_path, capsys) -> None:
    """`--seed -1 --overwrite` deleted the last training, then failed as "expected non-negative integer"."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["train", "--data", str(domain_dir), "--model", "ease", "--seed", "-1", "--out", str(out), "--overwrite"])
    assert "--seed: a seed is an integer >= 0, got '-1'" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == "{}"


def test_data_inside_the_output_folder_is_refused(domain_dir, tmp_path, capsys) -> None:
    """--overwrite empties --out: a domain inside it would be deleted after it was loaded."""
    import shutil

    data = tmp_path / "out" / "synth"
    shutil.copytree(domain_dir, data)
    assert main(["train", "--data", str(data), "--model", "ease", "--out", str(tmp_path / "out"), "--overwrite"]) == 1
    assert "lies inside --out" in capsys.readouterr().err and (data / "interactions.csv").is_file()


def test_bad_parameter_is_one_line_error(domain_dir, tmp_path, capsys) -> None:
    assert main(["train", "--data", str(domain_dir), "--model", "ease", "--out", str(tmp_path),
                 "--set", "lambda=3"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "lambda" in err


def test_train_sequential_tuning_the_text_encoder_ships_its_layers(domain_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["train", "--data", str(domain_dir), "--model", "sequential", "--out", str(out),
                 "--set", "encoder_layers=1", "--set", "device=cpu", "--set", "hidden=16", "--set", "n_layers=1",
                 "--set", "max_epochs=1", "--set", "max_len=10"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert metric_keys() <= set(report)
    weights = load_file(out / "weights.safetensors")
    tower = [name for name in weights if name.startswith("text_tower.layers.0.")]
    assert tower and all(torch.isfinite(weights[name]).all() for name in tower)


@pytest.mark.parametrize("model,params", [("text-lae", ["--set", "lam=[1,100]"]),
                                          ("sequential", ["--set", "hidden=16", "--set", "n_layers=1",
                                                          "--set", "max_epochs=1", "--set", "max_len=10"])])
def test_trained_weights_come_with_a_card_that_recommend_and_evaluate_read(domain_dir, tmp_path, monkeypatch, capsys,
                                                                          model, params) -> None:
    """`fedmerge train` wrote weights without a model card, so `fedmerge evaluate` and `recommend` refused them."""
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["train", "--data", str(domain_dir), "--model", model, "--encoder", "hashing", "--out", str(out),
                 "--seed", "3", *params]) == 0
    report = json.loads((out / "metrics.json").read_text())
    card = json.loads((out / "weights.json").read_text())
    assert card["family"]["name"] == model and card["domains"] == ["synth"] and card["run"]["seed"] == 3
    assert card["metrics"]["synth"]["recall@10"] == report["recall@10"]
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "weights.safetensors"), "--data", str(domain_dir), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["metrics"]["recall@10"] == pytest.approx(report["recall@10"], abs=1e-9)
    assert main(["recommend", "--model", str(out / "weights.safetensors"), "--catalog", str(domain_dir),
                 "--history", "synth-0-i00000,synth-0-i00001", "-k", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["recommendations"]) == 3


def test_a_family_reading_more_than_50_items_is_trained_and_evaluated_at_its_own_max_len(tmp_path, monkeypatch):
    """fedmerge train (and text-LAE's λ search) evaluated the last 50 items of each history whatever the family
    reads: metrics.json and the card differed from fedmerge evaluate of the same weights."""
    from fedmerge.recommender import load_recommender

    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path / "cache"))
    domain = make_synthetic_domains(n_domains=1, n_users=60, n_items=40, n_topics=4, min_len=70, max_len=90, seed=1)[0]
    data = save_generic_domain(domain, tmp_path / "long")
    out = tmp_path / "out"
    assert main(["train", "--data", str(data), "--model", "text-lae", "--encoder", "hashing", "--out", str(out),
                 "--set", "lam=[0.1,10]", "--set", "max_len=80"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    again = load_recommender(out / "weights.safetensors").evaluate(data)
    assert {k: report[k] for k in again} == again


@pytest.mark.parametrize("command", [["train", "--data", "d", "--model", "ease", "--out", "o"],
                                     ["data", "synth", "--out", "o"]])
def test_a_seed_too_large_for_torch_is_refused_by_the_seed_option(command, capsys) -> None:
    """--seed 2**64 passed the argparse type: `train` then failed in torch.manual_seed naming no option, and `data
    synth` wrote domains under a seed no run can reproduce (run.seed is below 2**63)."""
    from fedmerge.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--seed", str(2**64)])
    assert "--seed: a seed is an integer below 2**63" in capsys.readouterr().err
    assert build_parser().parse_args([*command, "--seed", str(2**63 - 1)]).seed == 2**63 - 1
