"""Shared fixtures: the real Amazon data (skips, naming what is missing, when absent) and small synthetic domains.

Every test that uses the ``amazon_dir`` fixture is marked ``real_data`` (select them with ``-m real_data``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from fedmerge.data.domain import Domain
from fedmerge.data.synthetic import make_synthetic_domains

T = TypeVar("T")
AMAZON_DOMAINS = ("Beauty", "Pantry", "Toys")
# (users, items, train interactions) of the MergeRec Amazon domains, from the data's README
AMAZON_COUNTS = {"Beauty": (22363, 12101, 153776), "Pantry": (14180, 4968, 109413), "Toys": (19412, 11924, 128773)}


def amazon_data_dir() -> Path:
    """``$FEDMERGE_AMAZON_DIR`` or ``<repo root>/../shared/datasets/amazon``."""
    env = os.environ.get("FEDMERGE_AMAZON_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "amazon"


def amazon_source(root: Path, domain: str) -> Path | None:
    """``<root>/<domain>.tar.gz`` or the unpacked ``<root>/<domain>/`` folder, whichever exists (tarball first)."""
    for candidate in (root / f"{domain}.tar.gz", root / domain):
        if candidate.exists():
            return candidate
    return None


@pytest.fixture(scope="session")
def amazon_dir() -> Path:
    """Folder holding the MergeRec Amazon domains (``<Domain>.tar.gz`` or ``<Domain>/``); skips the test if absent."""
    path = amazon_data_dir()
    if not any(amazon_source(path, d) for d in AMAZON_DOMAINS):
        pytest.skip(f"real Amazon data missing: {path} holds none of {', '.join(AMAZON_DOMAINS)} as <Domain>.tar.gz or "
                    f"<Domain>/ (set FEDMERGE_AMAZON_DIR)")
    return path


def amazon_domain_source(root: Path, domain: str) -> Path:
    """A domain's tarball or folder under ``root``; skips the test, naming both paths looked for, when absent."""
    source = amazon_source(root, domain)
    if source is None:
        pytest.skip(f"real Amazon domain {domain} missing: neither {root / f'{domain}.tar.gz'} nor {root / domain}/")
    return source


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "amazon_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_data)


@pytest.fixture(scope="session")
def synthetic_domains() -> list[Domain]:
    """Three small seeded synthetic domains (120 users, 60 items, 6 topics each); treat as read-only."""
    return make_synthetic_domains(n_domains=3, n_users=120, n_items=60, n_topics=6, seed=0)


@pytest.fixture
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process identity Flower's simulation and ServerApp set before an app runs (run 1, task 1, node 0), undone
    after the test so that no later test sees it."""
    from flwr.supercore.task_identity import TaskIdentity

    for key, value in {"_run_id": 1, "_task_id": 1, "_node_id": 0}.items():
        monkeypatch.setattr(TaskIdentity, key, value)


def at_one_and_two_threads(compute: Callable[[], T]) -> tuple[T, T]:
    """``compute()`` with one torch intra-op thread, then with two; the process's thread count restored after."""
    import torch

    previous, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(compute())
    finally:
        torch.set_num_threads(previous)
    return results[0], results[1]
