"""Where this copy of fedmerge lives, and the environment with which a child interpreter imports that copy (the
lowest layer: imports nothing of fedmerge)."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent  # the fedmerge package folder
REPO_ROOT = PACKAGE_ROOT.parent  # the folder holding it: a checkout's root (scenarios/, server/, clients/ beside it)


def importable_env() -> dict[str, str]:
    """This environment with :data:`REPO_ROOT` first on PYTHONPATH, for child interpreters that import fedmerge (the
    launcher's family check, the supervisor, the parallel encoding workers, benchmark subprocesses): they run this
    copy, whatever copy their environment would find."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT) if not path else os.pathsep.join([str(REPO_ROOT), path])}
