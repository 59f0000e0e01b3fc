"""Shared fixtures: the real Amazon data folder (skips when missing) and small synthetic domains."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedmerge.data.domain import Domain
from fedmerge.data.synthetic import make_synthetic_domains

AMAZON_DOMAINS = ("Beauty", "Pantry", "Toys")


def amazon_data_dir() -> Path:
    """``$FEDMERGE_AMAZON_DIR`` or ``<repo root>/../shared/datasets/amazon``."""
    env = os.environ.get("FEDMERGE_AMAZON_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "amazon"


@pytest.fixture(scope="session")
def amazon_dir() -> Path:
    """Folder holding the MergeRec Amazon domains (``<Domain>.tar.gz`` or ``<Domain>/``); skips the test if absent."""
    path = amazon_data_dir()
    if not any((path / f"{d}.tar.gz").is_file() or (path / d).is_dir() for d in AMAZON_DOMAINS):
        pytest.skip(f"Amazon data not found at {path} (set FEDMERGE_AMAZON_DIR)")
    return path


@pytest.fixture(scope="session")
def synthetic_domains() -> list[Domain]:
    """Three small seeded synthetic domains (120 users, 60 items, 6 topics each); treat as read-only."""
    return make_synthetic_domains(n_domains=3, n_users=120, n_items=60, n_topics=6, seed=0)
