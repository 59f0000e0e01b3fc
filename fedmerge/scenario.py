"""The typed scenario: one frozen :class:`Scenario` per run, built once from TOML + ``--set`` overrides, and what it
names, resolved: its domains and their data, the public catalogs, the model family, the text encoder and the
family's item features.

:meth:`Scenario.from_mapping` is the one constructor: it lays a two-level table over
:data:`fedmerge.config.DEFAULTS` (unknown keys and wrong types fail there, naming the key), builds the typed sections
and runs every check that needs no training (:func:`fedmerge.config.validate`), so a bad value fails before any
client starts. :meth:`Scenario.to_mapping` gives the resolved table back (results.json's ``config``, the TOML that
a `flwr run` receives): ``Scenario.from_mapping(s.to_mapping()) == s``.

Both sides use the helpers: the server reads only public parts (catalogs, family, encoder, θ₀'s feature width), a
client loads its own domain. Kept apart from :mod:`fedmerge.runners.client` so that server-side code never imports
client modules. Light at import (torch and the data stack load on first use), as :mod:`fedmerge.config` is.
"""

from __future__ import annotations

import copy
import json
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmerge.errors import DataError, FedmergeError

if TYPE_CHECKING:
    import torch

    from fedmerge.data.domain import Domain, ItemCatalog
    from fedmerge.merging import MergeRecConfig
    from fedmerge.models import ModelFamily
    from fedmerge.text.encoder import TextEncoder


@dataclass(frozen=True)
class RunSettings:
    """``[run]``: name, seed (``seeds``: one run per seed), torch threads of a client and of the server, progress
    bars."""

    name: str
    seed: int
    seeds: tuple[int, ...]
    torch_threads: int
    server_threads: int
    progress: bool


@dataclass(frozen=True)
class SyntheticSizes:
    """``[data.synthetic]``: the seeded generator's sizes (:func:`fedmerge.data.synthetic.make_synthetic_domains`)."""

    n_domains: int
    n_users: int
    n_items: int
    n_topics: int
    min_len: int
    max_len: int


@dataclass(frozen=True)
class DataSettings:
    """``[data]``: the source of the domains, their names and which are held out (evaluated zero-shot only)."""

    source: str
    root: str
    domains: tuple[str, ...]
    held_out: tuple[str, ...]
    synthetic: SyntheticSizes

    def domain_names(self) -> list[str]:
        """All domains of the run in partition order (synthetic domains are named ``synth-<i>``)."""
        if self.source == "synthetic":
            from fedmerge.data.synthetic import synthetic_domain_name

            generated = [synthetic_domain_name(i) for i in range(self.synthetic.n_domains)]
            if self.domains:
                unknown = [d for d in self.domains if d not in generated]
                if unknown:
                    raise FedmergeError(f"data.domains names unknown synthetic domain(s) {unknown}; valid: {generated} "
                                        "(data.source is \"synthetic\"; for domain folders of your own set "
                                        "data.source = \"generic\" and data.root)")
                return list(self.domains)
            return generated
        return list(self.domains)

    def training_domains(self) -> list[str]:
        """Domains whose clients train and are merged (all but ``held_out``), in partition order."""
        return [d for d in self.domain_names() if d not in self.held_out]

    def held_out_domains(self) -> list[str]:
        """The held-out domains in partition order."""
        return [d for d in self.domain_names() if d in self.held_out]

    def root_path(self) -> Path:
        """``root``, else $FEDMERGE_AMAZON_DIR, else ``data/amazon`` (relative to the working folder)."""
        from fedmerge.data.amazon import default_amazon_root

        return Path(self.root).expanduser() if self.root else default_amazon_root()

    def file_digests(self) -> dict[str, str]:
        """Each domain's :func:`~fedmerge.data.domain_files_digest` (empty for generated synthetic domains, which the
        seed and settings fix)."""
        if self.source == "synthetic":
            return {}
        from fedmerge.data import domain_files_digest

        return {name: domain_files_digest(self.domain_path(name)) for name in self.domain_names()}

    def domain_path(self, name: str, advice: str = "") -> Path:
        """Where domain ``name`` lives under the data root: ``<name>/`` folder or ``<name>.tar.gz``; a DataError
        ending with ``advice`` (default: how this data source gets its data) when neither exists."""
        from fedmerge.data.amazon import AMAZON_ROOT_ENV

        root = self.root_path()
        for candidate in (root / name, root / f"{name}.tar.gz"):
            if candidate.exists():
                return candidate
        where = f"domain {name!r} not found under {root.resolve()} (looked for {name}/ and {name}.tar.gz)"
        if advice:
            raise DataError(f"{where}: {advice}")
        if self.source == "generic":
            from fedmerge.data.generic import INTERACTIONS_FILE, ITEMS_FILE

            raise DataError(f"{where}: each domain is a folder {name}/ with {INTERACTIONS_FILE} and {ITEMS_FILE} "
                            "under data.root (--set data.root=DIR)")
        from fedmerge.data.download import AMAZON_SHA256

        present = sorted({p.name.removesuffix(".tar.gz") for p in root.glob("*")} & set(AMAZON_SHA256)) \
            if root.is_dir() else []
        if name not in AMAZON_SHA256:
            raise DataError(f"{where}: {name!r} is not one of the Amazon domains {list(AMAZON_SHA256)}"
                            + (f" (present there: {present})" if present else ""))
        domains = ",".join(d for d in self.domain_names() if d in AMAZON_SHA256)
        raise DataError(
            f"{where}. Get the data with `fedmerge data download amazon --domains {domains} --dest {root}`, or point "
            f"data.root (--set data.root=DIR) or ${AMAZON_ROOT_ENV} at a folder that has it"
        )


@dataclass(frozen=True)
class EncoderSettings:
    """``[encoder]``: the item-text encoder (``name`` with ``params``) and the embedding cache folder."""

    name: str
    params: dict[str, Any]
    cache_dir: str

    def text_encoder(self) -> TextEncoder:
        """The encoder, one instance per process."""
        return _encoder(self.name, json.dumps(self.params, sort_keys=True, default=str))  # a Path param as its text

    def feature_width(self, family: ModelFamily) -> int:
        """Width of ``family``'s item features under this encoder; reads the encoder's files, encodes nothing (θ₀ of
        most families needs only this, so the server does not encode a whole catalog before the clients can start;
        a family whose ``init_reads_catalogs`` is the exception)."""
        return family.feature_width(int(self.text_encoder().dim))

    def item_features(self, catalog: ItemCatalog, family: ModelFamily) -> torch.Tensor:
        """``family``'s input features for a catalog, from (cached) text embeddings."""
        from fedmerge.text import EmbeddingCache, encode_catalog

        encoder = self.text_encoder()
        cache = EmbeddingCache(self.cache_dir) if self.cache_dir else None
        return family.catalog_features(catalog, lambda: encode_catalog(encoder, catalog, cache=cache))

    def catalogs_features(
        self, catalogs: Sequence[ItemCatalog], family: ModelFamily, workers: int = 1
    ) -> list[torch.Tensor]:
        """:meth:`item_features` of several catalogs; with ``workers`` > 1 the embeddings they miss are first encoded
        in that many parallel processes, one catalog each (:func:`fedmerge.text.cache.warm_cache`): the same
        features, sooner on idle cores."""
        if workers > 1 and family.reads_text_embeddings:
            from fedmerge.text.cache import EmbeddingCache, warm_cache

            warm_cache(self.name, self.params, EmbeddingCache(self.cache_dir or None), [c.texts() for c in catalogs],
                       workers)
        return [self.item_features(catalog, family) for catalog in catalogs]


@dataclass(frozen=True)
class ModelSettings:
    """``[model]``: the mergeable family and its parameters (checked by the family)."""

    family: str
    params: dict[str, Any]

    def make_family(self, extra_params: Mapping[str, Any] | None = None) -> ModelFamily:
        """The family, with ``extra_params`` laid over ``params``."""
        from fedmerge.models import get_family

        return get_family(self.family, **{**self.params, **(extra_params or {})})


@dataclass(frozen=True)
class TesttimeSettings:
    """``[merge.testtime]``: ``mergerec_testtime``'s teacher, whether the seen domains' pseudo-users stay in the
    objective, and the coefficient granularity."""

    teacher: str
    include_seen: bool
    granularity: str


@dataclass(frozen=True)
class MergeSettings:
    """``[merge]``: the merges to build, the training-free methods' parameters, MergeRec's keys and test-time merge."""

    methods: tuple[str, ...]
    params: dict[str, dict[str, Any]]
    mergerec: dict[str, Any]
    testtime: TesttimeSettings
    local_parameters: tuple[str, ...]

    def lists_mergerec(self) -> bool:
        """Whether ``methods`` hold a MergeRec merge (task-, layer- or tensor-wise, or the test-time one): each
        learns coefficients on the family's module, starting from ``mergerec.init_method``."""
        from fedmerge.merging.mergerec_config import MERGEREC_METHODS
        from fedmerge.merging.testtime import TESTTIME_METHOD

        return any(m in MERGEREC_METHODS or m == TESTTIME_METHOD for m in self.methods)


@dataclass(frozen=True)
class Theta0Settings:
    """``[theta0]``: θ₀ pretrained on pseudo-users of the public catalogs (:mod:`fedmerge.runners.pretrain`)."""

    pretrain: bool
    group_by: str
    length: int
    per_item: int


@dataclass(frozen=True)
class EvalSettings:
    """``[eval]``: cut-offs K, the users' target split and the metric of the summaries."""

    ks: tuple[int, ...]
    split: str
    primary: str


@dataclass(frozen=True)
class BaselineSettings:
    """``[baselines]``: which reference models are evaluated, FedAvg's rounds and its local training parameters."""

    individual: bool
    theta0: bool
    joint: bool
    fedavg_rounds: int
    fedavg_local_params: dict[str, Any]


@dataclass(frozen=True)
class FederationSettings:
    """``[federation]``: time-outs, the replies a phase needs and the defences against hostile updates (README)."""

    timeout_s: float
    startup_timeout_s: float
    min_replies: int
    max_update_slack: float
    max_abs_value: float
    norm_multiple: float
    norm_cap: float
    norm_action: str
    max_num_users: float
    fedavg_weighting: str
    fedavg_max_share: float
    fedavg_aggregation: str
    parallel_clients: int


@dataclass(frozen=True)
class PrivacySettings:
    """``[privacy]``: client-side differential privacy (:mod:`fedmerge.privacy.client`)."""

    enabled: bool
    unit: str
    clip_norm: float
    noise_multiplier: float
    target_epsilon: float
    delta: float
    max_grad_norm: float
    sample_rate: float
    epochs: float
    fedavg_epochs: float
    accountant: str
    user_norm_bound: float
    gram_repair: str
    gram_noise: str
    noise_seed: int
    secure_mode: bool
    release_diagnostics: bool

    def check_deployable(self) -> None:
        """FedmergeError when a data owner's node must refuse these settings: DP noise drawn from a seed the
        scenario fixes (``noise_seed`` ≥ 0), which whoever knows the scenario, the server too, can subtract."""
        if self.enabled and self.noise_seed >= 0:
            raise FedmergeError(f"privacy.noise_seed = {self.noise_seed}: a deployed node refuses DP noise drawn from a "
                                "seed the scenario fixes (whoever knows it, the server too, can subtract the noise); "
                                "deploy with privacy.noise_seed = -1")


@dataclass(frozen=True)
class Scenario:
    """One resolved, validated scenario; sections in :data:`fedmerge.config.DEFAULTS` order. Build it with
    :meth:`from_mapping` (or :func:`fedmerge.config.load_scenario`); change it with
    :func:`fedmerge.config.apply_overrides`, which validates again."""

    run: RunSettings
    data: DataSettings
    encoder: EncoderSettings
    model: ModelSettings
    merge: MergeSettings
    theta0: Theta0Settings
    eval: EvalSettings
    baselines: BaselineSettings
    federation: FederationSettings
    privacy: PrivacySettings

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], source: str = "scenario") -> Scenario:
        """The scenario of a two-level table ``{section: {key: value}}`` laid over the defaults: FedmergeError naming
        ``source`` and the key for an unknown key or a wrong type, naming the key and its valid values for a value
        the checks of :func:`fedmerge.config.validate` refuse."""
        from fedmerge.config import lay_over_defaults, validate

        table = lay_over_defaults(raw, source)
        scenario = _typed(cls, table)
        validate(scenario)
        return scenario

    def to_mapping(self) -> dict[str, Any]:
        """The resolved two-level table (lists for sequences; a deep copy, safe to change)."""
        return _table(self)

    def with_changes(self, **sections: Mapping[str, Any]) -> Scenario:
        """This scenario with the keys of each ``section={key: value, ...}`` changed, built and checked again as
        :meth:`from_mapping` builds a scenario (a change the checks refuse raises FedmergeError naming it); the
        programmatic form of :func:`fedmerge.config.apply_overrides`. A nested table changes key by key and keeps
        the scenario's other keys (``model={"params": {"hidden": 8}}`` changes the width only), except that another
        ``model.family`` (``encoder.name``) starts from empty ``params`` plus the ones given; to replace a whole
        table, ``apply_overrides(scenario, ['model.params={hidden = 8}'])``."""
        table = self.to_mapping()
        for section, changes in sections.items():
            if not isinstance(changes, Mapping):
                raise FedmergeError(f"with_changes({section}={changes!r}): give a table of the section's keys, e.g. "
                                    f"{section}={{key: value}}")
            current = table.setdefault(section, {})
            owner = {"model": "family", "encoder": "name"}.get(section)
            if owner in changes and changes[owner] != current.get(owner):
                current["params"] = {}  # another family or encoder starts from its own parameters
            _merge_into(current, changes)
        return Scenario.from_mapping(table, source="changed scenario")

    def make_checked_family(self) -> ModelFamily:
        """The run's model family, with the checks that need it, run when a run starts (the server's, and the Flower
        launcher's short-lived process) so they fail before any client trains (FedmergeError naming the key): with
        FedAvg rounds, the family of their local parameters is built too (a misspelt or mistyped
        ``baselines.fedavg_local_params`` key failed in the first round after the merges); ``merge.local_parameters``
        must name weights of the family's model; with a MergeRec merge,
        the family's module must run MergeRec's ``item_side`` (it failed the whole run at the merge)."""
        family = self.model.make_family()
        if self.baselines.fedavg_rounds and self.baselines.fedavg_local_params:
            self.model.make_family(self.baselines.fedavg_local_params)
        if self.merge.local_parameters:  # names that are no weight of θ₀'s model failed at the server's start
            from fedmerge.merging.local_parameters import check_local_parameters

            module = family.build(self.encoder.feature_width(family))
            check_local_parameters(list(self.merge.local_parameters), module.state_dict())
        if self.merge.lists_mergerec():
            from fedmerge.merging.mergerec import check_item_side

            config = self.mergerec_config("task")
            try:
                check_item_side(family.build(self.encoder.feature_width(family)), family.name, config.item_side)
            except ValueError as exc:
                raise FedmergeError(f"merge.mergerec: {exc}") from exc
            if config.pseudo_user_length > family.max_len:  # failed at the merge, after every client trained
                raise FedmergeError(f"merge.mergerec.pseudo_user_length = {config.pseudo_user_length} exceeds the "
                                    f"{family.max_len} items the {family.name!r} model reads (model.params.max_len)")
        return family

    def mergerec_config(self, granularity: str) -> MergeRecConfig:
        """MergeRec's configuration at ``granularity``: ``merge.mergerec`` with the run's seed and progress setting;
        FedmergeError naming ``merge.mergerec`` for a key or value it refuses."""
        from fedmerge.merging import MergeRecConfig

        try:
            return MergeRecConfig.from_keys({"seed": self.run.seed, "progress": self.run.progress,
                                             **self.merge.mergerec, "granularity": granularity})
        except (ValueError, TypeError) as exc:
            raise FedmergeError(f"merge.mergerec: {exc}") from exc

    def load_domain(self, name: str) -> Domain:
        """Domain ``name`` of the data source (synthetic domains: generated from ``run.seed``)."""
        source = self.data.source
        if source == "synthetic":
            return _synthetic_domains(self.run.seed, self.data.synthetic)[name]
        from fedmerge.data import detect_format, load_domain

        path = self.data.domain_path(name)
        if source == "amazon":
            from fedmerge.data.amazon import load_amazon_domain

            if path.is_dir() and detect_format(path) == "generic":
                raise DataError(f"{path}: a generic-format domain (interactions.csv + items.jsonl) while data.source "
                                "is \"amazon\"; set data.source = \"generic\"")
            return load_amazon_domain(path, name=name)
        return load_domain(path, name)

    def load_catalog(self, name: str) -> ItemCatalog:
        """The public catalog of domain ``name`` (what the server may read)."""
        if self.data.source == "synthetic":  # the generator is seeded; only the catalog is used
            return _synthetic_domains(self.run.seed, self.data.synthetic)[name].catalog
        from fedmerge.data import load_catalog as load_public_catalog

        return load_public_catalog(self.data.domain_path(name))


def _typed(cls: type, table: Mapping[str, Any]) -> Any:
    """``cls`` built from ``table`` (its keys are ``cls``'s fields): nested sections recursively, lists as tuples
    where the field is a tuple, free tables deep-copied."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        value, hint = table[f.name], hints[f.name]
        if is_dataclass(hint):
            value = _typed(hint, value)
        elif typing.get_origin(hint) is tuple:
            value = tuple(value)
        else:
            value = copy.deepcopy(value)
        values[f.name] = value
    return cls(**values)


def _table(section: Any) -> dict[str, Any]:
    """The inverse of :func:`_typed`: the section's fields as a table, tuples as lists."""
    out: dict[str, Any] = {}
    for f in fields(section):
        value = getattr(section, f.name)
        if is_dataclass(value):
            value = _table(value)
        elif isinstance(value, tuple):
            value = list(value)
        else:
            value = copy.deepcopy(value)
        out[f.name] = value
    return out


@lru_cache(maxsize=2)
def _synthetic_domains(seed: int, sizes: SyntheticSizes) -> dict[str, Domain]:
    """The seeded synthetic domains, generated once per process (callers only read them)."""
    from dataclasses import asdict

    from fedmerge.data.synthetic import make_synthetic_domains

    return {d.name: d for d in make_synthetic_domains(seed=seed, **asdict(sizes))}


@lru_cache(maxsize=4)
def _encoder(name: str, params_json: str) -> TextEncoder:
    """The encoder ``name`` with the parameters ``params_json`` encodes (JSON: a list-valued parameter such as the
    hashing encoder's ``ngram_sizes`` is a valid cache key too)."""
    from fedmerge.text import get_encoder

    return get_encoder(name, **json.loads(params_json))


def _merge_into(table: dict[str, Any], changes: Mapping[str, Any]) -> None:
    """``changes`` written into ``table``, nested tables key by key (a value that is not a table replaces)."""
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(table.get(key), dict):
            _merge_into(table[key], value)
        else:
            table[key] = copy.deepcopy(value)
