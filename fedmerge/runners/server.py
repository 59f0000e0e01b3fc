"""Framework-free server logic: θ₀, update checks, merging, FedAvg aggregation and the phase orchestration.

:class:`Federation` drives one run over a :class:`Transport` (send per-domain requests, get per-domain replies).
The Flower strategy (``server/strategy.py``) and the in-process engine are two transports over this one code path.
The server sees only weights, numeric metrics, domain names and the public catalogs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from tqdm.auto import tqdm

from fedmerge.data.domain import ItemCatalog
from fedmerge.errors import DataError, FedmergeError, NumericalError
from fedmerge.memory import release_freed_memory
from fedmerge.merging.mergerec_config import MergeRecConfig
from fedmerge.merging.local_parameters import (
    card_values,
    check_local_parameters,
    merged_behaviour_warnings,
    own_values,
    shared_values,
    with_values,
)
from fedmerge.merging.testtime import TESTTIME_METHOD
from fedmerge.metrics import USERS
from fedmerge.models import ModelFamily, StateDict
from fedmerge.models.base import STOP_MAX_SECONDS
from fedmerge.recommender import SAVED_INDIVIDUAL_PREFIX, card_path, model_path
from fedmerge.reproducibility import machine_dependent_thread_warnings, process_cpus, thread_count
from fedmerge.runners import protocol
from fedmerge.runners.aggregate import HELD_OUT_INDIVIDUAL_PREFIX
from fedmerge.scenario import Scenario

logger = logging.getLogger(__name__)
FINGERPRINT_KEY = "config_sha256"
SETTINGS_KEY = "training_settings"  # the fingerprinted settings themselves (JSON), to explain a mismatch on --resume
STALE_HINT = (  # why saved weights were refused on --resume, and what to do
    "a different data/encoder/model/privacy configuration or seed; resume with the original scenario and --set "
    "values, or run without --resume"
)
TRAIN_METRICS_KEY = "train_metrics"
FEW_TEST_USERS = 10  # a domain evaluated on fewer test users gets a warning (few_users_warnings)
TESTTIME_PREFIX = TESTTIME_METHOD + ":"  # saved-model name of the test-time merge for one held-out domain
# results.json name of training domain d's one-shot model evaluated on a held-out domain (which has no own model)
HELD_OUT_INDIVIDUAL = HELD_OUT_INDIVIDUAL_PREFIX + "{domain}"
# The config sections that determine what a client trains; a resumed run must match them exactly.
TRAINING_SECTIONS = ("data", "encoder", "model", "privacy", "theta0")

ReplyHandler = Callable[[str, RecordDict], None]
TrainMetrics = dict[str, float | str]  # a client's training metrics (numbers, and ``stop_reason``)


class Transport(Protocol):
    """Sends one request per domain and returns (replies, errors) keyed by domain name.

    ``on_reply(domain, content)``, when given, is called for each reply as soon as it arrives. ``refused``: nodes
    the transport turned away before any request (a Flower SuperNode claiming a domain it may not hold), recorded
    with the run's rejections; ``connect_seconds``: how long reaching the clients took (None: no connection step);
    ``node_of``: each domain's Flower node id (empty where clients are no nodes), recorded as the run's ``nodes``;
    ``warnings``: what the run's results must say about the transport (a late node's refused claim);
    ``undelivered``: the domains whose request of the last :meth:`send` never reached a client (no node holds the
    domain, the SuperLink refused the message), whose traffic is not counted.
    """

    refused: dict[str, str]
    connect_seconds: float | None
    node_of: dict[str, int]
    warnings: list[str]
    undelivered: set[str]

    def send(
        self, message_type: str, requests: Mapping[str, RecordDict], on_reply: ReplyHandler | None = None
    ) -> tuple[dict[str, RecordDict], dict[str, str]]: ...


def server_threads(cfg: Scenario) -> int:
    """Torch threads for server-side work: ``run.server_threads``, or the CPUs this process is given when 0
    (:func:`fedmerge.reproducibility.thread_count`).

    The default is 1: on a shared 2-core machine, 2 threads made MergeRec 15-30x slower under Flower's simulation
    engine (its polling threads and other processes preempt one OpenMP thread and the other spins); measured in
    benchmarks/flower_overhead.py. Use 0 on a dedicated multi-core server.
    """
    return thread_count(cfg.run.server_threads)


def training_settings(cfg: Scenario) -> dict[str, Any]:
    """The run seed and the :data:`TRAINING_SECTIONS` (minus the encoder cache folder): what a client's weights
    depend on."""
    table = cfg.to_mapping()
    sections = {name: table[name] for name in TRAINING_SECTIONS}
    sections["encoder"].pop("cache_dir", None)
    sections["seed"] = cfg.run.seed
    return json.loads(json.dumps(sections, sort_keys=True, default=str))


def _digest(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def fingerprint_metadata(cfg: Scenario) -> dict[str, str]:
    """What a saved weight file carries to be resumed: the fingerprint and the settings behind it."""
    settings = training_settings(cfg)
    return {FINGERPRINT_KEY: _digest(settings), SETTINGS_KEY: json.dumps(settings, sort_keys=True)}


def settings_mismatch(cfg: Scenario, metadata: Mapping[str, str], what: str) -> list[str]:
    """Check a saved weight file's settings against this scenario's before it is re-used (``--resume``).

    Equal fingerprints: nothing to say. Otherwise, when the file carries its settings, the difference is compared
    key by key: a key the saved run did not have and that this scenario leaves at its default (a setting added to
    fedmerge after the run, whose default keeps the earlier behaviour; one whose default does not counts as the
    value the run had, :func:`fedmerge.config.flatten_recorded`) is accepted and returned; any other difference
    raises a FedmergeError naming each key with both values. A file without its settings (saved before they were
    recorded) is refused when the fingerprints differ."""
    from fedmerge.config import flatten_recorded, flatten_settings, settings_differences

    current = training_settings(cfg)
    if metadata.get(FINGERPRINT_KEY) == _digest(current):
        return []
    if SETTINGS_KEY not in metadata:
        raise FedmergeError(f"{what}: trained with {STALE_HINT} (or by a fedmerge version with other settings; "
                            "the file does not record its settings)")
    try:
        recorded = json.loads(metadata[SETTINGS_KEY])
    except ValueError as exc:
        raise FedmergeError(f"{what}: unreadable '{SETTINGS_KEY}' metadata ({exc})") from None
    added, differing = settings_differences(recorded, current)
    if differing:  # the flat values only for the message: settings_differences already compared them
        saved, now = flatten_recorded(recorded), flatten_settings(current)
        details = "; ".join(f"{k}: saved {saved.get(k, '<absent>')!r}, now {now.get(k, '<absent>')!r}" for k in differing)
        raise FedmergeError(f"{what}: trained with {STALE_HINT}. Differences: {details}")
    return added


def initial_weights(cfg: Scenario) -> StateDict:
    """θ₀: the family's seeded initialization for the encoder's feature width (identical on every party); a family
    that reads the public catalogs for θ₀ (routed adapter) gets the training domains' item features. With
    ``theta0.pretrain`` it is then trained on pseudo-users of those public catalogs (:mod:`fedmerge.runners.pretrain`)."""
    return initial_weights_and_training(cfg)[0]


def initial_weights_and_training(cfg: Scenario) -> tuple[StateDict, TrainMetrics | None]:
    """(:func:`initial_weights`, the training metrics of θ₀'s pretraining or None without ``theta0.pretrain``): what
    the server records, e.g. a ``stop_reason`` that says the wall-clock cap cut it."""
    family, seed, pretrain = cfg.model.make_family(), cfg.run.seed, cfg.theta0.pretrain
    catalogs = ({d: cfg.load_catalog(d) for d in cfg.data.training_domains()}
                if family.init_reads_catalogs or pretrain else {})
    # the clients wait for θ₀, so the catalogs encode in parallel processes on the idle cores
    features = cfg.encoder.catalogs_features(list(catalogs.values()), family, workers=process_cpus())
    weights = family.initial_weights(cfg.encoder.feature_width(family), seed=seed,
                                     catalog_features=features if family.init_reads_catalogs else [])
    if pretrain:
        from fedmerge.runners.pretrain import pretrained_theta0

        weights, info = pretrained_theta0(family, weights, catalogs, features, cfg.theta0, seed)
        logger.info("θ₀ pretrained on the public catalogs %s: %s", sorted(catalogs), info)
        return weights, info
    return weights, None


def capped_shares(weights: Mapping[str, float], max_share: float) -> dict[str, float]:
    """Shares p_k ∝ w_k with every p_k ≤ ``max_share``: clients over the cap are fixed at it and the rest of the
    mass is re-split ∝ w among the others, until none is over (water-filling). Equal shares when
    ``max_share`` < 1/K (no feasible capped split). One client claiming 1e9 users then gets at most ``max_share``."""
    if max_share * len(weights) < 1:
        return {d: 1.0 / len(weights) for d in weights}
    capped: set[str] = set()
    while True:
        free = {d: w for d, w in sorted(weights.items()) if d not in capped}
        mass, total = 1.0 - max_share * len(capped), math.fsum(free.values())
        shares = {d: mass * w / total for d, w in free.items()}
        over = {d for d, p in shares.items() if p > max_share}
        if not over:
            return {**{d: max_share for d in capped}, **shares}
        capped |= over


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
    theta0: StateDict, replies: Mapping[str, StateDict], catalogs: Mapping[str, ItemCatalog], cfg: Scenario
) -> tuple[dict[str, StateDict], dict[str, Any]]:
    """Every configured merge of the clients' weights (training-free registry methods and MergeRec).

    Uses only the weights and the public catalogs. Returns (model name -> merged weights, report with per-method
    seconds and MergeRec's learned coefficients). A method whose computation diverges (NaN or infinite loss or
    weights) costs only itself: it is left out and its reason recorded in ``report["failed"]``.
    """
    from fedmerge.merging import MERGEREC_METHODS, METHODS, merge

    models = {d: replies[d] for d in sorted(replies)}
    merged: dict[str, StateDict] = {}
    report: dict[str, Any] = {"seconds": {}, "domains": list(models)}
    for method in cfg.merge.methods:
        if method == TESTTIME_METHOD:  # one merge per held-out catalog: see testtime_merges
            continue
        start = time.perf_counter()
        params = registry_params(cfg, method, list(models))
        try:
            if method in MERGEREC_METHODS:
                weights, report[method] = _mergerec(theta0, models, catalogs, cfg, MERGEREC_METHODS[method])
            else:
                try:
                    weights = merge(method, theta0, models, **params)
                except Exception as exc:
                    if METHODS[method].external:  # a plugin's kernel failing costs only its own merge
                        raise NumericalError(f"its kernel {METHODS[method].kernel!r} failed: "
                                             f"{type(exc).__name__}: {exc}") from exc
                    if isinstance(exc, ValueError):
                        raise FedmergeError(f"merge.methods: {method}: {exc}") from exc
                    raise
            not_finite = [name for name, tensor in weights.items() if not bool(torch.isfinite(tensor).all())]
            if not_finite:
                raise NumericalError(f"merged weights hold NaN or infinite values in {len(not_finite)} tensor(s), "
                                     f"e.g. {not_finite[:3]}")
        except NumericalError as exc:
            logger.warning("merge %s failed and is left out: %s", method, exc)
            report.setdefault("failed", {})[method] = str(exc)
            continue
        finally:
            report["seconds"][method] = round(time.perf_counter() - start, 3)
        merged[method] = weights
    return merged, report


def _mergerec(
    theta0: StateDict, models: Mapping[str, StateDict], catalogs: Mapping[str, ItemCatalog], cfg: Scenario,
    granularity: str,
) -> tuple[StateDict, dict[str, Any]]:
    """MergeRec with task- or layer-wise coefficients, learned on pseudo-users from the public catalogs.

    ``merge.mergerec`` keys are :class:`MergeRecConfig` fields (e.g. ``item_side="full"`` for the exact item side:
    every step then re-encodes all catalogs with gradient, 6-7 minutes per 500 steps on Amazon on a 2-core CPU
    instead of ~15 s for the default frozen candidates), or ``preset = "paper" | "fedmerge"``, whose constants the
    other keys override (:meth:`MergeRecConfig.from_keys`).
    """
    from dataclasses import asdict

    from fedmerge.merging.mergerec import mergerec

    family = cfg.model.make_family()
    features = {d: cfg.encoder.item_features(catalogs[d], family) for d in models}
    config = mergerec_config_for(cfg, granularity, models)
    try:
        merged, report = mergerec(family, theta0, dict(models), features, config)
    except ValueError as exc:
        raise FedmergeError(f"merge.mergerec: {exc}") from exc
    return merged, asdict(report)


def registry_params(cfg: Scenario, method: str, domains: list[str]) -> dict[str, Any]:
    """``merge.params.<method>`` as the run merges ``domains`` (by name) with it and records it on the merge's card:
    per-model ``weights``, given in ``data.domains``' order, in ``domains``' order
    (:func:`~fedmerge.merging.registry.weights_in_order`), and a registry method's seed (DARE's masks) the run's
    unless set."""
    from fedmerge.merging import METHODS
    from fedmerge.merging.registry import weights_in_order, with_default_seed

    params = weights_in_order(cfg.merge.params.get(method, {}), cfg.data.training_domains(), domains)
    return with_default_seed(method, params, cfg.run.seed) if method in METHODS else params


def listed_merges(cfg: Scenario) -> dict[str, tuple[str, Mapping[str, Any]]]:
    """Each merge ``merge.methods`` lists -> the registry method and ``merge.params`` it runs; a MergeRec (and the
    test-time one) -> its start's ``init_method`` and ``init_params`` (what
    :func:`~fedmerge.merging.local_parameters.merged_behaviour_warnings` reads)."""
    from fedmerge.merging import MERGEREC_METHODS

    out: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for method in cfg.merge.methods:
        if method in MERGEREC_METHODS or method == TESTTIME_METHOD:
            config = cfg.mergerec_config(MERGEREC_METHODS.get(method, cfg.merge.testtime.granularity))
            out[f"{method} (its {config.init_method} start)"] = (config.init_method, config.init_params)
        else:
            out[method] = (method, cfg.merge.params.get(method, {}))
    return out


def mergerec_config_for(cfg: Scenario, granularity: str, models: Mapping[str, StateDict]) -> MergeRecConfig:
    """:meth:`Scenario.mergerec_config` for merging ``models`` (by name): its start's per-model ``weights``, given in
    ``data.domains``' order, put in theirs (:func:`~fedmerge.merging.registry.weights_in_order`)."""
    from dataclasses import replace

    from fedmerge.merging.registry import weights_in_order

    config = cfg.mergerec_config(granularity)
    return replace(config, init_params=weights_in_order(config.init_params, cfg.data.training_domains(), list(models)))


def testtime_merges(
    theta0: StateDict, models: Mapping[str, StateDict], cfg: Scenario
) -> tuple[dict[str, StateDict], dict[str, Any]]:
    """``mergerec_testtime`` for each held-out domain (when configured): MergeRec coefficients learned on pseudo-users
    of that domain's public catalog (:func:`fedmerge.merging.testtime.mergerec_for_new_catalog`), with
    ``merge.mergerec``'s constants and ``merge.testtime``'s teacher, seen-domain pseudo-users and granularity.
    Returns (held-out domain -> merged weights, held-out domain -> report with its seconds)."""
    from dataclasses import asdict

    from fedmerge.merging.testtime import mergerec_for_new_catalog

    held_out = cfg.data.held_out_domains()
    if TESTTIME_METHOD not in cfg.merge.methods or not held_out:
        return {}, {}
    models = {d: models[d] for d in sorted(models)}  # as merge_replies: not the order the replies arrived in
    family, testtime = cfg.model.make_family(), cfg.merge.testtime
    seen = {d: cfg.encoder.item_features(cfg.load_catalog(d), family) for d in models} if testtime.include_seen else {}
    config = mergerec_config_for(cfg, testtime.granularity, models)
    merged, reports = {}, {}
    teacher = testtime.teacher
    if teacher != "theta0" and teacher not in models:  # its client was left out (rejected or silent)
        logger.warning("no %s: its teacher %s has no usable update", TESTTIME_METHOD, teacher)
        return {}, {h: {"skipped": f"teacher {teacher!r} has no usable update"} for h in held_out}
    for h in held_out:
        start = time.perf_counter()
        catalog = cfg.load_catalog(h)
        if len(catalog) < config.pseudo_user_length:  # known only now (a new catalog): costs only its own merge
            reason = (f"its catalog has {len(catalog)} items, fewer than merge.mergerec.pseudo_user_length = "
                      f"{config.pseudo_user_length}")
            logger.warning("%s for %s is left out: %s", TESTTIME_METHOD, h, reason)
            reports[h] = {"skipped": reason}
            continue
        try:
            merged[h], report = mergerec_for_new_catalog(
                family, theta0, dict(models), seen, h, cfg.encoder.item_features(catalog, family),
                config, teacher=testtime.teacher, include_seen=testtime.include_seen)
        except ValueError as exc:
            raise FedmergeError(f"merge.testtime ({h}): {exc}") from exc
        except NumericalError as exc:  # a diverged test-time merge costs only itself
            logger.warning("%s for %s failed and is left out: %s", TESTTIME_METHOD, h, exc)
            reports[h] = {"skipped": str(exc)}
            continue
        reports[h] = {**asdict(report), "seconds": round(time.perf_counter() - start, 3), **asdict(testtime)}
    return merged, reports


def average_metrics(per_domain: Mapping[str, Mapping[str, float]], domains: list[str]) -> dict[str, float]:
    """Unweighted mean over ``domains`` of every metric they all report (MergeRec averages domains equally)."""
    present = [per_domain[d] for d in domains if d in per_domain]
    if not present:
        return {}
    keys = set.intersection(*(set(m) for m in present)) - {"users"}
    return {k: float(np.mean([m[k] for m in present])) for k in sorted(keys)}


class Federation:
    """One run: one-shot training, update checks, merges, FedAvg rounds and evaluation, over a transport."""

    def __init__(self, cfg: Scenario, theta0: StateDict, out_dir: str | Path | None = None):
        """``out_dir``: where each accepted one-shot update is saved as it arrives (for ``--resume``).
        ``extra_models`` (empty here) holds shared models built outside the federation, evaluated beside the merges
        (the joint oracle)."""
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.theta0 = theta0
        self.family_name = cfg.model.family
        self.extra_models: dict[str, StateDict] = {}
        self.domains = cfg.data.domain_names()
        self.train_domains = cfg.data.training_domains()
        self.held_out = [d for d in self.domains if d not in self.train_domains]
        self.timings: dict[str, float] = {}
        self.bytes = {d: {"sent": 0, "received": 0} for d in self.domains}
        self.rejected: dict[str, str] = {}
        self.clipped: dict[str, str] = {}
        # a DP client keeps its user count (fedmerge.privacy.client.released_metrics): FedAvg then weights equally
        self.users_reported = not cfg.privacy.enabled or cfg.privacy.release_diagnostics
        self.errors: dict[str, str] = {}
        self.left_out: dict[str, list[tuple[str, str]]] = {}  # domain -> (phase, reason) it missed, see record_left_out
        self.models: dict[str, dict[str, dict[str, float]]] = {}
        self.fedavg_curve: list[dict[str, float]] = []
        self.merge_report: dict[str, Any] = {}
        self.train_metrics: dict[str, TrainMetrics] = {}
        self.fedavg_train_metrics: list[dict[str, TrainMetrics]] = []  # per FedAvg round, per domain
        self.server_train_metrics: dict[str, TrainMetrics] = {}  # θ₀'s pretraining, the joint oracle: this process's
        self.oneshot_bytes = 0
        self.saved_models: dict[str, Path] = {}  # model name -> weight file (with its card), see save_model
        self._public_features: dict[str, torch.Tensor] | None = None  # see public_features
        self._card: dict[str, Any] | None = None
        self.local_names = list(cfg.merge.local_parameters)  # fedmerge.merging.local_parameters
        check_local_parameters(self.local_names, theta0)
        from fedmerge.privacy.client import privacy_setting_warnings

        family = cfg.make_checked_family()
        self.setup_warnings = [
            *merged_behaviour_warnings(family.behaviour_parameters, self.local_names, theta0, listed_merges(cfg)),
            *privacy_setting_warnings(cfg),
            *machine_dependent_thread_warnings(cfg.run.torch_threads, cfg.run.server_threads),
            *([] if cfg.merge.methods else ["merge.methods is empty: no merge was built, only the baselines"]),
            *([f"one training domain ({self.train_domains[0]}): every merge is built from its one model and FedAvg "
               "trains that one client, so nothing is merged; list two or more domains in data.domains beside "
               "data.held_out"]
              if len(self.train_domains) == 1 else []),
        ]

    # ---- saved models -----------------------------------------------------------------------------------------
    def save_model(
        self, name: str, weights: StateDict, method: str, domains: list[str], params: Mapping[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None, **extra: Any,
    ) -> None:
        """Save an evaluated model as ``models/<name>.safetensors`` (atomically) with its model card, as soon as it
        is built (nothing without out_dir); :meth:`record_metrics` adds the metrics to the card after evaluation."""
        if self.out_dir is None:
            return
        from fedmerge.recommender import save_model

        path = model_path(self.out_dir, name)
        save_model(path, weights, self._model_card(name, method, domains, params, extra), metadata)
        self.saved_models[name] = path

    def save_individual(self, domain: str, weights: StateDict, path: Path) -> None:
        """The card of a client's one-shot weights, already saved at ``path`` (``clients/<domain>.json``)."""
        from fedmerge.recommender import write_card

        name = SAVED_INDIVIDUAL_PREFIX + domain
        write_card(path, weights, self._model_card(name, "individual", [domain], self.cfg.model.params, {}))
        self.saved_models[name] = path

    def _model_card(
        self, name: str, method: str, domains: list[str], params: Mapping[str, Any] | None, extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        from fedmerge.recommender import model_card, scenario_card
        from fedmerge.storage import weights_digest

        if self._card is None:
            self._card = scenario_card(self.cfg, weights_digest(self.theta0))
        return model_card(self._card, name, method, params, domains, **extra)

    def record_metrics(self) -> None:
        """Write each saved model's per-domain metrics (and the training-domain average) into its card."""
        from fedmerge.recommender import update_card

        for name, path in self.saved_models.items():
            if name.startswith(SAVED_INDIVIDUAL_PREFIX):
                domain = name[len(SAVED_INDIVIDUAL_PREFIX):]
                if domain in self.clipped:  # the evaluated model is the norm-clipped update, not the file's weights
                    update_card(path, clipped=self.clipped[domain], metrics={})
                    continue
                if domain in self.rejected:  # saved on arrival, then refused by the norm test: in no merge
                    update_card(path, rejected=self.rejected[domain], metrics={})
                    continue
                zero_shot = self.models.get(HELD_OUT_INDIVIDUAL.format(domain=domain), {})
                metrics = {domain: self.models.get("individual", {}).get(domain, {}),
                           **{h: zero_shot[h] for h in self.held_out if h in zero_shot}}
            elif name.startswith(TESTTIME_PREFIX):
                domain = name[len(TESTTIME_PREFIX):]
                metrics = {domain: self.models.get(TESTTIME_METHOD, {}).get(domain, {})}
            else:
                per_domain = self.models.get(name, {})
                metrics = {**{d: per_domain[d] for d in self.domains if d in per_domain},
                           "average": average_metrics(per_domain, self.train_domains)}
            update_card(path, metrics={d: m for d, m in metrics.items() if m})

    # ---- requests and replies -------------------------------------------------------------------------------
    def _exchange(
        self, transport: Transport, message_type: str, requests: dict[str, RecordDict], on_reply: ReplyHandler | None = None,
        label: str = "",
    ) -> dict[str, RecordDict]:
        """Send ``requests``, count bytes, record each client failure under ``errors["<label><type>:<domain>"]``
        (``label``: e.g. ``fedavg_round2:``, so a later round never overwrites an earlier phase's reason). The
        in-process engine's clients set the process's torch threads to ``run.torch_threads``: the server's work on
        their replies (checks, norms, merges, FedAvg) runs at :func:`server_threads`, as under Flower."""
        arrived: list[str] = []
        threads = server_threads(self.cfg)

        def progress(domain: str, content: RecordDict) -> None:  # one line per reply: many clients show progress
            arrived.append(domain)
            logger.info("%s: %d/%d replies (%s)", message_type, len(arrived), len(requests), domain)
            if on_reply is not None:
                torch.set_num_threads(threads)
                on_reply(domain, content)

        replies, errors = transport.send(message_type, requests, on_reply=progress)
        torch.set_num_threads(threads)
        for d, content in requests.items():  # what reached a client (a request no node took is no traffic)
            if d not in transport.undelivered:
                self.bytes[d]["received"] += protocol.record_bytes(content)
        for d, content in replies.items():
            self.bytes[d]["sent"] += protocol.record_bytes(content)
        for d, reason in errors.items():
            logger.error("client %s failed in %s%s: %s", d, label, message_type, reason)
            self.errors[f"{label}{message_type}:{d}"] = reason
        return replies

    def train_requests(self, weights: StateDict, phase: str, round_index: int) -> dict[str, RecordDict]:
        """One training request per training domain: the starting weights and (phase, round); in a FedAvg round
        whose local training distills towards θ₀ (``theta0_distill``), θ₀ too — the start is the round's model."""
        records = {protocol.GLOBAL: protocol.to_record(weights),
                   protocol.CONFIG: ConfigRecord({protocol.PHASE: phase, protocol.ROUND: round_index})}
        family = self.cfg.model.make_family(self.cfg.baselines.fedavg_local_params
                                            if phase == protocol.PHASE_FEDAVG else None)
        if not family.trains_on_public_catalogs:
            return {d: RecordDict(dict(records)) for d in self.train_domains}
        if phase == protocol.PHASE_FEDAVG:
            records[protocol.THETA0] = protocol.to_record(self.theta0)
        public = self.public_features(family)
        return {d: RecordDict({**records, protocol.PUBLIC_FEATURES: protocol.features_record(
                    {o: f for o, f in public.items() if o != d})}) for d in self.train_domains}

    def public_features(self, family: ModelFamily) -> dict[str, torch.Tensor]:
        """Every training domain's public catalog features (encoded once): a client that trains on the other
        catalogs gets them with its train request (:data:`~fedmerge.runners.protocol.PUBLIC_FEATURES`), since a data
        owner's machine holds its own domain only."""
        if self._public_features is None:
            self._public_features = {d: self.cfg.encoder.item_features(self.cfg.load_catalog(d), family)
                                     for d in self.train_domains}
        return self._public_features

    def accept_update(
        self, domain: str, content: RecordDict, label: str | None = None
    ) -> tuple[StateDict, TrainMetrics] | None:
        """The checked weights and finite training metrics of one reply, or None when rejected (logged and recorded
        under ``rejected[label]``, ``label`` defaulting to the domain).

        Beyond the format (:func:`~fedmerge.validation.check_update`): the family's fixed weights equal θ₀, no
        weight over ``federation.max_abs_value``, and a user count in (0, ``federation.max_num_users``] (optional
        from a DP client, which keeps it: ``users_reported``); other
        non-finite training metrics are dropped and recorded under ``rejected["train_metrics:<label>"]``.
        """
        from fedmerge.validation import UpdateRejected, check_payload, check_train_metrics

        label = label or domain
        federation = self.cfg.federation
        try:
            if protocol.WEIGHTS not in content.array_records:
                raise UpdateRejected("reply has no weights")
            record = content.array_records[protocol.WEIGHTS]
            check_payload(self.theta0, {name: len(array.data) for name, array in record.items()},
                          federation.max_update_slack)
            try:
                update = protocol.from_record(record)
            except Exception as exc:  # e.g. string arrays, bytes that are no array, an empty payload (EOFError)
                raise UpdateRejected("the weight arrays cannot be read as float tensors: "
                                     f"{type(exc).__name__}: {exc}") from None
            self.check_weights(update)
            metrics, dropped = check_train_metrics(dict(content.metric_records.get(protocol.TRAIN_METRICS, {})),
                                                   protocol.NUM_USERS, federation.max_num_users,
                                                   users_required=self.users_reported)
        except UpdateRejected as exc:
            logger.warning("rejected the update of %s: %s", label, exc.reason)
            self.rejected[label] = exc.reason
            return None
        if dropped:
            self.rejected[f"train_metrics:{label}"] = f"dropped non-finite or non-numeric training metrics {dropped}"
        return update, protocol.decoded_metrics(metrics)

    def check_weights(self, update: StateDict) -> None:
        """:class:`~fedmerge.validation.UpdateRejected` unless ``update`` is a well-formed model of this run
        (:func:`~fedmerge.validation.check_update`: names, shapes, dtypes, finite), its family's fixed weights
        equal θ₀, and no weight exceeds ``federation.max_abs_value``: what a reply and a saved client file must pass."""
        from fedmerge.validation import check_fixed, check_magnitude, check_update

        check_update(self.theta0, update)
        check_fixed(self.theta0, update, self.cfg.model.make_family().fixed_parameters(self.theta0))
        check_magnitude(update, self.cfg.federation.max_abs_value)

    def accept_saved(self, saved: Mapping[str, StateDict]) -> dict[str, StateDict]:
        """The saved client weights of an earlier run (``--resume``) that pass :meth:`check_weights`, each with a
        fresh card; a file that fails is left out and its reason recorded under ``rejected[domain]``."""
        from fedmerge.recommender import update_card
        from fedmerge.storage import client_weights_path
        from fedmerge.validation import UpdateRejected

        accepted: dict[str, StateDict] = {}
        for d, weights in saved.items():
            try:
                self.check_weights(weights)
            except UpdateRejected as exc:
                logger.warning("rejected the saved weights of %s: %s", d, exc.reason)
                self.rejected[d] = f"saved weights: {exc.reason}"
                self.train_metrics.pop(d, None)
                if self.out_dir is not None and card_path(client_weights_path(self.out_dir, d)).is_file():
                    update_card(client_weights_path(self.out_dir, d), rejected=self.rejected[d], metrics={})
                continue
            accepted[d] = weights
            if self.out_dir is not None:
                self.save_individual(d, weights, client_weights_path(self.out_dir, d))
        return accepted

    def screen_updates(self, updates: Mapping[str, StateDict], reference: StateDict, prefix: str = "") -> dict[str, StateDict]:
        """``updates`` after the task-vector norm test against the other clients' (τ_k = θ_k − ``reference``; see
        :func:`~fedmerge.validation.screen_norms`): over-norm updates are rejected or, with
        ``federation.norm_action = "clip"``, scaled to reference + s·τ_k and recorded under ``clipped``."""
        from fedmerge.validation import scale_task_vector, screen_norms, task_vector_norm

        federation = self.cfg.federation
        norms = {d: task_vector_norm(reference, u) for d, u in updates.items()}
        screen = screen_norms(norms, federation.norm_multiple, federation.norm_cap,
                              federation.norm_action)
        for d, reason in screen.rejected.items():
            logger.warning("rejected the update of %s%s: %s", prefix, d, reason)
            self.rejected[prefix + d] = reason
        for d, reason in screen.clipped.items():
            logger.warning("clipped the update of %s%s: %s", prefix, d, reason)
            self.clipped[prefix + d] = reason
        kept = {}
        for d, factor in screen.scale.items():
            kept[d] = updates[d] if factor == 1.0 else scale_task_vector(reference, updates[d], factor)
        self.require_enough(kept)
        return kept

    def require_enough(self, updates: Mapping[str, StateDict]) -> None:
        """FedmergeError unless at least ``federation.min_replies`` updates are usable; 0 (the default) means a
        strict majority of the K training clients, ⌊K/2⌋ + 1 (K = 1: 1, K = 2: 2, K = 3: 2), and
        ``min_replies = K`` needs every client."""
        configured = self.cfg.federation.min_replies
        needed = configured or len(self.train_domains) // 2 + 1
        if len(updates) < needed:
            rule = "" if configured else f" (0: a strict majority of the {len(self.train_domains)} training clients)"
            raise FedmergeError(
                f"only {len(updates)} usable updates ({sorted(updates)}) of {len(self.train_domains)} clients, "
                f"need {needed}: federation.min_replies = {configured}{rule}; rejected: {self.rejected}; "
                f"errors: {self.errors}"
            )

    def record_left_out(self, used: Mapping[str, StateDict], phase: str, prefix: str = "") -> None:
        """Note each training client whose update is not in ``used`` for ``phase``, with the reason recorded under
        ``rejected[prefix + domain]`` or ``errors["train:<domain>"]`` (for :meth:`left_out_warnings`)."""
        for d in self.train_domains:
            if d not in used:
                reason = (self.rejected.get(prefix + d) or self.errors.get(f"{prefix}{protocol.TRAIN}:{d}")
                          or "no usable update")
                self.left_out.setdefault(d, []).append((phase, reason))

    def partial_average_warnings(self) -> list[str]:
        """One line per model whose ``average`` covers only some training domains (a domain's metrics were left out
        or never came): that average is not comparable with the others'."""
        lines = []
        for name, per_domain in self.models.items():
            covered = [d for d in self.train_domains if d in per_domain]
            if 0 < len(covered) < len(self.train_domains):
                missing = [d for d in self.train_domains if d not in per_domain]
                lines.append(f"the average of {name} covers {covered} only (no metrics of {missing}): not comparable "
                             "with the averages over every training domain")
        for point in self.fedavg_curve:  # rounds before the last are no model of their own once FedAvg ends
            last = point["round"] == len(self.fedavg_curve) and "fedavg" in self.models
            if "domains" in point and f"fedavg_round{point['round']}" not in self.models and not last:
                lines.append(f"fedavg_curve's round {point['round']} averages {point['domains']} only: not comparable "
                             "with the rounds averaged over every training domain")
        return lines

    def missing_evaluations(self) -> dict[str, tuple[str, bool]]:
        """Each evaluation error (``errors`` key) -> (domain, whether that domain was left out of the training phase
        whose models it missed: the one-shot merges for ``evaluate:<d>``, FedAvg round r for
        ``fedavg_round<r>:evaluate:<d>``). A client gone for good misses both, which ``min_replies`` allows."""
        out = {}
        for key in sorted(self.errors):  # not the replies' arrival order
            label, sep, domain = key.rpartition(f"{protocol.EVALUATE}:")
            if not sep or label not in ("", *(f"fedavg_round{r}:" for r in range(1, len(self.fedavg_train_metrics) + 1))):
                continue
            phase = f"FedAvg round {label[len('fedavg_round'):-1]}" if label else "the one-shot merges"
            out[key] = (domain, any(p == phase for p, _ in self.left_out.get(domain, [])))
        return out

    def failed_evaluations(self) -> list[str]:
        """The evaluation errors that fail the run: every one but those of a client left out of that phase's
        training (:meth:`missing_evaluations`): its update is in none of the models it missed."""
        return [key for key, (_, excused) in self.missing_evaluations().items() if not excused]

    def few_users_warnings(self) -> list[str]:
        """One line per domain evaluated on fewer than :data:`FEW_TEST_USERS` test users (the count its client
        reports with the metrics): its figures are mostly sampling noise, and a training domain still weighs 1/K in
        every average."""
        lines = []
        for d in self.domains:
            users = next((int(m[d][USERS]) for m in self.models.values() if USERS in m.get(d, {})), None)
            if users is not None and 0 < users < FEW_TEST_USERS:
                share = f", and it weighs 1/{len(self.train_domains)} in every average" if d in self.train_domains else ""
                lines.append(f"domain {d}: {users} test users evaluated: a Recall@K there moves by up to "
                             f"±{0.98 / users ** 0.5:.2f} (95 %) from the sampling alone{share}")
        return lines

    def left_out_warnings(self) -> list[str]:
        """One line per training client the run went on without (fewer than every client is allowed by
        ``federation.min_replies``): the phases it missed and the first reason."""
        lines = [f"client {d} was left out of {', '.join(phase for phase, _ in missed)}: {missed[0][1]}"
                 for d, missed in self.left_out.items()]
        unevaluated: dict[str, str] = {}  # domain -> the first reason, for the evaluations that do not fail the run
        for key, (domain, excused) in self.missing_evaluations().items():
            if excused:
                unevaluated.setdefault(domain, self.errors[key])
        return lines + [f"client {d} sent no evaluation (left out of its training): {reason}"
                        for d, reason in unevaluated.items()]

    def accept_updates(
        self, replies: Mapping[str, RecordDict], reference: StateDict | None = None, round_index: int = 0
    ) -> tuple[dict[str, StateDict], dict[str, float], dict[str, TrainMetrics]]:
        """Checked, norm-screened weights (τ_k against ``reference``, default θ₀), FedAvg shares
        (:meth:`fedavg_shares`) and training metrics of the replies; a rejected update is logged, recorded under
        ``fedavg_round<r>:<domain>`` and left out."""
        prefix = f"fedavg_round{round_index}:" if round_index else ""
        updates, n_users, metrics = {}, {}, {}
        for d, content in replies.items():
            accepted = self.accept_update(d, content, label=prefix + d)
            if accepted is not None:
                updates[d], metrics[d] = accepted
                if protocol.NUM_USERS in accepted[1]:
                    n_users[d] = float(accepted[1][protocol.NUM_USERS])
        self.require_enough(updates)
        updates = self.screen_updates(updates, self.theta0 if reference is None else reference, prefix)
        return updates, self.fedavg_shares({d: n_users.get(d) for d in updates}), {d: metrics[d] for d in updates}

    def fedavg_shares(self, n_users: Mapping[str, float | None]) -> dict[str, float]:
        """FedAvg client weights: ``federation.fedavg_weighting`` "users" (the reported counts, each client's share
        capped at ``federation.fedavg_max_share`` by :func:`capped_shares`) or "equal"; equal too when a client
        reported no count (None: a DP client, see ``users_reported``)."""
        federation = self.cfg.federation
        counts = {d: n for d, n in n_users.items() if n is not None}
        if federation.fedavg_weighting == "equal" or len(counts) < len(n_users):
            return {d: 1.0 / len(n_users) for d in n_users}
        return capped_shares(counts, federation.fedavg_max_share)

    def aggregate_round(self, start: StateDict, updates: Mapping[str, StateDict], shares: Mapping[str, float]) -> StateDict:
        """One FedAvg round's new global weights: the share-weighted mean (``federation.fedavg_aggregation`` =
        "mean"), or a robust registry method (median, trimmed mean, clipped average) of the updates around
        ``start``; the family's fixed weights are kept exactly at θ₀. The mean sums in the domains' order, not the
        order the replies arrived in (Flower's varies), so a round's float result is the same on both engines."""
        from fedmerge.merging import merge

        rule = self.cfg.federation.fedavg_aggregation
        if rule == "mean":
            new = fedavg_aggregate({d: updates[d] for d in self.domains if d in updates}, shares)
        else:
            try:
                new = merge(rule, start, dict(sorted(updates.items())), **self.cfg.merge.params.get(rule, {}))
            except ValueError as exc:
                raise FedmergeError(f"federation.fedavg_aggregation: {rule}: {exc}") from exc
        new = {**new, **{n: self.theta0[n] for n in self.cfg.model.make_family().fixed_parameters(self.theta0)}}
        return with_values(new, shared_values(updates, self.local_names)) if self.local_names else new

    def local_values(self, updates: Mapping[str, StateDict]) -> dict[str, dict[str, torch.Tensor]]:
        """Each domain's own values of ``merge.local_parameters`` in its update (empty without local parameters), in
        the run's domain order: the merge report and the cards list them so, whatever order the replies came in."""
        if not self.local_names:
            return {}
        return own_values({d: updates[d] for d in self.domains if d in updates}, self.local_names)

    def served(self, weights: StateDict, domain: str, own: Mapping[str, Mapping[str, torch.Tensor]]) -> StateDict:
        """A shared model as ``domain`` evaluates it: with its own local parameters where it has them."""
        return with_values(weights, own[domain]) if domain in own else weights

    def collect_oneshot(self, transport: Transport) -> dict[str, StateDict]:
        """One-shot training from θ₀; each accepted update is checked and saved (atomically) as soon as it arrives."""
        from fedmerge.storage import save_client_weights

        individual: dict[str, StateDict] = {}
        fingerprint = fingerprint_metadata(self.cfg)

        def on_reply(domain: str, content: RecordDict) -> None:
            accepted = self.accept_update(domain, content)
            if accepted is None:
                return
            individual[domain], self.train_metrics[domain] = accepted
            if self.out_dir is not None:
                metadata = {**fingerprint, "family": self.family_name, "run": self.cfg.run.name,
                            TRAIN_METRICS_KEY: json.dumps(self.train_metrics[domain])}
                path = save_client_weights(self.out_dir, domain, individual[domain], metadata)
                self.save_individual(domain, individual[domain], path)

        requests = self.train_requests(self.theta0, protocol.PHASE_ONESHOT, 0)
        self._exchange(transport, protocol.TRAIN, requests, on_reply=on_reply)
        self.require_enough(individual)
        return individual

    def evaluate(self, transport: Transport, models_for: Mapping[str, Mapping[str, StateDict]], label: str = "") -> None:
        """Send each domain its models to evaluate and record the metrics under ``models.<name>.<domain>`` (a
        client's failure under ``errors["<label>evaluate:<domain>"]``)."""
        requests = {}
        for d, models in models_for.items():
            content = RecordDict({protocol.CONFIG: ConfigRecord({protocol.PHASE: protocol.PHASE_EVALUATE})})
            for name, weights in models.items():
                content[protocol.MODEL_PREFIX + name] = protocol.to_record(weights)
            requests[d] = content
        for models in models_for.values():
            for name in models:
                self.models.setdefault(name, {})
        for d, content in self._exchange(transport, protocol.EVALUATE, requests, label=label).items():
            self.accept_metrics(d, content, set(models_for[d]))

    def accept_metrics(self, domain: str, content: RecordDict, sent: set[str]) -> None:
        """Store one evaluate reply's metrics per model after :func:`~fedmerge.validation.check_eval_metrics`:
        only models the server sent, exactly the metric names of ``eval.ks``, values in [0, 1], consistent with each
        other (:func:`~fedmerge.validation.metric_consistency_problems`). Anything else is left out and recorded
        under ``rejected["evaluate:<domain>:<model>"]``."""
        from fedmerge.metrics import evaluation_metric_names
        from fedmerge.validation import check_eval_metrics

        expected = evaluation_metric_names([int(k) for k in self.cfg.eval.ks])
        reported = {key[len(protocol.METRICS_PREFIX):]: dict(record) for key, record in content.metric_records.items()
                    if key.startswith(protocol.METRICS_PREFIX)}
        failures = content.config_records.get(protocol.EVALUATION_FAILURES, {})
        problems = {name: ["metrics for a model the server did not send; ignored"] for name in set(reported) - sent}
        problems |= {name: [f"the client could not evaluate it: {str(failures[name])[:300]}" if name in failures
                            else "no metrics reported"] for name in sent - set(reported)}
        for name in sorted(sent & set(reported)):
            found = check_eval_metrics(reported[name], expected, USERS)
            if found:
                problems[name] = found
            else:
                self.models[name][domain] = reported[name]
        for name, found in sorted(problems.items()):
            logger.warning("left out %s's metrics of %s: %s", domain, name, "; ".join(found))
            self.rejected[f"{protocol.EVALUATE}:{domain}:{name}"] = "; ".join(found)

    # ---- the run ----------------------------------------------------------------------------------------------
    def run(self, transport: Transport, saved: Mapping[str, StateDict] | None = None) -> dict[str, Any]:
        """All phases; returns the results dict (see :mod:`fedmerge.runners.results`).

        ``saved``: the clients' one-shot weights of an earlier run (``--resume``): training is skipped (one-shot and
        FedAvg rounds); merging and evaluation run again.
        """
        baselines = self.cfg.baselines
        fedavg_rounds = 0 if saved is not None else int(baselines.fedavg_rounds)
        phases = tqdm(total=3 + fedavg_rounds, desc="federation", disable=not self.cfg.run.progress)
        try:  # the bar is closed on a failure too (a half-drawn bar stayed on the terminal)
            start = time.perf_counter()
            if saved is None:
                individual = self.collect_oneshot(transport)
                self.oneshot_bytes = self.total_bytes()
            else:
                individual = self.accept_saved(saved)
                self.require_enough(individual)
            individual = self.screen_updates(individual, self.theta0)
            self.record_left_out(individual, "the one-shot merges")
            self.timings["local_training"] = time.perf_counter() - start
            phases.update()

            start = time.perf_counter()
            catalogs = {d: self.cfg.load_catalog(d) for d in individual}
            merged, self.merge_report = merge_replies(self.theta0, individual, catalogs, self.cfg)
            release_freed_memory()  # MergeRec's teachers and pseudo-user batches, before evaluation and FedAvg
            self.timings["merging"] = time.perf_counter() - start
            own = self.local_values(individual)
            local_card = {"local_parameters": card_values(own)} if own else {}
            if own:  # a domain without its own values (held out, new) gets the clients' median, whatever the method
                common = shared_values(individual, self.local_names)
                merged = {method: with_values(weights, common) for method, weights in merged.items()}
                self.merge_report["local_parameters"] = {"names": self.local_names,
                                                         "shared": {n: v.tolist() for n, v in common.items()}, **local_card}
            for method, weights in merged.items():
                self.save_merged(method, weights, local_card)
            start = time.perf_counter()
            testtime, testtime_report = testtime_merges(self.theta0, individual, self.cfg)
            if testtime_report:
                self.merge_report[TESTTIME_METHOD] = testtime_report
                self.timings["testtime_merging"] = time.perf_counter() - start
            if own:
                testtime = {h: with_values(weights, common) for h, weights in testtime.items()}
            for h, weights in testtime.items():
                self.save_model(TESTTIME_PREFIX + h, weights, TESTTIME_METHOD, self.merge_report["domains"],
                                params=testtime_report[h]["config"], held_out_domain=h,
                                mergerec={"coefficients": testtime_report[h]["coefficients"]})
            phases.update()

            start = time.perf_counter()
            shared = {**merged, **self.extra_models}
            if baselines.theta0:
                shared["theta0"] = self.theta0
            models_for = {d: {**shared, **{m: self.served(w, d, own) for m, w in merged.items()}} for d in self.domains}
            for h, weights in testtime.items():
                models_for[h][TESTTIME_METHOD] = weights
            if baselines.individual:  # each held-out domain gets every training domain's model, zero-shot
                for d, weights in individual.items():
                    models_for[d]["individual"] = weights
                    for h in self.held_out:
                        models_for[h][HELD_OUT_INDIVIDUAL.format(domain=d)] = weights
            self.evaluate(transport, models_for)
            self.timings["evaluation"] = time.perf_counter() - start
            phases.update()

            start = time.perf_counter()
            global_weights = self.theta0
            fedavg_bytes = 0
            contributed: set[str] = set()  # clients whose update entered at least one round
            for r in range(1, fedavg_rounds + 1):
                before = self.total_bytes()
                requests = self.train_requests(global_weights, protocol.PHASE_FEDAVG, r)
                replies = self._exchange(transport, protocol.TRAIN, requests, label=f"fedavg_round{r}:")
                fedavg_bytes += self.total_bytes() - before  # FedAvg's own traffic: its training rounds only
                updates, shares, round_metrics = self.accept_updates(replies, reference=global_weights, round_index=r)
                self.record_left_out(updates, f"FedAvg round {r}", prefix=f"fedavg_round{r}:")
                self.fedavg_train_metrics.append(round_metrics)
                contributed.update(updates)
                global_weights = self.aggregate_round(global_weights, updates, shares)
                own = self.local_values(updates)
                self.evaluate(transport, {d: {f"fedavg_round{r}": self.served(global_weights, d, own)} for d in self.domains},
                              label=f"fedavg_round{r}:")
                round_metrics = self.models[f"fedavg_round{r}"]
                point = {"round": r, "bytes": fedavg_bytes, **average_metrics(round_metrics, self.train_domains)}
                covered = [d for d in self.train_domains if d in round_metrics]
                if len(covered) < len(self.train_domains):  # averaged over fewer domains than the other rounds
                    point["domains"] = covered
                self.fedavg_curve.append(point)
                phases.update()
            if self.fedavg_curve:
                self.save_model("fedavg", global_weights, "fedavg", [d for d in self.train_domains if d in contributed],
                                params=self.cfg.baselines.fedavg_local_params, rounds=len(self.fedavg_curve),
                                **({"local_parameters": card_values(own)} if own else {}))
                self.models["fedavg"] = self.models.pop(f"fedavg_round{len(self.fedavg_curve)}")
                for r in range(1, len(self.fedavg_curve)):
                    self.models.pop(f"fedavg_round{r}", None)
            self.timings["fedavg"] = time.perf_counter() - start
        finally:
            phases.close()
        self.record_metrics()
        return self.results()

    def total_bytes(self) -> int:
        """Bytes exchanged so far, all clients, both directions."""
        return sum(b["sent"] + b["received"] for b in self.bytes.values())

    def save_merged(self, method: str, weights: StateDict, card: Mapping[str, Any] | None = None) -> None:
        """Save one merge with its method parameters (MergeRec: its learned coefficients and configuration) and
        ``card``'s extra fields (each domain's local parameters)."""
        from fedmerge.merging import MERGEREC_METHODS, METHODS
        from fedmerge.merging.registry import recorded_params

        report = self.merge_report[method] if method in MERGEREC_METHODS else None  # a plugin may be named "seconds"
        extra = {} if report is None else {"mergerec": {
            "coefficients": report["coefficients"], "config": report["config"],
            "chosen_start": report.get("chosen_start")}}
        domains = self.merge_report["domains"]
        if extra:
            params = report["config"]
        elif method in METHODS:  # as merged: its weights beside the card's domains (in their order)
            params = recorded_params(method, registry_params(self.cfg, method, domains), n_models=len(domains))
        else:
            params = registry_params(self.cfg, method, domains)
        self.save_model(method, weights, method, domains, params=params, **extra, **(card or {}))

    def results(self) -> dict[str, Any]:
        """Per-model per-domain metrics with averages over the training domains, bytes, timings and diagnostics;
        every per-domain table in the domains' order and every diagnostic by key, not in the replies' arrival order
        (the same run writes the same results.json)."""
        models = {}
        for name, per_domain in self.models.items():
            models[name] = {**self.in_domain_order(per_domain), "average": average_metrics(per_domain, self.train_domains)}
        train_metrics = self.in_domain_order(self.train_metrics)
        fedavg_train_metrics = [self.in_domain_order(round_metrics) for round_metrics in self.fedavg_train_metrics]
        return {
            "status": "failed" if self.failed_evaluations() else "ok",
            "domains": self.domains,
            "held_out": list(self.cfg.data.held_out),
            "models": models,
            "fedavg_curve": self.fedavg_curve,
            "oneshot_bytes": self.oneshot_bytes,
            "bytes": self.bytes,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "train_metrics": train_metrics,
            "fedavg_train_metrics": fedavg_train_metrics,
            **({"server_train_metrics": self.server_train_metrics} if self.server_train_metrics else {}),
            "warnings": [*self.setup_warnings, *self.left_out_warnings(),
                         *(f"the update of {d} was clipped to the norm bound and used ({reason}); "
                           "federation.norm_action = 'clip' admits every update at that bound, the largest the "
                           "norm test lets through" for d, reason in sorted(self.clipped.items())),
                         *time_cap_warnings(train_metrics, fedavg_train_metrics, self.server_train_metrics),
                         *(f"merge {m} failed and was not evaluated: {reason}"
                           for m, reason in self.merge_report.get("failed", {}).items()),
                         *self.partial_average_warnings(), *self.few_users_warnings(),
                         *([] if self.users_reported or self.cfg.federation.fedavg_weighting == "equal"
                           or not self.fedavg_curve else
                           ["federation.fedavg_weighting = 'users', but DP clients send no user count (ε does not "
                            "cover it; privacy.release_diagnostics): FedAvg weighted the clients equally"]),
                         *(f"{TESTTIME_METHOD} for {h} skipped: {r['skipped']}"
                           for h, r in self.merge_report.get(TESTTIME_METHOD, {}).items() if "skipped" in r)],
            "merge_report": self.merge_report,
            "rejected": dict(sorted(self.rejected.items())),
            "clipped": dict(sorted(self.clipped.items())),
            "errors": dict(sorted(self.errors.items())),
        }

    def in_domain_order(self, per_domain: Mapping[str, Any]) -> dict[str, Any]:
        """``per_domain`` with its entries in the run's domain order."""
        return {d: per_domain[d] for d in self.domains if d in per_domain}


def _cut_point(metrics: Mapping[str, Any]) -> str:
    """Where the cap cut a training: " after N epoch(s)", or " in epoch N after s of S steps" when it cut the last
    epoch part-way (``last_epoch_steps`` < ``epoch_steps``); with max_epochs."""
    if "epochs" not in metrics:
        return ""
    epochs, done, total = int(metrics["epochs"]), metrics.get("last_epoch_steps", 0), metrics.get("epoch_steps", 0)
    where = f" in epoch {epochs} after {done} of {total} steps" if done < total else f" after {epochs} epoch(s)"
    return f"{where} (max_epochs {int(metrics.get('max_epochs', 0))})"


def time_cap_warnings(
    oneshot: Mapping[str, TrainMetrics], fedavg: list[dict[str, TrainMetrics]],
    server: Mapping[str, TrainMetrics] | None = None,
) -> list[str]:
    """One line per training that the wall-clock cap ``max_seconds`` cut (``stop_reason == "max_seconds"``): the
    clients' local trainings and the server's own (``server``: θ₀'s pretraining, which every model starts from, and
    the joint oracle); those models depend on the machine's speed and load, so the run is not reproducible
    elsewhere."""
    runs = [("local training", oneshot)] + [(f"FedAvg round {r} local training", m) for r, m in enumerate(fedavg, 1)]
    lines = [
        f"{phase} of {domain} was cut by max_seconds" + _cut_point(metrics)
        for phase, per_domain in runs for domain, metrics in per_domain.items()
        if metrics.get("stop_reason") == STOP_MAX_SECONDS
    ]
    lines += [f"{SERVER_TRAININGS.get(name, name)} was cut by max_seconds" + _cut_point(metrics)
              for name, metrics in (server or {}).items() if metrics.get("stop_reason") == STOP_MAX_SECONDS]
    return [f"{line}: its model depends on this machine's speed and load" for line in lines]


SERVER_TRAININGS = {"theta0_pretraining": "θ₀'s pretraining on the public catalogs (every model starts from it)",
                    "joint": "the joint oracle's training"}


def load_saved_run(cfg: Scenario, out_dir: str | Path) -> tuple[StateDict | None, dict[str, StateDict], dict[str, TrainMetrics]]:
    """θ₀ (None if it was not saved), the clients' saved one-shot weights and their training metrics.

    Every weight file must carry this scenario's training fingerprint (:func:`fingerprint_metadata`) and name one of
    its training domains, so merges are never computed from weights trained under another configuration.
    """
    from fedmerge.storage import client_metadata, load_client_weights

    out_dir = Path(out_dir)
    saved = load_client_weights(out_dir)
    metadata = client_metadata(out_dir)
    unknown = sorted(set(saved) - set(cfg.data.training_domains()))
    if unknown:
        raise FedmergeError(f"saved weights of {unknown} under {out_dir} are not training domains of this scenario "
                            f"({cfg.data.training_domains()})")
    added = sorted({key for d in sorted(saved)
                    for key in settings_mismatch(cfg, metadata[d], f"saved weights of {d!r} under {out_dir}")})
    if added:
        logger.warning("resuming %s: settings added since its run, at their defaults: %s", out_dir, added)
    metrics = {}
    for d in saved:
        try:
            metrics[d] = {k: v if isinstance(v, str) else float(v)
                          for k, v in json.loads(metadata[d].get(TRAIN_METRICS_KEY, "{}")).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise FedmergeError(f"saved weights of {d!r} under {out_dir}: unreadable '{TRAIN_METRICS_KEY}' "
                                f"metadata ({exc}); run without --resume") from None
    theta0_path = model_path(out_dir, "theta0")
    return (load_fingerprinted(theta0_path, cfg) if theta0_path.is_file() else None), saved, metrics


def load_fingerprinted(path: Path, cfg: Scenario) -> StateDict:
    """Weights a run saved under this scenario's training settings (:func:`settings_mismatch`); FedmergeError when
    it was another configuration."""
    from fedmerge.storage import load_weights, read_metadata

    settings_mismatch(cfg, read_metadata(path), str(path))
    return load_weights(path)


def card_training(training: TrainMetrics | None) -> dict[str, Any]:
    """The ``training`` field of a server-trained model's card (none without metrics); a NaN or infinite metric
    written as null, as results.json writes it (a card is strict JSON: it failed the run)."""
    from fedmerge.runners.results import without_non_finite

    return {} if training is None else {"training": without_non_finite(training)[0]}


def saved_training(out_dir: Path, name: str) -> TrainMetrics | None:
    """The training metrics (``training``) on the card of the server's own model ``name`` (θ₀'s pretraining, the
    joint oracle) an earlier run saved in ``out_dir``; None without them (no card, or none trained)."""
    from fedmerge.recommender import read_card

    path = model_path(out_dir, name)
    if not card_path(path).is_file():
        return None
    try:
        training = read_card(path).get("training")
    except DataError as exc:  # the card is written again below; the resumed run only lacks these metrics
        logger.warning("%s: its training metrics are not read (%s)", name, exc)
        return None
    return dict(training) if isinstance(training, Mapping) else None


def check_training_catalogs(cfg: Scenario) -> None:
    """FedmergeError when a training domain's public catalog has fewer items than a MergeRec pseudo-user needs
    (``merge.mergerec.pseudo_user_length`` distinct items): the merge failed the whole run after every client had
    trained. Only merges that read the training catalogs count (the in-run MergeRec merges, the test-time merge
    with ``include_seen``); a held-out catalog that is too small costs only its own test-time merge."""
    from fedmerge.merging.mergerec_config import MERGEREC_METHODS

    methods = cfg.merge.methods
    if not (any(m in MERGEREC_METHODS for m in methods)
            or (TESTTIME_METHOD in methods and cfg.data.held_out_domains() and cfg.merge.testtime.include_seen)):
        return
    length = cfg.mergerec_config("task").pseudo_user_length
    for domain in cfg.data.training_domains():
        n_items = len(cfg.load_catalog(domain))
        if n_items < length:
            raise FedmergeError(f"merge.mergerec.pseudo_user_length = {length} exceeds the {n_items} items of "
                                f"training domain {domain!r}'s catalog: each MergeRec pseudo-user is that many "
                                "distinct items of one catalog; lower it")


def run_federation(
    cfg: Scenario, transport: Transport, out_dir: str | Path | None = None, resume: bool = False
) -> dict[str, Any]:
    """θ₀, the optional joint oracle, then the federation phases over ``transport`` (shared by both engines).

    With ``out_dir``, θ₀, the joint oracle and every accepted one-shot client update are saved there. ``resume``
    reloads them instead of training (see :func:`load_saved_run`) and re-runs merging and evaluation only.
    """
    from fedmerge.runners.baselines import joint_oracle

    if resume and out_dir is None:
        raise FedmergeError("resume needs the output folder of the earlier run")
    check_training_catalogs(cfg)  # before θ₀ and every client train
    torch.set_num_threads(server_threads(cfg))
    out_path = Path(out_dir) if out_dir is not None else None
    fingerprint = fingerprint_metadata(cfg)
    start = time.perf_counter()
    saved, train_metrics = None, {}
    if resume:
        from fedmerge.runners.results import archive_results

        theta0, saved, train_metrics = load_saved_run(cfg, out_path)
        archive_results(out_path)  # once the saved run is accepted: a refused --resume leaves results.json alone
        if theta0 is None:
            logger.warning("no %s: regenerating θ₀ from the seed", model_path(out_path, "theta0"))
            theta0, pretraining = initial_weights_and_training(cfg)
        else:  # its pretraining's metrics (a cut by max_seconds) are on its card
            pretraining = saved_training(out_path, "theta0")
    else:
        theta0, pretraining = initial_weights_and_training(cfg)
    federation = Federation(cfg, theta0, out_dir=out_path)
    if pretraining is not None:
        federation.server_train_metrics["theta0_pretraining"] = pretraining
    # θ₀'s card names the run's local parameters, so that `fedmerge merge` of its clients builds the run's merges
    local_names = {"local_parameter_names": list(cfg.merge.local_parameters)} if cfg.merge.local_parameters else {}
    federation.save_model("theta0", theta0, "theta0", [], metadata=fingerprint, **local_names,
                          **card_training(pretraining))
    setup = time.perf_counter() - start
    federation.train_metrics.update(train_metrics)
    joint_seconds = joint_encoding = 0.0
    try:
        if cfg.baselines.joint:
            start = time.perf_counter()
            joint_path = model_path(out_path, "joint") if out_path is not None else None
            if resume and joint_path.is_file():
                joint, training = load_fingerprinted(joint_path, cfg), saved_training(out_path, "joint")
            else:
                joint, joint_encoding, training = joint_oracle(cfg, theta0)
            if training is not None:
                federation.server_train_metrics["joint"] = training
            federation.extra_models["joint"] = joint
            federation.save_model("joint", joint, "joint", cfg.data.training_domains(),
                                  metadata=fingerprint,
                                  non_private="trained on the pooled private data of every training domain",
                                  **card_training(training))
            joint_seconds = time.perf_counter() - start - joint_encoding
        out = federation.run(transport, saved=saved)
    except Exception as exc:  # a failure after partial work: keep what was measured, record why, status failed
        logger.exception("the run failed")
        try:  # the models saved before the failure keep the metrics measured for them
            federation.record_metrics()
        except Exception:  # noqa: BLE001 - the results below matter more than the cards
            logger.exception("could not write the metrics into the saved model cards")
        out = federation.results()
        out["status"] = "failed"
        out["errors"]["run"] = f"{type(exc).__name__}: {exc}"
    out["timings_s"] = {"setup": round(setup, 3), "joint_encoding": round(joint_encoding, 3),
                        "joint_training": round(joint_seconds, 3), **out["timings_s"]}
    if "joint" in out["models"]:
        out["models"]["joint"]["non_private"] = True
    if resume:
        out["resumed"] = {"from": str(out_path), "clients": sorted(d for d in saved if d not in federation.rejected),
                          "refused": sorted(d for d in saved if d in federation.rejected),
                          "skipped": ["local_training", *(["fedavg"] if cfg.baselines.fedavg_rounds else [])],
                          "note": "merged and evaluated from the saved weights of `clients` (`refused`: saved weights "
                                  "the update checks refused, see `rejected`)"}
        if cfg.baselines.fedavg_rounds:
            out["warnings"].append(
                f"--resume skips FedAvg (its rounds retrain the clients): baselines.fedavg_rounds = "
                f"{cfg.baselines.fedavg_rounds} was not run; a models/fedavg.* there, like the archived "
                "results.<time>.json, is the earlier run's")
    return out


def run_and_record(
    cfg: Scenario, transport: Transport, out_dir: str | Path | None = None, *, resume: bool = False, engine: str,
    started: float | None = None,
) -> dict[str, Any]:
    """:func:`run_federation`, then what every engine records: the transport's refused nodes and connection time,
    the total time (from ``started``, a :func:`time.perf_counter` value; default now), the run's identity and
    versions (:func:`fedmerge.runners.results.finalize`); written to ``out_dir`` (results.json, CSV, plots) when
    given, also for a run that fails once the federation has started (a failure before it — the start-up checks, θ₀
    and its pretraining — raises: nothing was measured yet). The one path of the in-process engine and the Flower
    ServerApp."""
    from fedmerge.runners import results as results_io

    start = time.perf_counter() if started is None else started
    out = run_federation(cfg, transport, out_dir=out_dir, resume=resume)
    out["rejected"].update(transport.refused)
    out["warnings"].extend(transport.warnings)
    out["nodes"] = dict(transport.node_of)
    if transport.connect_seconds is not None:
        out["timings_s"]["connect"] = round(transport.connect_seconds, 3)
    out["timings_s"]["total"] = round(time.perf_counter() - start, 3)
    out = results_io.finalize(out, cfg, engine=engine)
    if out_dir is not None:
        results_io.write_results(out, out_dir, cfg.eval.primary)
    return out
