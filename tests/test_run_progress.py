"""The launcher's progress bar of a Flower simulation, read from the run folder (no Flower run needed)."""

from __future__ import annotations

import os
import time

from fedmerge.config import load_scenario
from fedmerge.recommender import model_path
from fedmerge.runners.run_progress import FolderProgress
from fedmerge.storage import client_weights_path


def test_the_bar_follows_the_files_the_server_writes(tmp_path):
    cfg = load_scenario("quickstart", ['merge.methods=["average", "ties"]'])
    domains = cfg.data.training_domains()
    old_model = model_path(tmp_path, "ties")  # an earlier run's merge (a --resume folder) must not count
    old_model.parent.mkdir(parents=True)
    old_model.write_bytes(b"")
    os.utime(old_model, (time.time() - 60, time.time() - 60))
    (tmp_path / "results.json").write_text("{}")  # and its results.json: the bar said "done" from the start
    os.utime(tmp_path / "results.json", (time.time() - 60, time.time() - 60))
    progress = FolderProgress(cfg, tmp_path, enabled=True)
    model_path(tmp_path, "theta0").write_bytes(b"")  # the server saves θ₀ first: no merge yet
    assert not progress.poll() and (progress.bar.n, progress.phase) == (0, "local training")
    client_weights_path(tmp_path, domains[0]).parent.mkdir()
    for d in domains:
        client_weights_path(tmp_path, d).write_bytes(b"")
    assert not progress.poll() and (progress.bar.n, progress.phase) == (len(domains), "merging")
    model_path(tmp_path, "average").write_bytes(b"")
    assert not progress.poll() and (progress.bar.n, progress.phase) == (len(domains) + 1, "evaluation")
    (tmp_path / "results.json").write_text("{}")
    assert progress.poll() and (progress.bar.n, progress.phase) == (progress.bar.total, "done")
    progress.close()


def test_a_disabled_bar_still_polls(tmp_path):  # run.progress = false, or --verbose
    progress = FolderProgress(load_scenario("quickstart"), tmp_path, enabled=False)
    assert not progress.poll()
    (tmp_path / "results.json").write_text("{}")
    assert progress.poll() and progress.phase == "done"
    progress.close()
