"""Flower simulation with many clients (8, 16) on a small machine: completes, at most one actor per CPU, progress."""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch

from fedmerge.config import load_scenario
from tests.test_federation import TINY


@pytest.mark.slow
@pytest.mark.parametrize("n_domains", [8, 16])
def test_flower_simulation_with_many_clients_completes(n_domains, tmp_path, monkeypatch, capfd):
    from fedmerge.deploy.flwr_cli import FlwrClient
    from fedmerge.runners.simulation import run_scenario

    torch.set_num_threads(1)
    seen: dict = {}
    real = FlwrClient.submit_run

    def recording(self, app_dir, run_config=None, federation_config=None):
        seen.update(federation_config or {})
        return real(self, app_dir, run_config, federation_config)

    monkeypatch.setattr(FlwrClient, "submit_run", recording)
    cfg = load_scenario("quickstart", [
        *TINY, f"encoder.cache_dir={tmp_path / 'cache'}", f"data.synthetic.n_domains={n_domains}",
        "baselines.joint=false", 'merge.methods=["average","ties","mergerec_taskwise"]',
        "merge.mergerec.teacher_top_k=10"])
    fedmerge_logger = logging.getLogger("fedmerge")
    previous = fedmerge_logger.level
    fedmerge_logger.setLevel(logging.INFO)  # as --verbose: the run's log (ServerApp INFO included) streams to stderr
    start = time.perf_counter()
    try:
        out = run_scenario(cfg, "flower", tmp_path / "out")
    finally:
        fedmerge_logger.setLevel(previous)
    wall = time.perf_counter() - start
    assert out["status"] == "ok" and len(out["domains"]) == n_domains
    assert set(out["models"]["mergerec_taskwise"]) == {*out["domains"], "average"}
    # Ray gets the usable cores and each ClientApp one of them: never more client actors than CPUs
    assert seen["init-args-num-cpus"] == len(os.sched_getaffinity(0))
    assert seen["client-resources-num-cpus"] >= 1 and seen["num-supernodes"] == n_domains
    assert f"train: {n_domains}/{n_domains} replies" in capfd.readouterr().err  # progress, one line per reply
    print(f"{n_domains} clients: {wall:.1f} s")  # noqa: T201


def test_client_evaluate_prepares_user_batches_once_for_all_models(monkeypatch, synthetic_domains):
    from fedmerge.metrics import evaluate_scorer
    from fedmerge.runners import client as client_module

    cfg = load_scenario("quickstart", [*TINY, "model.params.max_len=8"])
    domain = synthetic_domains[0]
    family = cfg.model.make_family()
    features = torch.randn(domain.n_items, 32, generator=torch.Generator().manual_seed(0))
    theta0 = family.initial_weights(32, seed=0)
    models = {f"m{k}": {p: t + 0.05 * k * torch.ones_like(t) if t.is_floating_point() else t for p, t in theta0.items()}
              for k in range(3)}
    calls = []
    real = client_module.evaluation_batches
    monkeypatch.setattr(client_module, "evaluation_batches", lambda *a, **k: calls.append(a) or real(*a, **k))
    out = client_module.client_evaluate(domain, models, cfg, features=features)
    assert len(calls) == 1 and set(out) == set(models)
    for name, weights in models.items():
        assert out[name] == evaluate_scorer(family.scorer(weights, features), domain, "test",
                                            ks=tuple(cfg.eval.ks), max_len=family.max_len)
