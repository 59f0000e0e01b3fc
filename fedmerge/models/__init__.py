"""Model registry: in-domain recommenders and mergeable families, selected by name."""

from __future__ import annotations

import importlib
import inspect
from typing import TYPE_CHECKING, Any

from fedmerge.checks import describe_type, matches_type
from fedmerge.errors import FedmergeError

if TYPE_CHECKING:
    from fedmerge.models.base import ModelFamily, Recommender, StateDict, pad_sequences

BASE_NAMES = ("ModelFamily", "Recommender", "StateDict", "pad_sequences")  # from .base, imported on first use

# name -> "module:Class"; imported lazily so that a light command does not import every model.
RECOMMENDERS: dict[str, str] = {
    "popularity": "fedmerge.models.popularity:Popularity",
    "ease": "fedmerge.models.lae:EASE",
    "rlae": "fedmerge.models.lae:RLAE",
    "rdlae": "fedmerge.models.lae:RDLAE",
    "l3ae": "fedmerge.models.lae:L3AE",
}
FAMILIES: dict[str, str] = {
    "sequential": "fedmerge.models.sequential:SequentialFamily",
    "text-lae": "fedmerge.models.text_lae:TextLAEFamily",
}


def _construct(kind: str, table: dict[str, str], name: str, params: dict[str, Any]) -> Any:
    """``table[name](**params)``; a FedmergeError naming the parameter for an unknown name, a value of the wrong
    type (checked against the constructor's annotations: a TOML float or a JSON string where an integer belongs
    would otherwise fail deep inside torch) or a value the constructor refuses."""
    if name not in table:
        raise FedmergeError(f"unknown {kind} {name!r}; valid: {sorted(table)}")
    module_name, cls_name = table[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    try:
        signature = inspect.signature(cls, eval_str=True)
    except NameError:  # an annotation naming a type-checking-only import: keys are still checked, types are not
        signature = inspect.signature(cls)
    valid = [p for p in signature.parameters if p != "self"]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise FedmergeError(f"unknown parameter(s) {unknown} for {kind} {name!r}; valid: {valid}")
    wrong = [f"{key} must be {describe_type(hint)}, got {value!r}" for key, value in params.items()
             if not matches_type(value, hint := signature.parameters[key].annotation)]
    if wrong:
        raise FedmergeError(f"{kind} {name!r}: {'; '.join(wrong)}")
    try:
        return cls(**params)
    except ValueError as exc:
        raise FedmergeError(f"{kind} {name!r}: {exc}") from exc


def __getattr__(name: str) -> Any:
    """The :mod:`fedmerge.models.base` names, imported on first use: the registries alone do not import torch."""
    if name in BASE_NAMES:
        from fedmerge.models import base

        return getattr(base, name)
    raise AttributeError(f"module 'fedmerge.models' has no attribute {name!r}")


def get_recommender(name: str, **params: Any) -> Recommender:
    """An in-domain recommender by name (see :data:`RECOMMENDERS`)."""
    return _construct("model", RECOMMENDERS, name, params)


def get_family(name: str, **params: Any) -> ModelFamily:
    """A mergeable model family by name (see :data:`FAMILIES`)."""
    return _construct("model family", FAMILIES, name, params)


__all__ = [
    "FAMILIES",
    "RECOMMENDERS",
    "ModelFamily",
    "Recommender",
    "StateDict",
    "get_family",
    "get_recommender",
    "pad_sequences",
]
