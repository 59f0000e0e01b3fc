"""Drive Flower's ``flwr`` CLI against one SuperLink: register nodes, submit a run, poll its status.

Every call uses ``--format json`` and is judged by the JSON it prints (``"success"``), never by the exit code,
which is 0 even when the command failed. The SuperLink connection (address, root CA) lives in a private Flower
home (``FLWR_HOME``) so the user's ``~/.flwr/config.toml`` is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmerge.errors import FedmergeError
from fedmerge.storage import write_bytes_atomic

logger = logging.getLogger(__name__)

CONNECTION = "fedmerge"
FINISHED = "finished"
COMPLETED = "completed"
HINT_POLL_S = 0.25  # seconds between checks of FlwrClient.wait's ``ready`` hint
READY_POLL_S = 1.0  # seconds between status polls once the hint held (the run is about to finish)


class FlwrCommandError(FedmergeError):
    """A ``flwr`` command reported failure (or printed no JSON)."""


class RunFailed(FedmergeError):
    """The Flower run ended in a state other than finished:completed, or did not end in time."""


@dataclass(frozen=True)
class RunStatus:
    """A run's state as ``flwr ls`` reports it, e.g. ``finished:completed`` -> ("finished", "completed")."""

    run_id: int
    status: str
    sub_status: str
    details: str

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def succeeded(self) -> bool:
        return self.status == FINISHED and self.sub_status == COMPLETED

    def __str__(self) -> str:
        text = f"{self.status}:{self.sub_status}" if self.sub_status else self.status
        return text + (f" ({self.details})" if self.details and self.details != "N/A" else "")


def toml_string(value: str) -> str:
    """A TOML basic string literal for ``value`` (JSON string escaping is valid TOML)."""
    return json.dumps(value)


def write_flower_config(flwr_home: Path, address: str, root_certificates: Path | None) -> Path:
    """``<flwr_home>/config.toml`` with one default SuperLink connection (TLS with ``root_certificates``, or insecure)."""
    lines = ["[superlink]", f"default = {toml_string(CONNECTION)}", "", f"[superlink.{CONNECTION}]",
             f"address = {toml_string(address)}"]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {toml_string(str(Path(root_certificates).resolve()))}")
    return write_bytes_atomic(Path(flwr_home) / "config.toml", ("\n".join(lines) + "\n").encode())


def parse_json_output(stdout: str, command: str) -> dict[str, Any]:
    """The JSON object a ``flwr ... --format json`` command printed; FlwrCommandError unless ``success`` is true."""
    start = stdout.find("{")
    try:
        payload = json.loads(stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        raise FlwrCommandError(f"`{command}` printed no JSON result: {stdout.strip()[-500:] or '(nothing)'}")
    if not payload.get("success", False):
        message = str(payload.get("error-message", "no error message")).strip()
        raise FlwrCommandError(f"`{command}` failed: {message}")
    return payload


def parse_run_status(payload: Mapping[str, Any], run_id: int) -> RunStatus:
    """The entry for ``run_id`` in a ``flwr ls --format json`` payload."""
    for run in payload.get("runs", []):
        if int(run.get("run-id", -1)) == run_id:
            status, _, sub_status = str(run.get("status", "")).partition(":")
            return RunStatus(run_id, status, sub_status, str(run.get("status-details", "")))
    raise FlwrCommandError(f"run {run_id} is not listed by the SuperLink")


def toml_scalar(key: str, value: str | int | float | bool) -> str:
    """``value`` as a TOML scalar (strings quoted, numbers/bools bare); ValueError naming ``key`` otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    raise ValueError(f"config value for {key!r} must be a str, int, float or bool, got {type(value).__name__}")


def run_config_args(run_config: Mapping[str, Any]) -> list[str]:
    """``--run-config 'key=value'`` arguments (values as TOML: strings quoted, numbers/bools bare)."""
    args: list[str] = []
    for key, value in run_config.items():
        args += ["--run-config", f"{key}={toml_scalar(key, value)}"]
    return args


def check_config_path(what: str, path: str | Path) -> None:
    """FedmergeError naming ``path`` (``what``: the flag or domain it comes from) when it holds a double quote:
    Flower's ``--run-config`` / ``--node-config`` parser (``flwr.common.config.parse_config_args``) reads a quoted
    value up to the next ``"``, escaped or not, so such a path fails inside Flower with a generic "invalid format"
    error, after the processes started. Checked before a run touches anything."""
    if '"' in str(path):
        raise FedmergeError(f"{what} {path} holds a double quote (\"), which Flower's --run-config / --node-config "
                            "cannot carry; rename it or give a path without one")


def config_line(values: Mapping[str, Any]) -> str:
    """Space-separated ``key=value`` items with TOML values, as ``--federation-config``/``--node-config`` take them."""
    return " ".join(f"{key}={toml_scalar(key, value)}" for key, value in values.items())


class FlwrClient:
    """The ``flwr`` CLI bound to one private Flower home and its default SuperLink connection."""

    def __init__(self, flwr_home: Path, env: Mapping[str, str] | None = None, timeout_s: float = 120.0) -> None:
        self.flwr_home = Path(flwr_home)
        self.env = {**(env if env is not None else os.environ), "FLWR_HOME": str(self.flwr_home)}
        self.timeout_s = timeout_s

    def call(self, *args: str, cwd: Path | None = None) -> dict[str, Any]:
        """Run ``flwr <args> --format json`` and return its JSON payload (FlwrCommandError on failure)."""
        argv = ["flwr", *args, "--format", "json"]
        command = " ".join(argv[:3])
        try:
            done = subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=cwd, timeout=self.timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise FlwrCommandError(f"`{command}` did not answer within {self.timeout_s:.0f} s") from exc
        except OSError as exc:
            raise FlwrCommandError(f"cannot run flwr: {exc}") from exc
        return parse_json_output(done.stdout, command)

    def register_node(self, public_key: Path, name: str | None = None) -> int:
        """Register a SuperNode's public key with the SuperLink; returns its node id."""
        extra = ["--name", name] if name else []
        return int(self.call("supernode", "register", str(public_key), CONNECTION, *extra)["node-id"])

    def nodes(self) -> list[dict[str, Any]]:
        """The SuperLink's node table (``flwr supernode ls``)."""
        return list(self.call("supernode", "list", CONNECTION).get("nodes", []))

    def submit_run(
        self, app_dir: Path, run_config: Mapping[str, Any] | None = None,
        federation_config: Mapping[str, Any] | None = None,
    ) -> int:
        """``flwr run <app_dir>``: build the app bundle, submit it, return the run id (does not wait).

        ``federation_config``: the simulation runtime's settings (``--federation-config``), e.g. ``num-supernodes``.
        """
        extra = ["--federation-config", config_line(federation_config)] if federation_config else []
        payload = self.call("run", str(app_dir), CONNECTION, *run_config_args(run_config or {}), *extra, cwd=app_dir)
        return int(payload["run-id"])

    def status(self, run_id: int) -> RunStatus:
        return parse_run_status(self.call("ls", CONNECTION, "--run-id", str(run_id)), run_id)

    def logs(self, run_id: int) -> str:
        """The run's collected logs (``flwr log --show``), or a note why they are unavailable."""
        try:
            done = subprocess.run(
                ["flwr", "log", str(run_id), CONNECTION, "--show"], capture_output=True, text=True, env=self.env,
                timeout=self.timeout_s,
            )
        except (subprocess.TimeoutExpired, OSError) as exc:
            return f"(logs unavailable: {exc})"
        return done.stdout + done.stderr

    def stop(self, run_id: int) -> None:
        self.call("stop", str(run_id), CONNECTION)

    def wait(
        self, run_id: int, timeout_s: float, poll_s: float = 2.0, check: Callable[[], None] | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> RunStatus:
        """Poll until the run finishes; RunFailed unless it finished:completed or when ``timeout_s`` passes.

        ``check`` runs on every poll (e.g. to fail fast when the SuperLink process died). ``ready`` is a cheap hint
        that the run is about to finish (e.g. its results file exists): checked every :data:`HINT_POLL_S` between
        polls, it cuts the pause short, so a long ``poll_s`` spares ``flwr`` calls without delaying the end; once it
        held, the status is polled every :data:`READY_POLL_S` (the run still writes its tables and plots).
        """
        deadline = time.monotonic() + timeout_s
        last: RunStatus | None = None
        hinted = False
        while True:
            if check is not None:
                check()
            try:
                last = self.status(run_id)
            except FlwrCommandError as exc:
                logger.warning("status poll failed: %s", exc)
            if last is not None and last.finished:
                break
            if time.monotonic() > deadline:
                try:
                    self.stop(run_id)
                except FlwrCommandError as exc:
                    logger.warning("could not stop run %d: %s", run_id, exc)
                raise RunFailed(f"run {run_id} did not finish within {timeout_s:.0f} s (last status: {last})")
            if ready is not None and not hinted:
                pause_until = time.monotonic() + poll_s
                while time.monotonic() < pause_until and not (hinted := ready()):
                    time.sleep(HINT_POLL_S)
            else:  # the hint held once (it stays true: the results file exists): a short pause, never a spin
                time.sleep(min(poll_s, READY_POLL_S) if hinted else poll_s)
        if not last.succeeded:
            tail = "\n".join(self.logs(run_id).strip().splitlines()[-25:])
            raise RunFailed(f"run {run_id} ended {last}; last log lines:\n{tail}")
        return last
