"""Model registry: in-domain recommenders and mergeable families, selected by name.

A mergeable family from outside the package (a :class:`~fedmerge.models.base.ModelFamily` subclass whose ``name``
is its registered name) joins :data:`FAMILIES` in this process with :func:`register_family`, or in every process
(the Flower apps' too) through an entry point of :data:`FAMILY_PLUGIN_GROUP` whose value is ``"module:Class"``
(read without importing the module, so a scenario naming it still loads without torch).
"""

from __future__ import annotations

import importlib
import inspect
import re
from importlib.metadata import EntryPoint
from typing import TYPE_CHECKING, Any

from fedmerge.checks import describe_type, matches_type
from fedmerge.errors import FedmergeError
from fedmerge.plugins import PluginRegistry, check_target

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
FAMILY_PLUGIN_GROUP = "fedmerge.families"  # entry points: family name = "module:Class"
FAMILIES: PluginRegistry[str] = PluginRegistry("model-family", FAMILY_PLUGIN_GROUP, {
    "sequential": "fedmerge.models.sequential:SequentialFamily",
    "text-lae": "fedmerge.models.text_lae:TextLAEFamily",
}, lambda entry: _register_family_plugin(entry))
FAMILY_NAME = re.compile(r"[a-z][a-z0-9_-]*")  # what results, model cards and scenario keys hold


def register_family(name: str, target: str, *, find: bool = True) -> None:
    """Add family ``name`` = ``"module:Class"`` to :data:`FAMILIES` (this process; every process: an entry point,
    see the module docstring). ValueError for a malformed or taken name (a family's or an in-domain model's: ``fedmerge
    train --model`` takes both), a target that is not ``module:Class`` or (with ``find``; entry points skip it, as
    finding a module imports its parent packages) whose module cannot be found. The class is imported when the family
    is first built, and must then be a ModelFamily whose ``name`` is ``name``."""
    if not isinstance(name, str) or not FAMILY_NAME.fullmatch(name):
        raise ValueError(f"model family name {name!r}: use lower-case letters, digits, '_' and '-'")
    if name in FAMILIES or name in RECOMMENDERS:
        raise ValueError(f"model family {name!r} is already registered (families: {sorted(FAMILIES)}, in-domain "
                         f"models: {sorted(RECOMMENDERS)})")
    check_target("model family", name, target, find=find)
    FAMILIES[name] = target


def _register_family_plugin(entry: EntryPoint) -> None:
    register_family(entry.name, entry.value, find=False)


def _construct(kind: str, table: dict[str, str] | PluginRegistry[str], name: str, params: dict[str, Any]) -> Any:
    """``table[name](**params)``; a FedmergeError naming the parameter for an unknown name, a value of the wrong
    type (checked against the constructor's annotations: a TOML float or a JSON string where an integer belongs
    would otherwise fail deep inside torch) or a value the constructor refuses."""
    if name not in table:
        failures = table.failures() if isinstance(table, PluginRegistry) else ""
        raise FedmergeError(f"unknown {kind} {name!r}; valid: {sorted(table)}{failures}")
    module_name, cls_name = table[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # a plugin's module is found only when its family is first built
        raise FedmergeError(f"{kind} {name!r}: cannot import module {module_name!r} ({type(exc).__name__}: "
                            f"{exc})") from exc
    if not hasattr(module, cls_name):
        raise FedmergeError(f"{kind} {name!r}: module {module_name!r} has no attribute {cls_name!r}")
    cls = getattr(module, cls_name)
    if table is FAMILIES:
        from fedmerge.models.base import ModelFamily

        if not (inspect.isclass(cls) and issubclass(cls, ModelFamily)) or getattr(cls, "name", None) != name:
            raise FedmergeError(f"model family {name!r} ({table[name]}) must be a ModelFamily subclass whose name is "
                                f"{name!r}, got {cls!r}")
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
    "FAMILY_PLUGIN_GROUP",
    "RECOMMENDERS",
    "ModelFamily",
    "Recommender",
    "StateDict",
    "get_family",
    "get_recommender",
    "pad_sequences",
    "register_family",
]
