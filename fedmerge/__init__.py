"""fedmerge: data-isolated cross-domain sequential recommendation by federated model merging.

The package is framework-free: Flower apps in ``clients/`` and ``server/`` are thin layers over it.
:func:`load_recommender` (from :mod:`fedmerge.recommender`) is imported on first use, so ``import fedmerge`` stays
light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_recommender"]


def __getattr__(name: str) -> Any:
    if name == "load_recommender":
        from fedmerge.recommender import load_recommender

        return load_recommender
    raise AttributeError(f"module 'fedmerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
