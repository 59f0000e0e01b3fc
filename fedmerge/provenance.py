"""Which code and packages produced a result: recorded in results.json, aggregate.json and model cards (the lowest
layer: imports only :mod:`fedmerge.paths`)."""

from __future__ import annotations

import functools
import platform
from importlib import metadata

from fedmerge.paths import PACKAGE_ROOT, REPO_ROOT

# opacus: DP-SGD and its accountants; scipy: the t-intervals and p-values over seeds; one not installed reads so
VERSION_PACKAGES = ("fedmerge", "flwr", "torch", "numpy", "transformers", "ray", "opacus", "scipy")


NO_CHECKOUT = "not a git checkout (installed package)"


_launcher_source: tuple[str, str] | None = None  # see adopt_launcher_source


def adopt_launcher_source(source: tuple[str, str] | None) -> None:
    """Record the (commit, digest) of the process that launched this one, for every version record this process
    writes (results.json, model cards): Flower's ServerApp runs from the unpacked app bundle, which has no .git."""
    global _launcher_source
    _launcher_source = source


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the numbers, Python's, ``fedmerge_commit`` (the git commit of
    the checkout in use, for a human to check out; ``-dirty`` with uncommitted changes to its code, untracked files
    included) and ``fedmerge_source`` (:func:`source_digest`, which tells two versions of the code apart with or
    without git: the version number alone does not change between commits).

    Outside a checkout, the launcher's commit (:func:`adopt_launcher_source`) is recorded when its digest is this
    code's, and named as another code's otherwise."""
    versions = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    commit, digest = source_commit(), source_digest()
    if commit == NO_CHECKOUT and _launcher_source is not None:
        launcher_commit, launcher_digest = _launcher_source
        commit = (launcher_commit if launcher_digest == digest else
                  f"{NO_CHECKOUT}; launched from checkout {launcher_commit}, whose source {launcher_digest} differs")
    versions["fedmerge_commit"], versions["fedmerge_source"] = commit, digest
    return versions


CODE_FOLDERS = ("fedmerge", "clients", "server", "scenarios")  # what a run executes; README or results edits are not


@functools.lru_cache(maxsize=1)
def source_commit() -> str:
    """``git rev-parse HEAD`` of the checkout holding this package, ``-dirty`` when :data:`CODE_FOLDERS` differ from
    it (a tracked file changed, or an untracked one that git does not ignore), or why there is none. Read once per
    process (``--no-optional-locks``: never takes the index lock a user's own git command may need)."""
    import subprocess

    root = REPO_ROOT
    if not (root / ".git").exists():
        return NO_CHECKOUT

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return f"unknown (git: {(head.stderr.strip().splitlines() or ['no output'])[0]})"
        # untracked files too (a new plugin module, a new scenario): `git diff` sees tracked files only; files git
        # ignores (__pycache__, the .gitignore entries) are not code
        untracked = git("ls-files", "--others", "--exclude-standard", "--", *CODE_FOLDERS)
        dirty = (git("diff", "--quiet", "HEAD", "--", *CODE_FOLDERS).returncode != 0
                 or untracked.returncode != 0 or bool(untracked.stdout.strip()))
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({type(exc).__name__})"
    return head.stdout.strip() + ("-dirty" if dirty else "")


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 (16 hex) over the package's own ``.py`` files (relative paths and bytes, sorted): the same for the same
    code whether installed or checked out, with or without git, and different for any edit to it."""
    import hashlib

    package = PACKAGE_ROOT
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
