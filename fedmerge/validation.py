"""Checks on a client's weight update before the server merges it.

A client ships a :data:`~fedmerge.models.base.StateDict`. Before it can touch the merged model the server checks
that it is an update *of the same model*: exactly the parameter names of θ₀ (a reply names no family: another
family's weights fail here), the same shapes and
dtypes, finite values, and — before any array is decoded — within a size budget. Any failure raises
:class:`UpdateRejected` naming the problem, so the server can drop (or report) that client instead of crashing deep
inside a merge.

A well-formed update can still be an attack (issue 19), so the server also checks that the weights the family
declares fixed equal θ₀ (:func:`check_fixed`), that no weight is huge (:func:`check_magnitude`), that the
task-vector norm is in line with the other clients' (:func:`screen_norms`), and that the metrics a client
reports are the expected, finite, in-range numbers (:func:`check_train_metrics`, :func:`check_eval_metrics`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fedmerge.checks import is_finite_number
from fedmerge.config import NORM_ACTIONS
from fedmerge.errors import FedmergeError
from fedmerge.metrics import MASKED_SUFFIX
from fedmerge.models.base import StateDict

_MAX_NAMES_SHOWN = 5


class UpdateRejected(FedmergeError):
    """A client's update was refused; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _names(names: set[str]) -> str:
    shown = sorted(names)[:_MAX_NAMES_SHOWN]
    more = len(names) - len(shown)
    return ", ".join(repr(n) for n in shown) + (f" (+{more} more)" if more > 0 else "")


def check_names(theta0: Mapping[str, torch.Tensor], update: Mapping[str, object]) -> None:
    """The update must have exactly θ₀'s parameter names (none missing, none extra)."""
    missing = set(theta0) - set(update)
    extra = set(update) - set(theta0)
    problems = []
    if missing:
        problems.append(f"missing parameters {_names(missing)}")
    if extra:
        problems.append(f"unexpected parameters {_names(extra)}")
    if problems:
        raise UpdateRejected("; ".join(problems))


def check_tensor(name: str, reference: torch.Tensor, value: object) -> None:
    """One parameter: a tensor with θ₀'s shape and dtype (a floating dtype), dense, and with only finite values."""
    if not isinstance(value, torch.Tensor):
        raise UpdateRejected(f"parameter {name!r} is a {type(value).__name__}, not a tensor")
    if value.layout != torch.strided:
        raise UpdateRejected(f"parameter {name!r} has layout {value.layout}, expected a dense tensor")
    if tuple(value.shape) != tuple(reference.shape):
        raise UpdateRejected(f"parameter {name!r} has shape {tuple(value.shape)}, expected {tuple(reference.shape)}")
    if value.dtype != reference.dtype:
        raise UpdateRejected(f"parameter {name!r} has dtype {value.dtype}, expected {reference.dtype}")
    if not value.dtype.is_floating_point:
        raise UpdateRejected(f"parameter {name!r} has non-float dtype {value.dtype}")
    n_bad = int((~torch.isfinite(value)).sum())
    if n_bad:
        n_nan = int(torch.isnan(value).sum())
        raise UpdateRejected(
            f"parameter {name!r} has {n_bad} non-finite values ({n_nan} NaN, {n_bad - n_nan} ±Inf)"
        )


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Payload size: numel × element size."""
    return tensor.numel() * tensor.element_size()


NPY_HEADER_BYTES = 4096  # what an array's serialized form (.npy) may carry beyond its values: 128 bytes usually


def check_payload(theta0: Mapping[str, torch.Tensor], payload_bytes: Mapping[str, int], slack: float = 1.0) -> None:
    """Before a reply's arrays are decoded: exactly θ₀'s parameter names (:func:`check_names`), and each array's
    serialized size at most ``slack`` × its θ₀ tensor's bytes + :data:`NPY_HEADER_BYTES`, so that no reply makes the
    server decode more than that (``payload_bytes``: name -> serialized bytes). A well-formed update is θ₀'s size;
    its shapes and dtypes are checked once decoded (:func:`check_update`)."""
    if slack < 1.0 or not math.isfinite(slack):
        raise ValueError(f"slack must be a finite number >= 1, got {slack}")
    check_names(theta0, payload_bytes)
    for name, reference in theta0.items():
        limit = math.ceil(slack * tensor_bytes(reference)) + NPY_HEADER_BYTES
        if payload_bytes[name] > limit:
            raise UpdateRejected(f"parameter {name!r} is {payload_bytes[name]} bytes serialized, over the limit of "
                                 f"{limit} bytes ({slack:g} × θ₀'s {tensor_bytes(reference)} + the array header)")


def check_update(theta0: StateDict, update: StateDict) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` is a well-formed set of weights for θ₀'s model.

    Checked in order: parameter names, then per parameter type/shape/dtype/finiteness. A reply names no model
    family: another family's weights fail on their names and shapes. (Sizes are bounded before decoding,
    :func:`check_payload`.)
    """
    if not isinstance(update, Mapping):
        raise UpdateRejected(f"update is a {type(update).__name__}, not a mapping of parameter names to tensors")
    check_names(theta0, update)
    for name, reference in theta0.items():
        check_tensor(name, reference, update[name])


# ---- checks beyond the format: fixed weights, magnitudes, task-vector norms (issue 19) -------------------------


def check_fixed(theta0: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor], fixed: Iterable[str]) -> None:
    """Every weight the family declares fixed (e.g. the routed adapter's router buffers) must equal θ₀ bit for bit."""
    changed = {name for name in fixed if not torch.equal(update[name], theta0[name])}
    if changed:
        raise UpdateRejected(f"fixed parameters {_names(changed)} differ from θ₀ (they must never change)")


def check_magnitude(update: Mapping[str, torch.Tensor], max_abs: float) -> None:
    """No weight may exceed ``max_abs`` in absolute value (keeps every merge's sums far from float32 overflow)."""
    for name, value in update.items():
        biggest = float(value.detach().abs().max()) if value.numel() else 0.0
        if biggest > max_abs:
            raise UpdateRejected(f"parameter {name!r} has a weight of magnitude {biggest:.3g}, over "
                                 f"federation.max_abs_value = {max_abs:g}")


def task_vector_norm(reference: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> float:
    """‖τ‖₂ = sqrt(Σ_p ‖θ_p − θ_ref,p‖²) over every parameter, in float64 (no overflow for any finite float32)."""
    return math.sqrt(sum(float((update[n].double() - ref.double()).pow(2).sum()) for n, ref in reference.items()))


def scale_task_vector(reference: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor],
                      factor: float) -> StateDict:
    """θ_ref + s·(θ − θ_ref) per tensor, computed in float64 and returned in ``update``'s dtypes: the update with its
    task vector scaled by ``factor`` (the norm screen's clip and DP clipping)."""
    return {n: (ref.double() + factor * (update[n].double() - ref.double())).to(update[n].dtype)
            for n, ref in reference.items()}


@dataclass(frozen=True)
class NormScreen:
    """What :func:`screen_norms` decided: per-client scale factors (1.0: unchanged) and reasons of rejections."""

    scale: dict[str, float]
    rejected: dict[str, str]
    clipped: dict[str, str]


def norm_limits(norms: Mapping[str, float], multiple: float, cap: float) -> dict[str, float]:
    """Per client the largest acceptable ‖τ_k‖: min(``multiple`` × r_k, ``cap``); 0 disables either. r_k is the
    ⌈m/2⌉-th (0-based) of the m other clients' norms in increasing order: their upper median for an even m, one
    above the median for an odd m.

    Over the *other* clients, so that one client cannot raise its own bar: with 3 clients a scaled attacker is
    compared with the two honest norms. At ⌈m/2⌉, so that one client cannot pull another's bar down either: however
    small its norm (a θ₀ copy: 0), an honest client's r_k stays at least the upper median of the other honest
    clients' norms (with the plain median a θ₀ copy halved each honest bar of 3 clients to 1.5× the other honest
    norm: measured, an honest client rejected). The price: with an even number of clients, a client's own r_k is one
    order statistic above the others' median. With 1 or 2 clients only ``cap`` applies: two clients have no
    majority, so a norm 5× the other's cannot say which one is out of line (honest Amazon text-LAE domains differ
    that much: Pantry 1.2, Toys 6.1 in a FedAvg round), and rejecting either leaves too few updates to merge.
    """
    limits = {}
    for k in norms:
        bounds = [math.inf]
        others = [v for j, v in norms.items() if j != k and math.isfinite(v)]
        if multiple > 0 and len(others) >= 2:
            bounds.append(multiple * sorted(others)[math.ceil(len(others) / 2)])
        if cap > 0:
            bounds.append(cap)
        limits[k] = min(bounds)
    return limits


def screen_norms(norms: Mapping[str, float], multiple: float, cap: float, action: str) -> NormScreen:
    """Reject (``action="reject"``) or scale down to the limit (``action="clip"``) each τ_k whose norm exceeds
    :func:`norm_limits`; returns the scale factor min(1, limit/‖τ_k‖) of each kept client."""
    if action not in NORM_ACTIONS:
        raise ValueError(f"norm action must be one of {list(NORM_ACTIONS)}, got {action!r}")
    limits = norm_limits(norms, multiple, cap)
    scale, rejected, clipped = {}, {}, {}
    for k, norm in norms.items():
        if not math.isfinite(norm):  # never clipped: a scale of limit / NaN would be NaN
            rejected[k] = f"task-vector norm {norm} is not finite"
            continue
        if norm <= limits[k]:
            scale[k] = 1.0
            continue
        reason = (f"task-vector norm {norm:.4g} exceeds {limits[k]:.4g} (federation.norm_multiple = {multiple:g} × "
                  f"the other clients' upper median norm, federation.norm_cap = {cap:g})")
        if action == "reject":
            rejected[k] = reason
        else:
            scale[k] = limits[k] / norm
            clipped[k] = f"{reason}: scaled by {scale[k]:.4g}"
    return NormScreen(scale, rejected, clipped)



def check_train_metrics(
    metrics: Mapping[str, object], users_key: str, max_users: float, users_required: bool = True
) -> tuple[dict[str, int | float], list[str]]:
    """(the finite numeric metrics, names of the dropped ones); :class:`UpdateRejected` unless ``users_key`` (the
    FedAvg weight) is a whole number in (0, ``max_users``], which it must be when present and, with
    ``users_required``, is required to be (a DP client sends no user count)."""
    users = metrics.get(users_key)
    if (users_required or users_key in metrics) and (
            not is_finite_number(users) or not 0 < users <= max_users or not float(users).is_integer()):
        raise UpdateRejected(f"training metric {users_key!r} = {users!r} is not a whole number in "
                             f"(0, federation.max_num_users = {max_users:g}]")
    kept = {k: v for k, v in metrics.items() if is_finite_number(v)}  # ints stay ints (coded metrics)
    return kept, sorted(set(metrics) - set(kept))


def check_eval_metrics(metrics: Mapping[str, object], expected: Iterable[str], users_key: str) -> list[str]:
    """Problems of one model's evaluation metrics (empty: acceptable): exactly the ``expected`` names, each a finite
    number in [0, 1], except ``users_key``, a whole number >= 0; then :func:`metric_consistency_problems`."""
    expected = set(expected)
    problems = []
    if set(metrics) - expected:
        problems.append(f"unexpected metrics {_names(set(metrics) - expected)}")
    if expected - set(metrics):
        problems.append(f"missing metrics {_names(expected - set(metrics))}")
    for name in sorted(expected & set(metrics)):
        value = metrics[name]
        if name == users_key:
            ok = is_finite_number(value) and value >= 0 and float(value).is_integer()
        else:
            ok = is_finite_number(value) and 0.0 <= value <= 1.0
        if not ok:
            problems.append(f"{name} = {value!r} is not {'a whole number >= 0' if name == users_key else 'in [0, 1]'}")
    return problems or metric_consistency_problems(metrics)


METRIC_NAME = re.compile(rf"(recall|ndcg)@(\d+)({re.escape(MASKED_SUFFIX)})?")
CONSISTENCY_SLACK = 1e-9  # float rounding of means over users


def metric_consistency_problems(metrics: Mapping[str, object]) -> list[str]:
    """What breaks the relations every honest evaluation satisfies (one target per user; ties counted as
    :mod:`fedmerge.metrics` counts them): Recall@K and NDCG@K grow with K, NDCG@K ≤ Recall@K, and the masked figure
    ≥ the unmasked one (masking only removes items ranked against the target). A client that invents its own
    domain's figures has to keep them consistent; it can still set any consistent values."""
    matches = ((METRIC_NAME.fullmatch(name), value) for name, value in metrics.items())
    values = {match.groups(): float(value) for match, value in matches if match}  # type: ignore[arg-type]

    def name(kind: str, k: str, masked: str | None) -> str:
        return f"{kind}@{k}{masked or ''}"

    problems = []
    for (kind, k, masked), value in sorted(values.items(), key=lambda item: (item[0][0], int(item[0][1]),
                                                                               item[0][2] or "")):
        larger = sorted((int(j), v) for (kd, j, m), v in values.items() if kd == kind and m == masked and int(j) > int(k))
        if larger and value > larger[0][1] + CONSISTENCY_SLACK:
            problems.append(f"{name(kind, k, masked)} = {value:g} exceeds {name(kind, str(larger[0][0]), masked)} = "
                            f"{larger[0][1]:g} (a hit in the top {k} is one in the top {larger[0][0]})")
        recall = values.get(("recall", k, masked))
        if kind == "ndcg" and recall is not None and value > recall + CONSISTENCY_SLACK:
            problems.append(f"{name(kind, k, masked)} = {value:g} exceeds {name('recall', k, masked)} = {recall:g} "
                            "(one target per user: NDCG@K ≤ Recall@K)")
        masked_value = values.get((kind, k, MASKED_SUFFIX))
        if not masked and masked_value is not None and value > masked_value + CONSISTENCY_SLACK:
            problems.append(f"{name(kind, k, masked)} = {value:g} exceeds {name(kind, k, MASKED_SUFFIX)} = "
                            f"{masked_value:g} (masking only removes items ranked against the target)")
    return problems
