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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedmerge.config import domain_names
from fedmerge.errors import FedmergeError

logger = logging.getLogger(__name__)
ENGINES = ("flower", "inprocess")
RAY_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def run_scenario(
    cfg: Mapping[str, Any], engine: str = "flower", out_dir: str | Path | None = None, resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the resolved scenario ``cfg`` on ``engine``; write results to ``out_dir`` (if given) and return them.

    ``out_dir`` is held with :func:`fedmerge.storage.run_folder` for the whole run: locked against a second run, and
    refused when it already holds files unless ``resume`` or ``overwrite`` (which deletes them first).
    ``resume``: re-merge and re-evaluate from the client weights an earlier run saved in ``out_dir`` (no training);
    that run's results.json is kept as ``results.<UTC time>.json``. A run whose results say ``status: failed``
    raises FedmergeError after its results.json (with the partial results and the errors) is written.
    """
    if engine not in ENGINES:
        raise FedmergeError(f"unknown engine {engine!r}; valid: {list(ENGINES)}")
    if resume and out_dir is None:
        raise FedmergeError("--resume needs the output folder of the earlier run (--out DIR)")
    if resume and overwrite:
        raise FedmergeError("--resume re-uses the earlier run's files and --overwrite deletes them; pass only one")
    if out_dir is None:
        return _run_engine(cfg, engine, None, resume)
    from fedmerge.storage import run_folder

    with run_folder(out_dir, resume=resume, overwrite=overwrite):
        if resume:
            from fedmerge.runners.results import archive_results

            archive_results(out_dir)
        return _run_engine(cfg, engine, out_dir, resume)


def _run_engine(cfg: Mapping[str, Any], engine: str, out_dir: str | Path | None, resume: bool) -> dict[str, Any]:
    if engine == "inprocess":
        from fedmerge.runners.inprocess import run_inprocess

        results = run_inprocess(cfg, out_dir, resume=resume)
    else:
        results = run_flower_simulation(cfg, out_dir, resume=resume)
    if results.get("status") != "ok":
        where = f" (results: {Path(out_dir) / 'results.json'})" if out_dir is not None else ""
        raise FedmergeError(f"the {engine} run failed{where}: {results.get('errors')}")
    return results


@contextmanager
def loopback_ray() -> Iterator[None]:
    """While inside, a Ray instance this process starts listens on 127.0.0.1 only.

    Ray (2.55) binds its GCS, raylet, object manager and worker gRPC servers to every interface unless the node IP
    is loopback, and it replaces a requested 127.0.0.1 (``_node_ip_address``) with the machine's address unless
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (its single-machine mode, the default on macOS and Windows). That
    setting is read once at import, so the imported constant is set too; the environment variable carries it into
    the processes Ray starts. Both are restored on exit.
    """
    from ray._private import ray_constants

    previous_env = os.environ.get(RAY_SINGLE_MACHINE_ENV)
    previous_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous_flag
        if previous_env is None:
            os.environ.pop(RAY_SINGLE_MACHINE_ENV, None)
        else:
            os.environ[RAY_SINGLE_MACHINE_ENV] = previous_env


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

    with tempfile.TemporaryDirectory(prefix="fedmerge-sim-") as scratch, loopback_ray():
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
    results["timings_s"]["simulation_wall"] = round(wall, 3)
    return results
