"""What travels between clients and server: message types, record keys and weight <-> record conversion.

Shared by the Flower apps (``clients/app.py``, ``server/strategy.py``) and the in-process engine, so both speak
exactly the same records. A client sends named float weight arrays, numeric metrics and its domain name; beside
them, the text of what went wrong: an evaluation's per-model failures (``EVALUATION_FAILURES``) and, for a request it
could not serve, an error reply (README, "What the server necessarily sees").
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmerge.errors import FedmergeError
from fedmerge.models.base import STOP_REASONS, StateDict

QUERY = "query"
TRAIN = "train"
EVALUATE = "evaluate"

CONFIG = "config"  # ConfigRecord sent by the server: PHASE and (training) ROUND; clients derive their seeds
PHASE = "phase"  # CONFIG key: PHASE_ONESHOT or PHASE_FEDAVG (train), PHASE_EVALUATE (evaluate)
ROUND = "round"  # CONFIG key: the training round (0 for the one-shot training)
PHASE_ONESHOT, PHASE_FEDAVG, PHASE_EVALUATE = "oneshot", "fedavg", "evaluate"
INFO = "info"  # ConfigRecord sent by a client: its domain name
GLOBAL = "global"  # ArrayRecord sent for training: the starting weights
THETA0 = "theta0"  # ArrayRecord sent with a FedAvg round's training when local training distills towards θ₀
# ArrayRecord sent with training when the family trains on the other training domains' public catalogs
# (theta0_distill): their item features, one array per domain, in the run's domain order, the client's own left out
PUBLIC_FEATURES = "public_features"
WEIGHTS = "weights"  # ArrayRecord replied after training
TRAIN_METRICS = "train_metrics"  # MetricRecord replied after training
MODEL_PREFIX = "model:"  # ArrayRecord per model to evaluate, keyed MODEL_PREFIX + model name
METRICS_PREFIX = "metrics:"  # MetricRecord per evaluated model
EVALUATION_FAILURES = "evaluation_failures"  # ConfigRecord replied: model name -> why the client could not evaluate it
NUM_USERS = "num-users"  # training metric used as the FedAvg weight
DOMAIN = "domain"
# String-valued training metrics: a MetricRecord holds numbers only, so each travels as its index in this tuple.
CODED_METRICS: dict[str, tuple[str, ...]] = {"stop_reason": STOP_REASONS}


def to_record(weights: StateDict) -> ArrayRecord:
    """Weights as an ArrayRecord of named float arrays (refuses non-float tensors)."""
    bad = [name for name, t in weights.items() if not torch.is_floating_point(t)]
    if bad:
        raise FedmergeError(f"refusing to send non-float weight arrays {bad[:5]}")
    return ArrayRecord({name: t.detach().cpu().contiguous() for name, t in weights.items()})


def features_record(features: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Catalog features by domain as an ArrayRecord (:data:`PUBLIC_FEATURES`; any dtype: token ids too)."""
    return ArrayRecord({name: t.detach().cpu().contiguous() for name, t in features.items()})


def from_record(record: ArrayRecord) -> StateDict:
    """An ArrayRecord back as a state dict of (copied, writable) tensors."""
    return {name: torch.from_numpy(np.array(arr.numpy(), copy=True)) for name, arr in record.items()}


def numeric_metrics(metrics: Mapping[str, object]) -> MetricRecord:
    """The int/float entries of ``metrics`` (and lists of them) as a MetricRecord, a :data:`CODED_METRICS` string as
    its index among the valid values; everything else is dropped."""
    kept: dict[str, float | int | list[float]] = {}
    for key, value in metrics.items():
        if key in CODED_METRICS and isinstance(value, str):
            if value not in CODED_METRICS[key]:
                raise FedmergeError(f"metric {key}={value!r} cannot be sent; valid: {list(CODED_METRICS[key])}")
            kept[key] = CODED_METRICS[key].index(value)
        elif isinstance(value, bool):
            kept[key] = int(value)
        elif isinstance(value, (int, float, np.integer, np.floating)):
            kept[key] = value.item() if isinstance(value, np.generic) else value
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
            kept[key] = [float(v) for v in value]
    return MetricRecord(kept)


def decoded_metrics(record: Mapping[str, object]) -> dict[str, object]:
    """A received MetricRecord as a dict, :data:`CODED_METRICS` indices back to their strings (an unknown code is
    kept as the number)."""
    out = dict(record)
    for key, values in CODED_METRICS.items():
        code = out.get(key)
        if isinstance(code, int) and 0 <= code < len(values):
            out[key] = values[code]
    return out


def info_record(domain: str) -> ConfigRecord:
    return ConfigRecord({DOMAIN: domain})


def reply_domain(content: RecordDict) -> str:
    """The domain name a client put in its reply."""
    if INFO not in content.config_records or DOMAIN not in content.config_records[INFO]:
        raise FedmergeError("client reply carries no domain name")
    return str(content.config_records[INFO][DOMAIN])


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of every record in ``content`` (Flower's own count)."""
    return int(sum(r.count_bytes() for r in content.values()))
