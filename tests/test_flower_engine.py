"""`fedmerge simulate --engine flower` through ``flwr run`` on a private simulation SuperLink: what it prints by
default and with ``--verbose``, and that Ctrl-C leaves no process behind (slow: each starts Flower and Ray)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmerge.deploy.processes import _alive, descendants
from tests.test_deploy import TINY



def simulate_argv(out: Path, *flags: str) -> list[str]:
    sets = [arg for item in TINY for arg in ("--set", item)]
    return [sys.executable, "-m", "fedmerge.cli", *flags, "simulate", "quickstart", "--out", str(out), *sets]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_default_output_is_the_summary_and_verbose_streams_the_run_log(tmp_path):
    quiet = subprocess.run(simulate_argv(tmp_path / "quiet"), capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "ndcg@10 (flower engine)" in quiet.stdout and (tmp_path / "quiet" / "results.json").is_file()
    for noise in ("INFO", "WARNING", "ERROR", "ClientAppActor", "Flower", "Ray"):
        assert noise not in quiet.stderr, quiet.stderr[-3000:]
    assert "local training" in quiet.stderr, quiet.stderr[-3000:]  # the launcher's bar, read from the run folder
    assert re.search(r"done: 100%.* (\d+)/\1 ", quiet.stderr), quiet.stderr[-3000:]
    # --resume keeps the earlier results.json as results.<UTC time>.json (the launcher deleted it before the run)
    earlier = (tmp_path / "quiet" / "results.json").read_text()
    resumed = subprocess.run([*simulate_argv(tmp_path / "quiet"), "--resume"], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (kept,) = (tmp_path / "quiet").glob("results.*.json")
    assert kept.read_text() == earlier and '"resumed"' in (tmp_path / "quiet" / "results.json").read_text()
    verbose = subprocess.run(simulate_argv(tmp_path / "verbose", "--verbose"), capture_output=True, text=True,
                             timeout=600)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "Starting Flower Simulation" in verbose.stderr and "ClientAppActor" in verbose.stderr
    assert "local training" not in verbose.stderr  # the streamed run log shows the progress; no second bar


@pytest.mark.slow
def test_ctrl_c_during_a_flower_simulation_stops_every_process(tmp_path):
    """Ctrl-C while the clients train (an epoch budget no run reaches, so a quiet machine cannot finish first)."""
    argv = [*simulate_argv(tmp_path / "run"), "--set", "model.params.max_epochs=100000",
            "--set", "model.params.patience=100000"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    seen: dict[int, str] = {}  # pid -> command line, recorded while alive
    deadline = time.monotonic() + 300
    try:
        while not any("ClientAppActor" in line for line in seen.values()):  # Ray runs the clients
            assert proc.poll() is None and time.monotonic() < deadline, "no client started"
            seen.update({pid: cmdline(pid) for pid in descendants(proc.pid)})
            time.sleep(0.5)
        time.sleep(5)
        seen.update({pid: cmdline(pid) for pid in descendants(proc.pid)})
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, err.decode()[-2000:]
    assert any("flower-superlink" in line for line in seen.values()) and any("raylet" in line for line in seen.values())
    deadline = time.monotonic() + 10
    while [pid for pid in seen if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [(pid, cmdline(pid)) for pid in seen if _alive(pid)]


@pytest.mark.slow
def test_failed_flower_run_names_the_errors_and_leaves_no_process(tmp_path):
    from fedmerge.config import load_scenario
    from fedmerge.errors import FedmergeError
    from fedmerge.runners.simulation import run_scenario

    # missing data now fails before Flower starts (test_flower_engine_refuses_bad_data_before_flower_starts); a
    # reply timeout far below the clients' training time fails the run inside Flower instead
    cfg = load_scenario("quickstart", [*TINY, "federation.timeout_s=0.2"])
    with pytest.raises(FedmergeError, match=r"(?s)ended finished:failed.*train:synth-0"):
        run_scenario(cfg, "flower", tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists() or '"failed"' in (tmp_path / "run" / "results.json").read_text()
    assert descendants(os.getpid()) == []


def test_the_fab_holds_the_app_only_and_fits_flowers_limit():
    """`flwr run` packs the project folder into a FAB of at most 10 MiB: the app's code, scenarios and README go in;
    the measured results (16 MB, which made `flwr run` refuse the FAB), tests and benchmarks stay out."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    fab = build_fab_from_disk(Path(__file__).resolve().parents[1])
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert len(fab) <= FAB_MAX_SIZE
    assert {"clients/app.py", "server/app.py", "fedmerge/runners/client.py", "scenarios/quickstart.toml"} <= set(names)
    assert not [n for n in names if n.startswith(("results/", "tests/", "benchmarks/"))]
