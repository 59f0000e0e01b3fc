"""The merge-method registry: every training-free method's name, declared parameters (defaults, checks) and paper.

Torch-free, so that loading and validating a scenario (:func:`fedmerge.config.validate`) does not import torch: a
method names its tensor function (``kernel``) in :mod:`fedmerge.merging.methods`, which is imported on the first
:attr:`MergeMethod.fn` access, i.e. when a merge runs. What the methods compute: :mod:`fedmerge.merging.methods`.

Methods from outside the package: :func:`register_method` adds one in this process; a package installed beside
fedmerge adds one to every process (the Flower ServerApp's too) through the entry-point group
:data:`PLUGIN_GROUP`, each entry naming a :class:`MergeMethod` whose ``kernel`` is ``"module:function"``. A plugin
that fails to load is left out with a warning, and its name and reason are given where the method is asked for.
The plugins are loaded on the first lookup in :data:`METHODS` (a :class:`fedmerge.plugins.PluginRegistry`), so a
plugin module may import ``MergeMethod`` and ``Param`` from :mod:`fedmerge.merging`, and be imported before it.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint
from typing import TYPE_CHECKING, Any

from fedmerge.checks import is_finite_number, is_integer
from fedmerge.plugins import PluginRegistry, check_target

if TYPE_CHECKING:
    import torch

    MethodFn = Callable[[torch.Tensor, dict[str, Any], torch.Generator], torch.Tensor]

PLUGIN_GROUP = "fedmerge.merge_methods"  # entry points naming a MergeMethod (see the module docstring)


@dataclass(frozen=True)
class Param:
    """A method parameter: default, a validity check and its description for error messages."""

    default: Any
    check: Callable[[Any], bool]
    valid: str


def _in_open_closed(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: is_finite_number(v) and lo < v <= hi


def _in_closed_open(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: is_finite_number(v) and lo <= v < hi


def _is_weights(v: Any) -> bool:
    if v is None:
        return True
    if not isinstance(v, (list, tuple)) or not all(is_finite_number(x) for x in v):  # "123" read as [1, 2, 3]
        return False
    values = [float(x) for x in v]
    return len(values) > 0 and min(values) >= 0 and sum(values) > 0


SCALE = Param(1.0, is_finite_number, "a finite real number")
DENSITY = Param(0.2, _in_open_closed(0.0, 1.0), "a number in (0, 1]")
SCOPES = ("tensor", "model")


def scope_param(default: str) -> Param:
    """``scope``: run per parameter tensor or once over each model's whole flattened task vector."""
    return Param(default, lambda v: v in SCOPES, f"one of {list(SCOPES)}")


@dataclass(frozen=True)
class MergeMethod:
    """A registered training-free merge: its tensor function (``kernel``: a name in :mod:`fedmerge.merging.methods`,
    or ``"module:function"`` for a method from outside the package), parameters with defaults, and its paper.

    The function maps the (K, *shape) stack of the K models' task vectors τ_k = θ_k − θ₀ of one weight (of the whole
    flattened model when a ``scope`` parameter is ``"model"``), the resolved parameters and a seeded
    ``torch.Generator`` to the processed stack τ̃ of the same shape; the merge is θ₀ + λ Σ_k τ̃_k, λ the value of
    the parameter ``scale_param`` (1 when None)."""

    name: str
    kernel: str
    params: dict[str, Param]
    paper: str
    summary: str
    scale_param: str | None = "scale"
    extra_check: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)

    @property
    def external(self) -> bool:
        """Whether the method comes from outside the package (its kernel is ``"module:function"``)."""
        return ":" in self.kernel

    @property
    def fn(self) -> MethodFn:
        """The tensor function: (K, *shape) task-vector stack, resolved parameters, generator -> processed stack
        τ̃ (importing :mod:`fedmerge.merging.methods`, and with it torch, on first use)."""
        if self.external:
            module, _, function = self.kernel.partition(":")
            try:
                return getattr(importlib.import_module(module), function)
            except (ImportError, AttributeError) as exc:
                raise ValueError(f"merge method {self.name!r}: its kernel {self.kernel!r} cannot be loaded: "
                                 f"{exc}") from exc
        from fedmerge.merging import methods

        return getattr(methods, self.kernel)


def _check_dare(params: dict[str, Any]) -> None:
    if params["base"] != "ties" and params["density"] != 1.0:
        raise ValueError("dare: 'density' trims only with base='ties'; leave it at 1.0 for base='task_arithmetic'")


METHODS: PluginRegistry[MergeMethod] = PluginRegistry("merge-method", PLUGIN_GROUP, {
    m.name: m
    for m in (
        MergeMethod(
            "average",
            "_average",
            {"weights": Param(None, _is_weights, "None or finite non-negative per-model weights with a positive sum")},
            "https://arxiv.org/abs/2203.05482",
            "(weighted) weight averaging, model soups (Wortsman et al. 2022)",
            scale_param=None,
        ),
        MergeMethod(
            "task_arithmetic",
            "_task_arithmetic",
            {"scale": Param(0.3, is_finite_number, "a finite real number")},
            "https://arxiv.org/abs/2212.04089",
            "θ₀ + λ Σ τ_k (Ilharco et al. 2023)",
        ),
        MergeMethod(
            "ties",
            "_ties",
            {"density": DENSITY, "scale": SCALE, "scope": scope_param("tensor")},
            "https://arxiv.org/abs/2306.01708",
            "trim, elect sign, disjoint mean (Yadav et al. 2023); top-ρ trim per tensor by default",
        ),
        MergeMethod(
            "ties_global",
            "_ties",
            {"density": DENSITY, "scale": SCALE, "scope": scope_param("model")},
            "https://arxiv.org/abs/2306.01708",
            "TIES as its authors' and MergeRec's code run it: top-ρ trim over the whole flattened model",
        ),
        MergeMethod(
            "dare",
            "_dare",
            {
                "p": Param(0.9, _in_closed_open(0.0, 1.0), "a drop rate in [0, 1)"),
                "base": Param("task_arithmetic", lambda v: v in ("task_arithmetic", "ties"), "'task_arithmetic' or 'ties'"),
                "density": Param(1.0, _in_open_closed(0.0, 1.0), "a number in (0, 1] (base='ties' only)"),
                "scale": Param(None, lambda v: v is None or is_finite_number(v), "None (the base's default) or a finite real number"),
                "seed": Param(0, is_integer, "an integer"),
            },
            "https://arxiv.org/abs/2311.03099",
            "drop and rescale, combined with task arithmetic or TIES (Yu et al. 2024)",
            extra_check=_check_dare,
        ),
        MergeMethod(
            "pcb",
            "_pcb",
            {"ratio": Param(0.1, _in_open_closed(0.0, 1.0), "a keep ratio in (0, 1]"), "scale": SCALE},
            "https://arxiv.org/abs/2410.02396",
            "parameter competition balancing: intra/inter balancing, drop, weighted merge (Du et al. 2024)",
        ),
        MergeMethod(
            "pcb_released",
            "_pcb_released",
            {"density": DENSITY, "scale": SCALE, "scope": scope_param("model")},
            "https://github.com/duguodong7/pcb-merging",
            "PCB as its released code (run by MergeRec): exp/tanh balancing, quantile-clamped soft mask, "
            "whole-model scope, extra 1/K",
        ),
        MergeMethod(
            "median",
            "_median",
            {},
            "https://arxiv.org/abs/1803.01498",
            "coordinate-wise median of the task vectors, robust to one outlying client of three (Yin et al. 2018)",
            scale_param=None,
        ),
        MergeMethod(
            "trimmed_mean",
            "_trimmed_mean",
            {"trim": Param(1, lambda v: is_integer(v) and v >= 0,
                           "an integer >= 0 (values dropped per side, at most (models − 1)//2)")},
            "https://arxiv.org/abs/1803.01498",
            "coordinate-wise trimmed mean: drop the trim largest and smallest values per entry (Yin et al. 2018)",
            scale_param=None,
        ),
        MergeMethod(
            "clipped_average",
            "_clipped_average",
            {"multiple": Param(1.0, _in_open_closed(0.0, math.inf), "a finite number > 0")},
            "https://arxiv.org/abs/1911.07963",
            "average of task vectors clipped per tensor to multiple × the median norm (Sun et al. 2019)",
            scale_param=None,
        ),
    )
}, lambda entry: _register_plugin(entry))


# Registry methods that bound what one outlying client can do to the merge (federation.fedavg_aggregation choices).
ROBUST_METHODS = ("median", "trimmed_mean", "clipped_average")


NAME = re.compile(r"[a-z][a-z0-9_]*")  # a method name: what scenario keys (merge.params.<name>) and results hold
# names the runner gives its own models and rows (results.json models.<name>, models/<name>.safetensors)
RESERVED_NAMES = ("theta0", "individual", "joint", "fedavg")
RESERVED_PREFIXES = ("mergerec_", "individual_", "fedavg_")  # MergeRec's and the test-time merge; per-domain rows


def register_method(method: MergeMethod) -> MergeMethod:
    """Add ``method`` to :data:`METHODS` (this process; see the module docstring for every process); ValueError when
    its name is taken, reserved (:data:`RESERVED_NAMES`, :data:`RESERVED_PREFIXES`) or malformed, its kernel is not
    ``"module:function"`` or its module cannot be found, a parameter is not a :class:`Param` whose default passes its
    own check, or ``scale_param`` is not one of its parameters. The kernel function is imported when a merge first
    runs."""
    if not isinstance(method, MergeMethod):
        raise ValueError(f"expected a MergeMethod, got {type(method).__name__}")
    if not NAME.fullmatch(method.name):
        raise ValueError(f"merge method name {method.name!r}: use lower-case letters, digits and '_'")
    if method.name in RESERVED_NAMES or method.name.startswith(RESERVED_PREFIXES):
        raise ValueError(f"merge method name {method.name!r} is reserved (the run's own models: {list(RESERVED_NAMES)} "
                         f"and names starting with {list(RESERVED_PREFIXES)})")
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    check_target("merge method", method.name, method.kernel, find=False)
    for key, spec in method.params.items():
        if not isinstance(spec, Param):
            raise ValueError(f"merge method {method.name!r}: parameter {key!r} must be a Param(default, check, "
                             f"valid), got {spec!r}")
        if not spec.check(spec.default):
            raise ValueError(f"merge method {method.name!r}: parameter {key!r} has default {spec.default!r}, which "
                             f"its check refuses (expected {spec.valid})")
    if method.scale_param is not None and method.scale_param not in method.params:
        raise ValueError(f"merge method {method.name!r}: scale_param {method.scale_param!r} is not one of its "
                         f"parameters {sorted(method.params)} (None: λ = 1)")
    check_target("merge method", method.name, method.kernel)  # last: finding the module imports its packages
    module, _, function = method.kernel.partition(":")
    loaded = sys.modules.get(module)
    initializing = getattr(getattr(loaded, "__spec__", None), "_initializing", False)  # decorator-style registration
    if loaded is not None and not initializing and not hasattr(loaded, function):  # a typo would fail after training
        raise ValueError(f"merge method {method.name!r}: module {module!r} has no function {function!r}")
    METHODS[method.name] = method
    return method


def _register_plugin(entry: EntryPoint) -> None:
    """Register the :class:`MergeMethod` an entry point of :data:`PLUGIN_GROUP` names (ValueError otherwise)."""
    method = entry.load()
    if not isinstance(method, MergeMethod):
        raise ValueError(f"{entry.value} is a {type(method).__name__}, not a MergeMethod")
    register_method(method)


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; ValueError listing the valid names otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; valid: {sorted(METHODS)}{METHODS.failures()}")
    return METHODS[name]


def with_default_seed(name: str, params: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """``params`` with ``seed`` as the default of method ``name``'s ``seed`` parameter (DARE's masks), so a seeded
    method follows the run's seed unless ``params`` sets one; unchanged for a method without randomness."""
    out = dict(params)
    if "seed" in get_method(name).params:
        out.setdefault("seed", seed)
    return out


def resolve_params(name: str, params: Mapping[str, Any], n_models: int | None = None) -> dict[str, Any]:
    """``params`` completed with the method's defaults and validated (ValueError naming the bad key or value)."""
    method = get_method(name)
    unknown = sorted(set(params) - set(method.params))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for merge method {name!r}; valid: {sorted(method.params)}")
    resolved = {key: params.get(key, spec.default) for key, spec in method.params.items()}
    for key, spec in method.params.items():
        if not spec.check(resolved[key]):
            raise ValueError(f"merge method {name!r}: {key}={resolved[key]!r} is invalid; expected {spec.valid}")
    if method.extra_check is not None:
        method.extra_check(resolved)
    if "weights" in resolved and resolved["weights"] is not None:
        resolved["weights"] = [float(x) for x in resolved["weights"]]
        if n_models is not None and len(resolved["weights"]) != n_models:
            raise ValueError(f"merge method {name!r}: {len(resolved['weights'])} weights for {n_models} models")
    return resolved


def weights_in_order(params: Mapping[str, Any], listed: Sequence[str], merged: Sequence[str]) -> dict[str, Any]:
    """``params`` with its per-model ``weights``, given in the order of ``listed`` (a run's ``data.domains``,
    ``fedmerge merge --models``), put in the order the models are merged in (``merged``: by name, of those left to
    merge), so each weight stays with the model it was written for; unchanged without a list of one weight per
    ``listed`` name (the registry then names the problem)."""
    weights = params.get("weights")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(listed):
        return dict(params)
    by_name = dict(zip(listed, weights))
    return {**params, "weights": [by_name[name] for name in merged]}


def recorded_params(name: str, params: Mapping[str, Any], n_models: int | None = None) -> dict[str, Any]:
    """What a model card records of method ``name``'s parameters: every one with its default (:func:`resolve_params`,
    so a later change of a default cannot change what the card says), or ``params`` as given when the resolved ones
    do not fit JSON (a plugin's ``inf`` default), with a warning."""
    import json
    import logging

    from fedmerge.storage import json_default

    resolved = resolve_params(name, params, n_models=n_models)
    try:
        json.dumps(resolved, allow_nan=False, default=json_default)
    except (TypeError, ValueError):
        logging.getLogger(__name__).warning("merge %s: its resolved parameters are not JSON; the card keeps the given "
                                            "ones", name)
        return dict(params)
    return resolved


def merge_scale(name: str, params: Mapping[str, Any]) -> float:
    """The final scalar λ of method ``name`` under resolved ``params`` (DARE: its base's default unless set; a
    plugin's scale left None: 1)."""
    method = get_method(name)
    if method.scale_param is None:
        return 1.0
    value = params[method.scale_param]
    if value is None:  # DARE without an explicit scale takes its base's default
        return float(METHODS[params["base"]].params["scale"].default) if "base" in params else 1.0
    return float(value)


def describe_methods() -> list[dict[str, Any]]:
    """Name, summary, paper and parameter defaults of every registered method."""
    return [
        {"name": m.name, "summary": m.summary, "paper": m.paper, "params": {k: p.default for k, p in m.params.items()}}
        for m in METHODS.values()
    ]
