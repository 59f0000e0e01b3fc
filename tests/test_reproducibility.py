"""Same scenario + seed ⇒ identical metrics whatever the torch thread count or the machine's load (CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fedmerge.config import load_scenario
from fedmerge.data.synthetic import make_synthetic_domains
from fedmerge.merging.methods import trim_magnitude
from fedmerge.models import get_family
from fedmerge.runners.inprocess import run_inprocess
from tests.conftest import at_one_and_two_threads

SMALL = [
    "run.progress=false", "data.synthetic.n_users=120", "data.synthetic.n_items=200", "data.synthetic.max_len=20",
    "model.params.hidden=32", "model.params.n_layers=1", "model.params.max_len=20", "model.params.max_epochs=2",
    "model.params.batch_size=64", "baselines.fedavg_rounds=1", "baselines.joint=false", "merge.mergerec.steps=10",
    'merge.methods=["ties", "dare", "mergerec_layerwise"]', "encoder.name=hashing", "encoder.params.dim=64",
]


def _without_timings(train_metrics: dict) -> dict:
    return {d: {k: v for k, v in m.items() if "seconds" not in k} for d, m in train_metrics.items()}


def test_training_gives_bit_identical_weights_with_one_and_two_threads():
    """Under the old code (threaded backward kernels) the weights differed in the last bits after one epoch."""
    domain = make_synthetic_domains(n_domains=1, n_users=120, n_items=300, n_topics=6, seed=0)[0]
    family = get_family("sequential", hidden=64, n_layers=2, max_len=20, max_epochs=1, batch_size=64)
    features = torch.randn(domain.n_items, 128, generator=torch.Generator().manual_seed(0))
    theta0 = family.initial_weights(128, seed=0)
    (first, info1), (second, info2) = at_one_and_two_threads(
        lambda: family.train(theta0, domain, features, seed=0, progress=False))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert info1["final_loss"] == info2["final_loss"]


def test_user_level_dp_sgd_gives_bit_identical_weights_with_one_and_two_threads():
    """DP-SGD's per-user gradients, clipping and steps ran at the process's thread count (family.train runs each step
    at one): with privacy.noise_seed set, a study's numbers still moved with the machine and the engine."""
    from fedmerge.privacy.dpsgd import UserLevelDP, train_user_level

    domain = make_synthetic_domains(n_domains=1, n_users=60, n_items=300, n_topics=6, seed=0)[0]
    family = get_family("sequential", hidden=64, n_layers=2, max_len=20, dropout=0.0)
    features = torch.randn(domain.n_items, 128, generator=torch.Generator().manual_seed(0))
    theta0 = family.initial_weights(128, seed=0)
    first, second = at_one_and_two_threads(lambda: train_user_level(
        family, theta0, domain, features, UserLevelDP(1.0, 0.5, 0.2, 1.0), seed=0, noise_seed=7, progress=False)[0])
    assert all(torch.equal(first[k], second[k]) for k in first)


TEXT_LAE_FIT = """
import hashlib
from fedmerge.data.synthetic import make_synthetic_domains
from fedmerge.models.text_lae import TextLAEFamily
from fedmerge.text.encoder import HashingEncoder
domain = make_synthetic_domains(n_domains=1, n_users=300, n_items=200, seed=0)[0]
family = TextLAEFamily(lam=10.0)
features = family.item_features(HashingEncoder(dim=384).encode(domain.catalog.texts()))
weights, _ = family.train(family.initial_weights(384), domain, features, progress=False)
print(hashlib.sha256(weights["W"].numpy().tobytes()).hexdigest())
"""


def test_text_lae_gives_bit_identical_weights_with_one_and_two_blas_threads():
    """The Gram products and eigendecompositions ran at numpy's BLAS thread count (OMP_NUM_THREADS, a ClientApp's
    CPU share under Ray): W differed by up to 1e-14 between 1 and 2 threads. Each fit runs in a fresh process, as
    BLAS reads the variable when it loads."""
    import os

    from fedmerge.paths import REPO_ROOT

    digests = []
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
               "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        digests.append(subprocess.run([sys.executable, "-c", TEXT_LAE_FIT], env=env, capture_output=True, text=True,
                                      check=True).stdout.strip())
    assert digests[0] == digests[1] and len(digests[0]) == 64


@pytest.mark.slow
def test_metrics_are_identical_across_thread_counts_and_under_load(tmp_path):
    """Under the old code (threaded backward kernels) the training losses differed in the last bits."""
    runs = []
    for threads, busy in ((1, False), (2, True)):
        cfg = load_scenario("quickstart", [*SMALL, f"run.torch_threads={threads}", f"run.server_threads={threads}",
                                           f"encoder.cache_dir={tmp_path / 'cache'}"])
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            runs.append(run_inprocess(cfg, tmp_path / f"threads{threads}"))
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    one, two = runs
    assert one["models"] == two["models"]
    assert _without_timings(one["train_metrics"]) == _without_timings(two["train_metrics"])
    assert all(m["stop_reason"] == "max_epochs" for m in one["train_metrics"].values())
    assert one["warnings"] == []


def test_trim_magnitude_breaks_ties_towards_the_lower_position():
    """topk chose among equal magnitudes by its own search (the last ones here, thread-dependent in general)."""
    tau = torch.ones(2, 10)
    tau[1, 7] = 3.0
    kept = trim_magnitude(tau, 0.3) != 0
    assert kept[0].nonzero().squeeze(1).tolist() == [0, 1, 2]
    assert kept[1].nonzero().squeeze(1).tolist() == [0, 1, 7]


def test_a_run_cut_by_max_seconds_says_so_per_domain_and_in_the_summary(tmp_path):
    from fedmerge.runners.results import summary_table

    tiny = ["run.progress=false", "data.synthetic.n_users=30", "data.synthetic.n_items=20", "data.synthetic.max_len=6",
            "model.params.hidden=16", "model.params.n_layers=1", "model.params.max_len=6", "model.params.max_epochs=4",
            "model.params.max_seconds=0.0", "model.params.batch_size=4", "baselines.fedavg_rounds=1", "baselines.joint=true",
            "theta0.pretrain=true", 'merge.methods=["average"]', "encoder.name=hashing", "encoder.params.dim=16",
            f"encoder.cache_dir={tmp_path / 'cache'}"]
    out = run_inprocess(load_scenario("quickstart", tiny), tmp_path / "out")
    for metrics in [*out["train_metrics"].values(), *out["fedavg_train_metrics"][0].values(),
                    *out["server_train_metrics"].values()]:  # θ₀'s pretraining and the joint oracle were cut silently
        assert (metrics["epochs"], metrics["stop_reason"], metrics["max_epochs"]) == (1, "max_seconds", 4)
        assert metrics["last_epoch_steps"] == 1 < metrics["epoch_steps"]  # cut after its first step
    assert sorted(out["server_train_metrics"]) == ["joint", "theta0_pretraining"]
    assert len(out["warnings"]) == 2 * len(out["domains"]) + 2
    assert any(w.startswith("θ₀'s pretraining on the public catalogs (every model starts from it) was cut by "
                            "max_seconds in epoch 1") for w in out["warnings"]), out["warnings"]
    assert any(w.startswith("the joint oracle's training was cut by max_seconds") for w in out["warnings"])
    # a resumed run reuses that θ₀ and joint model: their cut is still said (--resume dropped it)
    from fedmerge.config import apply_overrides

    again = run_inprocess(apply_overrides(load_scenario("quickstart", tiny), ["baselines.fedavg_rounds=0"]),
                          tmp_path / "out", resume=True)
    assert again["server_train_metrics"] == out["server_train_metrics"]
    assert sum("cut by max_seconds" in w for w in again["warnings"]) == len(out["domains"]) + 2
    steps = out["train_metrics"]["synth-0"]["epoch_steps"]
    assert (f"local training of synth-0 was cut by max_seconds in epoch 1 after 1 of {steps} steps (max_epochs 4)"
            in out["warnings"][0])
    assert summary_table(out).count("WARNING: ") == len(out["warnings"])
