"""The fedmerge ServerApp (Flower Message API): runs the federation through :class:`server.strategy.MergeStrategy`.

It writes ``results.json`` (plus CSV and plots) to the output folder; the runner reads that file back to check
the run really finished (``status``), rather than trusting an exit code.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmerge.errors import FedmergeError
from fedmerge.logs import configure_from_env
from fedmerge.provenance import adopt_launcher_source
from fedmerge.runners import results as results_io
from fedmerge.runners.appconfig import folder_settings, launcher_source, scenario_from_run_config
from fedmerge.runners.server import run_and_record
from fedmerge.runners.simulation import check_one_seed
from fedmerge.storage import run_folder
from server.strategy import MergeStrategy
from fedmerge.scenario import Scenario

logger = logging.getLogger(__name__)


def build_server_app() -> ServerApp:
    """The ServerApp: scenario, output folder and resume/overwrite come from the run config
    (:mod:`fedmerge.runners.appconfig`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        start = time.perf_counter()
        configure_from_env()
        folder = folder_settings(context.run_config)  # before anything else: a quoted "false" is refused
        scenario = scenario_from_run_config(context.run_config)
        check_one_seed(scenario, "a Flower app run", "submit one run per seed with run.seed=S in the overrides "
                       "(`fedmerge simulate --seeds` runs every seed and aggregates them)")
        adopt_launcher_source(launcher_source(context.run_config))  # the FAB has no .git: the launcher's commit
        target = folder.target or Path(f"runs/{scenario.run.name}")
        if folder.held:  # `fedmerge simulate` holds the folder (lock, earlier files)
            out = run(grid, scenario, target, folder.resume, start)
        else:  # a plain `flwr run`: nobody else holds the folder or keeps the earlier results
            with run_folder(target, resume=folder.resume, overwrite=folder.overwrite):
                out = run(grid, scenario, target, folder.resume, start)
                print(results_io.run_summary(out, scenario.eval.primary))  # noqa: T201  (the user's only view of the results)
        if out["status"] != "ok":
            raise FedmergeError(f"federation failed (results: {target / results_io.RESULTS_FILE}): {out['errors']}")

    return app


def run(grid: Grid, scenario: Scenario, target: Path, resuming: bool, start: float) -> dict[str, Any]:
    """The federation over ``grid``; results (also a failed run's partial ones) written to ``target`` and returned."""
    logger.info("results go to %s%s", target.resolve(), " (resuming from saved client weights)" if resuming else "")
    strategy = MergeStrategy(scenario, grid)
    strategy.summary()
    return run_and_record(scenario, strategy, target, resume=resuming, engine="flower", started=start)


app = build_server_app()
