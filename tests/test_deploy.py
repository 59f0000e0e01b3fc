"""Deployment pieces: PKI, flwr output parsing, pid-based process stopping, and real loopback runs.

The loopback tests start real ``flower-superlink`` / ``flower-supernode`` processes on 127.0.0.1 with ports picked
at runtime; every process is stopped by pid in the fixture teardown and checked to be gone.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmerge.deploy.certs import generate, load_tls_dir
from fedmerge.deploy.flwr_cli import (
    FlwrClient,
    FlwrCommandError,
    RunFailed,
    config_line,
    parse_json_output,
    parse_run_status,
    run_config_args,
    write_flower_config,
)
from fedmerge.deploy.local import (
    REPO_ROOT,
    deployment_env,
    domain_data_paths,
    start_superlink,
    start_supernode,
    wait_until_online,
)
from fedmerge.deploy.processes import ProcessSet, _alive, descendants, free_port
from fedmerge.errors import DataError, FedmergeError

# ---------------------------------------------------------------------------------------------------- PKI


def test_certificates_chain_to_own_ca(tmp_path):
    files = generate(tmp_path, n_nodes=2)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    key = serialization.load_pem_private_key(files.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert oct(files.server_key.stat().st_mode & 0o777) == "0o600"


def test_a_server_certificate_for_a_public_name_also_names_the_loopback(tmp_path):
    """`deploy certs --host link.example.org` (production step 1) gave a certificate for that name only, and the
    SuperLink's own SuperExec, which connects to it on 127.0.0.1 over TLS, failed: 'IP address mismatch'."""
    files = generate(tmp_path, n_nodes=0, hosts=["link.example.org"])
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName)[0] == "link.example.org"
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)


def test_node_keys_are_openssh_nist_ec_pairs(tmp_path):
    files = generate(tmp_path, n_nodes=3)
    assert [k.private_key.name for k in files.nodes] == ["node-0", "node-1", "node-2"]
    public_keys = set()
    for keys in files.nodes:
        private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), None)
        public = serialization.load_ssh_public_key(keys.public_key.read_bytes())
        assert isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
        public_keys.add(keys.public_key.read_text())
        assert oct(keys.private_key.stat().st_mode & 0o777) == "0o600"
    assert len(public_keys) == 3
    assert load_tls_dir(tmp_path).nodes == files.nodes


def test_certificates_not_overwritten_by_accident(tmp_path):
    first = generate(tmp_path, n_nodes=0).ca_cert.read_bytes()
    with pytest.raises(FedmergeError, match="already holds certificates"):
        generate(tmp_path, n_nodes=0)
    assert (tmp_path / "ca.crt").read_bytes() == first
    assert generate(tmp_path, n_nodes=0, overwrite=True).ca_cert.read_bytes() != first


def test_private_keys_never_follow_a_planted_symlink(tmp_path):
    """A symlink planted at ``<key>.tmp`` (the old fixed temporary name) must not receive the private key."""
    victim = tmp_path / "victim.txt"
    victim.write_text("attacker-readable file")
    out = tmp_path / "pki"
    (out / "nodes").mkdir(parents=True)
    for name in ("ca.key", "server.key", "nodes/node-0"):
        (out / f"{name}.tmp").symlink_to(victim)
    files = generate(out, n_nodes=1)
    assert victim.read_text() == "attacker-readable file"
    for key in (files.ca_key, files.server_key, files.nodes[0].private_key):
        assert not key.is_symlink() and key.stat().st_mode & 0o777 == 0o600
        assert b"PRIVATE KEY" in key.read_bytes()
    assert files.ca_cert.stat().st_mode & 0o777 == 0o644 and files.nodes[0].public_key.stat().st_mode & 0o777 == 0o644


def test_incomplete_tls_dir_named(tmp_path):
    generate(tmp_path, n_nodes=0)
    (tmp_path / "server.key").unlink()
    with pytest.raises(FedmergeError, match="server.key"):
        load_tls_dir(tmp_path)


def _resign_server_cert(folder, *, days_valid=(-5, 30), hosts=("127.0.0.1", "localhost"), ca_folder=None):
    """Replace folder/server.crt (and .key) by one signed by ca_folder's CA (default folder's), valid from/to the
    given day offsets and naming only ``hosts``."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    ca_folder = ca_folder or folder
    ca_key = serialization.load_pem_private_key((ca_folder / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((ca_folder / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    names = [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=days_valid[0]))
            .not_valid_after(now + dt.timedelta(days=days_valid[1]))
            .add_extension(x509.SubjectAlternativeName(names), critical=False).sign(ca_key, hashes.SHA256()))
    (folder / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))


def _resign_ca(folder, *, days_valid):
    """Replace folder/ca.crt by a certificate of the same CA key and name, valid from/to the given day offsets."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes

    key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(ca.subject).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now + dt.timedelta(days=days_valid[0]))
            .not_valid_after(now + dt.timedelta(days=days_valid[1]))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    (folder / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize(("change", "pattern"), [
    ({"days_valid": (-10, -1)}, r"server\.crt expired on 20\d\d-\d\d-\d\d"),
    ({"days_valid": (2, 30)}, r"server\.crt is not valid before 20\d\d-\d\d-\d\d"),
    ({"hosts": ("link.example.org",)}, r"server\.crt does not name 127\.0\.0\.1 .*link\.example\.org"),
    ({"ca_folder": "other"}, r"server\.crt is not signed by .*ca\.crt"),
])
def test_a_tls_dir_whose_server_certificate_cannot_work_is_named_before_anything_starts(tmp_path, change, pattern):
    """An expired certificate, one without the loopback names, or one from another CA reached the SuperLink and
    came back as `flwr supernode register` failed: 'Connection to the SuperLink is unavailable. Please check your
    network connection'."""
    generate(tmp_path / "pki", n_nodes=1)
    if change.get("ca_folder"):
        change = {"ca_folder": generate(tmp_path / "other", n_nodes=0).ca_cert.parent}
    _resign_server_cert(tmp_path / "pki", **change)
    with pytest.raises(FedmergeError, match=pattern):
        load_tls_dir(tmp_path / "pki")


def test_an_expired_ca_and_files_that_are_no_certificate_or_key_are_named(tmp_path):
    import datetime as dt

    from cryptography.hazmat.primitives import hashes

    files = generate(tmp_path / "pki", n_nodes=0)
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), None)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    now = dt.datetime.now(dt.timezone.utc)
    expired = (x509.CertificateBuilder().subject_name(ca.subject).issuer_name(ca.subject)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=10)).not_valid_after(now - dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    saved = files.ca_cert.read_bytes()
    files.ca_cert.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(FedmergeError, match=r"ca\.crt expired on"):
        load_tls_dir(tmp_path / "pki")
    files.ca_cert.write_text("not a certificate")
    with pytest.raises(FedmergeError, match=r"ca\.crt: not a PEM certificate"):
        load_tls_dir(tmp_path / "pki")
    files.ca_cert.write_bytes(saved)
    key = serialization.load_pem_private_key(files.server_key.read_bytes(), None)
    files.server_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(FedmergeError, match=r"server\.key: not an unencrypted PEM private key"):
        load_tls_dir(tmp_path / "pki")


def test_deploy_local_refuses_a_bad_tls_dir_before_touching_the_output_folder(tmp_path):
    """The TLS check ran after --overwrite had deleted the earlier deployment's files."""
    from fedmerge.deploy.local import deploy_local

    generate(tmp_path / "pki", n_nodes=3)
    _resign_server_cert(tmp_path / "pki", days_valid=(-10, -1))
    earlier = tmp_path / "deploy" / "results" / "results.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}")
    with pytest.raises(FedmergeError, match="expired"):
        deploy_local("quickstart", tmp_path / "deploy", tls_dir=tmp_path / "pki", overwrite=True)
    assert earlier.read_text() == "{}"
    # the PKI an earlier deployment generated in OUT/tls: --overwrite would delete it before it is used
    generate(tmp_path / "deploy" / "tls", n_nodes=3)
    with pytest.raises(FedmergeError, match="lies inside --out"):
        deploy_local("quickstart", tmp_path / "deploy", tls_dir=tmp_path / "deploy" / "tls", overwrite=True)
    assert earlier.read_text() == "{}" and (tmp_path / "deploy" / "tls" / "server.crt").is_file()
    # so do the domains' private data (--data-root inside --out was deleted by --overwrite)
    data = tmp_path / "deploy" / "data" / "shopA"
    data.mkdir(parents=True)
    (data / "interactions.csv").write_text("user,item,timestamp\n")
    with pytest.raises(FedmergeError, match="the data root .* lies inside --out"):
        deploy_local("quickstart", tmp_path / "deploy", overrides=['data.source="generic"', 'data.domains=["shopA"]'],
                     data_root=tmp_path / "deploy" / "data", overwrite=True)
    assert (data / "interactions.csv").is_file() and earlier.read_text() == "{}"
    # and a scenario the run would refuse (a misspelt model.params key, a missing text-encoder folder)
    for bad, problem in ((["model.params.hiden=16"], "hiden"),
                         (["encoder.name=/no/such/model", "encoder.params={}"], "/no/such/model does not exist")):
        with pytest.raises(FedmergeError, match=problem):
            deploy_local("quickstart", tmp_path / "deploy", overrides=bad, overwrite=True)
        assert earlier.read_text() == "{}"
    generate(tmp_path / "pki", n_nodes=3, overwrite=True)
    (tmp_path / "pki" / "nodes" / "node-1.pub").unlink()
    with pytest.raises(FedmergeError, match=r"lacks the public key\(s\) .*node-1\.pub"):
        deploy_local("quickstart", tmp_path / "deploy", tls_dir=tmp_path / "pki", overwrite=True)


def test_a_server_key_of_another_certificate_is_named(tmp_path):
    generate(tmp_path / "pki", n_nodes=0)
    generate(tmp_path / "other", n_nodes=0)
    (tmp_path / "pki" / "server.key").write_bytes((tmp_path / "other" / "server.key").read_bytes())
    with pytest.raises(FedmergeError, match=r"server\.key does not belong to .*server\.crt"):
        load_tls_dir(tmp_path / "pki")


# ---------------------------------------------------------------------------------------------------- flwr output


def test_parse_json_output_never_trusts_success_by_default():
    assert parse_json_output('{"success": true, "run-id": "7"}', "flwr run")["run-id"] == "7"
    with pytest.raises(FlwrCommandError, match="Connection to the SuperLink is unavailable"):
        parse_json_output('{"success": false, "error-message": "Connection to the SuperLink is unavailable."}', "flwr ls")
    with pytest.raises(FlwrCommandError, match="printed no JSON"):
        parse_json_output("Traceback ...", "flwr ls")
    with pytest.raises(FlwrCommandError, match="failed"):
        parse_json_output('{"run-id": 3}', "flwr run")  # no "success": not a success


def test_parse_run_status():
    payload = {"success": True, "runs": [
        {"run-id": "11", "status": "running", "status-details": "N/A"},
        {"run-id": "12", "status": "finished:failed", "status-details": "ServerApp raised"},
    ]}
    running = parse_run_status(payload, 11)
    assert (running.status, running.finished, running.succeeded) == ("running", False, False)
    failed = parse_run_status(payload, 12)
    assert (failed.finished, failed.succeeded, failed.sub_status) == (True, False, "failed")
    assert str(failed) == "finished:failed (ServerApp raised)"
    assert parse_run_status({"runs": [{"run-id": 5, "status": "finished:completed"}]}, 5).succeeded
    with pytest.raises(FlwrCommandError, match="run 99"):
        parse_run_status(payload, 99)


def test_run_config_and_node_config_quoting():
    assert run_config_args({"scenario": 'a "b"', "n": 3, "x": 0.5, "flag": True}) == [
        "--run-config", 'scenario="a \\"b\\""', "--run-config", "n=3", "--run-config", "x=0.5",
        "--run-config", "flag=true"]
    with pytest.raises(ValueError, match="'bad'"):
        run_config_args({"bad": [1]})
    text = config_line({"data-path": "/d/x y", "partition-id": 2, "verbose": False})
    assert tomllib.loads(text.replace(" partition", "\npartition").replace(" verbose", "\nverbose")) == {
        "data-path": "/d/x y", "partition-id": 2, "verbose": False}


def test_flower_config_is_valid_toml(tmp_path):
    path = write_flower_config(tmp_path, "127.0.0.1:1234", tmp_path / "ca.crt")
    conf = tomllib.loads(path.read_text())
    assert conf["superlink"]["default"] == "fedmerge"
    assert conf["superlink"]["fedmerge"] == {"address": "127.0.0.1:1234", "root-certificates": str(tmp_path / "ca.crt")}
    insecure = tomllib.loads(write_flower_config(tmp_path, "h:1", None).read_text())
    assert insecure["superlink"]["fedmerge"]["insecure"] is True


def test_flwr_client_reports_unreachable_superlink(tmp_path):
    write_flower_config(tmp_path, f"127.0.0.1:{free_port()}", None)
    with pytest.raises(FlwrCommandError, match="flwr ls"):
        FlwrClient(tmp_path, timeout_s=60).status(1)


# ---------------------------------------------------------------------------------------------------- processes

SPAWNER = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(120)\n"
)


def _child_pid(log: Path) -> int:
    for _ in range(100):
        text = log.read_text().strip()
        if text:
            return int(text.split()[0])
        time.sleep(0.05)
    raise AssertionError("spawner printed no child pid")


def test_process_set_stops_processes_and_detached_descendants(tmp_path):
    with ProcessSet(tmp_path, grace_s=2.0) as procs:
        proc = procs.start("spawner", [sys.executable, "-c", SPAWNER])
        child = _child_pid(proc.log_path)
        assert child in descendants(proc.pid)
        assert os.getpgid(child) != os.getpgid(proc.pid)  # a separate session: a group kill alone would miss it
    assert proc.popen.returncode == -signal.SIGTERM
    assert not _alive(child)
    assert (tmp_path / "processes.json").is_file()


CRASHER = (  # a 'SuperLink' that starts a helper in its group and one in its own session, then exits with code 3
    "import os, subprocess, sys, time\n"
    "sleeper = [sys.executable, '-c', 'import time; time.sleep(120)']\n"
    "same = subprocess.Popen(sleeper)\n"
    "own = subprocess.Popen(sleeper, start_new_session=True)\n"
    "print(same.pid, own.pid, flush=True)\n"
    "while not os.path.exists(sys.argv[1]):\n"
    "    time.sleep(0.05)\n"
    "os._exit(3)\n"
)


def _pids_printed(log: Path, count: int) -> list[int]:
    for _ in range(200):
        words = log.read_text().split()
        if len(words) >= count:
            return [int(w) for w in words[:count]]
        time.sleep(0.05)
    raise AssertionError(f"{log} holds no {count} pids")


def _wait_exit(proc) -> None:
    deadline = time.monotonic() + 15
    while proc.popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.popen.returncode == 3


def test_process_set_stops_the_helpers_of_a_process_that_already_exited(tmp_path):
    """A SuperLink that crashed left its helpers running: stop() skipped the group signal once it had a return code,
    and the descendants of a dead pid are none (they were re-parented). Helpers seen while it ran (watch) and the
    members of its process group are stopped now."""
    flag = tmp_path / "crash"
    with ProcessSet(tmp_path, grace_s=1.0) as procs:
        proc = procs.start("crasher", [sys.executable, "-c", CRASHER, str(flag)])
        same, own = _pids_printed(proc.log_path, 2)
        procs.watch()
        flag.touch()
        _wait_exit(proc)
        assert _alive(same) and _alive(own)
    assert not _alive(same) and not _alive(own)


def test_the_poll_check_of_both_flower_engines_remembers_helpers_then_names_a_crashed_superlink(tmp_path):
    """`simulate --engine flower` polled with link.check_alive alone (only `deploy local` watched the helpers), so
    a crashed simulation SuperLink left its SuperExec and simulation runtime running; both engines now poll with
    poll_check."""
    from fedmerge.deploy.local import Link, poll_check

    flag = tmp_path / "crash"
    with ProcessSet(tmp_path, grace_s=1.0) as procs:
        proc = procs.start("superlink", [sys.executable, "-c", CRASHER, str(flag)])
        same, own = _pids_printed(proc.log_path, 2)
        check = poll_check(procs, Link(proc, "127.0.0.1:1", None))
        check()  # a poll while it runs
        flag.touch()
        _wait_exit(proc)
        with pytest.raises(FedmergeError, match="the SuperLink exited with code 3"):
            check()
    assert not _alive(same) and not _alive(own)


def test_process_set_stops_on_error_and_kills_sigterm_ignorers(tmp_path):
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(120)"
    with pytest.raises(RuntimeError, match="boom"):
        with ProcessSet(tmp_path, grace_s=0.5) as procs:
            proc = procs.start("stubborn", [sys.executable, "-c", stubborn])
            _wait_for_text(proc.log_path, "up")
            raise RuntimeError("boom")
    assert proc.popen.returncode == -signal.SIGKILL


def test_process_start_failure_is_clear(tmp_path):
    with ProcessSet(tmp_path) as procs:
        with pytest.raises(FedmergeError, match="no-such-binary-h7"):
            procs.start("x", ["no-such-binary-h7"])
        procs.start("y", [sys.executable, "-c", "pass"])
        with pytest.raises(ValueError, match="already started"):
            procs.start("y", [sys.executable, "-c", "pass"])


def _wait_for_text(path: Path, text: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path}")


# ---------------------------------------------------------------------------------------------------- data layout


def test_domain_data_paths(tmp_path):
    from fedmerge.config import load_scenario

    cfg = load_scenario("quickstart", ["data.synthetic.n_users=30", "data.synthetic.n_items=20"])
    paths = domain_data_paths(cfg, None, tmp_path)
    assert list(paths) == ["synth-0", "synth-1", "synth-2"]
    assert all((p / "interactions.csv").is_file() for p in paths.values())
    root = tmp_path / "root"
    (root / "synth-0").mkdir(parents=True)
    (root / "synth-1.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"'synth-2' not found.*--data-root") as missing:
        domain_data_paths(cfg, root, tmp_path)
    assert "FEDMERGE_AMAZON_DIR" not in str(missing.value)  # --data-root overrides it under deploy
    (root / "synth-2").symlink_to(root / "synth-0")  # a linked folder is the domain of its own name
    assert domain_data_paths(cfg, root, tmp_path)["synth-2"].name == "synth-2"


# ---------------------------------------------------------------------------------------------------- loopback


@pytest.fixture
def deployment(tmp_path):
    """A ProcessSet whose processes (and their descendants) are all checked gone after the test."""
    procs = ProcessSet(tmp_path, env=deployment_env(tmp_path))
    tracked: list[int] = []
    yield procs, tracked
    for proc in procs.processes:
        tracked += [proc.pid, *descendants(proc.pid)]
    procs.stop_all()
    assert not [pid for pid in tracked if _alive(pid)]


@pytest.mark.slow
def test_superlink_tls_and_unregistered_supernode_refused(tmp_path, deployment):
    procs, _ = deployment
    tls = generate(tmp_path / "tls", n_nodes=2)
    link = start_superlink(procs, tmp_path, tls)
    host, port = link.address.split(":")
    context = ssl.create_default_context(cafile=str(tls.ca_cert))
    with socket.create_connection((host, int(port))) as raw, context.wrap_socket(raw, server_hostname=host) as tls_sock:
        assert tls_sock.version() in ("TLSv1.2", "TLSv1.3")
    stranger = ssl.create_default_context()  # system CAs only: our own CA is not trusted
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection((host, int(port))) as raw, stranger.wrap_socket(raw, server_hostname=host):
            pass

    flwr_home = Path(procs.env["FLWR_HOME"])
    write_flower_config(flwr_home, link.address, link.root_cert)
    flwr = FlwrClient(flwr_home, env=procs.env)
    node_id = flwr.register_node(tls.nodes[0].public_key)
    good = start_supernode(procs, link, "registered", {"data-path": "unused"}, tls.nodes[0])
    bad = start_supernode(procs, link, "unregistered", {"data-path": "unused"}, tls.nodes[1], max_wait_s=5)
    anonymous = start_supernode(procs, link, "anonymous", {"data-path": "unused"}, None, max_wait_s=5)
    wait_until_online(flwr, [node_id], [good], 60)
    for refused, reason in ((bad, "[code: 2004] Failed to activate SuperNode"),
                            (anonymous, "[code: 2001] SuperNode authentication is enabled")):
        assert refused.popen.wait(timeout=60) != 0
        assert "Exit Code: 305" in refused.log_tail(50) and reason in refused.log_tail(50)  # 305: connection refused
    assert good.popen.poll() is None
    online = [n for n in flwr.nodes() if n["status"] == "online"]
    assert [int(n["node-id"]) for n in online] == [node_id]


WRAPPER_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"
[project]
name = "fedmerge-app"
version = "0.1.0"
description = "fedmerge's ServerApp and ClientApp (installed package) as a Flower app"
license = "Apache-2.0"
dependencies = []
[tool.flwr.app]
publisher = "fedmerge"
[tool.flwr.app.components]
serverapp = "server.app:app"
clientapp = "clients.app:app"
[tool.flwr.app.config]
scenario = "quickstart"
overrides = ""
out-dir = ""
"""

TINY = ["data.synthetic.n_domains=2", "data.synthetic.n_users=40", "data.synthetic.n_items=30",
        "model.params.max_epochs=1", "baselines.fedavg_rounds=1", "baselines.joint=false",
        "merge.methods=['average','ties']"]


def flower_app_dir(tmp_path: Path) -> Path:
    """The repository (``flwr run .``) once its pyproject has [tool.flwr.app]; until then a folder whose
    pyproject names the same installed ServerApp/ClientApp."""
    conf = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    if "app" in conf.get("tool", {}).get("flwr", {}):
        return REPO_ROOT
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "pyproject.toml").write_text(WRAPPER_PYPROJECT)
    return tmp_path / "app"


def test_app_dir_without_flower_table_is_refused(tmp_path):
    from fedmerge.deploy.local import check_app_dir

    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    with pytest.raises(FedmergeError, match=r"no \[tool.flwr.app\]"):
        check_app_dir(tmp_path)
    (tmp_path / "w").mkdir()
    assert check_app_dir(flower_app_dir(tmp_path / "w")).is_dir()


@pytest.mark.slow
def test_full_tls_run_matches_simulation_shape(tmp_path):
    import json

    from fedmerge.config import load_scenario
    from fedmerge.deploy.local import deploy_local
    from fedmerge.runners.simulation import run_scenario

    results = deploy_local("quickstart", tmp_path / "deploy", overrides=TINY, app_dir=flower_app_dir(tmp_path),
                           timeout_s=500, poll_s=1.0)
    assert results["status"] == "ok" and results["errors"] == {} and results["rejected"] == {}
    assert results["domains"] == ["synth-0", "synth-1"]
    processes = (tmp_path / "deploy" / "processes.json").read_text()
    assert all(name in processes for name in ("superlink", "supernode-synth-0", "supernode-synth-1"))
    sim = run_scenario(load_scenario("quickstart", TINY), engine="inprocess", out_dir=tmp_path / "sim")
    assert _shape(results) == _shape(sim)
    assert sorted(results["nodes"]) == ["synth-0", "synth-1"] and sim["nodes"] == {}  # which node served each domain
    deployment = results["deployment"]  # what the launcher knows and the ServerApp does not
    assert deployment["tls"] is True and deployment["node_auth"] is True
    assert deployment["superlink"].startswith("127.0.0.1:")
    assert sorted(deployment["node_keys"]) == ["synth-0", "synth-1"] and "deployment" not in sim
    assert json.loads((tmp_path / "deploy" / "deployment.json").read_text()) == deployment
    assert json.loads((tmp_path / "deploy" / "results" / "results.json").read_text())["deployment"] == deployment


@pytest.mark.slow
def test_deploy_local_with_own_data_folders_under_data_root(tmp_path):
    """--data-root reached the SuperNodes but not the ServerApp, which kept the scenario's data.root and failed at
    merge time ("domain 'synth-1' not found under data/amazon"), after every client had trained."""
    from fedmerge.config import load_scenario
    from fedmerge.data import save_generic_domain
    from fedmerge.deploy.local import deploy_local

    synthetic = load_scenario("quickstart", TINY)
    for name in synthetic.data.domain_names():
        save_generic_domain(synthetic.load_domain(name), tmp_path / "own" / name)
    results = deploy_local("quickstart", tmp_path / "deploy", app_dir=flower_app_dir(tmp_path), timeout_s=500,
                           poll_s=1.0, data_root=tmp_path / "own",
                           overrides=[*TINY, 'data.source="generic"', 'data.domains=["synth-0","synth-1"]'])
    assert results["status"] == "ok" and results["errors"] == {}
    assert set(results["models"]["average"]) >= {"synth-0", "synth-1"}


@pytest.mark.slow
def test_supernode_killed_mid_training_fails_run_with_domain_named(tmp_path):
    """A SuperNode dies after receiving its train message: the server waits at most federation.timeout_s, merges
    the one reply it has (min_replies = 1), and the run ends ok with the dead domain named in errors and warnings
    (it ended failed until 2026-12-08: its missing evaluation failed a run that min_replies lets go on); nothing
    hangs."""
    import json
    import threading

    from fedmerge.deploy.local import deploy_local

    out = tmp_path / "deploy"
    overrides = [*TINY, "baselines.fedavg_rounds=0", "merge.methods=['average']", "federation.timeout_s=90.0",
                 "federation.min_replies=1"]
    outcome: dict[str, BaseException | None] = {}

    def run() -> None:
        try:
            deploy_local("quickstart", out, overrides=overrides, app_dir=flower_app_dir(tmp_path), timeout_s=400,
                         poll_s=1.0)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    start = time.monotonic()
    thread.start()
    victim_log = out / "logs" / "supernode-synth-1.log"
    _wait_for_text(victim_log, "Receiving: train message", timeout_s=300)
    victim = next(p for p in json.loads((out / "processes.json").read_text()) if p["name"] == "supernode-synth-1")
    doomed = [victim["pid"], *descendants(victim["pid"])]
    for pid in doomed:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=450)
    assert not thread.is_alive(), "deployment hung"
    elapsed = time.monotonic() - start
    assert outcome["error"] is None, outcome["error"]
    results = json.loads((out / "results" / "results.json").read_text())
    assert results["status"] == "ok"
    assert "train:synth-1" in results["errors"] and not any("synth-0" in k for k in results["errors"])
    assert any(w.startswith("client synth-1 was left out of the one-shot merges") for w in results["warnings"])
    assert any(w.startswith("client synth-1 sent no evaluation (left out of its training)") for w in results["warnings"])
    assert "average" in results["models"] and "synth-0" in results["models"]["average"]
    # the recorded reason is what ended the wait: the SuperLink's "Node Unavailable" (missed heartbeats) when it
    # noticed first, the timeout only when it really ran out (was "no reply within" after a 1-minute run)
    reason = results["errors"]["train:synth-1"]
    assert "Node Unavailable" in reason or ("no reply within" in reason and results["timings_s"]["total"] >= 90), reason
    assert not [pid for pid in doomed if _alive(pid)]
    assert elapsed < 400


def _shape(obj):
    """Keys (recursively) and value types, ignoring values and run-specific entries."""
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items()
                if k not in ("timings_s", "run", "config", "versions", "nodes", "deployment")}
    if isinstance(obj, list):
        return [_shape(v) for v in obj[:1]]
    return type(obj).__name__


def test_deploy_local_bad_inputs_fail_before_starting_anything(tmp_path):
    from fedmerge.deploy.local import deploy_local

    app = flower_app_dir(tmp_path)
    with pytest.raises(FedmergeError, match="--data-root is needed"):
        deploy_local("amazon-lae", tmp_path / "a", app_dir=app)
    few_keys = tmp_path / "pki"
    generate(few_keys, n_nodes=1)
    with pytest.raises(FedmergeError, match="holds 1 node key pairs but 3 SuperNodes"):
        deploy_local("quickstart", tmp_path / "b", overrides=["data.synthetic.n_users=30"], tls_dir=few_keys, app_dir=app)
    assert not (tmp_path / "b" / "processes.json").exists()
    used = tmp_path / "used"
    (used / "results").mkdir(parents=True)
    (used / "results" / "results.json").write_text("{}")
    (used / ".fedmerge.lock").touch()  # as the earlier run left it
    with pytest.raises(FedmergeError, match=rf"run folder {used} already holds an earlier run's files \(results\)"):
        deploy_local("quickstart", used, app_dir=app)
    assert (used / "results" / "results.json").read_text() == "{}" and not (used / "processes.json").exists()
    # seeded DP noise: every SuperNode would refuse it once the deployment had started
    with pytest.raises(FedmergeError, match=r"privacy.noise_seed = 0: a deployed node refuses DP noise drawn from"):
        deploy_local("quickstart", tmp_path / "c", app_dir=app, overrides=[
            "privacy.enabled=true", "privacy.noise_multiplier=1.0", "privacy.noise_seed=0", "baselines.joint=false"])
    assert not (tmp_path / "c").exists()


def test_cli_deploy_certs(tmp_path, capsys):
    from fedmerge.cli import main

    assert main(["deploy", "certs", "--out", str(tmp_path), "--nodes", "1", "--host", "10.0.0.5", "--days", "365"]) == 0
    server = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    assert (server.not_valid_after_utc - server.not_valid_before_utc).days == 365  # 30 was hard-coded
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress)[0] == ipaddress.ip_address("10.0.0.5")  # then the loopback
    assert main(["deploy", "certs", "--out", str(tmp_path)]) == 1
    assert "already holds certificates" in capsys.readouterr().err


class ScriptedFlwr(FlwrClient):
    """FlwrClient whose SuperLink answers come from a script (no processes): status sequence, logs, stop calls."""

    def __init__(self, tmp_path: Path, statuses: list[str]) -> None:
        super().__init__(tmp_path)
        self.statuses = statuses
        self.stopped: list[int] = []
        self.polls = 0

    def status(self, run_id: int):
        self.polls += 1
        text = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return parse_run_status({"runs": [{"run-id": run_id, "status": text}]}, run_id)

    def logs(self, run_id: int) -> str:
        return "\n".join(f"line {i}" for i in range(40)) + "\nFedmergeError: federation failed: {'train:synth-1': 'x'}"

    def stop(self, run_id: int) -> None:
        self.stopped.append(run_id)


def test_wait_polls_until_completed(tmp_path):
    flwr = ScriptedFlwr(tmp_path, ["pending", "starting", "running", "finished:completed"])
    assert flwr.wait(3, timeout_s=10, poll_s=0.01).succeeded and flwr.statuses == ["finished:completed"]


def test_wait_never_trusts_a_failed_run(tmp_path):
    flwr = ScriptedFlwr(tmp_path, ["running", "finished:failed"])
    with pytest.raises(RunFailed, match=r"(?s)ended finished:failed.*train:synth-1"):
        flwr.wait(3, timeout_s=10, poll_s=0.01)
    with pytest.raises(RunFailed, match="finished:stopped"):
        ScriptedFlwr(tmp_path, ["finished:stopped"]).wait(3, timeout_s=10, poll_s=0.01)


def test_wait_times_out_and_stops_the_run(tmp_path):
    flwr = ScriptedFlwr(tmp_path, ["running"])
    start = time.monotonic()
    with pytest.raises(RunFailed, match=r"did not finish within 0 s \(last status: running\)"):
        flwr.wait(7, timeout_s=0.2, poll_s=0.05)
    assert flwr.stopped == [7] and time.monotonic() - start < 5


def test_wait_fails_fast_when_check_fails(tmp_path):
    def superlink_died() -> None:
        raise FedmergeError("the SuperLink exited with code -9")

    with pytest.raises(FedmergeError, match="exited with code -9"):
        ScriptedFlwr(tmp_path, ["running"]).wait(1, timeout_s=60, poll_s=0.01, check=superlink_died)


def test_wait_ready_hint_ends_a_long_pause(tmp_path):
    flwr = ScriptedFlwr(tmp_path, ["running", "finished:completed"])
    ready_at = time.monotonic() + 0.3
    start = time.monotonic()
    assert flwr.wait(3, timeout_s=60, poll_s=30, ready=lambda: time.monotonic() > ready_at).succeeded
    assert time.monotonic() - start < 5  # without the hint: one 30 s pause


def test_wait_does_not_spin_once_the_ready_hint_holds(tmp_path):
    """Once results.json exists the hint stays true: `flwr ls` was then called back to back (1.28 million status
    polls in 2 s with a stub) while the ServerApp still wrote its tables and plots."""
    flwr = ScriptedFlwr(tmp_path, ["running"])
    with pytest.raises(RunFailed, match="did not finish"):
        flwr.wait(3, timeout_s=2.0, poll_s=5.0, ready=lambda: True)
    assert flwr.polls <= 5  # a poll per READY_POLL_S (1 s) once the hint holds


KILLED_DEPLOYER = (
    "import sys, time\n"
    "from fedmerge.deploy.processes import ProcessSet\n"
    "with ProcessSet(sys.argv[1], grace_s=1.0) as procs:\n"
    "    proc = procs.start('spawner', [sys.executable, '-c', sys.argv[2]])\n"
    "    print(proc.pid, flush=True)\n"
    "    time.sleep(120)\n"
)


def test_sigkilled_deployer_leaves_no_process_behind(tmp_path):
    """SIGKILL gives the deploying process no chance to clean up: its supervisor stops what it started, including
    descendants in their own sessions (as Flower's SuperExec is)."""
    deployer = subprocess.Popen([sys.executable, "-c", KILLED_DEPLOYER, str(tmp_path), SPAWNER], stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, text=True)
    spawner = int(deployer.stdout.readline())
    child = _child_pid(tmp_path / "logs" / "spawner.log")
    assert _alive(spawner) and _alive(child)
    deployer.kill()
    deployer.wait()
    deadline = time.monotonic() + 15
    while (_alive(spawner) or _alive(child)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(spawner) and not _alive(child)


CRASHED_THEN_KILLED_DEPLOYER = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from fedmerge.deploy.processes import ProcessSet\n"
    "with ProcessSet(sys.argv[1], grace_s=1.0) as procs:\n"
    "    proc = procs.start('crasher', [sys.executable, '-c', sys.argv[2], sys.argv[3]])\n"
    "    while len(proc.log_path.read_text().split()) < 2:\n"
    "        time.sleep(0.05)\n"
    "    procs.watch()\n"
    "    Path(sys.argv[3]).touch()\n"
    "    proc.popen.wait()\n"
    "    print(proc.log_path.read_text().strip(), flush=True)\n"
    "    time.sleep(120)\n"
)


def test_sigkilled_deployer_leaves_no_helper_of_a_crashed_process_behind(tmp_path):
    """The supervisor skipped every recorded process that had exited, so a crashed SuperLink's helpers outlived a
    SIGKILLed deployer; the helpers the deployer saw are in processes.json and stopped."""
    deployer = subprocess.Popen(
        [sys.executable, "-c", CRASHED_THEN_KILLED_DEPLOYER, str(tmp_path), CRASHER, str(tmp_path / "crash")],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, text=True)
    same, own = (int(p) for p in deployer.stdout.readline().split())
    assert _alive(same) and _alive(own)
    deployer.kill()
    deployer.wait()
    deadline = time.monotonic() + 15
    while (_alive(same) or _alive(own)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(same) and not _alive(own)


def test_supervisor_signals_only_the_recorded_command(tmp_path):
    """A recorded pid is signalled only while it still runs the recorded command (never a recycled pid)."""
    from fedmerge.deploy.processes import _same_process

    argv = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "up\n"  # running its own code (/proc/PID/cmdline is empty just after exec)
        assert _same_process(proc.pid, argv)
        assert not _same_process(proc.pid, ["flower-supernode", "--superlink", "127.0.0.1:1"])
    finally:
        proc.kill()
        proc.wait()
    assert not _same_process(proc.pid, argv)


@pytest.mark.slow
def test_sigkilled_deploy_local_leaves_no_superlink_or_supernode(tmp_path):
    """`fedmerge deploy local` killed with SIGKILL while its SuperNodes are online: within the supervisor's grace
    period no SuperLink, SuperNode or process they spawned (SuperExec, ClientApp) is left."""
    import json

    out = tmp_path / "deploy"
    argv = [sys.executable, "-m", "fedmerge.cli", "deploy", "local", "--scenario", "quickstart", "--out", str(out)]
    argv += [item for o in TINY for item in ("--set", o)]
    deployer = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        for name in ("supernode-synth-0", "supernode-synth-1"):
            _wait_for_text(out / "logs" / f"{name}.log", "Starting Flower SuperExec", timeout_s=300)
        started = [p["pid"] for p in json.loads((out / "processes.json").read_text())]
        assert len(started) == 3
        everything = [pid for pid in started for pid in (pid, *descendants(pid))]
        assert all(_alive(pid) for pid in started)
    finally:
        deployer.kill()
        deployer.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in everything) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in everything if _alive(pid)]


def test_the_run_config_hands_flower_the_resolved_scenario_whatever_its_values(tmp_path):
    """`deploy local` passed the scenario's name and its overrides joined by ';' (split again by the apps), so an
    override value holding ';' broke only under deployment; simulation and deployment now write the resolved
    scenario and hand its path (one function)."""
    from fedmerge.config import load_scenario
    from fedmerge.runners.appconfig import flower_run_config, scenario_from_run_config

    cfg = load_scenario("quickstart", ['run.name="a;b=c"', "data.synthetic.n_users=30"])
    run_config = flower_run_config(cfg, tmp_path, tmp_path / "out", resume=True)
    assert scenario_from_run_config(run_config) == cfg
    assert run_config["out-dir"] == str(tmp_path / "out") and run_config["resume"] is True


def test_a_server_certificate_from_an_existing_offline_ca(tmp_path, capsys):
    """There was no way to sign with an existing CA (README: keep the CA offline), and --force to add a host name
    made a new CA, so every data owner's ca.crt stopped working."""
    from fedmerge.cli import main

    offline = generate(tmp_path / "offline", n_nodes=0)
    assert main(["deploy", "certs", "--out", str(tmp_path / "link"), "--nodes", "1", "--host", "link.example.org",
                 "--ca", str(tmp_path / "offline")]) == 0
    ca = x509.load_pem_x509_certificate(offline.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "link" / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    assert (tmp_path / "link" / "ca.crt").read_bytes() == offline.ca_cert.read_bytes()
    assert not (tmp_path / "link" / "ca.key").exists()  # the CA key stays where it was
    assert "ca.key" not in capsys.readouterr().out.split("server certificate")[1]
    # that folder is a deployment's --tls-dir as it is (it was refused for lacking the ca.key it never reads)
    from fedmerge.deploy.certs import load_tls_dir

    assert load_tls_dir(tmp_path / "link").server_cert == tmp_path / "link" / "server.crt"
    # an empty host name: refused before any file is written (a raw cryptography error, and a ca.key left behind)
    assert main(["deploy", "certs", "--out", str(tmp_path / "empty-host"), "--host", ""]) == 1
    assert "host names must be non-empty" in capsys.readouterr().err
    assert not (tmp_path / "empty-host" / "ca.key").exists()
    other = generate(tmp_path / "other", n_nodes=0)
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "ca.crt").write_bytes(offline.ca_cert.read_bytes())
    (tmp_path / "mixed" / "ca.key").write_bytes(other.ca_key.read_bytes())
    with pytest.raises(FedmergeError, match=r"ca.key does not belong to .*ca.crt"):
        generate(tmp_path / "bad", n_nodes=0, ca=tmp_path / "mixed")
    with pytest.raises(FedmergeError, match=r"no ca.crt"):
        generate(tmp_path / "bad", n_nodes=0, ca=tmp_path / "nowhere")


def test_regenerated_certificates_leave_no_stale_keys_and_stray_files_are_not_keys(tmp_path):
    """`generate(out, 1, overwrite=True)` after `generate(out, 2)` kept node-1 from the earlier generation (a
    deployment with two domains then used it); --force --ca kept the replaced CA's ca.key; a stray nodes/node-0.bak
    made load_tls_dir fail with a bare ValueError."""
    from fedmerge.deploy.certs import load_tls_dir

    generate(tmp_path / "pki", n_nodes=2)
    (tmp_path / "pki" / "nodes" / "node-0.bak").write_text("an editor's copy")
    assert [k.private_key.name for k in load_tls_dir(tmp_path / "pki").nodes] == ["node-0", "node-1"]
    offline = generate(tmp_path / "offline", n_nodes=0)
    generate(tmp_path / "pki", n_nodes=1, overwrite=True, ca=tmp_path / "offline")
    assert sorted(p.name for p in (tmp_path / "pki" / "nodes").iterdir()) == ["node-0", "node-0.bak", "node-0.pub"]
    assert not (tmp_path / "pki" / "ca.key").exists() and offline.ca_key.is_file()
    assert [k.private_key.name for k in load_tls_dir(tmp_path / "pki").nodes] == ["node-0"]
    # by each key's number, not its place in the list: node-5 beside node-0 and node-1 went on living with --nodes 3
    generate(tmp_path / "gaps", n_nodes=2)
    for name in ("node-5", "node-5.pub"):
        (tmp_path / "gaps" / "nodes" / name).write_bytes((tmp_path / "gaps" / "nodes" / name.replace("5", "0")).read_bytes())
    for name in ("node-01", "node-01.pub", "node-9.pub"):  # node-01 read as node 1, a lone .pub never removed
        (tmp_path / "gaps" / "nodes" / name).write_text("stale")
    generate(tmp_path / "gaps", n_nodes=3, overwrite=True)
    assert [k.private_key.name for k in load_tls_dir(tmp_path / "gaps").nodes] == ["node-0", "node-1", "node-2"]
    assert sorted(p.name for p in (tmp_path / "gaps" / "nodes").iterdir()) == [
        "node-0", "node-0.pub", "node-1", "node-1.pub", "node-2", "node-2.pub"]
    # node keys alone (no certificates) are not replaced without --force
    (tmp_path / "keys-only" / "nodes").mkdir(parents=True)
    (tmp_path / "keys-only" / "nodes" / "node-0").write_text("a key")
    with pytest.raises(FedmergeError, match="already holds"):
        generate(tmp_path / "keys-only", n_nodes=1)
    assert (tmp_path / "keys-only" / "nodes" / "node-0").read_text() == "a key"


def test_a_server_certificate_never_outlives_its_ca_and_an_expired_ca_is_refused(tmp_path, caplog):
    """A --ca valid one more day signed a server certificate for 30 (the chain broke silently after a day); an
    expired one signed it too."""
    short = generate(tmp_path / "short", n_nodes=0, days=1)
    ca = x509.load_pem_x509_certificate(short.ca_cert.read_bytes())
    link = generate(tmp_path / "link", n_nodes=0, days=30, ca=tmp_path / "short")
    server = x509.load_pem_x509_certificate(link.server_cert.read_bytes())
    assert server.not_valid_after_utc == ca.not_valid_after_utc and "ends with its CA" in caplog.text
    _resign_ca(tmp_path / "short", days_valid=(-10, -1))
    with pytest.raises(FedmergeError, match="CA certificate expired"):
        generate(tmp_path / "late", n_nodes=0, ca=tmp_path / "short")
    assert not (tmp_path / "late" / "server.crt").exists()


def test_deploy_local_prints_the_tables_and_where_the_results_are(tmp_path, monkeypatch, capsys):
    """`fedmerge deploy local` printed one JSON line after minutes of silence: now the run's tables (as simulate
    prints them) and the results and logs paths; --json keeps the one JSON object."""
    from fedmerge.cli import main
    from fedmerge.deploy import local

    metrics = {"recall@10": 0.5, "ndcg@10": 0.25}
    results = {"status": "ok", "run": {"engine": "flower", "seed": 0}, "domains": ["a"], "held_out": [],
               "models": {"ties": {"a": metrics, "average": metrics}}, "timings_s": {"total": 3.0}, "warnings": [],
               "config": {"eval": {"primary": "ndcg@10"}}}
    monkeypatch.setattr(local, "deploy_local", lambda *a, **k: results)
    assert main(["deploy", "local", "--out", str(tmp_path / "d")]) == 0
    text = capsys.readouterr().out
    assert "\n\nndcg@10 (flower engine)" in text and "ties" in text and "0.2500" in text
    assert f"results: {tmp_path / 'd' / 'results' / 'results.json'} (logs: {tmp_path / 'd' / 'logs'})" in text
    assert main(["deploy", "local", "--out", str(tmp_path / "d"), "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["status"] == "ok"


@pytest.mark.parametrize("key", ["resume", "overwrite", "out-dir-held"])
def test_a_run_config_flag_given_as_a_string_is_refused_not_read_as_true(tmp_path, key):
    """`flwr run --run-config 'overwrite="false"'` keeps "false" a string (Flower checks keys, not types); the
    ServerApp read it with bool(), so "false" was true: an earlier run's folder was emptied, a "no" out-dir-held
    skipped the folder's lock and checks."""
    from flwr.common.config import fuse_dicts, parse_config_args

    from fedmerge.runners.appconfig import folder_settings

    defaults = {"out-dir": "runs/x", "resume": False, "overwrite": False, "out-dir-held": False}
    quoted = fuse_dicts(defaults, parse_config_args([f'out-dir="{tmp_path}" {key}="false"']))
    with pytest.raises(FedmergeError, match=rf"run config {key} = 'false' is not a boolean; give true or false "
                                            "without quotes"):
        folder_settings(quoted)
    plain = fuse_dicts(defaults, parse_config_args([f'out-dir="{tmp_path}" {key}=true']))
    settings = folder_settings(plain)
    assert settings.target == tmp_path and {k: v for k, v in vars(settings).items() if v is True} == {
        {"resume": "resume", "overwrite": "overwrite", "out-dir-held": "held"}[key]: True}


def test_run_seeds_is_refused_by_deploy_local_and_the_server_app_before_anything_starts(tmp_path, monkeypatch):
    """`deploy local --set 'run.seeds=[0,1,2]'` (and a plain `flwr run` of such a scenario) ran run.seed only and
    recorded run.seeds in results.json as if each seed had run; run_scenario refused it. Both refuse it now, before
    the output folder is touched."""
    from flwr.app import Context, RecordDict

    import server.app
    from fedmerge.deploy import local

    def started(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(local, "_deploy", started)
    monkeypatch.setattr(server.app, "run", started)
    earlier = tmp_path / "deploy" / "results" / "results.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}")
    (tmp_path / "deploy" / ".fedmerge.lock").touch()  # an earlier run's folder: --overwrite would empty it
    with pytest.raises(FedmergeError, match=r"run.seeds = \[0, 1, 2\]: deploy local runs one seed \(run.seed\); "
                                            r"run it once per seed.*--set run.seed=S"):
        local.deploy_local("quickstart", tmp_path / "deploy", overrides=["run.seeds=[0, 1, 2]"], overwrite=True)
    assert earlier.read_text() == "{}"

    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"scenario": "quickstart", "overrides": "run.seeds=[0, 1, 2]",
                                  "out-dir": str(tmp_path / "deploy"), "resume": False, "overwrite": True,
                                  "out-dir-held": False})
    with pytest.raises(FedmergeError, match=r"run.seeds = \[0, 1, 2\]: a Flower app run runs one seed \(run.seed\)"):
        server.app.app(None, context)
    assert earlier.read_text() == "{}"


def test_deploy_local_json_prints_one_object_also_when_the_run_fails(tmp_path, monkeypatch, capsys):
    """`deploy local --json` printed nothing on stdout when the run failed (only the error line on stderr), though
    it promises exactly one JSON object; now {"status": "failed", "error", "results" (the path when this run wrote
    results.json, else null), "warnings"} and still a non-zero exit code."""
    import json

    from fedmerge.cli import main
    from fedmerge.deploy import local

    out = tmp_path / "d"
    path = out / "results" / "results.json"

    def refused(*args, **kwargs):
        raise FedmergeError("scenario file nope.toml does not exist")

    monkeypatch.setattr(local, "deploy_local", refused)
    assert main(["deploy", "local", "--out", str(out), "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"status": "failed", "error": "scenario file nope.toml does not exist",
                                        "results": None, "warnings": []}
    assert "fedmerge deploy: error: scenario file nope.toml does not exist" in captured.err

    def failed_run(*args, **kwargs):  # the ServerApp wrote a failed run's results.json, then deploy_local raised
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"status": "failed", "errors": {"a": "boom"}, "warnings": ["one domain"]}))
        raise RunFailed("run 1 ended finished:failed")

    monkeypatch.setattr(local, "deploy_local", failed_run)
    assert main(["deploy", "local", "--out", str(out), "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {"status": "failed", "error": "run 1 ended finished:failed",
                                                   "results": str(path), "warnings": ["one domain"]}
    monkeypatch.setattr(local, "deploy_local", refused)  # an earlier run's results.json is not this run's
    assert main(["deploy", "local", "--out", str(out), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["results"] is None


def test_a_path_with_a_double_quote_is_refused_before_flower_is_given_it(tmp_path, monkeypatch, capsys):
    """Flower's --run-config / --node-config parser takes a quoted value up to the next `"`, escaped or not: an
    --out, data root or domain folder holding one failed inside Flower with a generic "invalid format" error (after
    the processes had started). simulate (Flower engine) and deploy local refuse it first, naming the path."""
    import json
    import re

    from fedmerge.cli import main
    from fedmerge.config import load_scenario
    from fedmerge.data.generic import save_generic_domain
    from fedmerge.deploy import local
    from fedmerge.runners import simulation

    def started(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(local, "_deploy", started)
    monkeypatch.setattr(simulation, "run_flower_simulation", started)
    small = ["data.synthetic.n_users=30", "data.synthetic.n_items=20", 'encoder.name="hashing"']
    quoted = tmp_path / 'run "one"'
    cfg = load_scenario("quickstart", small)
    for run in (lambda: simulation.run_scenario(cfg, "flower", quoted),
                lambda: simulation.simulate(cfg.with_changes(run={"seeds": [0, 1]}), quoted, engine="flower"),
                lambda: local.deploy_local("quickstart", quoted, overrides=small)):
        with pytest.raises(FedmergeError, match=rf"--out {re.escape(str(quoted))} holds a double quote \(\"\), "
                                                r"which Flower's --run-config / --node-config cannot carry"):
            run()
        assert not quoted.exists()
    assert main(["simulate", "quickstart", "--out", str(quoted), *[a for s in small for a in ("--set", s)]]) == 1
    assert f"--out {quoted} holds a double quote" in capsys.readouterr().err and not quoted.exists()
    domain = load_scenario("quickstart", small).load_domain("synth-0")
    for root, name, named in ((tmp_path / 'da"ta', "shop", f"--data-root {tmp_path}/da\"ta"),
                              (tmp_path / "data", 'sh"op', f"domain 'sh\"op': its data path {tmp_path}/data/sh\"op")):
        save_generic_domain(domain, root / name)
        generic = [*small, 'data.source="generic"', f"data.domains={json.dumps([name])}"]
        with pytest.raises(FedmergeError, match=rf"{re.escape(named)} holds a double quote"):
            local.deploy_local("quickstart", tmp_path / "out", overrides=generic, data_root=root)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-5", "0", "soon"])
def test_deploy_local_timeout_must_be_a_finite_number_above_zero(value, tmp_path, capsys):
    """--timeout was a plain float: NaN never timed out (the wait's deadline test is never true) and a negative one
    failed after every process had started. Now argparse refuses it, naming the option."""
    from fedmerge.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["deploy", "local", "--out", str(tmp_path), f"--timeout={value}"])
    assert exit_info.value.code == 2
    assert f"argument --timeout: a finite number of seconds > 0, got {value!r}" in capsys.readouterr().err
    args = parser.parse_args(["deploy", "local", "--out", str(tmp_path), "--timeout", "90"])
    assert args.timeout == 90.0
