"""``run_scenario``: one entry point for both engines.

``engine="flower"`` runs the real ClientApp/ServerApp with ``flwr run`` on a private SuperLink started with
Flower's simulation runtime (Ray backend, one virtual SuperNode per domain); ``engine="inprocess"`` calls the same
client and server code directly. The Flower run's success is judged from ``flwr ls`` and the results file the
ServerApp writes, never from an exit code.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from fedmerge.errors import FedmergeError
from fedmerge.runners.results import RESULTS_FILE
from fedmerge.scenario import Scenario

logger = logging.getLogger(__name__)
ENGINES = ("flower", "inprocess")
# Ray (2.55) binds its GCS, raylet, object manager and worker gRPC servers to every interface unless the node IP is
# loopback, and replaces a requested 127.0.0.1 with the machine's address unless this is "0" (its single-machine
# mode, the default on macOS and Windows). Read once when ray is imported: set in the SuperLink's environment, it
# reaches the simulation runtime's process and every process Ray starts.
RAY_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray folds worker lines that differ only in numbers into "[repeated Nx across cluster]", which would hide each
# client's own "<domain>: round r trained in t s"; "0" keeps every line (only read with --verbose's log_to_driver).
RAY_DEDUP_ENV = "RAY_DEDUP_LOGS"
SIMULATION_POLL_S = 10.0  # seconds between `flwr ls` polls while the run has written no results.json yet


def run_scenario(
    cfg: Scenario, engine: str = "flower", out_dir: str | Path | None = None, resume: bool = False,
    overwrite: bool = False, set_aside: bool = False,
) -> dict[str, Any]:
    """Run the resolved scenario ``cfg`` on ``engine``; write results to ``out_dir`` (if given) and return them.

    ``out_dir`` is held with :func:`fedmerge.storage.run_folder` for the whole run: locked against a second run, and
    refused when it already holds files unless ``resume``, ``overwrite`` (which deletes them first) or ``set_aside``
    (which moves them beside the folder, as a resumed multi-seed run or privacy study does with an unfinished
    seed's files). Under Flower
    every domain is loaded once before Flower starts, so bad data fails at once with its own error.
    ``resume``: re-merge and re-evaluate from the client weights an earlier run saved in ``out_dir`` (no training);
    that run's results.json is kept as ``results.<UTC time>.json``. A run whose results say ``status: failed``
    raises FedmergeError after its results.json (with the partial results and the errors) is written.
    """
    if engine not in ENGINES:
        raise FedmergeError(f"unknown engine {engine!r}; valid: {list(ENGINES)}")
    check_one_seed(cfg, "run_scenario", "use fedmerge.simulate (or fedmerge.runners.multiseed.run_seeds) for one "
                   "run per seed")
    if resume and out_dir is None:
        raise FedmergeError("--resume needs the output folder of the earlier run (--out DIR)")
    if resume and overwrite:
        raise FedmergeError("--resume re-uses the earlier run's files and --overwrite deletes them; pass only one")
    check_flower_out(engine, out_dir)
    check_before_run(cfg, engine)
    if out_dir is None:
        return _run_engine(cfg, engine, None, resume)
    from fedmerge.storage import check_data_outside, run_folder

    check_data_outside(cfg, out_dir)  # --overwrite would delete the scenario's own data

    with run_folder(out_dir, resume=resume, overwrite=overwrite, set_aside=set_aside):
        check_or_record_data(cfg, Path(out_dir), resume)
        return _run_engine(cfg, engine, out_dir, resume)


def check_one_seed(cfg: Scenario, runner: str, advice: str) -> None:
    """FedmergeError when ``cfg`` lists ``run.seeds``: ``runner`` runs one seed (``run.seed``), and would record
    ``run.seeds`` in results.json as if each had run; ``advice`` says what runs one run per seed."""
    if cfg.run.seeds:
        raise FedmergeError(f"run.seeds = {list(cfg.run.seeds)}: {runner} runs one seed (run.seed); {advice}")


def simulate(
    scenario: Scenario, out_dir: str | Path | None = None, *, engine: str = "inprocess", resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """What ``fedmerge simulate`` runs, from Python (in-process by default; ``engine="flower"`` for Flower's
    simulation engine): one run of ``scenario`` (its results, as results.json holds them) or, when ``run.seeds``
    lists seeds, one run per seed into ``out_dir/seed-<s>/`` and their aggregate (means, 95 % intervals and paired
    ratios, as aggregate.json holds them; :func:`fedmerge.runners.multiseed.run_seeds`). ``out_dir``, ``resume``
    and ``overwrite`` as for :func:`run_scenario`; several seeds need an ``out_dir``."""
    if resume and overwrite:  # run_scenario says so too, but a multi-seed run reached the engine first
        raise FedmergeError("--resume re-uses the earlier run's files and --overwrite deletes them; pass only one")
    check_flower_out(engine, out_dir)  # as is this (a multi-seed run holds out_dir before its first seed starts)
    if scenario.run.seeds:
        if out_dir is None:
            raise FedmergeError(f"run.seeds = {list(scenario.run.seeds)}: several seeds need an output folder "
                                "(out_dir), one sub-folder per seed")
        from fedmerge.runners.multiseed import run_seeds

        return run_seeds(scenario, engine, out_dir, resume=resume, overwrite=overwrite)
    return run_scenario(scenario, engine=engine, out_dir=out_dir, resume=resume, overwrite=overwrite)


def check_flower_out(engine: str, out_dir: str | Path | None) -> None:
    """Under Flower, FedmergeError naming an output folder that Flower's run config cannot carry
    (:func:`fedmerge.deploy.flwr_cli.check_config_path`); the in-process engine takes any folder."""
    if engine == "flower" and out_dir is not None:
        from fedmerge.deploy.flwr_cli import check_config_path

        check_config_path("--out", Path(out_dir).resolve())


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """(device, inode, modification time in ns) of ``path``, None when there is none: whether a file is still the
    one seen earlier (an atomic write or a rename makes another)."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino, status.st_mtime_ns


def check_before_run(cfg: Scenario, engine: str) -> None:
    """What must fail before a run touches its output folder (``--overwrite`` empties it): a misspelt
    ``model.params`` key or ``merge.local_parameters`` name (:meth:`Scenario.make_checked_family`), a missing
    text-encoder model folder (a path is checked here, where the run's processes read it, not when the scenario
    loads), a missing domain and, under Flower, a method registered in this process only and bad data (every
    domain loaded once: the clients would load it only once Flower runs; the in-process engine loads it first
    thing)."""
    if engine == "flower":
        check_registered_here_only(cfg)
        check_family_in_subprocess(cfg)
        for name in cfg.data.domain_names():
            cfg.load_domain(name)
    else:
        cfg.make_checked_family()
        if cfg.data.source != "synthetic":
            for name in cfg.data.domain_names():
                cfg.data.domain_path(name)  # DataError naming a domain that is not there
    cfg.encoder.text_encoder()


def check_registered_here_only(cfg: Scenario) -> None:
    """FedmergeError when the scenario names a merge method or model family registered in this process only
    (``register_method`` / ``register_family``): the Flower engine's server and client processes do not have it."""
    from fedmerge.merging import METHODS
    from fedmerge.models import FAMILIES

    names = list(cfg.merge.methods)
    if cfg.merge.lists_mergerec():
        names.append(cfg.mergerec_config("task").init_method)  # MergeRec starts from this registry merge
    local = sorted({m for m in names if m in METHODS.registered_here})
    local += [cfg.model.family] if cfg.model.family in FAMILIES.registered_here else []
    if local:
        raise FedmergeError(f"{local} registered in this process only (register_method / register_family): the Flower "
                            "engine's processes do not have them; run with engine='inprocess', or register them "
                            "with an entry point (README: Adding a merge method / Adding a model family)")


def check_family_in_subprocess(cfg: Scenario) -> None:
    """:meth:`Scenario.make_checked_family` (the check the server runs when it starts) in a short-lived process, so
    that a bad ``model.params`` value fails in seconds with the family's one-line message, before Flower starts,
    while this launcher process stays free of torch (the family modules import it)."""
    import json
    import subprocess
    import sys

    from fedmerge.paths import importable_env

    code = ("import json, sys\n"
            "from fedmerge.errors import FedmergeError\n"
            "from fedmerge.scenario import Scenario\n"
            "try:\n"
            "    Scenario.from_mapping(json.loads(sys.argv[1])).make_checked_family()\n"
            "except FedmergeError as exc:\n"
            "    print(exc, file=sys.stderr)\n"
            "    sys.exit(3)\n")
    args = [sys.executable, "-c", code, json.dumps(cfg.to_mapping())]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=importable_env())
    if result.returncode == 3:
        raise FedmergeError(result.stderr.strip().splitlines()[-1])
    if result.returncode:
        logger.warning("could not check model.params before starting Flower (exit %d): %s", result.returncode,
                       (result.stderr.strip().splitlines() or ["no output"])[-1])


def check_or_record_data(cfg: Scenario, out_dir: Path, resume: bool) -> None:
    """A new run records the digests of its domains' files (:data:`fedmerge.storage.DATA_DIGESTS_FILE`); a resumed
    one compares them and refuses a domain whose files changed since the run (its saved weights were trained on other
    data). A simulation holds every domain's data in one place; a deployment's clients keep theirs."""
    from fedmerge.data import same_domain_files
    from fedmerge.storage import DATA_DIGESTS_FILE, client_weights_path, write_json_atomic

    path = out_dir / DATA_DIGESTS_FILE
    now = cfg.data.file_digests()
    if not resume:
        write_json_atomic(path, now)
        return
    if not any(client_weights_path(out_dir, d).is_file() for d in cfg.data.training_domains()):
        return  # nothing trained to compare against: the resumed run says so itself
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        if now:
            logger.warning("%s has no %s (a run before fedmerge recorded it): the data is not checked against the "
                           "run's", out_dir, DATA_DIGESTS_FILE)
        return
    except ValueError as exc:
        raise FedmergeError(f"{path}: unreadable ({exc}); run without --resume") from None
    changed = sorted(d for d, digest in now.items()
                     if d in recorded and not same_domain_files(recorded[d], cfg.data.domain_path(d), digest))
    if changed:
        raise FedmergeError(f"the files of domain(s) {changed} changed since the run in {out_dir} (sha256 recorded in "
                            f"{DATA_DIGESTS_FILE}): its saved weights were trained on other data; run without --resume "
                            "(--overwrite) to train again")


def _run_engine(cfg: Scenario, engine: str, out_dir: str | Path | None, resume: bool) -> dict[str, Any]:
    if engine == "inprocess":
        from fedmerge.runners.inprocess import run_inprocess

        results = run_inprocess(cfg, out_dir, resume=resume)
    else:
        results = run_flower_simulation(cfg, out_dir, resume=resume)
    if results.get("status") != "ok":
        where = f" (results: {Path(out_dir) / RESULTS_FILE})" if out_dir is not None else ""
        raise FedmergeError(f"the {engine} run failed{where}: {results.get('errors')}")
    return results


def client_cpus(cfg: Scenario, cpus: int) -> int:
    """CPUs each simulated ClientApp gets (Flower's ``client-resources-num-cpus``): 1, so one ClientApp runs per CPU,
    or ``cpus // federation.parallel_clients`` (at least 1) so that only that many run at once - one Ray actor
    each, and each actor holds its own training peak (README, Running a federation)."""
    wanted = cfg.federation.parallel_clients
    return 1 if wanted == 0 else max(1, cpus // wanted)


def run_flower_simulation(cfg: Scenario, out_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Flower simulation through ``flwr run``: a private SuperLink with Flower's simulation runtime (Ray backend),
    ``num-supernodes`` = number of domains, :func:`client_cpus` CPUs per ClientApp.

    The resolved scenario is written to a run-private folder that also holds the Flower home (``FLWR_HOME``); a
    SuperLink (``--simulation``) listens on a free 127.0.0.1 port; the app (this repository's ``[tool.flwr.app]``)
    is submitted with the run config ``scenario`` (that file), ``out-dir`` and ``resume``; ``flwr ls`` is polled
    until the run finished, and success needs both ``finished:completed`` and ``results.json`` with ``status: ok``
    (never an exit code), and the file then gets ``timings_s.simulation_wall`` (seconds from the SuperLink's start
    to the run's end, the Flower engine's whole cost); there is no overall time limit (``federation.timeout_s`` bounds the ServerApp's every
    wait for replies). Every process started is stopped by pid on return, error or Ctrl-C. Ray runs in
    single-machine mode (:data:`RAY_SINGLE_MACHINE_ENV`), so it listens on 127.0.0.1 only. The run's own output
    (ServerApp and ClientApps, Ray) is streamed to stderr only with ``--verbose``; otherwise a progress bar read
    from the run folder (:class:`fedmerge.runners.run_progress.FolderProgress`; none when ``run.progress`` is false)
    shows the phases.
    """
    from fedmerge.deploy.flwr_cli import CONNECTION, FlwrClient, RunFailed, check_config_path, write_flower_config
    from fedmerge.deploy.local import (
        REPO_ROOT, check_app_dir, deployment_env, poll_check, read_results, reported_errors, start_superlink,
    )
    from fedmerge.deploy.processes import ProcessSet
    from fedmerge.logs import LEVEL_ENV, verbose_enabled
    from fedmerge.runners.appconfig import flower_run_config
    from fedmerge.runners.run_progress import FolderProgress
    from fedmerge.storage import write_json_atomic

    app = check_app_dir(REPO_ROOT)
    verbose = verbose_enabled()
    with tempfile.TemporaryDirectory(prefix="fedmerge-sim-") as scratch:
        private = Path(scratch)
        check_config_path("the temporary folder (TMPDIR)", private)  # it holds the run config's scenario file
        target = Path(out_dir).resolve() if out_dir is not None else private / "results"
        results_path = target / RESULTS_FILE
        # a stale file must not pass for this run's result; a resumed run's ServerApp keeps the earlier one as
        # results.<UTC time>.json (archive_results) once it accepts the saved weights, so it stays until then
        stale = file_identity(results_path) if resume else None
        if not resume:
            results_path.unlink(missing_ok=True)
        # run_scenario holds out_dir (lock, earlier files)
        run_config = flower_run_config(cfg, private, target, resume=resume, out_dir_held=True)
        cpus = len(os.sched_getaffinity(0))
        federation_config = {"num-supernodes": len(cfg.data.domain_names()),
                             "client-resources-num-cpus": client_cpus(cfg, cpus),
                             "init-args-num-cpus": cpus, "init-args-log-to-driver": verbose,
                             "verbose": logging.getLogger().isEnabledFor(logging.DEBUG)}
        env = {**deployment_env(private), RAY_SINGLE_MACHINE_ENV: "0", RAY_DEDUP_ENV: "0",
               LEVEL_ENV: logging.getLevelName(logging.getLogger("fedmerge").getEffectiveLevel())}
        start = time.perf_counter()
        with ProcessSet(private, env=env) as procs:
            link = start_superlink(procs, private, tls=None, node_auth=False, simulation=True,
                                   startup_timeout_s=cfg.federation.startup_timeout_s)
            write_flower_config(Path(env["FLWR_HOME"]), link.address, None)
            flwr = FlwrClient(Path(env["FLWR_HOME"]), env=env)
            run_id = flwr.submit_run(app, run_config, federation_config)
            logger.info("submitted Flower simulation run %d to %s", run_id, link.address)
            if verbose:
                procs.start("run-log", ["flwr", "log", str(run_id), CONNECTION, "--stream"], echo=True)
            progress = FolderProgress(cfg, target, enabled=cfg.run.progress and not verbose)
            try:
                flwr.wait(run_id, float("inf"), SIMULATION_POLL_S, check=poll_check(procs, link), ready=progress.poll)
            except RunFailed as exc:
                fresh = file_identity(results_path) not in (None, stale)
                raise RunFailed(f"{exc}{reported_errors(results_path) if fresh else ''}") from exc
            finally:
                progress.close()
        wall = time.perf_counter() - start
        if stale is not None and file_identity(results_path) == stale:
            raise FedmergeError(f"the run finished but wrote no new {results_path} (the earlier run's is unchanged)")
        results = read_results(results_path)
        results["timings_s"]["simulation_wall"] = round(wall, 3)
        # the ServerApp has finished: nothing else writes the file, which says what the run returns
        write_json_atomic(results_path, results)
    return results
