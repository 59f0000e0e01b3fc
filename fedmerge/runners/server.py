"""Framework-free server logic: θ₀, update checks, merging, FedAvg aggregation and the phase orchestration.

:class:`Federation` drives one run over a :class:`Transport` (send per-domain requests, get per-domain replies).
The Flower strategy (``server/strategy.py``) and the in-process engine are two transports over this one code path.
The server sees only weights, numeric metrics, domain names and the public catalogs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from tqdm.auto import tqdm

from fedmerge.config import domain_names, training_domains
from fedmerge.data.domain import ItemCatalog
from fedmerge.errors import FedmergeError
from fedmerge.models import StateDict
from fedmerge.runners import protocol
from fedmerge.runners.client import family_of, feature_width, item_features, load_catalog

logger = logging.getLogger(__name__)
THETA0_FILE = "theta0.safetensors"
JOINT_FILE = "joint.safetensors"
FINGERPRINT_KEY = "config_sha256"
STALE_HINT = (  # why saved weights were refused on --resume, and what to do
    "a different data/encoder/model/privacy configuration or seed; resume with the original scenario and --set "
    "values, or run without --resume"
)
TRAIN_METRICS_KEY = "train_metrics"
# The config sections that determine what a client trains; a resumed run must match them exactly.
TRAINING_SECTIONS = ("data", "encoder", "model", "privacy")

ReplyHandler = Callable[[str, RecordDict], None]


class Transport(Protocol):
    """Sends one request per domain and returns (replies, errors) keyed by domain name.

    ``on_reply(domain, content)``, when given, is called for each reply as soon as it arrives.
    """

    def send(
        self, message_type: str, requests: Mapping[str, RecordDict], on_reply: ReplyHandler | None = None
    ) -> tuple[dict[str, RecordDict], dict[str, str]]: ...


def server_threads(cfg: Mapping[str, Any]) -> int:
    """Torch threads for server-side work: ``run.server_threads``, or every core this process may use when 0.

    The default is 1: on a shared 2-core machine, 2 threads made MergeRec 15-30x slower under Flower's simulation
    engine (its polling threads and other processes preempt one OpenMP thread and the other spins); measured in
    benchmarks/flower_overhead.py. Use 0 on a dedicated multi-core server.
    """
    wanted = int(cfg["run"]["server_threads"])
    return wanted if wanted > 0 else len(os.sched_getaffinity(0))


def training_fingerprint(cfg: Mapping[str, Any]) -> str:
    """sha256 of the run seed and the :data:`TRAINING_SECTIONS` (minus the encoder cache folder), as sorted JSON."""
    sections = {name: dict(cfg[name]) for name in TRAINING_SECTIONS}
    sections["encoder"].pop("cache_dir", None)
    sections["seed"] = cfg["run"]["seed"]
    return hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode()).hexdigest()


def initial_weights(cfg: Mapping[str, Any]) -> StateDict:
    """θ₀: the family's seeded initialization for the encoder's feature width (identical on every party); a family
    that reads the public catalogs for θ₀ (routed adapter) gets the training domains' item features."""
    family = family_of(cfg)
    catalogs = ([item_features(cfg, load_catalog(cfg, d), family) for d in training_domains(cfg)]
                if family.init_reads_catalogs else [])
    return family.initial_weights(feature_width(cfg, family), seed=int(cfg["run"]["seed"]), catalog_features=catalogs)


def fedavg_aggregate(updates: Mapping[str, StateDict], weights: Mapping[str, float]) -> StateDict:
    """Σ_d n_d θ_d / Σ_d n_d per parameter (McMahan et al. 2017)."""
    total = float(sum(weights[d] for d in updates))
    if total <= 0:
        raise FedmergeError("FedAvg weights sum to zero")
    first = next(iter(updates.values()))
    return {
        name: (sum(updates[d][name].double() * (weights[d] / total) for d in updates)).to(first[name].dtype)
        for name in first
    }


def merge_replies(
    theta0: StateDict, replies: Mapping[str, StateDict], catalogs: Mapping[str, ItemCatalog], cfg: Mapping[str, Any]
) -> tuple[dict[str, StateDict], dict[str, Any]]:
    """Every configured merge of the clients' weights (training-free registry methods and MergeRec).

    Uses only the weights and the public catalogs. Returns (model name -> merged weights, report with per-method
    seconds and MergeRec's learned coefficients).
    """
    from fedmerge.merging import MERGEREC_METHODS, merge

    models = {d: replies[d] for d in sorted(replies)}
    merged: dict[str, StateDict] = {}
    report: dict[str, Any] = {"seconds": {}, "domains": list(models)}
    for method in cfg["merge"]["methods"]:
        start = time.perf_counter()
        params = dict(cfg["merge"]["params"].get(method, {}))
        if method in MERGEREC_METHODS:
            merged[method], report[method] = _mergerec(theta0, models, catalogs, cfg, MERGEREC_METHODS[method])
        else:
            try:
                merged[method] = merge(method, theta0, models, **params)
            except ValueError as exc:
                raise FedmergeError(f"merge.methods: {method}: {exc}") from exc
        report["seconds"][method] = round(time.perf_counter() - start, 3)
    return merged, report


def _mergerec(
    theta0: StateDict, models: Mapping[str, StateDict], catalogs: Mapping[str, ItemCatalog], cfg: Mapping[str, Any],
    granularity: str,
) -> tuple[StateDict, dict[str, Any]]:
    """MergeRec with task- or layer-wise coefficients, learned on pseudo-users from the public catalogs.

    ``merge.mergerec`` keys are :class:`MergeRecConfig` fields (e.g. ``item_side="full"`` for the exact item side:
    every step then re-encodes all catalogs with gradient, 6-7 minutes per 500 steps on Amazon on a 2-core CPU
    instead of ~15 s for the default frozen candidates).
    """
    from dataclasses import asdict, fields

    from fedmerge.merging.mergerec import MergeRecConfig, mergerec

    family = family_of(cfg)
    features = {d: item_features(cfg, catalogs[d], family) for d in models}
    params = {"seed": int(cfg["run"]["seed"]), "progress": bool(cfg["run"]["progress"]),
              **cfg["merge"]["mergerec"], "granularity": granularity}
    valid = [f.name for f in fields(MergeRecConfig)]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise FedmergeError(f"unknown merge.mergerec key(s) {unknown}; valid: {valid}")
    try:
        merged, report = mergerec(family, theta0, dict(models), features, MergeRecConfig(**params))
    except ValueError as exc:
        raise FedmergeError(f"merge.mergerec: {exc}") from exc
    return merged, asdict(report)


def average_metrics(per_domain: Mapping[str, Mapping[str, float]], domains: list[str]) -> dict[str, float]:
    """Unweighted mean over ``domains`` of every metric they all report (MergeRec averages domains equally)."""
    present = [per_domain[d] for d in domains if d in per_domain]
    if not present:
        return {}
    keys = set.intersection(*(set(m) for m in present)) - {"users"}
    return {k: float(np.mean([m[k] for m in present])) for k in sorted(keys)}


class Federation:
    """One run: one-shot training, update checks, merges, FedAvg rounds and evaluation, over a transport."""

    def __init__(
        self, cfg: Mapping[str, Any], theta0: StateDict, extra_models: Mapping[str, StateDict] | None = None,
        out_dir: str | Path | None = None,
    ):
        """``out_dir``: where each accepted one-shot update is saved as it arrives (for ``--resume``)."""
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.theta0 = theta0
        self.family_name = cfg["model"]["family"]
        self.extra_models = dict(extra_models or {})
        self.domains = domain_names(cfg)
        self.train_domains = training_domains(cfg)
        self.timings: dict[str, float] = {}
        self.bytes = {d: {"sent": 0, "received": 0} for d in self.domains}
        self.rejected: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.models: dict[str, dict[str, dict[str, float]]] = {}
        self.fedavg_curve: list[dict[str, float]] = []
        self.merge_report: dict[str, Any] = {}
        self.train_metrics: dict[str, dict[str, float]] = {}
        self.oneshot_bytes = 0

    # ---- requests and replies -------------------------------------------------------------------------------
    def _exchange(
        self, transport: Transport, message_type: str, requests: dict[str, RecordDict], on_reply: ReplyHandler | None = None
    ) -> dict[str, RecordDict]:
        for d, content in requests.items():
            self.bytes[d]["received"] += protocol.record_bytes(content)
        arrived: list[str] = []

        def progress(domain: str, content: RecordDict) -> None:  # one line per reply: many clients show progress
            arrived.append(domain)
            logger.info("%s: %d/%d replies (%s)", message_type, len(arrived), len(requests), domain)
            if on_reply is not None:
                on_reply(domain, content)

        replies, errors = transport.send(message_type, requests, on_reply=progress)
        for d, content in replies.items():
            self.bytes[d]["sent"] += protocol.record_bytes(content)
        for d, reason in errors.items():
            logger.error("client %s failed in %s: %s", d, message_type, reason)
            self.errors[f"{message_type}:{d}"] = reason
        return replies

    def train_requests(self, weights: StateDict, phase: str, round_index: int) -> dict[str, RecordDict]:
        """One training request per training domain: the starting weights and (phase, round)."""
        record = protocol.to_record(weights)
        config = ConfigRecord({"phase": phase, "round": round_index})
        return {d: RecordDict({protocol.GLOBAL: record, protocol.CONFIG: config}) for d in self.train_domains}

    def accept_update(self, domain: str, content: RecordDict) -> tuple[StateDict, dict[str, float]] | None:
        """The checked weights and numeric training metrics of one reply, or None when rejected (logged)."""
        from fedmerge.validation import UpdateRejected, check_update, max_bytes_for

        max_bytes = max_bytes_for(self.theta0, float(self.cfg["federation"]["max_update_slack"]))
        try:
            if protocol.WEIGHTS not in content.array_records:
                raise UpdateRejected("reply has no weights")
            update = protocol.from_record(content.array_records[protocol.WEIGHTS])
            check_update(self.theta0, update, self.family_name, expected_family=self.family_name, max_bytes=max_bytes)
        except UpdateRejected as exc:
            logger.warning("rejected the update of %s: %s", domain, exc.reason)
            self.rejected[domain] = exc.reason
            return None
        metrics = dict(content.metric_records.get(protocol.TRAIN_METRICS, {}))
        return update, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

    def require_enough(self, updates: Mapping[str, StateDict]) -> None:
        """FedmergeError unless at least ``federation.min_replies`` (0: every training client) updates are usable."""
        needed = int(self.cfg["federation"]["min_replies"]) or len(self.train_domains)
        if len(updates) < needed:
            raise FedmergeError(
                f"only {len(updates)} usable updates ({sorted(updates)}) of {len(self.train_domains)} clients, "
                f"need federation.min_replies = {needed}; rejected: {self.rejected}; errors: {self.errors}"
            )

    def accept_updates(self, replies: Mapping[str, RecordDict]) -> tuple[dict[str, StateDict], dict[str, float]]:
        """Checked weights and FedAvg weights (user counts) of the replies; a rejected update is logged and left out."""
        updates, n_users = {}, {}
        for d, content in replies.items():
            accepted = self.accept_update(d, content)
            if accepted is not None:
                updates[d] = accepted[0]
                n_users[d] = float(accepted[1].get(protocol.NUM_USERS, 1))
        self.require_enough(updates)
        return updates, n_users

    def collect_oneshot(self, transport: Transport) -> dict[str, StateDict]:
        """One-shot training from θ₀; each accepted update is checked and saved (atomically) as soon as it arrives."""
        from fedmerge.storage import save_client_weights

        individual: dict[str, StateDict] = {}
        fingerprint = training_fingerprint(self.cfg)

        def on_reply(domain: str, content: RecordDict) -> None:
            accepted = self.accept_update(domain, content)
            if accepted is None:
                return
            individual[domain], self.train_metrics[domain] = accepted
            if self.out_dir is not None:
                metadata = {FINGERPRINT_KEY: fingerprint, "family": self.family_name, "run": str(self.cfg["run"]["name"]),
                            TRAIN_METRICS_KEY: json.dumps(self.train_metrics[domain])}
                save_client_weights(self.out_dir, domain, individual[domain], metadata)

        self._exchange(transport, protocol.TRAIN, self.train_requests(self.theta0, "oneshot", 0), on_reply=on_reply)
        self.require_enough(individual)
        return individual

    def evaluate(self, transport: Transport, models_for: Mapping[str, Mapping[str, StateDict]]) -> None:
        """Send each domain its models to evaluate and record the metrics under ``models.<name>.<domain>``."""
        requests = {}
        for d, models in models_for.items():
            content = RecordDict({protocol.CONFIG: ConfigRecord({"phase": "evaluate"})})
            for name, weights in models.items():
                content[protocol.MODEL_PREFIX + name] = protocol.to_record(weights)
            requests[d] = content
        for d, content in self._exchange(transport, protocol.EVALUATE, requests).items():
            for key, record in content.metric_records.items():
                if key.startswith(protocol.METRICS_PREFIX):
                    self.models.setdefault(key[len(protocol.METRICS_PREFIX):], {})[d] = dict(record)

    # ---- the run ----------------------------------------------------------------------------------------------
    def run(self, transport: Transport, saved: Mapping[str, StateDict] | None = None) -> dict[str, Any]:
        """All phases; returns the results dict (see :mod:`fedmerge.runners.results`).

        ``saved``: the clients' one-shot weights of an earlier run (``--resume``): training is skipped (one-shot and
        FedAvg rounds); merging and evaluation run again.
        """
        baselines = self.cfg["baselines"]
        fedavg_rounds = 0 if saved is not None else int(baselines["fedavg_rounds"])
        phases = tqdm(total=3 + fedavg_rounds, desc="federation", disable=not self.cfg["run"]["progress"])

        start = time.perf_counter()
        if saved is None:
            individual = self.collect_oneshot(transport)
            self.oneshot_bytes = sum(b["sent"] + b["received"] for b in self.bytes.values())
        else:
            individual = dict(saved)
            self.require_enough(individual)
        self.timings["local_training"] = time.perf_counter() - start
        phases.update()

        start = time.perf_counter()
        catalogs = {d: load_catalog(self.cfg, d) for d in individual}
        merged, self.merge_report = merge_replies(self.theta0, individual, catalogs, self.cfg)
        self.timings["merging"] = time.perf_counter() - start
        phases.update()

        start = time.perf_counter()
        shared = {**merged, **self.extra_models}
        if baselines["theta0"]:
            shared["theta0"] = self.theta0
        models_for = {d: dict(shared) for d in self.domains}
        if baselines["individual"]:
            for d, weights in individual.items():
                models_for[d]["individual"] = weights
        self.evaluate(transport, models_for)
        self.timings["evaluation"] = time.perf_counter() - start
        phases.update()

        start = time.perf_counter()
        global_weights = self.theta0
        for r in range(1, fedavg_rounds + 1):
            replies = self._exchange(transport, protocol.TRAIN, self.train_requests(global_weights, "fedavg", r))
            updates, n_users = self.accept_updates(replies)
            global_weights = fedavg_aggregate(updates, n_users)
            self.evaluate(transport, {d: {f"fedavg_round{r}": global_weights} for d in self.domains})
            round_avg = average_metrics(self.models[f"fedavg_round{r}"], self.train_domains)
            communicated = sum(b["sent"] + b["received"] for b in self.bytes.values())
            self.fedavg_curve.append({"round": r, "bytes": communicated, **round_avg})
            phases.update()
        if self.fedavg_curve:
            self.models["fedavg"] = self.models.pop(f"fedavg_round{len(self.fedavg_curve)}")
            for r in range(1, len(self.fedavg_curve)):
                self.models.pop(f"fedavg_round{r}", None)
        self.timings["fedavg"] = time.perf_counter() - start
        phases.close()
        return self.results()

    def results(self) -> dict[str, Any]:
        """Per-model per-domain metrics with averages over the training domains, bytes, timings and diagnostics."""
        models = {}
        for name, per_domain in self.models.items():
            ordered = {d: per_domain[d] for d in self.domains if d in per_domain}
            models[name] = {**ordered, "average": average_metrics(per_domain, self.train_domains)}
        return {
            "status": "failed" if any(k.startswith(protocol.EVALUATE) for k in self.errors) else "ok",
            "domains": self.domains,
            "held_out": list(self.cfg["data"]["held_out"]),
            "models": models,
            "fedavg_curve": self.fedavg_curve,
            "oneshot_bytes": self.oneshot_bytes,
            "bytes": self.bytes,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "train_metrics": self.train_metrics,
            "merge_report": self.merge_report,
            "rejected": self.rejected,
            "errors": self.errors,
        }


def load_saved_run(cfg: Mapping[str, Any], out_dir: str | Path) -> tuple[StateDict | None, dict[str, StateDict], dict[str, dict[str, float]]]:
    """θ₀ (None if it was not saved), the clients' saved one-shot weights and their training metrics.

    Every weight file must carry this scenario's :func:`training_fingerprint` and name one of its training domains,
    so merges are never computed from weights trained under another configuration.
    """
    from fedmerge.storage import client_metadata, load_client_weights

    out_dir = Path(out_dir)
    saved = load_client_weights(out_dir)
    metadata = client_metadata(out_dir)
    unknown = sorted(set(saved) - set(training_domains(cfg)))
    if unknown:
        raise FedmergeError(f"saved weights of {unknown} under {out_dir} are not training domains of this scenario "
                            f"({training_domains(cfg)})")
    fingerprint = training_fingerprint(cfg)
    stale = sorted(d for d in saved if metadata[d].get(FINGERPRINT_KEY) != fingerprint)
    if stale:
        raise FedmergeError(
            f"saved weights of {stale} under {out_dir} were trained with {STALE_HINT}"
        )
    metrics = {d: {k: float(v) for k, v in json.loads(metadata[d].get(TRAIN_METRICS_KEY, "{}")).items()} for d in saved}
    theta0_path = out_dir / THETA0_FILE
    return (load_fingerprinted(theta0_path, fingerprint) if theta0_path.is_file() else None), saved, metrics


def load_fingerprinted(path: Path, fingerprint: str) -> StateDict:
    """Weights a run saved under the same :func:`training_fingerprint`; FedmergeError when it was another config."""
    from fedmerge.storage import load_weights, read_metadata

    if read_metadata(path).get(FINGERPRINT_KEY) != fingerprint:
        raise FedmergeError(f"{path} was saved by a run with {STALE_HINT}")
    return load_weights(path)


def run_federation(
    cfg: Mapping[str, Any], transport: Transport, out_dir: str | Path | None = None, resume: bool = False
) -> dict[str, Any]:
    """θ₀, the optional joint oracle, then the federation phases over ``transport`` (shared by both engines).

    With ``out_dir``, θ₀, the joint oracle and every accepted one-shot client update are saved there. ``resume``
    reloads them instead of training (see :func:`load_saved_run`) and re-runs merging and evaluation only.
    """
    from fedmerge.runners.baselines import joint_oracle
    from fedmerge.storage import save_weights

    if resume and out_dir is None:
        raise FedmergeError("resume needs the output folder of the earlier run")
    torch.set_num_threads(server_threads(cfg))
    out_path = Path(out_dir) if out_dir is not None else None
    fingerprint = training_fingerprint(cfg)
    start = time.perf_counter()
    saved, train_metrics = None, {}
    if resume:
        theta0, saved, train_metrics = load_saved_run(cfg, out_path)
        if theta0 is None:
            logger.warning("no %s under %s: regenerating θ₀ from the seed", THETA0_FILE, out_path)
            theta0 = initial_weights(cfg)
    else:
        theta0 = initial_weights(cfg)
        if out_path is not None:
            save_weights(out_path / THETA0_FILE, theta0, {FINGERPRINT_KEY: fingerprint})
    setup = time.perf_counter() - start
    extra, joint_seconds = {}, 0.0
    if cfg["baselines"]["joint"]:
        start = time.perf_counter()
        joint_path = out_path / JOINT_FILE if out_path is not None else None
        if resume and joint_path.is_file():
            extra["joint"] = load_fingerprinted(joint_path, fingerprint)
        else:
            extra["joint"] = joint_oracle(cfg, theta0)
            if joint_path is not None:
                save_weights(joint_path, extra["joint"], {FINGERPRINT_KEY: fingerprint})
        joint_seconds = time.perf_counter() - start
    federation = Federation(cfg, theta0, extra_models=extra, out_dir=None if resume else out_path)
    federation.train_metrics.update(train_metrics)
    out = federation.run(transport, saved=saved)
    out["timings_s"] = {"setup": round(setup, 3), "joint_training": round(joint_seconds, 3), **out["timings_s"]}
    if "joint" in out["models"]:
        out["models"]["joint"]["non_private"] = True
    if resume:
        out["resumed"] = {"from": str(out_path), "clients": sorted(saved),
                          "skipped": ["local_training", "fedavg"], "note": "merged and evaluated from saved weights"}
    return out
