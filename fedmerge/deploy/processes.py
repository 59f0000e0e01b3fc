"""Start and stop long-running processes (SuperLink, SuperNodes) by pid, each in its own process group.

:class:`ProcessSet` is a context manager: every process it starts is recorded (name, pid, command, log file) in
``<out>/processes.json``; on exit - normal, error or KeyboardInterrupt - each one is stopped by its pid:
SIGTERM to its process group, then SIGKILL after a grace period. Flower's daemons spawn helpers (SuperExec) in
their own sessions, so the descendants of each process are collected from /proc before the stop and signalled too;
:meth:`ProcessSet.watch` remembers them while their parent runs, so a process that crashed (its helpers re-parented,
no longer its descendants) has them and its process group's members stopped all the same.

A supervisor process (this module run with ``python -m``) guards against the deploying process dying without
running that cleanup (SIGKILL, OOM kill): it blocks reading a pipe from the deploying process, and the kernel closes
the pipe when that process dies however it dies; on end-of-file the supervisor stops every process recorded in
``processes.json`` that still runs, with its descendants. After a normal stop every recorded process has a return
code and the supervisor just exits.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from fedmerge.errors import FedmergeError
from fedmerge.paths import importable_env

logger = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
STDERR_FD = 2  # ProcessSet.start(echo=True): the child writes to this process's stderr (fd level)
RECORD_FILE = "processes.json"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float, alive: subprocess.Popen | None = None) -> None:
    """Block until ``host:port`` accepts TCP connections; FedmergeError after ``timeout_s`` or if ``alive`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise FedmergeError(f"process {alive.pid} exited with code {alive.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise FedmergeError(f"nothing listening on {host}:{port} after {timeout_s:.0f} s")


def descendants(pid: int) -> list[int]:
    """All live descendant pids of ``pid`` (from /proc/*/stat parent links; empty where /proc is absent)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    frontier = [pid]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found.extend(kids)
        frontier.extend(kids)
    return found


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3, the state, first); None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot, /proc/PID/stat field 22): with the pid, it names one process,
    never a later one given the same pid."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def group_members(pgid: int) -> list[int]:
    """Live pids in process group ``pgid`` (from /proc). A group id stays taken while a member lives, so after its
    leader exits these are still that leader's helpers."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(int(entry.name))
        if fields and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def orphans(pid: int, seen: Mapping[int, int]) -> list[int]:
    """What is left of a process that has exited (``pid`` no longer exists): the members of its process group and
    the descendants ``seen`` while it ran (pid -> start time) that still run. Empty while ``pid`` exists: then
    :func:`descendants` finds them, and a process now holding ``pid`` is another one."""
    if _alive(pid):
        return []
    return sorted({*group_members(pid), *(p for p, started in seen.items() if start_time(p) == started)} - {pid})


def _signal(pid: int, sig: signal.Signals, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state != "Z"


@dataclass
class ManagedProcess:
    """One started process: its name, command, log file and Popen handle."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen = field(repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, n_lines: int = 20) -> str:
        """The last lines of its log (ANSI colours removed)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()[-n_lines:])


class ProcessSet:
    """Processes started for one deployment; all of them are stopped by pid when the context exits."""

    def __init__(self, out_dir: str | Path, env: Mapping[str, str] | None = None, grace_s: float = STOP_GRACE_S) -> None:
        self.out_dir = Path(out_dir)
        self.env = dict(env) if env is not None else None
        self.grace_s = grace_s
        self.processes: list[ManagedProcess] = []
        self.seen: dict[str, dict[int, int]] = {}  # process name -> its descendants seen so far (pid -> start time)

    def start(self, name: str, argv: Sequence[str], cwd: str | Path | None = None, echo: bool = False) -> ManagedProcess:
        """Start ``argv`` in a new session (own process group), stdout+stderr to ``<out>/logs/<name>.log`` (with
        ``echo``: to this process's stderr instead; the log file stays empty)."""
        if any(p.name == name for p in self.processes):
            raise ValueError(f"a process named {name!r} was already started")
        log_path = self.out_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            try:
                popen = subprocess.Popen(
                    list(argv), stdout=STDERR_FD if echo else log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, env=self.env, cwd=cwd,
                )
            except OSError as exc:
                raise FedmergeError(f"cannot start {name} ({argv[0]}): {exc}") from exc
        proc = ManagedProcess(name, list(argv), log_path, popen)
        self.processes.append(proc)
        self._record()
        logger.info("started %s (pid %d), log %s", name, proc.pid, log_path)
        return proc

    def _record(self) -> None:
        from fedmerge.storage import write_json_atomic  # imported here: the supervisor (python -m) needs no torch

        write_json_atomic(
            self.out_dir / RECORD_FILE,
            [{"name": p.name, "pid": p.pid, "argv": p.argv, "log": str(p.log_path), "returncode": p.popen.poll(),
              "descendants": sorted(self.seen.get(p.name, {}).items())} for p in self.processes],
        )

    def watch(self) -> None:
        """Remember (and record for the supervisor) the descendants of every process still running: once a process
        exits (a crashed SuperLink) its helpers in their own sessions can no longer be found from its pid."""
        for proc in self.processes:
            if proc.popen.poll() is None:
                known = self.seen.setdefault(proc.name, {})
                for pid in descendants(proc.pid):
                    started = start_time(pid)
                    if started is not None:
                        known.setdefault(pid, started)
        self._record()

    def _helpers(self, proc: ManagedProcess) -> list[int]:
        """The pids to stop beside ``proc`` itself: its descendants now, or, once it has exited, what is left of it
        (:func:`orphans`)."""
        if proc.popen.poll() is None:
            return descendants(proc.pid)
        return orphans(proc.pid, self.seen.get(proc.name, {}))

    def stop(self, proc: ManagedProcess) -> int | None:
        """Stop one process and its descendants by pid: SIGTERM (group), wait, then SIGKILL. Returns its exit code.
        A process that already exited has its helpers stopped all the same (:meth:`_helpers`)."""
        extra = self._helpers(proc)
        if proc.popen.poll() is None:
            _signal(proc.pid, signal.SIGTERM, group=True)
        for pid in extra:
            _signal(pid, signal.SIGTERM, group=False)
        try:
            proc.popen.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", proc.name, proc.pid, self.grace_s)
            _signal(proc.pid, signal.SIGKILL, group=True)
            proc.popen.wait()
        deadline = time.monotonic() + self.grace_s
        while any(_alive(pid) for pid in extra) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in extra:
            if _alive(pid):
                _signal(pid, signal.SIGKILL, group=False)
        return proc.popen.returncode

    def stop_all(self) -> None:
        """Stop every started process, newest first (nodes before the link)."""
        for proc in reversed(self.processes):
            self.stop(proc)
        self._record()
        logger.info("stopped %d processes", len(self.processes))

    def __enter__(self) -> ProcessSet:
        """Start the supervisor that stops the recorded processes should this process die without :meth:`stop_all`."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._supervisor = subprocess.Popen(
            [sys.executable, "-m", __name__, str(self.out_dir / RECORD_FILE), str(self.grace_s)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True, env=importable_env(),
        )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.stop_all()
        finally:
            self._supervisor.stdin.close()  # every recorded process has a return code now: the supervisor just exits
            self._supervisor.wait()


def _same_process(pid: int, argv: Sequence[str]) -> bool:
    """True while ``pid`` runs ``argv`` (its arguments end the command line; a script may run under an interpreter),
    so a recycled pid is never signalled."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return False
    head = len(cmdline) - len(argv) + 1
    return head >= 1 and cmdline[head:] == list(argv[1:]) and any(Path(argv[0]).name in c for c in cmdline[:head])


def supervise(record: Path, grace_s: float = STOP_GRACE_S) -> list[int]:
    """Block until stdin reaches end-of-file, then stop every process of ``record`` that has no return code and
    still runs its command, with all its descendants (collected before any signal), and what is left of each that
    exited (:func:`orphans`): SIGTERM, then SIGKILL after ``grace_s``. Returns the pids it signalled."""
    sys.stdin.buffer.read()
    try:
        entries = json.loads(Path(record).read_text())
    except (OSError, ValueError):
        return []
    live = [e["pid"] for e in entries if e.get("returncode") is None and _same_process(e["pid"], e["argv"])]
    trees = {pid: descendants(pid) for pid in live}
    for e in entries:  # a recorded process that exited before the deployer died: what is left of it
        if e["pid"] not in trees:
            trees[e["pid"]] = orphans(e["pid"], {int(p): int(t) for p, t in e.get("descendants", [])})
    for pid, extra in trees.items():
        if pid in live:
            _signal(pid, signal.SIGTERM, group=True)
        for child in extra:
            _signal(child, signal.SIGTERM, group=False)
    everyone = [p for pid, extra in trees.items() for p in ((pid,) if pid in live else ()) + tuple(extra)]
    deadline = time.monotonic() + grace_s
    while any(_alive(p) for p in everyone) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in everyone:
        if _alive(pid):
            _signal(pid, signal.SIGKILL, group=False)
    return everyone


if __name__ == "__main__":  # the supervisor: python -m fedmerge.deploy.processes RECORD GRACE_S
    supervise(Path(sys.argv[1]), float(sys.argv[2]))
