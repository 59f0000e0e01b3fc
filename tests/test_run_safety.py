"""A run's results are never lost or mixed: run-folder lock, no silent reuse of a folder, failed runs still write
results.json, write errors name the path."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest

from fedmerge.config import apply_overrides, load_scenario
from fedmerge.errors import FedmergeError
from fedmerge.storage import LOCK_FILE, run_folder, write_bytes_atomic

TINY = [
    "run.progress=false", "data.synthetic.n_users=30", "data.synthetic.n_items=20", "data.synthetic.max_len=6",
    "model.params.hidden=8", "model.params.n_layers=1", "model.params.max_len=6", "model.params.max_epochs=1",
    "model.params.n_experts=2", "baselines.fedavg_rounds=0", "baselines.joint=false", "merge.methods=['average']",
    "encoder.name=hashing", "encoder.params.dim=16",
]


@pytest.fixture
def cfg(tmp_path):
    return load_scenario("quickstart", [*TINY, f"encoder.cache_dir={tmp_path / 'cache'}"])


def test_second_run_into_a_locked_folder_fails_at_once(cfg, tmp_path):
    from fedmerge.runners.simulation import run_scenario

    out = tmp_path / "run"
    with run_folder(out):
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(FedmergeError, match=rf"run folder {out} is in use by another run \(pid {os.getpid()}"):
            run_scenario(cfg, "inprocess", out)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the refused run wrote nothing
    with run_folder(out):  # released when the holder leaves (or dies: the kernel drops a flock with its process)
        pass


def test_non_empty_folder_refused_unless_resume_or_overwrite(cfg, tmp_path):
    from fedmerge.runners.simulation import run_scenario

    out = tmp_path / "run"
    (out / "clients").mkdir(parents=True)
    (out / "clients" / "old-seed.safetensors").write_bytes(b"weights of an earlier run")
    (out / LOCK_FILE).touch()  # as the earlier run left it
    with pytest.raises(FedmergeError, match=r"already holds an earlier run's files \(clients\).*--resume.*--overwrite"):
        run_scenario(cfg, "inprocess", out)
    assert (out / "clients" / "old-seed.safetensors").read_bytes() == b"weights of an earlier run"
    with pytest.raises(FedmergeError, match="pass only one"):
        run_scenario(cfg, "inprocess", out, resume=True, overwrite=True)
    # a misspelt model parameter fails before --overwrite deletes anything (the in-process engine deleted first)
    with pytest.raises(FedmergeError, match=r"hiden"):
        run_scenario(apply_overrides(cfg, ["model.params.hiden=16"]), "inprocess", out, overwrite=True)
    assert (out / "clients" / "old-seed.safetensors").read_bytes() == b"weights of an earlier run"
    results = run_scenario(cfg, "inprocess", out, overwrite=True)
    assert results["status"] == "ok"
    assert not (out / "clients" / "old-seed.safetensors").exists()
    assert sorted(p.stem for p in (out / "clients").glob("*.safetensors")) == ["synth-0", "synth-1", "synth-2"]
    assert run_scenario(cfg, "inprocess", out, resume=True)["resumed"]["clients"] == ["synth-0", "synth-1", "synth-2"]


def test_overwrite_never_empties_a_folder_no_run_has_held(tmp_path, capsys):
    """--out pointed at a home or project folder by mistake: the first try was refused but left a lock file there,
    and the second, with --overwrite, deleted everything in it (any folder was emptied, lock or not)."""
    from fedmerge.cli import main

    home = tmp_path / "home"
    (home / "thesis").mkdir(parents=True)
    (home / "thesis" / "draft.tex").write_text("years of work")
    (home / "notes.txt").write_text("keep me")
    args = ["simulate", "quickstart", "--engine", "inprocess", "--out", str(home)]
    args += [item for o in [*TINY, f"encoder.cache_dir={tmp_path / 'cache'}"] for item in ("--set", o)]
    for flags in ([], ["--resume"], ["--overwrite"]):  # --resume left its lock, and the --overwrite after it emptied
        assert main([*args, *flags]) != 0
        assert "holds files no fedmerge run left (notes.txt, thesis; it has no .fedmerge.lock)" in capsys.readouterr().err
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt", "thesis"]
    assert (home / "thesis" / "draft.tex").read_text() == "years of work"


@pytest.mark.parametrize("engine", ["inprocess", "flower"])
def test_a_missing_encoder_folder_fails_before_overwrite_empties_the_folder(cfg, tmp_path, engine):
    """A misspelt model folder (encoder.name=/path) failed when the clients built the encoder, after --overwrite had
    deleted the earlier run's results and trained weights."""
    out = tmp_path / "out"
    (out / "clients").mkdir(parents=True)
    (out / "clients" / "synth-0.safetensors").write_bytes(b"weights of an earlier run")
    from fedmerge.runners.simulation import run_scenario

    missing = tmp_path / "no-such-model"
    with pytest.raises(FedmergeError, match=f"{missing}.*does not exist"):
        run_scenario(apply_overrides(cfg, [f"encoder.name={missing}", "encoder.params={}"]), engine, out,
                     overwrite=True)
    assert (out / "clients" / "synth-0.safetensors").read_bytes() == b"weights of an earlier run"


@pytest.mark.parametrize("bad, problem", [
    (['merge.local_parameters=["nonexistent"]'], "not weights of this model"),
    (['data.source="generic"', "data.root=/no/such/root", 'data.domains=["A", "B"]'], "domain 'A' not found"),
])
def test_an_in_process_run_checks_its_domains_and_local_parameters_before_overwrite(cfg, tmp_path, bad, problem):
    """Under the in-process engine a missing domain folder and a merge.local_parameters name that is no weight
    failed after --overwrite had emptied the folder (the Flower engine checked the data first)."""
    from fedmerge.runners.simulation import run_scenario

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    with pytest.raises(FedmergeError, match=problem):
        run_scenario(apply_overrides(cfg, bad), "inprocess", out, overwrite=True)
    assert (out / "results.json").read_text() == "{}"


@pytest.mark.parametrize("bad", [["model.params.hiden=16"], ["encoder.name=/no/such/model", "encoder.params={}"]])
def test_a_multi_seed_run_checks_its_scenario_before_overwrite_empties_the_folder(cfg, tmp_path, bad):
    """`--seeds 0-1 --overwrite` emptied --out (every seed's results and weights) before the first seed's run met
    a misspelt model.params key or a missing encoder folder."""
    from fedmerge.runners.simulation import simulate

    out = tmp_path / "out"
    (out / "seed-0" / "clients").mkdir(parents=True)
    (out / "seed-0" / "clients" / "synth-0.safetensors").write_bytes(b"weights of an earlier run")
    with pytest.raises(FedmergeError, match="hiden|does not exist"):
        simulate(apply_overrides(cfg, ["run.seeds=[0, 1]", *bad]), out, overwrite=True)
    assert (out / "seed-0" / "clients" / "synth-0.safetensors").read_bytes() == b"weights of an earlier run"


def test_an_unfinished_run_is_not_set_aside_while_a_run_holds_its_folder(tmp_path):
    """A second `--resume` moved a live run's files aside before it met the lock the live run held."""
    folder = tmp_path / "seed-0"
    (folder / "clients").mkdir(parents=True)
    (folder / "clients" / "a.safetensors").write_bytes(b"trained")
    (folder / LOCK_FILE).touch()  # an earlier run's folder
    with run_folder(folder, resume=True):  # the live run
        with pytest.raises(FedmergeError, match="in use by another run"):
            with run_folder(folder, set_aside=True):
                pass
    assert (folder / "clients" / "a.safetensors").read_bytes() == b"trained"
    with run_folder(folder, set_aside=True):
        (kept,) = tmp_path.glob("seed-0.unfinished-*")
        assert (kept / "clients" / "a.safetensors").read_bytes() == b"trained" and not (folder / "clients").exists()
    with run_folder(folder, set_aside=True):
        assert len(list(tmp_path.glob("seed-0.unfinished-*"))) == 1  # nothing left to set aside: no new folder
    with pytest.raises(FedmergeError, match="pass only one"):
        with run_folder(folder, resume=True, set_aside=True):
            pass


def test_an_unfinished_seed_is_set_aside_and_run_again_under_one_hold_of_its_lock(cfg, tmp_path, monkeypatch):
    """A resumed seed's unfinished files were moved aside under the folder's lock, which was then released and taken
    again by the new run: another run could start in the folder in between."""
    import fedmerge.storage as storage
    from fedmerge.runners.multiseed import resume_seed

    folder = tmp_path / "seed-0"
    (folder / "clients").mkdir(parents=True)
    (folder / "clients" / "synth-0.safetensors").write_bytes(b"weights of an interrupted run")
    (folder / LOCK_FILE).touch()
    holds = []
    real_run_folder = storage.run_folder

    def counting_run_folder(out_dir, **kwargs):
        holds.append(out_dir)
        return real_run_folder(out_dir, **kwargs)

    monkeypatch.setattr(storage, "run_folder", counting_run_folder)
    results = resume_seed(cfg, "inprocess", folder)
    assert results["status"] == "ok" and [str(p) for p in holds] == [str(folder)]
    (kept,) = tmp_path.glob("seed-0.unfinished-*")
    assert (kept / "clients" / "synth-0.safetensors").read_bytes() == b"weights of an interrupted run"


def test_a_run_that_failed_before_writing_anything_does_not_block_the_next(tmp_path, capsys):
    """A multi-seed run that stops at a data error leaves only lock files (OUT/.fedmerge.lock, OUT/seed-0/.fedmerge.lock):
    the rerun with the data fixed must start without --overwrite (it used to be refused as "an earlier run's files")."""
    from fedmerge.cli import main

    out = tmp_path / "run"
    args = ["simulate", "quickstart", "--engine", "inprocess", "--seeds", "0", "--out", str(out)]
    args += [item for o in [*TINY, f"encoder.cache_dir={tmp_path / 'cache'}"] for item in ("--set", o)]
    assert main([*args, "--set", f"data.root={tmp_path / 'missing'}", "--set", "data.source=amazon",
                 "--set", 'data.domains=["Beauty"]']) != 0
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err
    assert (out / "seed-0" / "results.json").is_file()


def test_simulate_cli_refuses_a_used_out_folder(tmp_path, capsys):
    from fedmerge.cli import main

    args = ["simulate", "quickstart", "--engine", "inprocess", "--out", str(tmp_path / "run")]
    args += [item for o in [*TINY, f"encoder.cache_dir={tmp_path / 'cache'}"] for item in ("--set", o)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 1
    assert "already holds an earlier run's files" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_failure_after_training_writes_failed_results_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    """Merging fails after every client trained: results.json keeps the training metrics and the error, the CLI
    exits 1 (the in-process engine used to exit 0 on status failed, or lose the partial results on an exception)."""
    from fedmerge.cli import main
    from fedmerge.runners import server

    def broken_merge(*args, **kwargs):
        raise RuntimeError("merge exploded")

    monkeypatch.setattr(server, "merge_replies", broken_merge)
    out = tmp_path / "run"
    args = ["simulate", "quickstart", "--engine", "inprocess", "--out", str(out)]
    args += [item for o in [*TINY, f"encoder.cache_dir={tmp_path / 'cache'}"] for item in ("--set", o)]
    assert main(args) == 1
    assert f"the inprocess run failed (results: {out / 'results.json'})" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed"
    assert results["errors"]["run"] == "RuntimeError: merge exploded"
    assert sorted(results["train_metrics"]) == ["synth-0", "synth-1", "synth-2"]
    assert sorted(p.stem for p in (out / "clients").glob("*.safetensors")) == ["synth-0", "synth-1", "synth-2"]


def test_evaluation_error_status_failed_exits_non_zero(cfg, tmp_path, monkeypatch):
    """A client failing evaluation gives status failed; run_scenario raises for the in-process engine too."""
    from fedmerge.runners import client
    from fedmerge.runners.simulation import run_scenario

    def broken_evaluate(*args, **kwargs):
        raise ValueError("test users unreadable")

    monkeypatch.setattr(client, "client_evaluate", broken_evaluate)
    with pytest.raises(FedmergeError, match="the inprocess run failed .*test users unreadable"):
        run_scenario(cfg, "inprocess", tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


def test_a_diverged_merge_costs_only_itself_and_nan_diagnostics_still_write_results(cfg, tmp_path, monkeypatch):
    """One merge method producing NaN weights is left out with its reason (the other merges are evaluated, status
    ok), and a NaN in a diagnostic (here a merge report's loss curve) is written as null and named in warnings:
    results.json used to be refused (JSON cannot hold NaN), losing the whole run."""
    from dataclasses import replace

    import fedmerge.merging as merging
    from fedmerge.runners import server
    from fedmerge.runners.simulation import run_scenario

    real_merge, real_replies = merging.merge, server.merge_replies

    def diverging_merge(method, theta0, models, **params):
        merged = real_merge(method, theta0, models, **params)
        return {k: v * float("nan") for k, v in merged.items()} if method == "task_arithmetic" else merged

    def with_nan_diagnostic(*args, **kwargs):
        merged, report = real_replies(*args, **kwargs)
        report["loss_curve"] = [1.0, float("nan"), float("inf")]
        return merged, report

    monkeypatch.setattr(merging, "merge", diverging_merge)
    monkeypatch.setattr(server, "merge_replies", with_nan_diagnostic)
    cfg = replace(cfg, merge=replace(cfg.merge, methods=("average", "task_arithmetic")))
    results = run_scenario(cfg, "inprocess", tmp_path / "run")
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == written["status"] == "ok"
    assert "average" in written["models"] and "task_arithmetic" not in written["models"]
    assert "NaN or infinite values in" in written["merge_report"]["failed"]["task_arithmetic"]
    assert written["merge_report"]["loss_curve"] == [1.0, None, None]
    assert any(w.startswith("merge task_arithmetic failed and was not evaluated") for w in written["warnings"])
    assert any("merge_report.loss_curve[1], merge_report.loss_curve[2]" in w for w in written["warnings"])


def test_a_model_the_client_cannot_evaluate_costs_only_its_own_metrics(cfg):
    """A model whose scores hold NaN: the client reports the others' metrics and why that one is missing; the server
    keeps the others and records the reason (one bad model used to fail the domain's whole evaluation)."""
    import torch
    from flwr.app import RecordDict

    from fedmerge.runners import protocol
    from fedmerge.runners.client import ClientState
    from fedmerge.runners.server import Federation, initial_weights

    theta0 = initial_weights(cfg)
    broken = {k: v * float("nan") if v.is_floating_point() else v for k, v in theta0.items()}
    state = ClientState(cfg, partition_id=0)
    request = RecordDict({protocol.MODEL_PREFIX + "good": protocol.to_record(theta0),
                          protocol.MODEL_PREFIX + "broken": protocol.to_record(broken)})
    reply = state.handle(protocol.EVALUATE, request)
    assert set(reply.metric_records) == {protocol.METRICS_PREFIX + "good"}
    assert "scores contain NaN" in reply.config_records[protocol.EVALUATION_FAILURES]["broken"]
    federation = Federation(cfg, theta0)
    federation.models.update(good={}, broken={})  # as the evaluation phase prepares them for the models it sends
    domain = state.domain.name
    federation.accept_metrics(domain, reply, sent={"good", "broken"})
    assert domain in federation.models["good"] and domain not in federation.models.get("broken", {})
    assert federation.rejected[f"{protocol.EVALUATE}:{domain}:broken"] == \
        "the client could not evaluate it: ValueError: scores contain NaN"
    assert torch.isfinite(torch.tensor(list(federation.models["good"][domain].values()))).all()
    others = [d for d in federation.train_domains if d != domain]
    assert f"the average of good covers ['{domain}'] only (no metrics of {others})" in \
        "\n".join(federation.results()["warnings"])


def test_write_errors_name_the_path(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "results.json"

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(FedmergeError, match=rf"cannot write {target}: No space left on device"):
        write_bytes_atomic(target, b"{}")
    assert list(target.parent.iterdir()) == []  # no temporary file left behind
    monkeypatch.undo()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(FedmergeError, match=rf"cannot write {blocker / 'x.json'}"):
        write_bytes_atomic(blocker / "x.json", b"{}")


def listening_sockets(pids: set[int]) -> set[tuple[str, int, int]]:
    """(local address, port, pid) of every listening TCP socket (IPv4 and IPv6) owned by one of ``pids``."""
    import ipaddress
    from pathlib import Path

    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:  # the process ended meanwhile
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_address, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_address)
            # /proc lists the address as 32-bit words in host (little-endian) order
            packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(packed)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            found.add((str(address), int(hex_port, 16), inodes[fields[9]]))
    return found


@pytest.mark.slow
def test_flower_simulation_ray_listens_on_loopback_only(cfg, tmp_path):
    """Every socket that Ray's processes (GCS, raylet, workers, the driver) listen on during a Flower simulation is
    on 127.0.0.1 (Ray used to bind its gRPC servers to all interfaces, unauthenticated). ~30 s."""
    import ipaddress
    import threading

    from fedmerge.deploy.processes import descendants
    from fedmerge.runners.simulation import run_scenario

    seen: set[tuple[str, int, int]] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(listening_sockets({os.getpid(), *descendants(os.getpid())}))
            done.wait(0.3)

    before = listening_sockets({os.getpid()})
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert run_scenario(cfg, "flower", tmp_path / "run")["status"] == "ok"
    finally:
        done.set()
        watcher.join()
    ray_sockets = seen - before
    assert len({pid for _, _, pid in ray_sockets}) >= 2, ray_sockets  # at least GCS and raylet were observed
    exposed = sorted(s for s in ray_sockets if not ipaddress.ip_address(s[0]).is_loopback)
    assert not exposed, f"listening beyond loopback: {exposed}"


class SlowStartGrid:
    """SuperNodes that connect ``delay_s`` after the run starts; each then answers the connect query at once."""

    def __init__(self, domains: list[str], delay_s: float) -> None:
        self.domains = domains
        self.ready_at = time.monotonic() + delay_s
        self.query_timeouts: list[float] = []

    def get_node_ids(self):
        return list(range(1, len(self.domains) + 1)) if time.monotonic() >= self.ready_at else []

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Message, RecordDict

        from fedmerge.runners import protocol

        self.query_timeouts.append(timeout)
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"id-{m.metadata.dst_node_id}"
            domain = self.domains[m.metadata.dst_node_id - 1]
            replies.append(Message(RecordDict({protocol.INFO: protocol.info_record(domain)}), reply_to=m))
        return replies


def test_supernode_start_up_wait_is_not_the_reply_timeout(cfg, flower_task_identity):
    """A 0.2 s reply timeout no longer bounds the wait for SuperNodes that need 1.5 s to start."""
    from fedmerge.config import apply_overrides
    from server.strategy import MergeStrategy

    grid = SlowStartGrid(["synth-0", "synth-1", "synth-2"], delay_s=1.5)
    strategy = MergeStrategy(apply_overrides(cfg, ["federation.timeout_s=0.2", "federation.startup_timeout_s=30.0"]), grid)
    assert strategy.connect() == {"synth-0": 1, "synth-1": 2, "synth-2": 3}
    assert grid.query_timeouts[0] > 20  # the connect query round is bounded by the start-up wait too
    with pytest.raises(FedmergeError, match="federation.startup_timeout_s must be > 0"):
        apply_overrides(cfg, ["federation.startup_timeout_s=0.0"])


def test_simulate_overwrite_never_deletes_the_scenarios_own_data_inside_out(cfg, tmp_path):
    """`simulate --overwrite` into a run folder that also held the scenario's data root deleted the data with the
    earlier run's files (train and deploy local refused this; simulate did not), single seed and seeds alike."""
    from fedmerge.data.generic import save_generic_domain
    from fedmerge.runners.multiseed import run_seeds
    from fedmerge.runners.simulation import run_scenario

    out = tmp_path / "run"
    with run_folder(out):  # an earlier run's folder
        (out / "results.json").write_text("{}")
    for name in cfg.data.domain_names():
        save_generic_domain(cfg.load_domain(name), out / "data" / name)
    inside = apply_overrides(cfg, ['data.source="generic"', f'data.root="{out / "data"}"',
                                   'data.domains=["synth-0", "synth-1", "synth-2"]'])
    with pytest.raises(FedmergeError, match=r"the data root .*/run/data lies inside --out .*/run, which the run "
                                            r"takes over \(--overwrite empties it\)"):
        run_scenario(inside, "inprocess", out, overwrite=True)
    with pytest.raises(FedmergeError, match=r"the data root .* lies inside --out"):
        run_seeds(apply_overrides(inside, ["run.seeds=[0, 1]"]), "inprocess", out, overwrite=True)
    assert sorted(p.name for p in (out / "data").iterdir()) == ["synth-0", "synth-1", "synth-2"]
    assert (out / "data" / "synth-0" / "interactions.csv").is_file() and (out / "results.json").is_file()


def test_a_foreign_folder_is_refused_before_a_lock_file_is_made_so_no_concurrent_overwrite_empties_it(tmp_path, monkeypatch):
    """A run refused a folder of user files only after creating .fedmerge.lock in it (then unlinked it): a second run
    with --overwrite starting in that window saw the lock, took the folder for an earlier run's and emptied it. The
    refusal now comes before any lock file exists; a run whose lock file was replaced while it locked stops."""
    from fedmerge import storage

    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    opened = []
    real_open = storage.os.open
    monkeypatch.setattr(storage.os, "open", lambda path, *a, **k: (opened.append(str(path)), real_open(path, *a, **k))[1])
    for flags in ({}, {"overwrite": True}):
        with pytest.raises(FedmergeError, match="holds files no fedmerge run left"):
            with run_folder(home, **flags):
                pass
    assert str(home / LOCK_FILE) not in opened and sorted(p.name for p in home.iterdir()) == ["thesis.tex"]
    with pytest.raises(FedmergeError) as refused:  # train and deploy local have no --resume to suggest
        with run_folder(home, resumable=False):
            pass
    assert "--resume" not in str(refused.value)
    # the lock file another process unlinks and makes anew between our open and our flock locks nothing
    out = tmp_path / "run"
    with run_folder(out):
        pass
    real_flock = storage.fcntl.flock

    def replaced_then_flock(fd, operation):
        (out / LOCK_FILE).unlink()
        (out / LOCK_FILE).write_text("")
        return real_flock(fd, operation)

    monkeypatch.setattr(storage.fcntl, "flock", replaced_then_flock)
    with pytest.raises(FedmergeError, match=r"was replaced while this run locked it"):
        with run_folder(out):
            pass
