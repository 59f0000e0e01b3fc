"""fedmerge: data-isolated cross-domain sequential recommendation by federated model merging.

The package is framework-free: Flower apps in ``clients/`` and ``server/`` are thin layers over it. From Python:
:func:`load_scenario` / :class:`Scenario` (a run's settings), :func:`simulate` (run it, as ``fedmerge simulate``)
and :func:`load_recommender` (a saved model); each is imported on first use, so ``import fedmerge`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Scenario", "load_recommender", "load_scenario", "simulate"]
HOMES = {"Scenario": "fedmerge.scenario", "load_recommender": "fedmerge.recommender", "load_scenario": "fedmerge.config",
         "simulate": "fedmerge.runners.simulation"}  # name -> the module that defines it


def __getattr__(name: str) -> Any:
    if name in HOMES:
        import importlib

        return getattr(importlib.import_module(HOMES[name]), name)
    raise AttributeError(f"module 'fedmerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
