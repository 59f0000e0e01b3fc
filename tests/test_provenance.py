"""Which code produced a result: source_commit's -dirty mark, in a temporary git checkout."""

from __future__ import annotations

import subprocess

import pytest

from fedmerge import provenance


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A git checkout with committed code folders, standing in for the repository root."""
    (tmp_path / "fedmerge").mkdir()
    (tmp_path / "fedmerge" / "core.py").write_text("X = 1\n")
    (tmp_path / "scenarios").mkdir()
    (tmp_path / "scenarios" / "a.toml").write_text("[run]\n")
    (tmp_path / ".gitignore").write_text("__pycache__/\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "initial")
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    provenance.source_commit.cache_clear()
    yield tmp_path
    provenance.source_commit.cache_clear()


def _commit(root):
    provenance.source_commit.cache_clear()  # read once per process
    return provenance.source_commit()


def test_an_untracked_file_in_a_code_folder_marks_the_commit_dirty(checkout):
    """`git diff --quiet HEAD` ignores untracked files: a new plugin module under fedmerge/ (which changes
    source_digest) or a new scenario ran under the bare commit, with no -dirty."""
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert _commit(checkout) == head
    plugin = checkout / "fedmerge" / "plugin.py"
    plugin.write_text("Y = 2\n")
    assert _commit(checkout) == f"{head}-dirty"
    plugin.unlink()
    (checkout / "scenarios" / "mine.toml").write_text("[run]\n")
    assert _commit(checkout) == f"{head}-dirty"
    (checkout / "scenarios" / "mine.toml").unlink()
    # ignored files (git's standard excludes) and files outside the code folders leave it clean
    (checkout / "fedmerge" / "__pycache__").mkdir()
    (checkout / "fedmerge" / "__pycache__" / "core.cpython-311.pyc").write_bytes(b"\0")
    (checkout / "notes.md").write_text("notes\n")
    assert _commit(checkout) == head
    (checkout / "fedmerge" / "core.py").write_text("X = 3\n")  # a tracked edit, as before
    assert _commit(checkout) == f"{head}-dirty"


def test_versions_record_the_packages_that_shape_dp_and_the_intervals(monkeypatch):
    """opacus (DP-SGD and its accountants) and scipy (t-intervals, p-values) shape the numbers and were not
    recorded; a package that is not installed is recorded as such, not an error."""
    from importlib import metadata

    versions = provenance.package_versions()
    for name in ("opacus", "scipy"):
        try:
            expected = metadata.version(name)
        except metadata.PackageNotFoundError:
            expected = "not installed"
        assert versions[name] == expected
    monkeypatch.setattr(provenance, "VERSION_PACKAGES", (*provenance.VERSION_PACKAGES, "no-such-package-fedmerge"))
    assert provenance.package_versions()["no-such-package-fedmerge"] == "not installed"
