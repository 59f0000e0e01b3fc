"""A real multi-process federation on one machine: one SuperLink, one SuperNode per domain, TLS + node auth.

:func:`deploy_local` starts ``flower-superlink`` (TLS, ``--enable-supernode-auth``), registers every SuperNode's
public key with ``flwr supernode register``, starts one ``flower-supernode`` per domain pointed at that domain's
private data folder (``--node-config data-path=...``), submits the fedmerge app with ``flwr run``, polls the run
with ``flwr ls`` until it finished, checks ``results.json`` and stops every process by pid (also on errors and
KeyboardInterrupt). Logs of each process are in ``<out>/logs``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmerge.deploy.certs import NodeKeys, TlsFiles, generate, load_tls_dir
from fedmerge.deploy.flwr_cli import FlwrClient, RunFailed, check_config_path, config_line, write_flower_config
from fedmerge.deploy.processes import ManagedProcess, ProcessSet, free_port, wait_for_port
from fedmerge.errors import FedmergeError
from fedmerge.paths import REPO_ROOT
from fedmerge.runners.results import RESULTS_FILE
from fedmerge.scenario import Scenario
from fedmerge.storage import check_data_outside, check_outside, write_json_atomic

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEPLOYMENT_FILE = "deployment.json"  # OUT/: how the run was deployed (also in a completed run's results.json)


@dataclass(frozen=True)
class Link:
    """A started SuperLink: its process, address and the CA its certificate chains to (None: insecure)."""

    process: ManagedProcess
    address: str
    root_cert: Path | None

    def check_alive(self) -> None:
        """FedmergeError with the end of its log if the SuperLink process has exited (a ``FlwrClient.wait`` check)."""
        if self.process.popen.poll() is not None:
            raise FedmergeError(f"the SuperLink exited with code {self.process.popen.returncode}:\n"
                                f"{self.process.log_tail()}")


def poll_check(procs: ProcessSet, link: Link) -> Callable[[], None]:
    """The check a :meth:`FlwrClient.wait` runs at every poll: remember the helpers the processes started
    (:meth:`ProcessSet.watch`: a crashed SuperLink's SuperExec and simulation runtime are stopped too), then fail if
    the SuperLink has exited (:meth:`Link.check_alive`)."""

    def check() -> None:
        procs.watch()
        link.check_alive()

    return check


def deployment_env(out_dir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every process: a private Flower home, unbuffered output, no runtime dependency install."""
    env = dict(os.environ if base is None else base)
    env.update({"FLWR_HOME": str(out_dir / "flwr-home"), "PYTHONUNBUFFERED": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})
    return env


def start_superlink(
    procs: ProcessSet, out_dir: Path, tls: TlsFiles | None, node_auth: bool = True, startup_timeout_s: float = 600.0,
    simulation: bool = False,
) -> Link:
    """Start a SuperLink on a free loopback port (TLS unless ``tls`` is None) and wait until it listens.

    ``simulation``: Flower's simulation runtime (virtual SuperNodes on Ray, no Fleet API) instead of real SuperNodes.
    """
    if node_auth and tls is None:
        raise FedmergeError("SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth with --insecure)")
    port = free_port(HOST)
    argv = ["flower-superlink", "--host", HOST, "--port", str(port), "--database", str(out_dir / "superlink.db"),
            "--disable-runtime-dependency-installation", *(["--simulation"] if simulation else [])]
    if tls is None:
        argv.append("--insecure")
    else:
        argv += ["--ssl-certfile", str(tls.server_cert), "--ssl-keyfile", str(tls.server_key),
                 "--ssl-ca-certfile", str(tls.ca_cert)]
    if node_auth:
        argv.append("--enable-supernode-auth")
    proc = procs.start("superlink", argv)
    try:
        wait_for_port(HOST, port, startup_timeout_s, alive=proc.popen)
    except FedmergeError as exc:
        raise FedmergeError(f"SuperLink did not start: {exc}\n{proc.log_tail()}") from exc
    return Link(proc, f"{HOST}:{port}", tls.ca_cert if tls else None)


def start_supernode(
    procs: ProcessSet, link: Link, name: str, node_config: Mapping[str, str | int | float], keys: NodeKeys | None,
    max_wait_s: float = 600.0,
) -> ManagedProcess:
    """Start a SuperNode connecting to ``link`` with ``node_config``; ``keys`` authenticate it (None: no key)."""
    argv = ["flower-supernode", "--superlink", link.address, "--port", str(free_port(HOST)),
            "--node-config", config_line(node_config), "--max-wait-time", str(max_wait_s)]
    argv += ["--insecure"] if link.root_cert is None else ["--root-certificates", str(link.root_cert)]
    if keys is not None:
        argv += ["--auth-supernode-private-key", str(keys.private_key)]
    return procs.start(name, argv)


def wait_until_online(flwr: FlwrClient, node_ids: Sequence[int], nodes: Sequence[ManagedProcess], timeout_s: float) -> None:
    """Block until every node id shows ``online``; FedmergeError naming a node whose process exited or timed out."""
    deadline = time.monotonic() + timeout_s
    wanted = {str(n) for n in node_ids}
    while True:
        for proc in nodes:
            if proc.popen.poll() is not None:
                raise FedmergeError(
                    f"{proc.name} exited with code {proc.popen.returncode} before the run:\n{proc.log_tail()}"
                )
        online = {str(n["node-id"]) for n in flwr.nodes() if n.get("status") == "online"}
        if wanted <= online:
            return
        if time.monotonic() > deadline:
            raise FedmergeError(f"SuperNodes {sorted(wanted - online)} not online after {timeout_s:.0f} s")
        time.sleep(1.0)


def check_data_root(cfg: Scenario, data_root: str | Path | None) -> list[str]:
    """The scenario's domain names; FedmergeError when it names none, or when a non-synthetic scenario comes without
    ``--data-root``."""
    names = cfg.data.domain_names()
    if not names:
        raise FedmergeError("the scenario names no domains (data.domains is empty)")
    if data_root is None and cfg.data.source != "synthetic":
        raise FedmergeError("--data-root is needed for a non-synthetic scenario (one folder or .tar.gz per domain)")
    return names


def domain_data_paths(cfg: Scenario, data_root: Path | None, out_dir: Path) -> dict[str, Path]:
    """Each domain's private data location: ``<data_root>/<name>`` (folder or .tar.gz); synthetic scenarios without
    a data root get their domains written to ``<out>/data/<name>`` in the generic format."""
    names = check_data_root(cfg, data_root)
    if data_root is None:
        from fedmerge.data.generic import save_generic_domain

        return {name: save_generic_domain(cfg.load_domain(name), out_dir / "data" / name) for name in names}
    located = cfg.with_changes(data={"root": str(data_root)}).data
    advice = "--data-root needs one folder or tarball per domain"
    # absolute, not resolved: a linked folder is the domain of its own name
    return {name: located.domain_path(name, advice=advice).absolute() for name in names}


def given_tls_files(tls_dir: Path, n_nodes: int, out_dir: Path) -> TlsFiles:
    """The PKI of ``--tls-dir`` (:func:`fedmerge.deploy.certs.load_tls_dir`: complete, a server certificate that
    can work) with a key pair (private and ``.pub``) for each of ``n_nodes`` SuperNodes, outside ``out_dir`` (which
    the deployment takes over: ``--overwrite`` empties it)."""
    check_outside(tls_dir, out_dir, "--tls-dir", "the deployment")
    tls = load_tls_dir(tls_dir)
    if len(tls.nodes) < n_nodes:
        raise FedmergeError(f"{tls_dir} holds {len(tls.nodes)} node key pairs but {n_nodes} SuperNodes are needed; "
                            f"run `fedmerge deploy certs --out {tls_dir} --nodes {n_nodes} --force`")
    missing = [str(keys.public_key) for keys in tls.nodes[:n_nodes] if not keys.public_key.is_file()]
    if missing:
        raise FedmergeError(f"{tls_dir} lacks the public key(s) {missing} of its node key pairs; run `fedmerge deploy "
                            f"certs --out {tls_dir} --nodes {n_nodes} --force`")
    return tls


def read_results(path: Path) -> dict[str, Any]:
    """``results.json`` of a finished run; FedmergeError if it is missing, unreadable or not ``status: ok``."""
    if not path.is_file():
        raise FedmergeError(f"the run finished but wrote no {path}")
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FedmergeError(f"{path} is not readable JSON: {exc}") from exc
    if results.get("status") != "ok":
        raise FedmergeError(f"{path} reports status {results.get('status')!r}: {results.get('errors')}")
    return results


def reported_errors(path: Path) -> str:
    """The per-domain errors and rejections a failed run still wrote to ``results.json`` (empty if none)."""
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    return f"\nresults.json ({path}) reports errors {results.get('errors')} and rejected updates {results.get('rejected')}"


def check_app_dir(app_dir: Path) -> Path:
    """``app_dir`` must hold a pyproject.toml with a ``[tool.flwr.app]`` table (what ``flwr run`` builds)."""
    pyproject = Path(app_dir) / "pyproject.toml"
    try:
        conf = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FedmergeError(f"cannot read the Flower app's {pyproject}: {exc}") from exc
    if "app" not in conf.get("tool", {}).get("flwr", {}):
        raise FedmergeError(f"{pyproject} has no [tool.flwr.app] table; `flwr run` cannot build the app")
    return Path(app_dir).resolve()


def deploy_local(
    scenario: str | Path,
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    data_root: str | Path | None = None,
    tls_dir: str | Path | None = None,
    app_dir: str | Path = REPO_ROOT,
    timeout_s: float = 3600.0,
    poll_s: float = 2.0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run ``scenario`` on a local SuperLink + one SuperNode per domain over TLS with node authentication.

    ``out_dir`` is held with :func:`fedmerge.storage.run_folder` for the run: locked, and refused when it holds an
    earlier deployment's files unless ``overwrite`` (they are deleted first). The SuperLink's listen, the
    SuperNodes' connection and the ServerApp's wait for them are bounded by ``federation.startup_timeout_s``, the
    whole run by ``timeout_s``. Returns the parsed ``results.json``; raises FedmergeError (run failed, node refused,
    timeout, ...) after stopping every started process.
    """
    from fedmerge.config import load_scenario
    from fedmerge.runners.simulation import check_before_run, check_one_seed
    from fedmerge.storage import run_folder

    app = check_app_dir(Path(app_dir))
    cfg = load_scenario(scenario, overrides)
    check_one_seed(cfg, "deploy local", "run it once per seed, each into its own --out, with --set run.seed=S "
                   "(`fedmerge simulate --seeds` runs every seed and aggregates them)")
    if data_root is not None:  # the ServerApp reads the public catalogs there too, not only the SuperNodes their data
        cfg = cfg.with_changes(data={"root": str(Path(data_root).resolve())})
    out = Path(out_dir).resolve()
    check_config_path("--out", out)  # Flower's run config carries it, the node config each domain's data path
    data_base = Path(data_root).resolve() if data_root is not None else out / "data"
    if data_root is not None:
        check_config_path("--data-root", data_base)
    for name in cfg.data.domain_names():
        check_config_path(f"domain {name!r}: its data path", data_base / name)
    check_data_outside(cfg, out, "the deployment")
    cfg.privacy.check_deployable()  # each SuperNode would refuse it, after everything had started
    tls = None if tls_dir is None else given_tls_files(Path(tls_dir), len(cfg.data.domain_names()), out)  # before
    check_data_root(cfg, data_root)
    check_before_run(cfg, "flower")  # as is a bad scenario (model.params key, encoder folder, data)
    with run_folder(out, overwrite=overwrite, resumable=False):  # --out is touched (--overwrite deletes what it holds)
        return _deploy(cfg, out, data_root, tls, app, timeout_s, poll_s)


def _deploy(
    cfg: Scenario, out: Path, data_root: str | Path | None, tls: TlsFiles | None, app: Path, timeout_s: float,
    poll_s: float,
) -> dict[str, Any]:
    from fedmerge.logs import verbose_enabled
    from fedmerge.runners.appconfig import flower_run_config
    from fedmerge.runners.run_progress import FolderProgress

    paths = domain_data_paths(cfg, Path(data_root).resolve() if data_root else None, out)
    tls = tls or generate(out / "tls", len(paths), overwrite=True)
    env = deployment_env(out)
    results_dir = out / "results"
    startup_s = cfg.federation.startup_timeout_s
    with ProcessSet(out, env=env) as procs:
        link = start_superlink(procs, out, tls, startup_timeout_s=startup_s)
        write_flower_config(Path(env["FLWR_HOME"]), link.address, link.root_cert)
        flwr = FlwrClient(Path(env["FLWR_HOME"]), env=env)
        node_ids = [flwr.register_node(keys.public_key, name=name) for keys, name in zip(tls.nodes, paths)]
        nodes = [
            start_supernode(procs, link, f"supernode-{name}", {"data-path": str(path)}, keys, max_wait_s=startup_s)
            for (name, path), keys in zip(paths.items(), tls.nodes)
        ]
        wait_until_online(flwr, node_ids, nodes, startup_s)
        run_config = flower_run_config(cfg, out, results_dir)
        run_id = flwr.submit_run(app, run_config)
        logger.info("submitted run %d to %s with %d SuperNodes", run_id, link.address, len(nodes))
        deployment = {"superlink": link.address, "run_id": run_id, "tls": link.root_cert is not None,
                      "node_auth": True,
                      "root_certificate": None if link.root_cert is None else str(link.root_cert.resolve()),
                      "node_keys": {name: str(keys.public_key.resolve()) for name, keys in zip(paths, tls.nodes)}}
        write_json_atomic(out / DEPLOYMENT_FILE, deployment)  # also for a run that fails
        progress = FolderProgress(cfg, results_dir, enabled=cfg.run.progress and not verbose_enabled())
        try:
            status = flwr.wait(run_id, timeout_s, poll_s, check=poll_check(procs, link), ready=progress.poll)
        except RunFailed as exc:
            raise RunFailed(f"{exc}{reported_errors(results_dir / RESULTS_FILE)}") from exc
        finally:
            progress.close()
            (out / "logs" / "run.log").write_text(flwr.logs(run_id))
        logger.info("run %d %s", run_id, status)
    results = {**read_results(results_dir / RESULTS_FILE), "deployment": deployment}
    write_json_atomic(results_dir / RESULTS_FILE, results)  # the ServerApp has finished: nothing else writes it
    return results
