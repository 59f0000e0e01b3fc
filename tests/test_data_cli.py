"""``fedmerge data`` info / download / synth through fedmerge.cli.main."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from fedmerge.cli import main
from fedmerge.data import load_domain
from fedmerge.data.download import AMAZON_SHA256
from fedmerge.data.synthetic import make_synthetic_domains
from tests.test_data_amazon import write_folder, write_tarball


@pytest.fixture
def tiny_source(tmp_path, monkeypatch):
    """A source folder holding Tiny.tar.gz, registered as a known domain with its true sha256."""
    source = tmp_path / "source"
    source.mkdir()
    tarball = write_tarball(write_folder(tmp_path / "src"), source / "Tiny.tar.gz")
    monkeypatch.setitem(AMAZON_SHA256, "Tiny", hashlib.sha256(tarball.read_bytes()).hexdigest())
    return source


def test_info_json_is_one_object(tmp_path, capsys):
    folder = write_folder(tmp_path)
    assert main(["data", "info", str(folder), "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out)
    assert info == load_domain(folder).summary()
    assert {"users", "items", "train_interactions"} <= info.keys()
    assert out.count("\n") == 1


def test_info_text(tmp_path, capsys):
    assert main(["data", "info", str(write_folder(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "users" in out and "train_interactions" in out and "dropped_users" in out


def test_bad_path_is_exit_1_with_one_line(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing: no such file or folder" in err
    assert err.startswith("fedmerge data: error:")


@pytest.mark.parametrize("as_url", [False, True])
def test_download_from_folder_or_file_url(tmp_path, tiny_source, as_url, capsys):
    source = tiny_source.as_uri() if as_url else str(tiny_source)
    dest = tmp_path / "dest"
    assert main(["data", "download", "amazon", "--domains", "Tiny", "--dest", str(dest), "--source", source]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["Tiny"]
    assert load_domain(dest / "Tiny").n_users == 3
    assert capsys.readouterr().out.strip() == str(dest / "Tiny")


def test_wrong_checksum_leaves_nothing(tmp_path, tiny_source, monkeypatch, capsys):
    monkeypatch.setitem(AMAZON_SHA256, "Tiny", "0" * 64)
    dest = tmp_path / "dest"
    assert main(["data", "download", "amazon", "--domains", "Tiny", "--dest", str(dest), "--source", str(tiny_source)]) == 1
    err = capsys.readouterr().err
    assert "sha256" in err and "does not match" in err and "Tiny.tar.gz" in err
    assert list(dest.iterdir()) == []


def test_truncated_download_with_matching_hash_leaves_nothing(tmp_path, tiny_source, monkeypatch, capsys):
    tarball = tiny_source / "Tiny.tar.gz"
    tarball.write_bytes(tarball.read_bytes()[:-200])
    monkeypatch.setitem(AMAZON_SHA256, "Tiny", hashlib.sha256(tarball.read_bytes()).hexdigest())
    dest = tmp_path / "dest"
    assert main(["data", "download", "amazon", "--domains", "Tiny", "--dest", str(dest), "--source", str(tiny_source)]) == 1
    assert "cannot unpack" in capsys.readouterr().err
    assert list(dest.iterdir()) == []


def test_download_errors(tmp_path, tiny_source, capsys):
    dest = str(tmp_path / "dest")
    assert main(["data", "download", "amazon", "--domains", "Toys,Garden", "--dest", dest, "--source", str(tiny_source)]) == 1
    err = capsys.readouterr().err
    assert "Garden" in err and "Beauty, Pantry, Toys" in err
    assert main(["data", "download", "amazon", "--domains", "Toys", "--dest", dest, "--source", str(tiny_source)]) == 1
    assert "could not fetch" in capsys.readouterr().err  # Toys.tar.gz absent from the source folder


def test_a_malformed_url_or_a_file_in_the_domains_place_is_a_clear_error(tmp_path, tiny_source, capsys):
    """A malformed URL raised InvalidURL / ValueError past the fetch's error handling; a file where the domain's
    folder goes was returned as the downloaded domain."""
    dest = tmp_path / "dest"
    for source, message in (("http://localhost:abc/", "could not fetch http://localhost:abc/Toys.tar.gz"),
                            ("http://[::1/", "source http://[::1/: not a valid URL")):
        assert main(["data", "download", "amazon", "--domains", "Toys", "--dest", str(dest), "--source", source]) == 1
        assert message in capsys.readouterr().err
    (dest / "Tiny").write_text("not a domain")
    args = ["data", "download", "amazon", "--domains", "Tiny", "--dest", str(dest), "--source", str(tiny_source)]
    assert main(args) == 1
    assert f"{dest / 'Tiny'} exists and is not a folder" in capsys.readouterr().err


def test_an_out_that_is_a_file_is_named(tmp_path, capsys):
    """`data synth --out afile` said "[Errno 20] Not a directory: 'afile/synth-0'"."""
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["data", "synth", "--out", str(afile), "--domains", "1", "--users", "20", "--items", "10"]) == 1
    assert f"--out {afile} is a file, not a folder" in capsys.readouterr().err


def test_synth_writes_loadable_generic_domains(tmp_path):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--domains", "2", "--users", "40", "--items", "30", "--seed", "5"]) == 0
    expected = make_synthetic_domains(n_domains=2, n_users=40, n_items=30, seed=5)
    for domain in expected:
        loaded = load_domain(out / domain.name)
        assert loaded.catalog == domain.catalog
        assert np.array_equal(loaded.test_target, domain.test_target)


def test_synth_writes_a_scenarios_own_domains(tmp_path):
    """The quickstart trains on 200 users x 100 items; `data synth` defaulted to 300 x 150 under the same names, so
    evaluating a quickstart model on them gave other numbers."""
    from fedmerge.config import load_scenario
    from fedmerge.scenario import Scenario

    # without --scenario: the domains a scenario with default [data.synthetic] trains on (one home for the sizes)
    assert main(["data", "synth", "--out", str(tmp_path / "default"), "--domains", "1"]) == 0
    default = Scenario.from_mapping({}).load_domain("synth-0")
    plain = load_domain(tmp_path / "default" / "synth-0")
    assert plain.n_users == default.n_users and plain.catalog == default.catalog
    assert np.array_equal(plain.test_target, default.test_target)
    out = tmp_path / "qs"
    assert main(["data", "synth", "--out", str(out), "--scenario", "quickstart"]) == 0
    cfg = load_scenario("quickstart")
    for name in ("synth-0", "synth-2"):
        expected = cfg.load_domain(name)
        loaded = load_domain(out / name)
        assert loaded.n_users == expected.n_users == 200 and loaded.catalog == expected.catalog
        assert np.array_equal(loaded.test_target, expected.test_target)
    # a run's --set data.synthetic.n_users=30 is --users 30 on top of the scenario
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--scenario", "quickstart", "--users", "30"]) == 0
    small = load_scenario("quickstart", ["data.synthetic.n_users=30"]).load_domain("synth-1")
    assert load_domain(tmp_path / "x" / "synth-1").n_users == small.n_users == 30
    assert np.array_equal(load_domain(tmp_path / "x" / "synth-1").test_target, small.test_target)
    assert main(["data", "synth", "--out", str(tmp_path / "y"), "--min-len", "3", "--max-len", "5", "--domains",
                 "1"]) == 0
    assert max(len(s) for s in load_domain(tmp_path / "y" / "synth-0").train) <= 5


def test_a_reader_that_closes_the_pipe_is_not_an_error(tmp_path, capsys, monkeypatch):
    """`fedmerge data info … | head -3`: head closing the pipe ends the command quietly (exit 141, like a SIGPIPE),
    not with 'error: [Errno 32] Broken pipe'."""
    import io
    import sys

    class ClosedPipe(io.TextIOBase):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    folder = write_folder(tmp_path)
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["data", "info", str(folder)]) == 141
    assert "error" not in capsys.readouterr().err
    # another pipe breaking (a socket, a child's stdin) while stdout is fine is an error like any other
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    import fedmerge.commands.data as data_command

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(data_command, "run_info", broken)
    assert main(["data", "info", str(folder)]) == 1
    assert "fedmerge data: error: [Errno 32] Broken pipe" in capsys.readouterr().err

    class FullDisk(io.StringIO):  # `> file` on a full disk: an error that names it, no traceback
        def flush(self) -> None:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(data_command, "run_info", lambda args: print("x") or 0)
    monkeypatch.setattr(sys, "stdout", FullDisk())
    assert main(["data", "info", str(folder)]) == 1
    assert "fedmerge data: error: [Errno 28] No space left on device" in capsys.readouterr().err


def test_a_closed_pipe_at_exit_is_quiet_too(tmp_path):
    """Output still buffered when the command returns reached a closed pipe at interpreter exit: 'Exception
    ignored … BrokenPipeError' and exit 120 (hidden where PYTHONUNBUFFERED is set)."""
    import os
    import subprocess
    import sys

    folder = write_folder(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(["bash", "-c", f"{sys.executable} -m fedmerge.cli data info {folder} | true; "
                           "echo ${PIPESTATUS[0]}"], capture_output=True, text=True, env=env, timeout=120)
    assert done.stderr == "" and done.stdout.strip() in ("0", "141"), (done.stdout, done.stderr)


def test_an_existing_domain_is_kept_unless_force_and_an_incomplete_one_refused(tmp_path, tiny_source, capsys):
    """An existing dest/<Domain>/ was skipped (an INFO line) and printed as downloaded, even empty."""
    dest = tmp_path / "dest"
    (dest / "Tiny").mkdir(parents=True)
    (dest / "Tiny" / "train.json").write_text("{}")
    args = ["data", "download", "amazon", "--domains", "Tiny", "--dest", str(dest), "--source", str(tiny_source)]
    assert main(args) == 1
    assert f"{dest / 'Tiny'} exists but lacks val.json, test.json" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0 and load_domain(dest / "Tiny").n_users == 3
    assert main(args) == 0  # complete now: kept as it is
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(dest / "Tiny")


def test_a_local_source_folder_whose_name_has_a_colon(tmp_path, tiny_source, monkeypatch, capsys):
    """"mirror:2024" was accepted as a folder, then fetched as a URL of scheme "mirror" (URLError)."""
    monkeypatch.chdir(tmp_path)
    tiny_source.rename(tmp_path / "mirror:2024")
    dest = tmp_path / "dest"
    assert main(["data", "download", "amazon", "--domains", "Tiny", "--dest", str(dest), "--source", "mirror:2024"]) == 0
    assert load_domain(dest / "Tiny").n_users == 3


def test_synth_refuses_an_existing_domain_unless_overwrite(tmp_path, capsys):
    """`data synth` replaced a folder holding the user's own items.jsonl / interactions.csv, exit 0."""
    out = tmp_path / "synth"
    flags = ["--domains", "2", "--users", "20", "--items", "10"]
    own = out / "synth-1"
    own.mkdir(parents=True)
    (own / "items.jsonl").write_text('{"id": "mine", "title": "my own item"}\n')
    (own / "interactions.csv").write_text("user,item,timestamp\nme,mine,1\n")
    (own / "notes.txt").write_text("keep me")
    assert main(["data", "synth", "--out", str(out), *flags, "--seed", "3"]) == 1
    err = capsys.readouterr().err
    assert str(own) in err and "items.jsonl" in err and "--overwrite" in err
    assert (own / "items.jsonl").read_text() == '{"id": "mine", "title": "my own item"}\n'
    assert not (out / "synth-0").exists()  # refused before writing any domain
    assert main(["data", "synth", "--out", str(out), *flags, "--seed", "3", "--overwrite"]) == 0
    expected = make_synthetic_domains(n_domains=2, n_users=20, n_items=10, seed=3)
    for domain in expected:
        loaded = load_domain(out / domain.name)
        assert loaded.catalog == domain.catalog and np.array_equal(loaded.test_target, domain.test_target)
    assert (own / "notes.txt").read_text() == "keep me"  # only the domain's own files are replaced
    # a folder holding an Amazon-format domain is refused even with --overwrite: the generic files would not be read
    (out / "synth-0" / "train.json").write_text("{}")
    assert main(["data", "synth", "--out", str(out), *flags, "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert str(out / "synth-0") in err and "train.json" in err and "Amazon" in err
