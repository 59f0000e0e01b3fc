"""``run_scenario``: one entry point for both engines.

``engine="flower"`` runs the real ClientApp/ServerApp through Flower's simulation engine (Ray backend, one
SuperNode per domain); ``engine="inprocess"`` calls the same client and server code directly. The Flower run's
success is judged from the results file the ServerApp writes, never from an exit code.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmerge.config import domain_names
from fedmerge.errors import FedmergeError

logger = logging.getLogger(__name__)
ENGINES = ("flower", "inprocess")


def run_scenario(
    cfg: Mapping[str, Any], engine: str = "flower", out_dir: str | Path | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run the resolved scenario ``cfg`` on ``engine``; write results to ``out_dir`` (if given) and return them.

    ``resume``: re-merge and re-evaluate from the client weights an earlier run saved in ``out_dir`` (no training);
    that run's results.json is kept as ``results.<UTC time>.json``.
    """
    if engine not in ENGINES:
        raise FedmergeError(f"unknown engine {engine!r}; valid: {list(ENGINES)}")
    if resume:
        if out_dir is None:
            raise FedmergeError("--resume needs the output folder of the earlier run (--out DIR)")
        from fedmerge.runners.results import archive_results

        archive_results(out_dir)
    if engine == "inprocess":
        from fedmerge.runners.inprocess import run_inprocess

        return run_inprocess(cfg, out_dir, resume=resume)
    return run_flower_simulation(cfg, out_dir, resume=resume)


def run_flower_simulation(cfg: Mapping[str, Any], out_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Flower simulation (Ray backend) with ``num_supernodes`` = number of domains, one CPU per ClientApp.

    The ClientApps' own output (their progress bars, with Ray's actor prefixes) is shown only with ``--verbose``.
    """
    from flwr.simulation import run_simulation

    from clients.app import build_client_app
    from fedmerge.logs import quiet_frameworks, verbose_enabled
    from server.app import build_server_app

    if not verbose_enabled():
        quiet_frameworks()

    with tempfile.TemporaryDirectory(prefix="fedmerge-sim-") as scratch:
        target = Path(out_dir) if out_dir is not None else Path(scratch)
        results_path = target / "results.json"
        results_path.unlink(missing_ok=True)  # a stale file must not pass for this run's result
        start = time.perf_counter()
        run_simulation(
            server_app=build_server_app(cfg, target, resume=resume),
            client_app=build_client_app(cfg),
            num_supernodes=len(domain_names(cfg)),
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": len(os.sched_getaffinity(0)), "include_dashboard": False,
                                          "log_to_driver": verbose_enabled()}},  # Ray workers' output: --verbose
            verbose_logging=logging.getLogger().isEnabledFor(logging.DEBUG),
        )
        wall = time.perf_counter() - start
        if not results_path.is_file():
            raise FedmergeError(f"the Flower run wrote no {results_path}; see the log above for the ServerApp error")
        results = json.loads(results_path.read_text())
    if results.get("status") != "ok":
        raise FedmergeError(f"the Flower run failed: {results.get('errors')}")
    results["timings_s"]["simulation_wall"] = round(wall, 3)
    return results
