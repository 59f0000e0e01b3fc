"""Framework-free client logic: load the client's own domain, train from the received weights, evaluate models.

A client knows only its own domain. :meth:`ClientState.handle` maps a request :class:`~flwr.app.RecordDict` to a
reply RecordDict; the Flower ClientApp and the in-process engine both call it, so they run one code path.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from fedmerge.data.domain import Domain
from fedmerge.errors import FedmergeError
from fedmerge.memory import release_freed_memory
from fedmerge.metrics import evaluate_batches, evaluation_batches
from fedmerge.models import ModelFamily, StateDict
from fedmerge.reproducibility import thread_count
from fedmerge.runners import protocol
from fedmerge.scenario import Scenario

logger = logging.getLogger(__name__)


def load_client_domain(cfg: Scenario, partition_id: int | None = None, data_path: str | None = None) -> Domain:
    """The one domain this client holds: from ``data_path`` (deployment) or the scenario's ``partition_id``-th domain."""
    if data_path:
        from fedmerge.data import load_domain

        return load_domain(data_path)
    names = cfg.data.domain_names()
    if partition_id is None or not 0 <= int(partition_id) < len(names):
        raise FedmergeError(f"partition id {partition_id} out of range: the scenario has {len(names)} domains {names}")
    return cfg.load_domain(names[int(partition_id)])


def domain_position(cfg: Scenario, domain_name: str) -> int:
    """The domain's index in the scenario's domain list (a domain not in it comes after all of them)."""
    names = cfg.data.domain_names()
    return names.index(domain_name) if domain_name in names else len(names)


def client_seed(cfg: Scenario, domain_name: str, round_index: int) -> int:
    """Seed of one client in one round: the run seed + 1000·round + domain position."""
    return cfg.run.seed + 1000 * round_index + domain_position(cfg, domain_name)


NOISE_STREAM_TAG = 0x6E6F697365  # "noise": keeps the noise seeds' hash apart from any other use of the same numbers


def noise_seed(cfg: Scenario, domain_name: str, round_index: int) -> int | None:
    """Seed of a client's DP noise: None (OS entropy) unless ``privacy.noise_seed`` ≥ 0 asks for reproducible noise.

    Never derived from the public run seed: a server that can regenerate the noise can subtract it. A 62-bit hash
    (numpy's ``SeedSequence``) of (``privacy.noise_seed``, round, domain position), not ``noise_seed`` + 1000·round +
    position: with ``privacy.noise_seed`` = the run seed (a study's seed 0) that sum was the client's own training
    seed and, one up (DP-SGD's noise generator), the next client's user-sampling seed, so noise and sampling drew
    from the same torch streams. Studies run before this change reproduce from their recorded commits.
    """
    base = cfg.privacy.noise_seed
    if base < 0:
        return None
    position = domain_position(cfg, domain_name)
    state = np.random.SeedSequence([NOISE_STREAM_TAG, base, round_index, position]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(2))


GRAM_NOISE_SEED = "gram_noise_seed"  # a client's memory: the seed of its one noisy Gram (privacy.gram_noise = "once")
GRAM_INPUTS = "gram_inputs"  # ... and a digest of what that Gram was computed from (gram_inputs_digest)
ClientMemory = MutableMapping[str, int | str]  # what a client keeps between its releases; never sent


def released_key(round_index: int) -> str:
    """The :data:`ClientMemory` key saying a DP client released round ``round_index``."""
    return f"released-round-{round_index}"


def gram_inputs_digest(cfg: Scenario, domain: Domain, features: torch.Tensor) -> str:
    """Short sha256 of what a client's noisy Gram is computed from besides the noise: its users' interactions (all of
    them, test targets too), the item features — by what makes them (the catalog's texts, the encoder and its
    settings, the features' shape), since a process that encodes the catalog again may differ in the last bit —,
    the profile bound B and the noise multiplier."""
    import hashlib

    from fedmerge.privacy.client import run_noise_multiplier

    digest = hashlib.sha256()
    for part in (domain.interactions_digest(), *domain.catalog.texts(), cfg.encoder.name,
                 json.dumps(cfg.encoder.params, sort_keys=True, default=str), repr(tuple(features.shape)),
                 repr(float(cfg.privacy.user_norm_bound)), repr(float(run_noise_multiplier(cfg)))):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def release_noise_seed(
    cfg: Scenario, domain: Domain, features: torch.Tensor, round_index: int, memory: ClientMemory
) -> int | None:
    """Seed of the DP noise of a client's release ``round_index``: :func:`noise_seed`, except for a noisy Gram drawn
    once (:func:`fedmerge.privacy.client.gram_drawn_once`), whose every release uses one seed so that it reuses the
    same Â: round 0's :func:`noise_seed` when the noise is seeded, else 62 bits of OS entropy drawn at the first
    release and kept in the client's ``memory``. Refused: a later release whose memory lost the seed (a fresh draw
    would be a second Gaussian release that the run's ε does not count), and a release whose Gram inputs
    (:func:`gram_inputs_digest`) differ from the first release's (the same noise on another Gram would reveal the
    difference of the two exactly). A first-release message that arrives again finds the seed and reuses it."""
    from fedmerge.privacy.client import gram_drawn_once

    if not gram_drawn_once(cfg):
        return noise_seed(cfg, domain.name, round_index)
    inputs = gram_inputs_digest(cfg, domain, features)
    if memory.setdefault(GRAM_INPUTS, inputs) != inputs:
        raise FedmergeError(
            f"{domain.name}: release {round_index} would add the noise of the client's first release to a Gram of "
            "other users, item features, profile bound or noise multiplier (privacy.gram_noise = 'once'): the "
            "difference of the two releases would be exact. Keep the client's data and settings fixed for a run")
    if cfg.privacy.noise_seed >= 0:
        return noise_seed(cfg, domain.name, 0)
    if GRAM_NOISE_SEED not in memory:
        if round_index > 0:
            raise FedmergeError(
                f"{domain.name}: release {round_index} finds no noisy-Gram seed in the client's memory (the node's "
                "Flower context.state was lost, e.g. the SuperNode restarted, or the node joined after the first "
                "release); a new draw would be a second release that the run's ε does not count "
                "(privacy.gram_noise = 'once'), so this client sits out the run's later releases. Start a new run, "
                "or use privacy.gram_noise = 'per_release' (ε composed over every release)")
        from fedmerge.privacy.dp import noise_generator_seed

        memory[GRAM_NOISE_SEED] = noise_generator_seed(None)
    return int(memory[GRAM_NOISE_SEED])


def public_catalog_features(cfg: Scenario, own: str) -> list[torch.Tensor]:
    """Item features of every training domain's public catalog but ``own``'s, as the server encodes them for θ₀
    (catalog text only: no other domain's interactions, no held-out catalog)."""
    family = cfg.model.make_family()
    return [cfg.encoder.item_features(cfg.load_catalog(d), family) for d in cfg.data.training_domains() if d != own]


class UpdateMemo:
    """Updates trained in this process without DP, by everything that determines them: the family and its settings,
    θ₀, the domain's interactions, the item features (and public catalog features), the training seed.

    Domain-level DP clips and noises the client's non-private update after training (post-processing), so the cells
    of a privacy study that differ only in ε, or in having DP at all, can share one training per client and seed;
    with epoch or step budgets the shared update is the one each cell would train. Active inside
    :func:`reusing_updates` only (the privacy study); everywhere else every request trains. It holds every update
    until the block ends: (clients + attack models) × seeds state dicts, a few MB each for the adapter recipes.
    """

    def __init__(self) -> None:
        self.updates: dict[tuple[str, ...], tuple[StateDict, dict[str, Any]]] = {}
        self.trained = 0
        self.reused = 0

    @staticmethod
    def key(family: ModelFamily, theta0: StateDict, domain: Domain, features: torch.Tensor, seed: int,
            public_features: list[torch.Tensor] | None, distill_teacher: StateDict | None = None) -> tuple[str, ...]:
        import json

        from fedmerge.storage import weights_digest

        public = () if public_features is None else tuple(weights_digest({"f": f}) for f in public_features)
        teacher = () if distill_teacher is None else ("teacher:" + weights_digest(distill_teacher),)
        return (family.name, json.dumps(family.config(), sort_keys=True, default=str), weights_digest(theta0),
                domain.interactions_digest(), weights_digest({"f": features}), str(seed), *public, *teacher)


_update_memo: UpdateMemo | None = None


@contextmanager
def reusing_updates() -> Iterator[UpdateMemo]:
    """Inside the block, :func:`nonprivate_update` trains each distinct update once (:class:`UpdateMemo`)."""
    global _update_memo
    previous, _update_memo = _update_memo, UpdateMemo()
    try:
        yield _update_memo
    finally:
        _update_memo = previous


def nonprivate_update(
    family: ModelFamily, theta0: StateDict, domain: Domain, features: torch.Tensor, *, seed: int,
    progress: bool = False, public_features: list[torch.Tensor] | None = None,
    distill_teacher: StateDict | None = None,
) -> tuple[StateDict, dict[str, Any]]:
    """``family.train`` on the domain (before any DP), or inside :func:`reusing_updates` the update already trained
    for the same inputs (a new dict of the same tensors, which nothing downstream modifies in place)."""
    public: dict[str, Any] = {} if public_features is None else {"public_features": public_features}
    if distill_teacher is not None:
        public["distill_teacher"] = distill_teacher
    memo = _update_memo
    if memo is None:
        return family.train(theta0, domain, features, seed=seed, progress=progress, **public)
    key = memo.key(family, theta0, domain, features, seed, public_features, distill_teacher)
    if key in memo.updates:
        memo.reused += 1
        logger.info("%s: non-private update of training seed %d already trained in this process, reused",
                    domain.name, seed)
    else:
        memo.updates[key] = family.train(theta0, domain, features, seed=seed, progress=progress, **public)
        memo.trained += 1
    weights, metrics = memo.updates[key]
    return dict(weights), dict(metrics)


def client_train(
    domain: Domain, theta0: StateDict, cfg: Scenario, round_index: int = 0,
    extra_params: Mapping[str, Any] | None = None, features: torch.Tensor | None = None,
    public_features: list[torch.Tensor] | None = None, memory: ClientMemory | None = None,
    distill_teacher: StateDict | None = None,
) -> tuple[StateDict, dict[str, Any]]:
    """Train from ``theta0`` on the domain; under ``privacy.enabled`` through
    :func:`fedmerge.privacy.client.private_train` (the one DP call site: domain- or user-level). A family that
    :attr:`~fedmerge.models.base.ModelFamily.trains_on_public_catalogs` also gets the other training domains' public
    catalogs (``public_features``, else :func:`public_catalog_features`) and, in a FedAvg round (``round_index``
    > 0, training from the round's model), the run's θ₀ it distills towards (``distill_teacher``, required there).
    ``memory``: what the client keeps between its releases and never sends (:func:`release_noise_seed`); None for a
    client that ships one release."""
    torch.set_num_threads(thread_count(cfg.run.torch_threads))
    family = cfg.model.make_family(extra_params)
    if features is None:
        features = cfg.encoder.item_features(domain.catalog, family)
    public: dict[str, Any] = {}
    if family.trains_on_public_catalogs:
        public["public_features"] = (public_catalog_features(cfg, domain.name) if public_features is None
                                     else public_features)
        if round_index > 0 and distill_teacher is None:  # the round's model is no θ₀: it distilled towards that
            raise FedmergeError(f"FedAvg round {round_index}: local training distills towards θ₀, which the train "
                                f"request did not carry ({protocol.THETA0!r})")
        if distill_teacher is not None:
            public["distill_teacher"] = distill_teacher
    seed = client_seed(cfg, domain.name, round_index)
    if cfg.privacy.enabled:
        from fedmerge.privacy.client import private_train

        weights, metrics = private_train(family, theta0, domain, features, cfg, seed=seed, round_index=round_index,
                                         noise_seed=release_noise_seed(cfg, domain, features, round_index,
                                                                       {} if memory is None else memory),
                                         progress=cfg.run.progress)
        # the family's fixed weights are θ₀'s, independent of the data: sent exactly (the server checks them)
        weights.update({name: theta0[name] for name in family.fixed_parameters(theta0)})
    else:
        weights, metrics = nonprivate_update(family, theta0, domain, features, seed=seed, progress=cfg.run.progress,
                                             **public)
    metrics = {**metrics, protocol.NUM_USERS: domain.n_users}
    if cfg.privacy.enabled:
        from fedmerge.privacy.client import released_metrics

        released = released_metrics(metrics, cfg.privacy)
        kept = {k: v for k, v in metrics.items() if k not in released}
        if kept:
            logger.info("%s: training metrics kept on the client (not covered by ε): %s", domain.name, kept)
        metrics = released
    return weights, metrics


def client_evaluate(
    domain: Domain, models: Mapping[str, StateDict], cfg: Scenario, features: torch.Tensor | None = None,
    failures: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of each model on the domain's private ``eval.split`` users (:func:`fedmerge.metrics.evaluate_batches`).

    The users' batches (truncated inputs, targets, masks) are prepared once for all models; each model then costs its
    scorer (item representations, once per model) and one forward per batch. One scorer is alive at a time.
    ``failures``: when given, a model that cannot be evaluated (e.g. its scores hold NaN) is left out and its reason
    stored there, so one bad model does not cost the others' metrics; otherwise the error propagates.
    """
    torch.set_num_threads(thread_count(cfg.run.torch_threads))
    family = cfg.model.make_family()
    if features is None:
        features = cfg.encoder.item_features(domain.catalog, family)
    ks = tuple(int(k) for k in cfg.eval.ks)
    batches = evaluation_batches(domain, cfg.eval.split, max_len=family.max_len)
    results = {}
    for name, weights in models.items():
        try:
            results[name] = evaluate_batches(family.scorer(weights, features), batches, domain.n_items, ks=ks)
        except (ValueError, RuntimeError, FloatingPointError) as exc:
            if failures is None:
                raise
            logger.warning("%s: model %s could not be evaluated: %s", domain.name, name, exc)
            failures[name] = f"{type(exc).__name__}: {exc}"
    return results


def client_error_reason(label: str, exc: BaseException) -> str:
    """The error reply of a client whose handling of a message raised ``exc`` (both engines send the same)."""
    return f"client {label}: {type(exc).__name__}: {exc}"


class ClientState:
    """A client's domain and item features, loaded once per process and reused across messages."""

    def __init__(self, cfg: Scenario, partition_id: int | None = None, data_path: str | None = None) -> None:
        self.cfg = cfg
        self.domain = load_client_domain(cfg, partition_id, data_path)
        self.deployed = data_path is not None  # a data owner's node (not one process simulating every domain)
        self._features: torch.Tensor | None = None
        # kept between this client's releases, never sent (client_train's memory); the Flower ClientApp loads it
        # from and stores it in the node's context.state around each message
        self.memory: ClientMemory = {}

    @property
    def features(self) -> torch.Tensor:
        if self._features is None:
            self._features = self.cfg.encoder.item_features(self.domain.catalog, self.cfg.model.make_family())
        return self._features

    def public_features(self, content: RecordDict, family: ModelFamily) -> list[torch.Tensor] | None:
        """The other training domains' public catalog features the train request carries
        (:data:`~fedmerge.runners.protocol.PUBLIC_FEATURES`) when ``family`` trains on them, else None. They come
        from the server: a data owner's machine holds its own domain only, not the scenario's data root."""
        if not family.trains_on_public_catalogs:
            return None
        if protocol.PUBLIC_FEATURES not in content.array_records:
            raise FedmergeError("train request without the other training domains' public catalog features "
                                f"({protocol.PUBLIC_FEATURES!r}), which this family's local training needs "
                                "(model.params.theta0_distill)")
        record = content.array_records[protocol.PUBLIC_FEATURES]
        return [torch.from_numpy(np.array(array.numpy(), copy=True)) for array in record.values()]

    def handle(self, message_type: str, content: RecordDict) -> RecordDict:
        """Reply to one request (query / train / evaluate); the reply holds only weights, metrics and the domain name.
        The memory the request freed goes back to the OS (:func:`fedmerge.memory.release_freed_memory`): the process
        serves further requests, often other clients' (a simulation actor), and would keep its training peak."""
        try:
            return self._reply(message_type, content)
        finally:
            release_freed_memory()

    def train_round(self, content: RecordDict, config: ConfigRecord) -> tuple[int, bool]:
        """(round, whether a FedAvg round) of a train request; FedmergeError for a malformed one (no weights, a
        phase other than one-shot / FedAvg, a round that does not fit it) and, under DP, for a release ε does not
        cover: a round past the run's ``1 + baselines.fedavg_rounds`` releases or one this client released
        already (a second noisy copy of a round would average its noise away, and ε counted it once)."""
        from fedmerge.checks import is_integer

        if protocol.GLOBAL not in content.array_records:
            raise FedmergeError(f"train request without its {protocol.GLOBAL!r} weights record")
        phase, round_index = config.get(protocol.PHASE), config.get(protocol.ROUND)
        if phase not in (protocol.PHASE_ONESHOT, protocol.PHASE_FEDAVG):
            raise FedmergeError(f"train request of phase {phase!r}; valid: "
                                f"{[protocol.PHASE_ONESHOT, protocol.PHASE_FEDAVG]}")
        fedavg = phase == protocol.PHASE_FEDAVG
        if not is_integer(round_index) or round_index < 0 or (round_index > 0) != fedavg:
            raise FedmergeError(f"train request of phase {phase!r} with round {round_index!r}: the one-shot round is "
                                "0, FedAvg rounds are 1, 2, ...")
        if self.deployed:
            self.cfg.privacy.check_deployable()
        if self.cfg.privacy.enabled:
            from fedmerge.privacy.client import releases_per_client

            allowed = releases_per_client(self.cfg)
            if round_index >= allowed:
                raise FedmergeError(f"round {round_index} refused: ε covers this client's {allowed} releases (rounds "
                                    f"0 to {allowed - 1})")
            if released_key(round_index) in self.memory:
                raise FedmergeError(f"round {round_index} refused: this client released it already, and ε counts "
                                    "each round once")
        return int(round_index), fedavg

    def _reply(self, message_type: str, content: RecordDict) -> RecordDict:
        info = protocol.info_record(self.domain.name)
        if message_type == protocol.QUERY:
            return RecordDict({protocol.INFO: info})
        config = content.config_records.get(protocol.CONFIG, ConfigRecord())
        if message_type == protocol.TRAIN:
            round_index, fedavg = self.train_round(content, config)
            theta = protocol.from_record(content.array_records[protocol.GLOBAL])
            local = self.cfg.baselines.fedavg_local_params if fedavg else None
            teacher = (protocol.from_record(content.array_records[protocol.THETA0])
                       if fedavg and protocol.THETA0 in content.array_records else None)
            start = time.perf_counter()
            weights, metrics = client_train(
                self.domain, theta, self.cfg, round_index, extra_params=local, features=self.features,
                public_features=self.public_features(content, self.cfg.model.make_family(local)), memory=self.memory,
                distill_teacher=teacher,
            )
            if self.cfg.privacy.enabled:
                self.memory[released_key(round_index)] = 1
            logger.info("%s: %s %d trained in %.0f s", self.domain.name, "FedAvg round" if fedavg else "round", round_index,
                        time.perf_counter() - start)
            return RecordDict(
                {protocol.WEIGHTS: protocol.to_record(weights), protocol.TRAIN_METRICS: protocol.numeric_metrics(metrics),
                 protocol.INFO: info}
            )
        if message_type == protocol.EVALUATE:
            models = {
                key[len(protocol.MODEL_PREFIX):]: protocol.from_record(rec)
                for key, rec in content.array_records.items() if key.startswith(protocol.MODEL_PREFIX)
            }
            failures: dict[str, str] = {}
            results = client_evaluate(self.domain, models, self.cfg, features=self.features, failures=failures)
            reply = RecordDict({protocol.INFO: info})
            for name, metrics in results.items():
                reply[protocol.METRICS_PREFIX + name] = protocol.numeric_metrics(metrics)
            if failures:
                reply[protocol.EVALUATION_FAILURES] = ConfigRecord(failures)
            return reply
        raise FedmergeError(f"unknown message type {message_type!r}; valid: {[protocol.QUERY, protocol.TRAIN, protocol.EVALUATE]}")
