"""Scenarios: TOML files describing one federated run, plus ``--set key=value`` overrides and validation.

A scenario is a two-level table ``{section: {key: value}}`` laid over :data:`DEFAULTS`. Keys listed in
:data:`FREE_TABLES` hold free-form tables (model/encoder/merge parameters handed to other modules, which check
them); every other key must be one of the defaults, so a typo fails with the list of valid keys. The resolved table
becomes a typed :class:`fedmerge.scenario.Scenario` (:meth:`~fedmerge.scenario.Scenario.from_mapping`, which runs
:func:`validate`); :func:`load_scenario` and :func:`apply_overrides` return one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmerge.checks import MAX_CUTOFF, TYPE_WORDS, is_finite_number, is_integer, is_number, too_large_cutoffs
from fedmerge.data.synthetic import SYNTHETIC_SIZES, check_synthetic_sizes
from fedmerge.errors import FedmergeError
from fedmerge.paths import REPO_ROOT

if TYPE_CHECKING:
    from fedmerge.merging import MergeRecConfig
    from fedmerge.scenario import FederationSettings, Scenario

logger = logging.getLogger(__name__)
DEFAULT_SCENARIO = "quickstart"
SCENARIO_DIR = REPO_ROOT / "scenarios"

DEFAULTS: dict[str, dict[str, Any]] = {
    "run": {"name": "unnamed", "seed": 0, "seeds": [], "torch_threads": 1, "server_threads": 1, "progress": True},
    "data": {
        "source": "synthetic",
        "root": "",
        "domains": [],
        "held_out": [],
        "synthetic": dict(SYNTHETIC_SIZES),
    },
    # "minilm": the packaged MiniLM-L6; "hashing": character n-grams, no language model (fast; the unit tests use it)
    "encoder": {"name": "minilm", "params": {}, "cache_dir": ""},
    "model": {"family": "sequential", "params": {}},
    "merge": {
        "methods": ["average", "task_arithmetic", "ties", "dare", "mergerec_taskwise", "mergerec_layerwise"],
        "params": {},
        "mergerec": {},
        # method "mergerec_testtime" (held-out domains only): teacher of the new catalog's pseudo-users ("theta0" or
        # a training domain), whether the seen domains' pseudo-users stay in the objective, coefficient granularity
        "testtime": {"teacher": "theta0", "include_seen": True, "granularity": "layer"},
        # weights each training domain keeps its own value of when it serves a shared model (their median for other
        # domains), e.g. ["last_item_bias"]: fedmerge/merging/local_parameters.py
        "local_parameters": [],
    },
    # θ₀ pretrained on pseudo-users of the training domains' public catalogs (fedmerge/runners/pretrain.py)
    "theta0": {"pretrain": False, "group_by": "brand", "length": 5, "per_item": 1},
    "eval": {"ks": [5, 10, 20, 50], "split": "test", "primary": "recall@10"},
    "baselines": {
        "individual": True,
        "theta0": True,
        "joint": True,
        "fedavg_rounds": 3,
        "fedavg_local_params": {},
    },
    # timeout_s: the wait for replies to one request; startup_timeout_s: the wait for the SuperNodes to connect and
    # their ClientApps to load their domain (under `deploy local` also for the SuperLink and SuperNode processes)
    "federation": {
        # min_replies 0: a strict majority of the K training clients (⌊K/2⌋ + 1); a rejected or silent minority is
        # left out, recorded and warned about. min_replies = K: every client must deliver.
        "timeout_s": 3600.0, "startup_timeout_s": 600.0, "min_replies": 0, "max_update_slack": 1.0,
        # defences against a client sending a well-formed but hostile update or lying metadata (issue 19)
        "max_abs_value": 1e4, "norm_multiple": 3.0, "norm_cap": 0.0, "norm_action": "reject",
        # fedavg_weighting "equal": every domain weighs the same in a FedAvg round, as MergeRec averages domains, and
        # an unverifiable user count cannot buy weight; "users" (McMahan et al.'s n_k-weighted FedAvg) trusts each
        # client's num-users, each share capped at fedavg_max_share
        "max_num_users": 1e8, "fedavg_weighting": "equal", "fedavg_max_share": 0.5, "fedavg_aggregation": "mean",
        # Flower simulation only: ClientApps running at once (0: one per CPU); each gets CPUs // parallel_clients
        # cores, which a client with run.torch_threads = 0 uses for its forward passes (README, Running a federation)
        "parallel_clients": 0,
    },
    "privacy": {
        "enabled": False,
        "unit": "domain",         # "domain": clip + noise on the shipped update; "user": per-user DP inside the client
                                  # (sequential: DP-SGD; text-lae: Gaussian mechanism on the Gram matrix)
        "clip_norm": 1.0,         # unit "domain": L2 bound C of the task vector
        "noise_multiplier": 0.0,  # σ/sensitivity (C, max_grad_norm or user_norm_bound²); used if target_epsilon = 0
        "target_epsilon": 0.0,    # > 0: calibrate the noise multiplier to (ε, delta) over all of a client's releases
        "delta": 1e-5,
        "max_grad_norm": 1.0,     # unit "user": L2 bound of one user's gradient per step
        "sample_rate": 0.05,      # unit "user": Poisson sampling rate of users per step
        "epochs": 1.0,            # unit "user": expected passes over the users per release (steps = ⌈epochs/rate⌉)
        "fedavg_epochs": 0.0,     # unit "user": the same for each FedAvg round's release (0: as `epochs`)
        "accountant": "rdp",      # unit "user": opacus accountant, "rdp" or "prv"
        "user_norm_bound": 1.0,   # unit "user", text-lae: L2 bound B of a user's text profile x_u E (Gram mechanism)
        "gram_repair": "clip",    # unit "user", text-lae: how the noisy Gram is made PSD, "clip" or "abs" eigenvalues
        "gram_noise": "once",     # unit "user", text-lae: "once" draws the noisy Gram once per client and run and every
                                  # release reuses it (ε of one release); "per_release" draws it afresh per release
        "noise_seed": -1,
        "secure_mode": False,     # unit "user", sequential: opacus' floating-point-safe Gaussian sampler (needs
                                  # noise_seed = -1; runs are not reproducible)
        "release_diagnostics": False,  # also ship the data-dependent training metrics and the user count, which ε
                                       # does not cover (fedmerge.privacy.client.RELEASED_METRICS); for studies only
    },
}
FREE_TABLES: frozenset[tuple[str, str]] = frozenset(
    {("encoder", "params"), ("model", "params"), ("merge", "params"), ("merge", "mergerec"),
     ("baselines", "fedavg_local_params")}
)
DATA_SOURCES = ("synthetic", "amazon", "generic")
# keys a results.json model table holds beside its domains (the mean over domains, the joint baseline's mark): a
# domain of that name would have its metrics overwritten
RESERVED_DOMAIN_NAMES = ("average", "non_private")
FEDAVG_WEIGHTINGS = ("users", "equal")  # FedAvg client weights: reported user counts (share-capped) or equal
NORM_ACTIONS = ("reject", "clip")  # what federation.norm_action does to a task vector over its norm limit
MAX_ABS_LIMIT = 1e30  # federation.max_abs_value above this would let a sum of a few models overflow float32


def scenario_path(name_or_path: str | Path) -> Path:
    """Resolve a bare scenario name to ``scenarios/<name>.toml``; anything with a suffix or separator is a path."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix or "/" in text or "\\" in text:
        if not path.is_file():
            raise FedmergeError(f"scenario file {path} {'is a folder' if path.is_dir() else 'does not exist'}")
        return path
    candidate = SCENARIO_DIR / f"{text}.toml"
    if not candidate.is_file():
        known = sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))
        raise FedmergeError(f"unknown scenario {text!r}; valid: {known} or a path to a .toml file")
    return candidate


def load_scenario(name_or_path: str | Path = DEFAULT_SCENARIO, overrides: Iterable[str] = ()) -> Scenario:
    """Read a scenario TOML, lay it over :data:`DEFAULTS` and validate (:meth:`Scenario.from_mapping`), then apply
    ``overrides`` (:func:`apply_overrides`)."""
    from fedmerge.scenario import Scenario

    path = scenario_path(name_or_path)
    return apply_overrides(Scenario.from_mapping(read_scenario_table(path), source=str(path)), overrides)


def read_scenario_table(path: Path) -> dict[str, Any]:
    """A scenario file's TOML as a table (FedmergeError naming the file when it is not valid TOML)."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise FedmergeError(f"scenario {path}: invalid TOML: {exc}") from exc


def lay_over_defaults(raw: Mapping[str, Any], source: str = "scenario") -> dict[str, Any]:
    """A copy of :data:`DEFAULTS` updated with ``raw`` (a two-level table), every key and type checked; the
    cross-field checks are :func:`validate`'s, which :meth:`~fedmerge.scenario.Scenario.from_mapping` runs next."""
    cfg = copy.deepcopy(DEFAULTS)
    for section, table in raw.items():
        if section == "privacy_study":
            raise FedmergeError(f"{source} is a privacy study (it has a [privacy_study] table): run it with "
                                "`fedmerge privacy run --scenario NAME_OR_PATH`, not `fedmerge simulate`")
        if section not in DEFAULTS:
            raise FedmergeError(f"{source}: unknown section [{section}]; valid: {sorted(DEFAULTS)}")
        if not isinstance(table, Mapping):
            raise FedmergeError(f"{source}: [{section}] must be a table, got {type(table).__name__}")
        for key, value in table.items():
            _set(cfg, (section, key), value, source)
    return cfg


def parse_value(text: str) -> Any:
    """Parse an override value as a TOML value (``3``, ``true``, ``["a", "b"]``, ``{x = 1}``); else a plain string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignments(items: Iterable[str], what: str) -> dict[str, str]:
    """``["k=v", ...]`` -> {k: v} with raw string values; FedmergeError naming the bad or repeated item."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise FedmergeError(f"{what} {item!r} is not KEY=VALUE")
        if key in out:
            raise FedmergeError(f"{what} {key!r} given twice")
        out[key] = value
    return out


def parse_params(items: Iterable[str], what: str = "--set") -> dict[str, Any]:
    """``["k=v", ...]`` -> {k: parse_value(v)}: the one parser of command-line model / method parameters."""
    return {key: parse_value(value) for key, value in parse_assignments(items, what).items()}


def apply_overrides(scenario: Scenario, overrides: Iterable[str]) -> Scenario:
    """``scenario`` with each ``section.key[.sub...]=value`` applied, validated again; ``scenario`` is not changed.
    Another ``model.family`` (``encoder.name``) starts from empty ``params`` plus those the overrides give, in any
    order, as :meth:`~fedmerge.scenario.Scenario.with_changes` does (the old family's were kept: ``--set
    model.family="text-lae"`` on a sequential scenario failed on ``hidden``, ``n_layers``, ...)."""
    from fedmerge.scenario import Scenario

    overrides = [(item, *parse_override(item)) for item in overrides]
    if not overrides:
        return scenario
    out = scenario.to_mapping()
    for section, owner in (("model", "family"), ("encoder", "name")):
        if any(path == (section, owner) and value != out[section][owner] for _, path, value in overrides):
            if out[section]["params"]:
                logger.info("--set %s.%s: the scenario's %s.params %s are not carried over", section, owner, section,
                            sorted(out[section]["params"]))
            out[section]["params"] = {}
    for item, path, value in overrides:
        _set(out, path, value, f"override {item!r}")
    return Scenario.from_mapping(out)


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """``"section.key[.sub...]=value"`` -> (the dotted key's parts, the value parsed as TOML by :func:`parse_value`);
    FedmergeError for any other form."""
    if "=" not in item:
        raise FedmergeError(f"override {item!r} must look like section.key=value")
    dotted, text = item.split("=", 1)
    path = tuple(part.strip() for part in dotted.strip().split("."))
    if len(path) < 2 or not all(path):
        raise FedmergeError(f"override {item!r}: key must be section.key (e.g. data.root), got {dotted!r}")
    return path, parse_value(text.strip())


def _set(cfg: dict[str, Any], path: tuple[str, ...], value: Any, source: str) -> None:
    section, key, rest = path[0], path[1], path[2:]
    if section not in DEFAULTS:
        raise FedmergeError(f"{source}: unknown section {section!r}; valid: {sorted(DEFAULTS)}")
    if key not in DEFAULTS[section]:
        raise FedmergeError(f"{source}: unknown key {section}.{key}; valid: {sorted(DEFAULTS[section])}")
    default = DEFAULTS[section][key]
    if not rest:
        if isinstance(default, dict) and (section, key) not in FREE_TABLES:
            if not isinstance(value, Mapping):
                raise FedmergeError(f"{source}: {section}.{key} must be a table, got {value!r}")
            for sub_key, sub_value in value.items():
                _set(cfg, (section, key, sub_key), sub_value, source)
            return
        cfg[section][key] = checked_type(f"{section}.{key}", default, value, source)
        return
    if not isinstance(default, dict):
        raise FedmergeError(f"{source}: {section}.{key} is not a table, cannot set {'.'.join(path)}")
    target = cfg[section][key]
    if (section, key) not in FREE_TABLES:
        if len(rest) != 1 or rest[0] not in default:
            raise FedmergeError(f"{source}: unknown key {'.'.join(path)}; valid: {sorted(default)}")
        target[rest[0]] = checked_type(".".join(path), default[rest[0]], value, source)
        return
    for part in rest[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise FedmergeError(f"{source}: {'.'.join(path)} goes through a non-table value")
    target[rest[-1]] = value


def checked_type(name: str, default: Any, value: Any, source: str) -> Any:
    """``value`` if its type fits the default's (ints are accepted where floats are expected)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = is_number(value)
        try:
            value = float(value) if ok else value
        except OverflowError:  # a 400-digit integer: "int too large to convert to float", naming no key
            ok = False
    elif isinstance(default, int):
        ok = is_integer(value)
    elif isinstance(default, (list, dict, str)):
        ok = isinstance(value, type(default))
    else:
        ok = True
    if not ok:
        hint = ""
        if isinstance(value, str) and value.strip()[:1] in "[{":
            hint = " (not valid TOML, so read as text: quote the strings inside, e.g. '[\"ties\"]')"
        raise FedmergeError(f"{source}: {name} must be {TYPE_WORDS.get(type(default), type(default).__name__)}, "
                            f"got {value!r}{hint}")
    return value


def validate(cfg: Scenario) -> None:
    """Cross-field checks that a single key's type cannot express: every check that needs no training, run when the
    scenario is built (:meth:`~fedmerge.scenario.Scenario.from_mapping`), before any client starts."""
    for key, values in (("data.domains", cfg.data.domains), ("data.held_out", cfg.data.held_out),
                        ("merge.methods", cfg.merge.methods), ("merge.local_parameters", cfg.merge.local_parameters)):
        if not all(isinstance(v, str) for v in values):  # data.domains = [2019, 2020] failed as "PosixPath / int"
            raise FedmergeError(f"{key} must be a list of names (strings), got {list(values)!r}")
    repeated = sorted({m for m in cfg.merge.methods if list(cfg.merge.methods).count(m) > 1})
    if repeated:  # each repeat was built again (MergeRec: minutes) and replaced the last
        raise FedmergeError(f"merge.methods lists {repeated} more than once")
    data = cfg.data
    if data.source not in DATA_SOURCES:
        raise FedmergeError(f"data.source must be one of {list(DATA_SOURCES)}, got {data.source!r}")
    if data.source != "synthetic" and not data.domains:
        raise FedmergeError(f"data.domains must list the domains for data.source = {data.source!r}")
    names = data.domain_names()
    repeated = sorted({d for d in names if names.count(d) > 1})
    if repeated:
        raise FedmergeError(f"data.domains lists {repeated} more than once; each domain is one client")
    if len(names) == 0:
        raise FedmergeError("the scenario has no domains (data.synthetic.n_domains = 0?)")
    from fedmerge.storage import safe_file_stem

    stems: dict[str, list[str]] = {}
    for name in names:
        try:
            stems.setdefault(safe_file_stem(name).casefold(), []).append(name)  # case-insensitive file systems
        except ValueError as exc:
            raise FedmergeError(f"domain name {name!r}: {exc}; rename the domain") from None
    clashing = [group for group in stems.values() if len(group) > 1]
    if clashing:  # "x a" and "x_a": one client's saved weights and card replaced the other's, the run ended ok
        raise FedmergeError(f"domain names {clashing[0]} give one file name ({safe_file_stem(clashing[0][0])!r}: "
                            "characters other than letters, digits and .-_ become _, and letter case is one on "
                            "macOS and Windows file systems), so their clients' saved weights would overwrite each "
                            "other; rename a domain")
    reserved = [d for d in names if d in RESERVED_DOMAIN_NAMES]
    if reserved:
        raise FedmergeError(f"domain name(s) {reserved} are reserved: results.json keeps {list(RESERVED_DOMAIN_NAMES)} "
                            "beside the domains of each model; rename the domain's folder")
    if data.source == "synthetic":
        from dataclasses import asdict

        try:
            check_synthetic_sizes(**asdict(data.synthetic))
        except ValueError as exc:
            raise FedmergeError(f"data.synthetic: {exc}") from exc
    from fedmerge.models import FAMILIES

    if cfg.model.family not in FAMILIES:  # names only: no family module is imported here
        raise FedmergeError(f"model.family {cfg.model.family!r} is unknown; valid: {sorted(FAMILIES)}"
                            f"{FAMILIES.failures()}")
    unknown = [d for d in data.held_out if d not in names]
    if unknown:
        raise FedmergeError(f"data.held_out names unknown domain(s) {unknown}; valid: {names}")
    if len(set(names) - set(data.held_out)) < 1:
        raise FedmergeError(f"every domain is held out ({names}); at least one domain must train")
    if cfg.baselines.fedavg_rounds < 0:
        raise FedmergeError(f"baselines.fedavg_rounds must be >= 0, got {cfg.baselines.fedavg_rounds}")
    if cfg.federation.min_replies < 0 or not cfg.federation.timeout_s > 0:  # not > 0: NaN too (it never waited)
        raise FedmergeError(f"federation.min_replies must be >= 0 and federation.timeout_s > 0, got "
                            f"{cfg.federation.min_replies} and {cfg.federation.timeout_s}")
    n_train = len(set(names) - set(data.held_out))
    if cfg.federation.min_replies > n_train:
        raise FedmergeError(f"federation.min_replies = {cfg.federation.min_replies} exceeds the {n_train} "
                            "training clients; valid: 0 (a strict majority) to the number of training clients")
    seeds = list(cfg.run.seeds)
    if not all(is_integer(s) and 0 <= s < SEED_LIMIT for s in seeds) or len(set(seeds)) != len(seeds):
        raise FedmergeError(f"run.seeds must list distinct integers >= 0 and below 2**63 (empty: the single run.seed; "
                            f"{SEED_LIMIT_REASON}), got {seeds!r}")
    if not is_integer(cfg.run.seed) or cfg.run.seed < 0:
        raise FedmergeError(f"run.seed must be an integer >= 0, got {cfg.run.seed!r}")
    if cfg.run.seed >= SEED_LIMIT:
        raise FedmergeError(f"run.seed must be below 2**63 ({SEED_LIMIT_REASON}), got {cfg.run.seed!r}")
    name = cfg.run.name
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
        raise FedmergeError(f"run.name must be a name, not a path (it is the default output folder runs/<run.name>, "
                            f"which --overwrite empties), got {name!r}")
    _validate_defences(cfg.federation)
    if not cfg.federation.startup_timeout_s > 0:
        raise FedmergeError(f"federation.startup_timeout_s must be > 0, got {cfg.federation.startup_timeout_s}")
    if cfg.run.torch_threads < 0 or cfg.run.server_threads < 0:
        raise FedmergeError("run.torch_threads and run.server_threads must be >= 0 (0: the CPUs this process is given)")
    if cfg.federation.parallel_clients < 0:
        raise FedmergeError(f"federation.parallel_clients must be >= 0 (0: one ClientApp per CPU), "
                            f"got {cfg.federation.parallel_clients}")
    from fedmerge.merging import MERGEREC_METHODS, METHODS
    from fedmerge.merging.mergerec_config import FAMILIES_SCORING_COSINE

    from fedmerge.merging.testtime import TESTTIME_METHOD, teacher_choices

    valid_methods = [*METHODS, *MERGEREC_METHODS, TESTTIME_METHOD]
    unknown = [m for m in cfg.merge.methods if m not in valid_methods]
    if unknown:
        raise FedmergeError(f"merge.methods names unknown method(s) {unknown}; valid: {valid_methods}"
                            f"{METHODS.failures()}")
    if TESTTIME_METHOD in cfg.merge.methods and not data.held_out:
        raise FedmergeError(f"merge.methods lists {TESTTIME_METHOD!r}, which merges for held-out domains, but "
                            "data.held_out is empty; hold a domain out or remove the method")
    if cfg.theta0.pretrain and cfg.model.params.get("routed_unseen", "none") != "none":
        raise FedmergeError("theta0.pretrain with model.params.routed_unseen is not supported yet: the frozen θ₀ "
                            "expert for unseen items would keep the untrained initial weights, not the pretrained ones")
    # θ₀ distillation in the one-shot training (model.params; the joint oracle and θ₀'s pretraining train with those
    # too) or only in the FedAvg rounds (their own parameters: the clients' training alone)
    for key, distill, settings in (
            ("model.params", cfg.model.params.get("theta0_distill", 0),
             (("theta0.pretrain", cfg.theta0.pretrain), ("baselines.joint", cfg.baselines.joint))),
            ("baselines.fedavg_local_params",
             cfg.baselines.fedavg_rounds and cfg.baselines.fedavg_local_params.get("theta0_distill", 0), ())):
        clashes = [name for name, on in (*settings, ("privacy.enabled", cfg.privacy.enabled)) if on]
        if distill and (clashes or len(data.training_domains()) < 2):
            raise FedmergeError(f"{key}.theta0_distill = {distill} distills towards θ₀ on the other training domains' "
                                "public catalogs in local training; it needs two or more training domains and is not "
                                f"supported with {clashes or 'fewer'} (their training has no other catalog, or does "
                                f"not pass them); set {key}.theta0_distill = 0")
    testtime = cfg.merge.testtime
    if testtime.teacher not in teacher_choices(data.training_domains()):
        raise FedmergeError(f"merge.testtime.teacher {testtime.teacher!r} is unknown; valid: "
                            f"{teacher_choices(data.training_domains())}")
    if testtime.granularity not in MERGEREC_METHODS.values():
        raise FedmergeError(f"merge.testtime.granularity {testtime.granularity!r} is unknown; valid: "
                            f"{sorted(set(MERGEREC_METHODS.values()))}")
    if "granularity" in cfg.merge.mergerec:
        raise FedmergeError("merge.mergerec.granularity is set by each method's name (mergerec_taskwise, "
                            "mergerec_layerwise, mergerec_tensorwise; merge.testtime.granularity for the test-time "
                            "merge): remove it")
    mergerec = cfg.mergerec_config(testtime.granularity)  # an unknown key or preset fails here, before any training
    if mergerec.logit_norm == "cosine" and cfg.model.family not in FAMILIES_SCORING_COSINE:
        raise FedmergeError(f"merge.mergerec.logit_norm = 'cosine' needs a family that scores cos/τ "
                            f"({sorted(FAMILIES_SCORING_COSINE)}); model.family is {cfg.model.family!r}")
    from fedmerge.privacy.client import validate_privacy

    validate_privacy(cfg)
    if cfg.theta0.length < 3 or cfg.theta0.per_item < 1:
        raise FedmergeError(f"theta0.length must be >= 3 and theta0.per_item >= 1, got {cfg.theta0.length}, "
                            f"{cfg.theta0.per_item}")
    from fedmerge.data.domain import SPLITS

    if cfg.eval.split not in SPLITS:
        raise FedmergeError(f"eval.split must be 'val' or 'test', got {cfg.eval.split!r}")
    ks = list(cfg.eval.ks)
    if not ks or not all(is_integer(k) and k > 0 for k in ks):
        raise FedmergeError(f"eval.ks must be a non-empty list of positive integers (e.g. [10, 20]), got {ks!r}")
    if too_large_cutoffs(ks):  # a model card of the run would be refused, and the metrics cannot allocate K gains
        raise FedmergeError(f"eval.ks {too_large_cutoffs(ks)} exceed the largest cut-off {MAX_CUTOFF}")
    check_metric_name("eval.primary", cfg.eval.primary, ks)
    _validate_before_training(cfg, mergerec)
    _refuse_non_finite(cfg.to_mapping())


# what to write instead of inf for a key where inf would read as "no limit" or "off"
NO_LIMIT = "for no practical limit write a large finite number, e.g. 1e9"
NON_FINITE_HINTS = {
    "federation.timeout_s": f"{NO_LIMIT} (seconds)",
    "federation.startup_timeout_s": f"{NO_LIMIT} (seconds)",
    "federation.max_num_users": NO_LIMIT,
    "federation.norm_cap": "0 turns the cap off",
    "federation.norm_multiple": "0 turns the test off",
}


def _refuse_non_finite(table: Mapping[str, Any] | Sequence[Any], prefix: str = "") -> None:
    """FedmergeError naming the first key (typed or inside a free table, list entries as ``key[i]``) whose value is
    an infinite or NaN number. TOML allows ``inf`` and ``nan``; results.json records the scenario and JSON holds
    neither, so such a run trained every client and then could not write its results. Run after the key-specific
    checks, whose messages give the key's range."""
    items = table.items() if isinstance(table, Mapping) else ((f"[{i}]", v) for i, v in enumerate(table))
    for key, value in items:
        name = f"{prefix}{key}" if isinstance(table, Sequence) or not prefix else f"{prefix}.{key}"
        if isinstance(value, Mapping | list | tuple):
            _refuse_non_finite(value, name)
        elif is_number(value) and not is_finite_number(value):
            hint = NON_FINITE_HINTS.get(name, "results.json records the scenario, and JSON holds no inf or nan")
            raise FedmergeError(f"{name} must be a finite number, got {value!r}; {hint}")


def check_metric_name(key: str, name: str, ks: Sequence[int]) -> None:
    """FedmergeError unless ``name`` is a metric an evaluation at cut-offs ``ks`` reports (a misspelled name would
    otherwise give empty tables once every client had trained)."""
    from fedmerge.metrics import USERS, evaluation_metric_names

    valid = sorted(evaluation_metric_names(ks) - {USERS})
    if name not in valid:
        raise FedmergeError(f"{key} {name!r} is not a metric of eval.ks = {list(ks)}; valid: {valid}")


def _validate_before_training(cfg: Scenario, mergerec: MergeRecConfig) -> None:
    """Checks of values that are otherwise read only after every client trained: merge parameters (per method, and
    those of ``mergerec``'s training-free start, the configuration :func:`validate` built, against the number of
    training clients) and the text encoder's name (never a hub download) and parameters. MergeRec settings and DP
    parameters are checked in :func:`validate` itself."""
    from fedmerge.merging import METHODS, resolve_params
    from fedmerge.text.encoder import check_encoder_name, check_encoder_params

    n_models = len(cfg.data.training_domains())
    methods = [(f"merge.params.{method}", method, params) for method, params in cfg.merge.params.items()]
    methods.append(("merge.mergerec.init_params", mergerec.init_method, mergerec.init_params))  # its start
    for key, method, params in methods:
        if method not in METHODS:
            raise FedmergeError(f"{key}: not a method with parameters; valid: {sorted(METHODS)}")
        if not isinstance(params, Mapping):
            raise FedmergeError(f"{key} must be a table of parameters, got {params!r}")
        try:
            resolve_params(method, params, n_models=n_models)
        except ValueError as exc:
            raise FedmergeError(f"{key}: {exc}") from exc
    check_encoder_name(cfg.encoder.name)
    try:
        check_encoder_params(cfg.encoder.name, dict(cfg.encoder.params))
    except (ValueError, TypeError) as exc:
        raise FedmergeError(f"encoder.params: {exc}") from exc


def flatten_settings(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested settings mapping as ``{"section.key": value}`` (an empty table stays one entry)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping) and value:
            out |= flatten_settings(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


# Settings fedmerge gained whose default is not what runs before them did, by family: a run of that family that
# recorded no such key ran with this value (privacy.gram_noise: text-LAE drew a fresh noisy Gram per release)
EARLIER_BEHAVIOUR: dict[str, dict[str, Any]] = {"text-lae": {"privacy.gram_noise": "per_release"}}


def runs_user_gram_mechanism(family: Any, enabled: Any, unit: Any) -> bool:
    """Whether a run of model ``family`` with ``privacy.enabled`` and ``privacy.unit`` runs text-LAE's user-level
    Gram mechanism, the only mechanism ``privacy.gram_noise`` changes."""
    return family == "text-lae" and enabled is True and unit == "user"


def gram_noise_in_effect(flat: Mapping[str, Any]) -> bool:
    """:func:`runs_user_gram_mechanism` of flat settings (:func:`flatten_settings`)."""
    return runs_user_gram_mechanism(flat.get("model.family"), flat.get("privacy.enabled"), flat.get("privacy.unit"))


# settings that change nothing unless their test holds: a run where neither side has them in effect does not differ
# by them (an older non-private or domain-level text-LAE run stays reusable under the "once" default)
IN_EFFECT_ONLY: dict[str, Callable[[Mapping[str, Any]], bool]] = {"privacy.gram_noise": gram_noise_in_effect}


def flatten_recorded(saved: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`flatten_settings` of the settings a run recorded, a key it predates that changed the behaviour of its
    family (:data:`EARLIER_BEHAVIOUR`) filled in with the value it ran with."""
    flat = flatten_settings(saved)
    return {**EARLIER_BEHAVIOUR.get(flat.get("model.family"), {}), **flat}


def settings_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(added, differing) between settings a run recorded and this scenario's (nested mappings of sections, as JSON
    holds them): ``added`` are keys the saved run did not have and that this scenario leaves at their default (a
    setting fedmerge gained after the run, whose default keeps the earlier behaviour: accepted; one whose default
    does not is read as the earlier value, :func:`flatten_recorded`); ``differing`` every other key whose value
    differs or is absent on one side. A key of :data:`IN_EFFECT_ONLY` that neither side has in effect is left out."""
    json_defaults = json.loads(json.dumps(DEFAULTS, default=str))
    old, new = flatten_recorded(saved), flatten_settings(now)
    for key, in_effect in IN_EFFECT_ONLY.items():
        if not in_effect(old) and not in_effect(new):
            old.pop(key, None)
            new.pop(key, None)
    defaults = flatten_settings(json_defaults)
    added = sorted(k for k in set(new) - set(old) if k in defaults and new[k] == defaults[k])
    differing = sorted(k for k in set(old) | set(new)
                       if k not in added and old.get(k, "<absent>") != new.get(k, "<absent>"))
    return added, differing


MAX_SEEDS = 10_000  # --seeds 0-1000000000 built a billion-element list before anything said no
# run seeds (run.seed, run.seeds, --seeds, privacy_study.seeds) stay below this: torch seeds are 64-bit and each client
# adds 1000·round + its position to the run seed (2**64 and up failed in torch.manual_seed, naming no key)
SEED_LIMIT = 2**63
SEED_LIMIT_REASON = "torch seeds are 64-bit and each client adds 1000·round + its position"


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"0,2,5"`` -> [0, 2, 5]; ranges and single seeds may be mixed (``"0-2,7"``);
    at most :data:`MAX_SEEDS` seeds."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        first, dash, last = part.partition("-")
        try:
            if dash and int(last) - int(first) >= MAX_SEEDS:
                raise FedmergeError(f"--seeds {text!r}: {part!r} names more than {MAX_SEEDS} seeds")
            chunk = list(range(int(first), int(last) + 1)) if dash else [int(part)]
        except ValueError:
            chunk = []
        if not chunk or min(chunk) < 0:
            raise FedmergeError(f"--seeds {text!r}: {part!r} is not a seed >= 0 or a range A-B with A <= B; "
                                "valid forms: 0-4, 0,2,5, 0-2,7")
        if max(chunk) >= SEED_LIMIT:
            raise FedmergeError(f"--seeds {text!r}: {part!r} names a seed not below 2**63 ({SEED_LIMIT_REASON})")
        seeds += chunk
    if len(set(seeds)) != len(seeds):
        raise FedmergeError(f"--seeds {text!r} names a seed twice")
    if len(seeds) > MAX_SEEDS:
        raise FedmergeError(f"--seeds {text!r} names {len(seeds)} seeds, more than {MAX_SEEDS}")
    return seeds


def _validate_defences(federation: FederationSettings) -> None:
    """The [federation] defence keys: ranges and names (see README, "Faults and bad inputs tried")."""
    from fedmerge.merging import ROBUST_METHODS

    checks = {
        "max_abs_value": (0 < federation.max_abs_value <= MAX_ABS_LIMIT, f"a number in (0, {MAX_ABS_LIMIT:g}]"),
        "norm_multiple": (federation.norm_multiple >= 0, "a number >= 0 (0: off)"),
        "norm_cap": (federation.norm_cap >= 0, "a number >= 0 (0: off)"),
        "norm_action": (federation.norm_action in NORM_ACTIONS, f"one of {list(NORM_ACTIONS)}"),
        "max_num_users": (federation.max_num_users > 0, "a number > 0"),
        "max_update_slack": (1 <= federation.max_update_slack < math.inf, "a finite number >= 1"),
        "fedavg_weighting": (federation.fedavg_weighting in FEDAVG_WEIGHTINGS, f"one of {list(FEDAVG_WEIGHTINGS)}"),
        "fedavg_max_share": (0 < federation.fedavg_max_share <= 1, "a number in (0, 1]"),
        "fedavg_aggregation": (federation.fedavg_aggregation in ("mean", *ROBUST_METHODS),
                               f"one of {['mean', *ROBUST_METHODS]}"),
    }
    for key, (ok, valid) in checks.items():
        if not ok:
            raise FedmergeError(f"federation.{key} must be {valid}, got {getattr(federation, key)!r}")
    if federation.fedavg_weighting == "users" and federation.fedavg_aggregation != "mean":
        raise FedmergeError(f"federation.fedavg_weighting = 'users' has no effect with federation.fedavg_aggregation = "
                            f"{federation.fedavg_aggregation!r} (a robust rule weighs every client alike); set "
                            "fedavg_weighting = 'equal', or fedavg_aggregation = 'mean' for user-count weights")


def write_scenario(cfg: Scenario, path: str | Path) -> Path:
    """Write the resolved scenario ``cfg`` as TOML to ``path``: ``load_scenario(path) == cfg`` (it is validated
    first, so a file that would not load back is never written). Used to hand a scenario to a `flwr run`."""
    import tomli_w

    from fedmerge.storage import write_bytes_atomic

    validate(cfg)
    return write_bytes_atomic(path, tomli_w.dumps(cfg.to_mapping()).encode())
