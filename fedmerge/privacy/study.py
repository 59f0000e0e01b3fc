"""The privacy study (``fedmerge privacy run``): utility of merged models and membership attacks under client-side DP.

Grid: unit of privacy (``[privacy_study] units``: ``"domain"``, ``"user"``, see :mod:`fedmerge.privacy.client`)
× ε (``epsilons``; ``inf`` = no DP, run once and shared by the units) × run seed (``seeds``).

Utility: each cell runs the scenario in process (:func:`fedmerge.runners.run_scenario`) with ``privacy.target_epsilon``
= ε at ``delta``: every client calibrates its noise so that all its releases (one-shot update + ``fedavg_rounds``
FedAvg updates) are (ε, δ)-DP for the unit. Reported: the metric of each study method (and FedAvg when
``baselines.fedavg_rounds`` > 0, θ₀, the individual models) averaged over the training domains, mean and 95 %
t-interval over the seeds.

Attacks: in each cell the probe domain (``probe_domain``, default the first training domain) is split by the seed
into members (``member_fraction``), non-members (as many as are probed, ``probe_max_users``, at most half of the
rest) and the attacker's reference users (all other users); a client trains on the members with the cell's DP
recipe, and the attacks of :mod:`fedmerge.privacy.attacks` (loss, offline LiRA with ``reference_models`` reference
models trained with the same recipe on as many reference users as the client has, or all of them when they are
fewer, gradient alignment with the task vector over the weights training moved, and with ``online_lira_models`` > 0
online LiRA: that many shadow models of the target's size as far as the attacker's pool fills them — recorded as
``shadow_model_users`` —, each probed candidate IN half of them) score up to ``probe_max_users`` members against up
to as many non-members (at most half the held-out users) on the weights the client would ship: AUC and TPR at 0.1 % / 1 % FPR, mean and interval over seeds. The probed sequences
are the ones the family fits its targets on (:meth:`~fedmerge.models.base.ModelFamily.fitted_sequences`: the training
sequences for the sequential family, train + validation items for the text-LAE), so a member's last probed item is
one the client trained on; the loss attack and LiRA score ``probe_positions``, gradient alignment every position.

Domain-level DP clips and noises a client's non-private update after training (post-processing): within one study
process each (client, seed) trains that update once, and the ε = ∞ cell and every domain-level ε of the seed add
their own clipping and noise to it (:func:`fedmerge.runners.client.reusing_updates`; ``privacy.json`` records
``nonprivate_updates``: trained and reused). With epoch or step budgets this is exactly what training each cell anew
gives; the cells of a seed then differ by their DP alone. User-level DP-SGD trains every cell.

Writes ``DIR/privacy.json``, ``DIR/privacy.md`` (the table), ``DIR/privacy.png`` (utility vs ε, and the frontier
utility vs the strongest attack's TPR at 1 % FPR), each run under ``DIR/<unit>/eps-<ε>/seed-<s>/`` and each
(cell, seed)'s attack scores as ``DIR/attacks/<unit>/eps-<ε>/seed-<s>.json`` as soon as they are computed. With
``resume``, an interrupted study keeps what it finished: a run folder with a complete results.json of the same
configuration, and an attack file of the same configuration and attack settings, are read instead of computed again
(a complete run of another configuration is refused, see :func:`kept_run`). The two halves are independent:
``part="utility"`` and ``part="attacks"`` (``--only``) run one of them, so that two processes or machines can run
them side by side into the same folder; a last ``resume`` run without ``part`` reads both back and writes the study.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmerge.checks import is_integer, is_number
from fedmerge.errors import FedmergeError
from fedmerge.storage import check_output_folder, write_json_atomic
from fedmerge.scenario import Scenario

if TYPE_CHECKING:
    from fedmerge.data.domain import Domain
    from fedmerge.models.base import StateDict

logger = logging.getLogger(__name__)

STUDY_SECTION = "privacy_study"


@dataclass(frozen=True)
class PrivacyStudySettings:
    """The ``[privacy_study]`` table, typed and validated by :func:`load_study` (meaning of each key: module docstring)."""

    epsilons: tuple[float, ...] = (math.inf, 8.0, 4.0, 1.0)
    delta: float = 1e-5
    units: tuple[str, ...] = ("domain",)
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = ("average", "ties", "mergerec_taskwise")
    metric: str = "recall@10"
    probe_domain: str = ""
    member_fraction: float = 0.5
    probe_max_users: int = 2000
    probe_positions: str = "last"
    reference_models: int = 4
    online_lira_models: int = 0


STUDY_KEYS = tuple(f.name for f in fields(PrivacyStudySettings))
NO_DP = "none"  # the unit label of the ε = ∞ cells
NOISE_SEED_STRIDE = 1_000_003  # a seeded study's noise seed moves by this per study seed (study_noise_base)


def study_noise_base(base: int, seed: int) -> int:
    """``privacy.noise_seed`` of study seed ``seed`` in a study seeded with ``base``: base + 1000003·seed, so every
    study seed draws other noise; a base < 0 (OS entropy) stays as it is. The one rule for every run over seeds:
    each seed of ``simulate --seeds`` (:func:`fedmerge.runners.multiseed.seed_config`) moves it the same way."""
    return base if base < 0 else base + NOISE_SEED_STRIDE * int(seed)


def load_study(scenario: str, overrides: Sequence[str] = ()) -> tuple[Scenario, PrivacyStudySettings]:
    """(resolved scenario, study settings): the ``[privacy_study]`` table is the study's, the rest is a scenario."""
    from fedmerge.config import apply_overrides, checked_type, parse_override, read_scenario_table, scenario_path

    path = scenario_path(scenario)
    raw = read_scenario_table(path)
    study = asdict(PrivacyStudySettings())
    prefix = f"{STUDY_SECTION}."
    items = [(k, v, str(path)) for k, v in raw.pop(STUDY_SECTION, {}).items()]
    for item in overrides:
        if item.startswith(prefix):
            keys, value = parse_override(item)
            items.append((".".join(keys[1:]), value, f"override {item!r}"))
    for key, value, source in items:
        if key not in STUDY_KEYS:
            raise FedmergeError(f"{source}: unknown key {prefix}{key}; valid: {sorted(STUDY_KEYS)}")
        default = study[key]
        study[key] = checked_type(f"{prefix}{key}", list(default) if isinstance(default, tuple) else default,
                                  value, source)
    scenario_overrides = [o for o in overrides if not o.startswith(prefix)]
    cfg = apply_overrides(Scenario.from_mapping(raw, source=str(path)), scenario_overrides)
    if cfg.run.seeds:
        raise FedmergeError(f"run.seeds does not apply to a privacy study: set privacy_study.seeds = "
                            f"{list(cfg.run.seeds)} (each cell runs once per study seed)")
    validate_study(study, cfg)
    settings = settings_from_mapping(study)
    for unit, epsilon in dp_cells(settings):  # every DP cell's scenario passes the scenario checks before any trains
        try:
            dp_scenario(cfg, unit, epsilon, settings.delta, settings.seeds[0])
        except FedmergeError as err:
            raise FedmergeError(f"{path}: the study's DP cells (privacy.unit = {unit!r}, ε = {epsilon:g}) "
                                f"are refused: {err}") from err
    return cfg, settings


def check_noise_reaches(cfg: Scenario, study: PrivacyStudySettings) -> None:
    """FedmergeError naming the first DP cell whose ε no noise multiplier reaches (the accountant's refusal came
    mid-study, bare, after the earlier cells had trained); run where the study runs, before any cell trains (the
    accountants import torch, which :func:`load_study` — the launcher's — does not)."""
    for unit, epsilon in dp_cells(study):
        try:
            dp_config(cfg, unit, epsilon, float(study.delta), study.seeds[0])
        except ValueError as err:
            raise FedmergeError(f"the study's DP cells (privacy.unit = {unit!r}, ε = {epsilon:g}, δ = "
                                f"{float(study.delta):g}): no noise multiplier reaches this ε ({err}); raise ε or δ, "
                                "or change privacy.accountant / the sampling") from err


def settings_from_mapping(study: Mapping[str, Any]) -> PrivacyStudySettings:
    """Typed settings from a validated ``[privacy_study]`` mapping or a ``privacy.json``'s ``study`` record
    (lists become tuples; ε given as ``"inf"`` / number labels, see :func:`study_record`, become floats)."""
    values = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in study.items()}
    values["epsilons"] = tuple(math.inf if e == "inf" else float(e) for e in values["epsilons"])
    return PrivacyStudySettings(**values)


def study_record(study: PrivacyStudySettings) -> dict[str, Any]:
    """The settings as ``privacy.json`` records them (JSON has no infinity: ε as :func:`epsilon_label`)."""
    return {**asdict(study), "epsilons": [epsilon_label(float(e)) for e in study.epsilons]}


def validate_study(study: Mapping[str, Any], cfg: Scenario) -> None:
    """Clear errors for study settings the sweep cannot run with."""
    from fedmerge.config import SEED_LIMIT, SEED_LIMIT_REASON, check_metric_name
    from fedmerge.privacy.client import UNITS, check_user_level

    eps = study["epsilons"]
    if not isinstance(eps, list | tuple) or not eps or not all(is_number(e) and e > 0 for e in eps):
        raise FedmergeError(f"{STUDY_SECTION}.epsilons must be a non-empty list of numbers > 0 (inf allowed), got {eps!r}")
    if not 0 < float(study["delta"]) < 1:
        raise FedmergeError(f"{STUDY_SECTION}.delta must lie in (0, 1), got {study['delta']!r}")
    labels: dict[str, list[Any]] = {}
    for e in eps:
        labels.setdefault(epsilon_label(float(e)), []).append(e)
    clash = next((values for values in labels.values() if len(values) > 1), None)
    if clash:  # one cell's run folder and attack file for both: the study stopped at the second, after hours
        raise FedmergeError(f"{STUDY_SECTION}.epsilons {clash} name one cell (ε = {epsilon_label(float(clash[0]))}, "
                            "6 significant digits): list each ε once")
    units = study["units"]
    if not isinstance(units, list | tuple) or not units or any(u not in UNITS for u in units):
        raise FedmergeError(f"{STUDY_SECTION}.units must be a non-empty list of {list(UNITS)}, got {units!r}")
    if len(set(units)) < len(units):
        raise FedmergeError(f"{STUDY_SECTION}.units lists {sorted({u for u in units if units.count(u) > 1})} more than "
                            "once")
    if "user" in units:
        try:
            check_user_level(cfg)
        except FedmergeError as err:
            raise FedmergeError(f"{STUDY_SECTION}.units: {err}") from err
    seeds = study["seeds"]
    if (not isinstance(seeds, list | tuple) or not seeds
            or not all(is_integer(s) and 0 <= s < SEED_LIMIT for s in seeds) or len(set(seeds)) < len(seeds)):
        raise FedmergeError(f"{STUDY_SECTION}.seeds must be a non-empty list of distinct integers >= 0 and below 2**63 "
                            f"({SEED_LIMIT_REASON}), got {seeds!r}")
    check_metric_name(f"{STUDY_SECTION}.metric", study["metric"], cfg.eval.ks)
    unknown = [m for m in study["methods"] if m not in cfg.merge.methods]
    if unknown:
        raise FedmergeError(f"{STUDY_SECTION}.methods {unknown} are not in merge.methods {list(cfg.merge.methods)}")
    if study["probe_domain"] and study["probe_domain"] not in cfg.data.training_domains():
        raise FedmergeError(f"{STUDY_SECTION}.probe_domain {study['probe_domain']!r} is not a training domain "
                            f"{cfg.data.training_domains()}")
    if not 0 < float(study["member_fraction"]) < 1:
        raise FedmergeError(f"{STUDY_SECTION}.member_fraction must lie in (0, 1), got {study['member_fraction']!r}")
    if int(study["probe_max_users"]) < 2:
        raise FedmergeError(f"{STUDY_SECTION}.probe_max_users must be >= 2, got {study['probe_max_users']!r}")
    if study["probe_positions"] not in ("last", "all"):
        raise FedmergeError(f"{STUDY_SECTION}.probe_positions must be 'last' or 'all', got {study['probe_positions']!r}")
    if int(study["reference_models"]) < 0:
        raise FedmergeError(f"{STUDY_SECTION}.reference_models must be >= 0 (0: no LiRA), got {study['reference_models']!r}")
    online = study["online_lira_models"]
    if not isinstance(online, int) or online % 2 or not (online == 0 or online >= 4):
        raise FedmergeError(f"{STUDY_SECTION}.online_lira_models must be 0 (no online LiRA) or an even number >= 4 (each "
                            f"candidate IN half of the shadow models, >= 2 each way to estimate a spread), got {online!r}")


def dp_scenario(cfg: Scenario, unit: str, epsilon: float, delta: float, seed: int) -> Scenario:
    """The scenario of one cell, checked as any scenario is: run seed ``seed``, DP off for ε = ∞, else
    ``privacy.unit`` = ``unit`` at target (ε, δ).

    A seeded study (``privacy.noise_seed`` = b ≥ 0) draws other noise for every study seed s: noise seed
    b + 1000003·s (b itself for s = 0), so the interval over seeds covers the noise; b < 0 keeps OS entropy.
    """
    run = {"seed": int(seed)}
    if math.isinf(epsilon):
        return cfg.with_changes(run=run, privacy={"enabled": False})
    return cfg.with_changes(run=run, privacy={
        "enabled": True, "unit": unit, "target_epsilon": float(epsilon), "delta": float(delta),
        "noise_seed": study_noise_base(cfg.privacy.noise_seed, seed)})


def dp_config(cfg: Scenario, unit: str, epsilon: float, delta: float, seed: int) -> tuple[Scenario, float]:
    """(:func:`dp_scenario`, its noise multiplier z) for one cell: z calibrated to (ε, δ) over all of a client's
    releases (:func:`fedmerge.privacy.client.run_noise_multiplier`), 0 for ε = ∞."""
    from fedmerge.privacy.client import run_noise_multiplier

    out = dp_scenario(cfg, unit, epsilon, delta, seed)
    return out, (run_noise_multiplier(out) if out.privacy.enabled else 0.0)


def epsilon_label(epsilon: float) -> str:
    """"inf" or the number (results are JSON, which has no infinity)."""
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def over_seeds(values: Sequence[float | None]) -> dict[str, Any]:
    """:func:`fedmerge.runners.aggregate.interval` (mean, 95 % Student-t interval, the values) of the seeds that
    report a value, with ``missing_seeds`` (how many did not) when some did not; ``{"n": 0, "mean": None, ...}``
    when none does."""
    from fedmerge.runners.aggregate import interval

    present = [v for v in values if v is not None]
    if not present:
        return {"n": 0, "mean": None, "std": None, "half_width": None, "low": None, "high": None, "values": [],
                **({"missing_seeds": len(values)} if values else {})}
    missing = len(values) - len(present)
    return {**interval(present), **({"missing_seeds": missing} if missing else {})}


def cells(study: PrivacyStudySettings) -> list[tuple[str, float]]:
    """(unit, ε) of the grid: one (``none``, ∞) cell if ∞ is asked, then every unit × finite ε."""
    eps = [float(e) for e in study.epsilons]
    out = [(NO_DP, math.inf)] if any(math.isinf(e) for e in eps) else []
    return out + [(u, e) for u in study.units for e in eps if not math.isinf(e)]


def dp_cells(study: PrivacyStudySettings) -> list[tuple[str, float]]:
    """The :func:`cells` with DP on: every unit × finite ε."""
    return [(unit, epsilon) for unit, epsilon in cells(study) if unit != NO_DP]


def utility_sweep(
    cfg: Scenario, study: PrivacyStudySettings, out_dir: Path, overwrite: bool = False, resume: bool = False
) -> list[dict[str, Any]]:
    """One in-process run per cell and seed; per cell the metric of every study method over the seeds
    (``overwrite``: replace the run folders an earlier study left; refused otherwise; ``resume``: keep those holding
    a complete run of the cell's configuration, move unfinished ones aside and run them again, refuse complete ones
    of another, see :func:`kept_run`)."""
    from fedmerge.runners import run_scenario

    rows = []
    metric = study.metric
    for unit, epsilon in cells(study):
        per_seed: list[dict[str, float | None]] = []
        row: dict[str, Any] = {"unit": unit, "epsilon": epsilon_label(epsilon), "seeds": list(study.seeds)}
        start = time.perf_counter()
        for seed in study.seeds:
            run_cfg, z = dp_config(cfg, unit, epsilon, float(study.delta), seed)
            row["noise_multiplier"] = z
            logger.info("privacy study: unit %s, ε=%s, seed %d, noise multiplier %.4g", unit, epsilon_label(epsilon),
                        seed, z)
            folder = out_dir / unit / f"eps-{epsilon_label(epsilon)}" / f"seed-{seed}"
            results = kept_run(folder, run_cfg) if resume else None
            if results is not None:
                logger.info("privacy study: complete run of this cell in %s, kept", folder)
            else:
                # resumed: an unfinished run's files are moved aside under the run's own lock, not deleted
                results = run_scenario(run_cfg, engine="inprocess", overwrite=overwrite, out_dir=folder,
                                       set_aside=resume)
            models = results["models"]
            names = [m for m in (*study.methods, "fedavg", "theta0", "individual") if m in models]
            per_seed.append({m: models[m]["average"].get(metric) for m in names})
            eps_reported = [m["dp_epsilon_run"] for m in results.get("train_metrics", {}).values() if "dp_epsilon_run" in m]
            if eps_reported:
                row["client_epsilon_max"] = max(row.get("client_epsilon_max", 0.0), *eps_reported)
        row["metric"] = {m: over_seeds([s.get(m) for s in per_seed]) for m in per_seed[0]}
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
    return rows


def kept_run(folder: Path, run_cfg: Scenario) -> dict[str, Any] | None:
    """``--resume``: the complete run of ``run_cfg`` in ``folder``, or None when nothing finished there (an unfinished
    run's files are then moved aside, ``set_aside`` of :func:`fedmerge.storage.run_folder`); a complete run of another
    configuration is refused, not replaced."""
    from fedmerge.runners.multiseed import finished_run, same_config

    results = finished_run(folder)
    if results is None or same_config(run_cfg, results.get("config")):
        return results
    raise FedmergeError(
        f"{folder} holds a complete run of another configuration than this study's cell (other --set values or "
        "scenario?): resume with the study's original settings, replace the earlier runs with --overwrite, or choose "
        "another --out"
    )


def probed_users(n_users: int, limit: int, seed: int) -> np.ndarray:
    """Indices of the (at most ``limit``, seeded) users whose sequences the attacks probe, in order."""
    if n_users <= limit:
        return np.arange(n_users)
    return np.sort(np.random.default_rng(seed).choice(n_users, size=limit, replace=False))


REFERENCE_SEED_STRIDE = 7919  # a prime far from the 1000·round + position steps of the client seeds


def _reference_config(cfg: Scenario, reference_seed: int) -> Scenario:
    """The attacker's recipe for the reference model of ``reference_seed``: the client's, with training randomness
    (dropout, negatives) and DP noise of its own. The attacker does not know the client's seeds, and a reused noise
    seed would make the reference models' noise equal the target's and cancel in the likelihood ratio."""
    offset = REFERENCE_SEED_STRIDE * (reference_seed + 1)
    base = cfg.privacy.noise_seed
    return cfg.with_changes(run={"seed": cfg.run.seed + offset},
                            privacy={"noise_seed": -1 if base < 0 else base + offset})


ATTACK_KEYS = ("probe_domain", "member_fraction", "probe_max_users", "probe_positions", "reference_models")
# What the attacks probe and how their models are built, recorded with every attack file and study so that scores
# of another protocol are neither read back by --resume nor pooled. "target-size-references": each family's fitted
# sequences are probed; the non-members are only as many as are probed, so that the reference models train on as
# many users as the target (or on all the others when fewer), each on seeds of its own; gradient alignment runs over
# the weights training moved. Earlier protocols: "fitted-sequences" (the same probe; non-members and reference
# users half of the rest each, each reference model on half of the reference users, i.e. a quarter of the rest;
# gradient alignment over every parameter); none recorded (train + validation items probed, whose last item the
# sequential family never trains on, reference models on the client's seed).
PROBE_PROTOCOL = "target-size-references"
ONLINE_KEY = "online_lira_models"  # recorded with the attack settings only when > 0: earlier files stay valid
ONLINE_SEED_OFFSET = 10_000  # shadow model k trains on reference seed seed + offset + k, apart from the offline ones


def attack_file(out_dir: Path, unit: str, epsilon: float, seed: int) -> Path:
    """Where the attack scores of one (cell, seed) are kept."""
    return out_dir / "attacks" / unit / f"eps-{epsilon_label(epsilon)}" / f"seed-{seed}.json"


def kept_attacks(path: Path, run_cfg: Scenario, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The attack record at ``path`` if it was computed under ``run_cfg`` and the attack ``settings`` and holds the
    scores of every attack :func:`fedmerge.privacy.attacks.run_attacks` computes; else None (computed again and
    replaced)."""
    import json

    from fedmerge.privacy.attacks import attack_names
    from fedmerge.runners.multiseed import same_config

    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        logger.warning("attack file %s unreadable (%s): computed again", path, error)
        return None
    if not isinstance(record, dict) or record.get("settings") != settings or not same_config(run_cfg, record.get("config")):
        return None
    expected = set(attack_names(settings["reference_models"] > 0, settings.get(ONLINE_KEY, 0) > 0))
    if not {"scores", "sizes", "theta0"} <= record.keys() or set(record["scores"]) != expected:
        return None  # incomplete, or written by a version with other attacks: computed again
    return record


def attack_record(
    run_cfg: Scenario, study: PrivacyStudySettings, name: str, seed: int, control: bool
) -> dict[str, Any]:
    """One (cell, seed) of the attacks: a client trains on the members of domain ``name`` with the cell's recipe
    (``run_cfg``), the attacker's reference models on its own users; ``{"sizes", "scores", "theta0"}``, the last the
    same attacks against θ₀ (the chance control) when ``control``, else None."""
    from fedmerge.privacy.attacks import (
        online_shadow_models, reference_model_users, reference_models, run_attacks, shadow_model_sizes,
    )
    from fedmerge.privacy.membership import split_members, split_users, subset_users, union_users
    from fedmerge.runners.client import client_train
    from fedmerge.runners.server import initial_weights

    limit, positions = int(study.probe_max_users), study.probe_positions
    domain = run_cfg.load_domain(name)
    members, rest = split_members(domain, float(study.member_fraction), seed=seed)
    nonmembers, reference = split_users(rest, min(limit, rest.n_users // 2), seed=seed + 1)
    users_per_reference = reference_model_users(members.n_users, reference.n_users)
    family = run_cfg.model.make_family()
    features = run_cfg.encoder.item_features(domain.catalog, family)
    theta0 = initial_weights(run_cfg)
    shipped, _ = client_train(members, theta0, run_cfg, features=features)

    def attacker_model(users: Domain, reference_seed: int) -> StateDict:
        """A model the attacker trains with the client's recipe (reference or shadow model)."""
        return client_train(users, theta0, _reference_config(run_cfg, reference_seed), features=features)[0]

    refs = reference_models(attacker_model, reference, int(study.reference_models), users_per_reference,
                            seed=seed) if int(study.reference_models) else []
    # the probed users (one fitted sequence each, no more non-members than probed), those with >= 2 items
    member_fitted, nonmember_fitted = family.fitted_sequences(members), family.fitted_sequences(nonmembers)
    member_users = [int(u) for u in probed_users(len(member_fitted), limit, seed) if len(member_fitted[u]) >= 2]
    nonmember_users = [u for u, seq in enumerate(nonmember_fitted) if len(seq) >= 2]
    member_seqs = [member_fitted[u] for u in member_users]
    nonmember_seqs = [nonmember_fitted[u] for u in nonmember_users]
    shadows, inside = [], None
    if study.online_lira_models:
        candidates = union_users([subset_users(members, member_users, members.name),
                                  subset_users(nonmembers, nonmember_users, nonmembers.name)], f"{name}-candidates")
        shadows, inside = online_shadow_models(attacker_model, candidates, reference, int(study.online_lira_models),
                                               members.n_users, seed=seed + ONLINE_SEED_OFFSET)
    attacks = {"references": refs, "positions": positions, "shadows": shadows, "inside": inside}
    shadow_users = {}
    if inside is not None:
        filled = shadow_model_sizes(inside, members.n_users, reference.n_users)
        shadow_users = {"shadow_model_users": [int(filled.min()), int(filled.max())]}
    return {
        "sizes": {"members": members.n_users, "nonmembers": nonmembers.n_users, "reference": reference.n_users,
                  "reference_model_users": users_per_reference, **shadow_users,
                  "probed_per_group": [len(member_seqs), len(nonmember_seqs)]},
        "scores": run_attacks(family, theta0, shipped, features, member_seqs, nonmember_seqs, **attacks),
        "theta0": run_attacks(family, theta0, theta0, features, member_seqs, nonmember_seqs, **attacks)
        if control else None,
    }


def shadow_size(probe: Mapping[str, Any]) -> str:
    """The online LiRA shadow models' size as a report says it: "the target's size" only when every one reached it
    (a pool too small for member_fraction > 0.5 fills them less; files before 2026-12-07 did not record it)."""
    lo, hi = probe.get("shadow_model_users", (None, None))
    target = probe.get("members")
    if lo is None:
        return "the target's size (intended; not recorded)"
    if lo == hi == target:
        return f"the target's size ({target} users)"
    return f"{lo}-{hi} users (the target has {target}: not the target's size, see the run's warnings)"


def check_no_earlier_attacks(out_dir: Path, study: PrivacyStudySettings) -> None:
    """FedmergeError when ``out_dir`` already holds an attack file of one of the study's cells (a new study without
    ``--resume`` or ``--overwrite`` recomputed and replaced them silently), before anything runs."""
    earlier = [path for u, e in cells(study) for s in study.seeds if (path := attack_file(out_dir, u, e, s)).exists()]
    if earlier:
        raise FedmergeError(f"{out_dir} already holds attack scores of an earlier study ({earlier[0]}"
                            f"{', ...' if len(earlier) > 1 else ''}): --resume reads them back, --overwrite replaces "
                            "them, or choose another --out")


def attack_sweep(cfg: Scenario, study: PrivacyStudySettings, out_dir: Path | None = None,
                 resume: bool = False) -> dict[str, Any]:
    """Attack scores (:func:`attack_record`) against the member-trained probe client in every cell, and against θ₀
    as a chance control in the ε = ∞ cell; with ``out_dir`` each (cell, seed)'s record is written to
    :func:`attack_file`, and with ``resume`` a file of the same configuration and attack settings is read instead of
    training and attacking again."""
    from fedmerge.privacy.attacks import summary
    from fedmerge.privacy.client import run_epsilon

    name = study.probe_domain or cfg.data.training_domains()[0]
    settings = {**{k: getattr(study, k) for k in ATTACK_KEYS}, "probe_domain": name, "protocol": PROBE_PROTOCOL,
                **({ONLINE_KEY: study.online_lira_models} if study.online_lira_models else {})}
    rows, controls, sizes = [], [], {}
    for unit, epsilon in cells(study):
        per_seed = []
        for seed in study.seeds:
            run_cfg, z = dp_config(cfg, unit, epsilon, float(study.delta), seed)
            path = attack_file(out_dir, unit, epsilon, seed) if out_dir is not None else None
            record = kept_attacks(path, run_cfg, settings) if path is not None and resume else None
            if record is not None:
                logger.info("attacks on %s, unit %s, ε=%s, seed %d: kept from %s", name, unit, epsilon_label(epsilon),
                            seed, path)
            else:
                record = attack_record(run_cfg, study, name, seed, control=unit == NO_DP)
                if path is not None:
                    write_json_atomic(path, {"config": run_cfg.to_mapping(), "settings": settings, **record})
                logger.info("attacks on %s, unit %s, ε=%s, seed %d: %s", name, unit, epsilon_label(epsilon), seed,
                            summary(record["scores"]))
            per_seed.append(record["scores"])
            if record["theta0"] is not None:
                controls.append(record["theta0"])
            shadow = [*sizes.get("shadow_model_users", []), *record["sizes"].get("shadow_model_users", [])]
            sizes = {**record["sizes"], **({"shadow_model_users": [min(shadow), max(shadow)]} if shadow else {})}
        # the attacks see the one-shot release only: its own ε, below the cell's ε when FedAvg rounds add releases
        # (except with a noisy Gram drawn once, whose one release is the whole ε)
        attacked = run_epsilon(run_cfg, z, 1) if z > 0 else None
        rows.append({"unit": unit, "epsilon": epsilon_label(epsilon), "noise_multiplier": z,
                     "attacked_release_epsilon": attacked, "attacks": _over_seeds(per_seed)})
    return {"domain": name, "protocol": PROBE_PROTOCOL, **sizes, "positions": study.probe_positions,
            "reference_models": int(study.reference_models), "rows": rows, "theta0": _over_seeds(controls) if controls else {},
            **({ONLINE_KEY: int(study.online_lira_models)} if study.online_lira_models else {})}


def _over_seeds(per_seed: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, Any]]:
    """{attack: {score: interval over seeds}} for the AUC and TPR entries of :func:`attack_metrics`."""
    return {attack: {score: over_seeds([s[attack][score] for s in per_seed])
                     for score in per_seed[0][attack] if not score.startswith("n_")}
            for attack in per_seed[0]}


def _format_interval(value: Mapping[str, Any] | None, digits: int = 4) -> str:
    """"mean [low, high]" (just the mean for one seed), "(n of m seeds)" added when some seeds reported no value;
    "-" when missing."""
    from fedmerge.runners.aggregate import format_bound

    if not value or value.get("mean") is None:
        return "-"
    missing = f" ({value['n']} of {value['n'] + value['missing_seeds']} seeds)" if value.get("missing_seeds") else ""
    if value["n"] < 2:
        return f"{value['mean']:.{digits}f}{missing}"
    low, high = format_bound(value["low"], digits), format_bound(value["high"], digits)
    return f"{value['mean']:.{digits}f} [{low}, {high}]{missing}"


def paired_ratio(value: Mapping[str, Any] | None, reference: Mapping[str, Any] | None,
                 seeds: Sequence[int]) -> dict[str, Any] | None:
    """:func:`over_seeds` of the per-seed ratios value_s / reference_s of two :func:`over_seeds` results over the same
    ``seeds`` (in that order); None unless both report every seed and no reference value is 0."""
    if not value or not reference:
        return None
    values, base = value.get("values", []), reference.get("values", [])
    if not len(values) == len(base) == len(seeds) or any(b == 0 for b in base):
        return None
    return over_seeds([v / b for v, b in zip(values, base)])


def ratio_tables(utility: Sequence[Mapping[str, Any]], metric: str) -> str:
    """Two tables of per-seed ratios with their 95 % t-intervals: every model of a cell against θ₀ of the same cell
    and seed, and every model of a DP cell against the same model of the ε = ∞ cell (same seed)."""
    columns = [c for c in dict.fromkeys(c for row in utility for c in row["metric"]) if c != "theta0"]
    no_dp = next((row for row in utility if row["epsilon"] == "inf"), None)
    out = []
    for title, rows, reference in (
        ("× θ₀ (same cell and seed)", utility, lambda row, c: row["metric"].get("theta0")),
        ("× the same model without DP (same seed)", [r for r in utility if r["epsilon"] != "inf"],
         lambda row, c: no_dp["metric"].get(c) if no_dp is not None and no_dp["seeds"] == row["seeds"] else None),
    ):
        if not rows:
            continue
        header = ["unit", "ε", *columns]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            table_row = [row["unit"], "∞ (no DP)" if row["epsilon"] == "inf" else row["epsilon"]]
            table_row += [_format_interval(paired_ratio(row["metric"].get(c), reference(row, c), row["seeds"]), 2) for c in columns]
            lines.append("| " + " | ".join(table_row) + " |")
        out.append(f"\n{metric}, per-seed ratio {title}: mean [95 % t-interval]; an interval that covers 1 is a "
                   "tie.\n\n"
                   + "\n".join(lines) + "\n")
    return "".join(out)


def markdown_table(utility: Sequence[Mapping[str, Any]], probe: Mapping[str, Any], study: PrivacyStudySettings,
                   cfg: Scenario) -> str:
    """The study table: one row per (unit, ε); the metric of each method and reference, each attack's AUC and TPR at
    0.1 % and 1 % FPR; then :func:`ratio_tables`."""
    from fedmerge.privacy.client import releases_per_client

    columns = list(dict.fromkeys(c for row in utility for c in row["metric"]))
    attacks = list(dict.fromkeys(a for row in probe["rows"] for a in row["attacks"]))
    by_cell = {(r["unit"], r["epsilon"]): r["attacks"] for r in probe["rows"]}
    header = ["unit", "ε", "z", *[f"{study.metric} {c}" for c in columns],
              *[f"{a} AUC" for a in attacks], *[f"{a} TPR@0.1%" for a in attacks], *[f"{a} TPR@1%" for a in attacks]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in utility:
        found = by_cell.get((row["unit"], row["epsilon"]), {})
        table_row = [row["unit"], "∞ (no DP)" if row["epsilon"] == "inf" else row["epsilon"], f"{row['noise_multiplier']:.3f}"]
        table_row += [_format_interval(row["metric"].get(c)) for c in columns]
        table_row += [_format_interval(found.get(a, {}).get("auc"), 3) for a in attacks]
        table_row += [_format_interval(found.get(a, {}).get(score), 3) for score in ("tpr@0.001", "tpr@0.01") for a in attacks]
        lines.append("| " + " | ".join(table_row) + " |")
    privacy = cfg.privacy
    if cfg.model.family == "sequential":
        from fedmerge.privacy.client import release_epochs

        per_release = f"{privacy.epochs:g} epoch(s) per release"
        if releases_per_client(cfg) > 1 and release_epochs(privacy, 1) != privacy.epochs:
            per_release = (f"{privacy.epochs:g} epoch(s) for the one-shot release and {release_epochs(privacy, 1):g} "
                           "per FedAvg round")
        user = (f"DP-SGD, per-user clip {privacy.max_grad_norm:g}, sampling rate {privacy.sample_rate:g}, "
                f"{per_release}, {privacy.accountant.upper()} accountant")
    else:
        user = f"Gaussian mechanism on the Gram matrix, user profile bound {privacy.user_norm_bound:g}" + (
            ", noisy Gram made PSD by its absolute eigenvalues" if privacy.gram_repair == "abs" else "") + (
            ", the noisy Gram drawn once per client and reused by every release: one release in ε"
            if privacy.gram_noise == "once" else ", a fresh noisy Gram per release")
    control = ", ".join(f"{a} {v['auc']['mean']:.3f}" for a, v in probe.get("theta0", {}).items())
    notes = (
        f"\nSeeds {list(study.seeds)} (mean, 95 % t-interval in brackets when > 1 seed); δ = {study.delta:g}; "
        f"{releases_per_client(cfg)} release(s) per client composed"
        + (" (unit 'domain'; unit 'user' draws its noisy Gram once)"
           if cfg.model.family == "text-lae" and privacy.gram_noise == "once" and releases_per_client(cfg) > 1
           and "user" in study.units else "")
        + f". Unit 'domain': the client's whole data set "
        f"(update clipped to C = {privacy.clip_norm:g}); unit 'user': one user's interactions ({user}). "
        f"Attacks on {probe['domain']} "
        f"({probe.get('probed_per_group', ['?', '?'])[0]} members vs {probe.get('probed_per_group', ['?', '?'])[1]} "
        f"held-out users, their fitted sequences; attack protocol "
        f"'{probe.get('protocol', 'none recorded: train + validation items probed')}'); loss and LiRA at the "
        f"'{probe['positions']}' position(s), gradient alignment at every position"
        f"{' over the weights training moved' if probe.get('protocol') == PROBE_PROTOCOL else ''}; LiRA with "
        f"{probe['reference_models']} reference models of {probe.get('reference_model_users', '?')} users each, "
        f"the target client's {probe.get('members', '?')} users)"
        + (f"; online LiRA with {probe[ONLINE_KEY]} shadow models of {shadow_size(probe)}, each candidate IN half "
           "of them" if probe.get(ONLINE_KEY) else "")
        + f"; AUC against θ₀: {control or '-'}."
    )
    # rows whose one-shot release carries less than the row's ε (a noisy Gram drawn once: all of it)
    attacked = [f"{row['unit']} ε {row['epsilon']}: {row['attacked_release_epsilon']:.3g}" for row in probe["rows"]
                if row.get("attacked_release_epsilon") is not None
                and row["attacked_release_epsilon"] < float(row["epsilon"]) * (1 - 1e-6)]
    if releases_per_client(cfg) > 1 and attacked:
        notes += (" The attacks see the one-shot release only, whose own ε is below the row's (all releases): "
                  + "; ".join(attacked) + ".")
    notes += per_user_note(utility, study, releases_per_client(cfg)) + coarse_fpr_note(probe)
    return "\n".join(lines) + "\n" + notes + "\n" + ratio_tables(utility, study.metric)


def per_user_note(utility: Sequence[Mapping[str, Any]], study: PrivacyStudySettings, releases: int) -> str:
    """What domain-level DP gives one user of the domain: the ε of noise multiplier z/2, since one user can move the
    clipped update by up to 2C (:func:`fedmerge.privacy.dp.epsilon_for` with ``neighbouring="replace"``)."""
    from fedmerge.privacy.dp import epsilon_for

    per_user = [(row["epsilon"], epsilon_for(row["noise_multiplier"], study.delta, rounds=releases,
                                             neighbouring="replace"))
                for row in utility if row["unit"] == "domain" and row["noise_multiplier"] > 0]
    per_user = [f"ε {label}: {eps:.3g} per user" for label, eps in per_user]
    if not per_user:
        return ""
    return (" Unit 'domain' bounds the whole data set of a client; one user of it is protected less, not more: one "
            "user can move the clipped update by up to 2C, twice what the noise is calibrated to, so per user the "
            f"same release is only ({', '.join(per_user)}; δ = {study.delta:g}, all releases)-DP.")


def coarse_fprs(probe: Mapping[str, Any]) -> list[float]:
    """The TPR columns' false-positive rates that the probed held-out users cannot resolve: with n of them no
    threshold has a rate in (0, 1/n), so a TPR at an FPR below 1/n is the TPR at 0 false positives."""
    from fedmerge.privacy.attacks import FPRS

    n = probe.get("probed_per_group", [None, None])[1]
    return [fpr for fpr in FPRS if isinstance(n, int) and 0 < n and fpr < 1 / n]


def coarse_fpr_note(probe: Mapping[str, Any]) -> str:
    """A warning naming :func:`coarse_fprs`, when there are any."""
    coarse = coarse_fprs(probe)
    if not coarse:
        return ""
    n = probe["probed_per_group"][1]
    return (f" With {n} held-out users the smallest non-zero false-positive rate is 1/{n}: the TPR at FPR "
            f"{', '.join(f'{fpr:g}' for fpr in coarse)} is the TPR at 0 false positives, a noisy figure that may "
            "exceed what ε allows at that rate; more held-out users (privacy_study.probe_max_users) resolve it.")


def plot_study(utility: Sequence[Mapping[str, Any]], probe: Mapping[str, Any], study: PrivacyStudySettings, path: Path) -> None:
    """Left: metric vs ε per method and unit; right: the frontier, metric vs the strongest attack's TPR at 1 % FPR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedmerge.storage import save_figure_atomic

    labels = list(dict.fromkeys("∞" if r["epsilon"] == "inf" else r["epsilon"] for r in utility))
    position = {label: i for i, label in enumerate(labels)}
    by_cell = {(r["unit"], r["epsilon"]): r["attacks"] for r in probe["rows"]}
    methods = [m for m in (*study.methods, "fedavg") if any(m in r["metric"] for r in utility)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    markers = {"domain": "o", "user": "s"}
    for m_index, method in enumerate(methods):
        color = f"C{m_index}"
        for unit in study.units:
            rows = [r for r in utility if r["unit"] in (unit, NO_DP)]
            x = [position["∞" if r["epsilon"] == "inf" else r["epsilon"]] for r in rows]
            stats = [r["metric"][method] for r in rows]
            y = [m["mean"] for m in stats]
            err = [[m["mean"] - (m["mean"] if m["low"] is None else m["low"]) for m in stats],
                   [(m["mean"] if m["high"] is None else m["high"]) - m["mean"] for m in stats]]
            style = "-" if unit == "domain" else "--"
            left.errorbar(x, y, yerr=err, fmt=markers[unit] + style, color=color, capsize=3, label=f"{method} ({unit})")
            tpr = [max(a["tpr@0.01"]["mean"] for a in by_cell[(r["unit"], r["epsilon"])].values()) for r in rows]
            right.plot(tpr, y, markers[unit] + style, color=color, label=f"{method} ({unit})")
            for t, y_, r in zip(tpr, y, rows):
                right.annotate("no DP" if r["epsilon"] == "inf" else f"ε={r['epsilon']}", (t, y_), fontsize=7,
                               textcoords="offset points", xytext=(3, 3))
    left.set(xticks=range(len(labels)), xticklabels=labels, xlabel="ε (δ fixed)",
             ylabel=f"{study.metric} (avg over domains)")
    left.legend(fontsize=7)
    at = " (at 0 false positives)" if 0.01 in coarse_fprs(probe) else ""
    right.set(xlabel=f"strongest attack's TPR at 1 % FPR{at} ({probe['domain']})", ylabel=f"{study.metric}")
    right.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def _pooled(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One interval dict (:func:`over_seeds`) from several, over all their seeds' values; the seeds that reported
    no value stay counted (``missing_seeds``)."""
    missing = sum(int(part.get("missing_seeds", 0)) for part in parts)
    return over_seeds([v for part in parts for v in part["values"]] + [None] * missing)


def _pool_scores(parts: Sequence[Mapping[str, Mapping[str, Any]]], label: str) -> dict[str, dict[str, Any]]:
    """{attack: {score: pooled interval}} of several {attack: {score: interval}} with the same attacks and scores."""
    shapes = {tuple((a, tuple(sorted(scores))) for a, scores in sorted(part.items())) for part in parts}
    if len(shapes) != 1:
        raise FedmergeError(f"{label}: the studies report different attacks or scores: {sorted(shapes)}")
    return {a: {score: _pooled([part[a][score] for part in parts]) for score in parts[0][a]} for a in parts[0]}


def _same_scenario(one: Any, other: Any, user_cells_in_both: bool) -> bool:
    """Whether two studies' recorded scenarios are one, their result-neutral settings aside
    (:data:`fedmerge.runners.multiseed.RESULT_NEUTRAL`: run name, progress, embedding-cache folder), settings fedmerge
    gained between them at their default (:func:`fedmerge.config.settings_differences`), and text-LAE's
    ``privacy.gram_noise`` alike when both studies ran unit "user" cells (``user_cells_in_both``; the only cells where it changes anything)."""
    from fedmerge.config import flatten_recorded, settings_differences
    from fedmerge.runners.multiseed import without_result_neutral

    if not isinstance(one, Mapping) or not isinstance(other, Mapping):
        return one == other
    one, other = without_result_neutral(one), without_result_neutral(other)  # studies from two machines' caches
    # a study's scenario runs DP off, where privacy.gram_noise is not in effect, but its text-LAE user cells run it
    flat = [flatten_recorded(s) for s in (one, other)]
    if user_cells_in_both and any(f.get("model.family") == "text-lae" for f in flat) \
            and flat[0].get("privacy.gram_noise") != flat[1].get("privacy.gram_noise"):
        return False
    # a key one side lacks is "added" seen from the other side: only a difference seen both ways is real
    return not set(settings_differences(one, other)[1]) & set(settings_differences(other, one)[1])


def pool_studies(studies: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """The ``privacy.json`` of one study assembled from several (``studies``: their ``privacy.json`` contents,
    ``labels``: where each came from, for errors and the record), run in separate processes or machines, either

    - over **disjoint seeds** of the same grid (same cells with the same noise multipliers, same attacks): the
      intervals are recomputed from the per-seed values; or
    - over **the same seeds** and different ε and/or units (:func:`_union_of_cells`): each (unit, ε) cell taken
      from the study that ran it; a cell (e.g. ε = ∞) that several ran must be identical in each, and together they
      must cover every cell of the combined grid (units × ε).

    Either way the studies must agree on every other setting and on the scenario, and the result is exactly what one
    study over the whole grid reports (each seed's cells depend only on that seed and cell)."""
    if len(studies) < 2:
        raise FedmergeError(f"pooling needs two or more studies, got {len(studies)}")
    missing = [label for label, st in zip(labels, studies) if "probe" not in st or "utility" not in st]
    if missing:
        raise FedmergeError(f"{missing}: not a finished privacy study (no utility or probe section)")
    # a study written before reference_model_users was recorded (protocol "fitted-sequences" or older): each of its
    # reference models trained on half of its reference users
    studies = [{**st, "probe": {"reference_model_users": max(1, int(st["probe"]["reference"]) // 2), **st["probe"]}}
               if "reference" in st["probe"] else st for st in studies]
    first, first_label = studies[0], labels[0]
    same_seeds = all(st["study"]["seeds"] == first["study"]["seeds"] for st in studies)
    free = ("epsilons", "units") if same_seeds else ("seeds",)
    defaults = study_record(PrivacyStudySettings())  # a setting added after a study ran: it ran at the default
    settings = {k: v for k, v in {**defaults, **first["study"]}.items() if k not in free}
    for label, st in zip(labels, studies):
        other = {k: v for k, v in {**defaults, **st["study"]}.items() if k not in free}
        differ = sorted(k for k in set(settings) | set(other) if settings.get(k) != other.get(k))
        if differ:
            raise FedmergeError(f"{label} and {first_label} differ in study settings {differ} (pooling combines "
                                "disjoint seeds of one grid, or other ε / units over the same seeds): not one study")
        user_cells_in_both = all("user" in {**defaults, **s["study"]}["units"] for s in (st, first))
        if not _same_scenario(st.get("scenario"), first.get("scenario"), user_cells_in_both) \
                or st.get("releases_per_client") != first.get("releases_per_client"):
            raise FedmergeError(f"{label} and {first_label} ran different scenarios: not one study")
        if st["probe"].get("protocol") != first["probe"].get("protocol"):
            raise FedmergeError(f"{label} and {first_label} ran different attack protocols ({st['probe'].get('protocol')} "
                                f"vs {first['probe'].get('protocol')}): not one study; rerun the older with --resume "
                                "(its runs are kept, its attacks recomputed)")
    if same_seeds:
        return _union_of_cells(studies, labels)
    seen: dict[int, str] = {}
    for label, st in zip(labels, studies):
        for seed in st["study"]["seeds"]:
            if seed in seen:
                raise FedmergeError(f"seed {seed} is in both {seen[seed]} and {label}: pool disjoint seeds, or "
                                    "studies of the same seeds")
            seen[seed] = label
        cells_here = [(r["unit"], r["epsilon"], r["noise_multiplier"]) for r in st["utility"]]
        if cells_here != [(r["unit"], r["epsilon"], r["noise_multiplier"]) for r in first["utility"]]:
            raise FedmergeError(f"{label} and {first_label} have different (unit, ε, noise multiplier) cells")
    utility = []
    for rows in zip(*(st["utility"] for st in studies)):
        metric = _pool_scores([{"metric": r["metric"]} for r in rows], "utility")["metric"]
        row = {**rows[0], "seeds": [s for r in rows for s in r["seeds"]], "metric": metric,
               "seconds": round(sum(r.get("seconds", 0.0) for r in rows), 1)}
        eps = [r["client_epsilon_max"] for r in rows if "client_epsilon_max" in r]
        if eps:
            row["client_epsilon_max"] = max(eps)
        utility.append(row)
    probes = [st["probe"] for st in studies]
    probe_rows = [{**rows[0], "attacks": _pool_scores([r["attacks"] for r in rows], "attacks")}
                  for rows in zip(*(p["rows"] for p in probes))]
    controls = [p["theta0"] for p in probes if p.get("theta0")]
    probe = {**probes[0], "rows": probe_rows, "theta0": _pool_scores(controls, "θ₀ control") if controls else {}}
    seeds = [s for st in studies for s in st["study"]["seeds"]]
    return {"study": {**first["study"], "seeds": seeds}, "releases_per_client": first.get("releases_per_client"),
            "utility": utility, "probe": probe, "scenario": first.get("scenario"), "pooled_from": list(labels),
            **({DOMAIN_USERS_KEY: first[DOMAIN_USERS_KEY]} if DOMAIN_USERS_KEY in first else {})}


def _union_of_cells(studies: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """:func:`pool_studies` of studies over the same seeds (settings already checked): the union of their cells in
    :func:`cells` order (units as the studies list them, in :data:`fedmerge.privacy.client.UNITS` order when they
    differ); a cell in several studies, and the probe's set-up and θ₀ control, must be identical."""
    def comparable(value: Any) -> Any:  # a cell no seed reported: older studies did not count its seeds
        if not isinstance(value, Mapping):
            return value
        if value.get("n") == 0:
            return {k: v for k, v in value.items() if k != "missing_seeds"}
        return {k: comparable(v) for k, v in value.items()}

    def without_time(row: Mapping[str, Any]) -> dict[str, Any]:  # and without what older studies did not record
        return comparable({k: v for k, v in row.items() if k not in ("seconds", "attacked_release_epsilon")})

    def union(section: str, rows_of: Any) -> dict[tuple[str, str], dict[str, Any]]:
        found: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
        for label, st in zip(labels, studies):
            for row in rows_of(st):
                key = (row["unit"], row["epsilon"])
                if key in found and without_time(found[key][0]) != without_time(row):
                    raise FedmergeError(f"{section} cell (unit {key[0]}, ε {key[1]}) differs between {found[key][1]} "
                                        f"and {label}: not the same study")
                found.setdefault(key, (dict(row), label))
        return {key: row for key, (row, _) in found.items()}

    def setup(probe: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in probe.items() if k not in ("rows", "theta0")}

    probe_setup = {k: v for k, v in studies[0]["probe"].items() if k not in ("rows", "theta0")}
    controls: dict[str, Any] = {}  # the θ₀ control: measured by the studies whose grid has ε = ∞
    for label, st in zip(labels, studies):
        if setup(st["probe"]) != setup(probe_setup):
            raise FedmergeError(f"{label} and {labels[0]} differ in the attacks' set-up: not one study")
        control = st["probe"].get("theta0") or {}
        if control and controls and control != controls:
            raise FedmergeError(f"{label} and {labels[0]} differ in the θ₀ control: not the same study")
        controls = controls or control
    epsilons = sorted({e for st in studies for e in st["study"]["epsilons"]},
                      key=lambda e: -math.inf if e == "inf" else -float(e))
    from fedmerge.privacy.client import UNITS

    unit_lists = [list(st["study"].get("units", ())) for st in studies]
    units = unit_lists[0] if all(u == unit_lists[0] for u in unit_lists) else \
        [u for u in UNITS if any(u in listed for listed in unit_lists)]
    study = {**studies[0]["study"], "epsilons": epsilons, "units": units}
    order = [(unit, epsilon_label(eps)) for unit, eps in cells(settings_from_mapping(study))]
    utility, attacks = union("utility", lambda st: st["utility"]), union("attack", lambda st: st["probe"]["rows"])
    absent = [key for key in order if key not in utility or key not in attacks]
    if absent:
        raise FedmergeError(f"cells {absent} of the combined grid were run by none of {list(labels)}")
    return {"study": study, "releases_per_client": studies[0].get("releases_per_client"),
            "utility": [utility[key] for key in order],
            "probe": {**probe_setup, "rows": [attacks[key] for key in order], "theta0": controls},
            "scenario": studies[0].get("scenario"), "pooled_from": list(labels),
            **({DOMAIN_USERS_KEY: studies[0][DOMAIN_USERS_KEY]} if DOMAIN_USERS_KEY in studies[0] else {})}


def write_pooled_study(paths: Sequence[Path], out_dir: Path, overwrite: bool = False) -> str:
    """Pool the ``privacy.json`` files at ``paths`` (:func:`pool_studies`) into ``out_dir``: privacy.json, privacy.md
    and privacy.png as :func:`run_study` writes them; returns the markdown table. A study already in ``out_dir``
    (one of the pooled ones, say) is refused unless ``overwrite``."""
    import json

    check_output_folder(out_dir)
    if not overwrite:
        check_no_earlier_study(out_dir, "pool into another --out, or replace them with --overwrite")

    studies = []
    for path in paths:
        try:
            studies.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as err:
            raise FedmergeError(f"cannot read privacy study {path}: {err}") from err
    pooled = pool_studies(studies, [str(p) for p in paths])
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_study(out_dir, pooled, settings_from_mapping(pooled["study"]), Scenario.from_mapping(pooled["scenario"]))


STUDY_FILES = ("privacy.json", "privacy.md", "privacy.png")  # what write_study writes


def check_no_earlier_study(out_dir: Path, advice: str) -> None:
    """FedmergeError naming the :data:`STUDY_FILES` an earlier study (or pool) left in ``out_dir``, with ``advice``
    (the flags that keep or replace them): what ``privacy run`` and ``privacy pool`` refuse to replace silently."""
    existing = [name for name in STUDY_FILES if (Path(out_dir) / name).exists()]
    if existing:
        raise FedmergeError(f"{out_dir} already holds {', '.join(existing)} (an earlier study's results): {advice}")


def write_study(out_dir: Path, record: Mapping[str, Any], study: PrivacyStudySettings, cfg: Scenario) -> str:
    """privacy.json (``record`` with :func:`study_warnings`), privacy.md (the table, then the warnings) and
    privacy.png of a whole study into ``out_dir``; returns the markdown."""
    warnings = study_warnings(cfg, study, record["probe"], record.get(DOMAIN_USERS_KEY))
    for warning in warnings:
        logger.warning("privacy study: %s", warning)
    write_json_atomic(out_dir / "privacy.json", {**record, "warnings": warnings})
    table = markdown_table(record["utility"], record["probe"], study, cfg)
    if warnings:
        table += "\nWarnings:\n" + "".join(f"- {w}\n" for w in warnings)
    (out_dir / "privacy.md").write_text(table)
    plot_study(record["utility"], record["probe"], study, out_dir / "privacy.png")
    return table


STUDY_PARTS = ("all", "utility", "attacks")
DOMAIN_USERS_KEY = "training_domain_users"  # privacy.json: each training domain's users (for the δ ≪ 1/n check)
MIN_PROBED_USERS = 100  # members or held-out users probed below which the attack figures are called noisy


def study_warnings(cfg: Scenario, study: PrivacyStudySettings, probe: Mapping[str, Any] | None,
                   domain_users: Mapping[str, int] | None) -> list[str]:
    """What a reader must know before trusting the study's figures, recorded in privacy.json and privacy.md: seeded
    DP noise, a δ not below 1/n for user-level cells (n the smallest of ``domain_users``, each training domain's
    users as the study recorded them; no check without them), a ``privacy.delta`` set away from its default that the
    study replaces, and (with ``probe``) too few probed users for the attack figures."""
    from fedmerge.config import DEFAULTS

    out = []
    if cfg.privacy.noise_seed >= 0:
        out.append(f"the DP noise is seeded (privacy.noise_seed = {cfg.privacy.noise_seed}): reproducible for a study, "
                   "but whoever knows the seed can regenerate and subtract it; a deployment keeps -1 (OS entropy)")
    if cfg.privacy.delta not in (study.delta, DEFAULTS["privacy"]["delta"]):
        out.append(f"privacy.delta = {cfg.privacy.delta:g} is not used: every DP cell runs at privacy_study.delta = "
                   f"{study.delta:g}")
    if "user" in study.units and domain_users:
        n = min(domain_users.values())
        if study.delta >= 1 / n:
            out.append(f"δ = {study.delta:g} is not below 1/{n} (the smallest training domain's users): a mechanism "
                       "that publishes one user's data outright in full meets (ε, δ) at this δ; use δ ≪ 1/n")
    if probe is not None:
        sizes = probe.get("probed_per_group", [])
        small = [f"{n} {group}" for n, group in zip(sizes, ("members", "held-out users")) if n < MIN_PROBED_USERS]
        users = probe.get("reference_model_users")
        if probe.get("reference_models") and isinstance(users, int) and users < MIN_PROBED_USERS:
            small.append(f"LiRA reference models of {users} users")
        if small:
            out.append(f"attacks on {', '.join(small)} (fewer than {MIN_PROBED_USERS}): their AUC and TPR are noisy, "
                       "one seed may land far from the attack's real success; more users (privacy_study."
                       "probe_max_users, member_fraction) or seeds narrow it")
    return out


def run_study(cfg: Scenario, study: PrivacyStudySettings, out_dir: Path, overwrite: bool = False,
              resume: bool = False, part: str = "all") -> str:
    """The whole study into ``out_dir`` (see the module docstring; ``overwrite``: replace an earlier study's run
    folders, attack files and privacy.json/.md/.png there, refused otherwise; ``resume``: keep what an earlier run
    of this study finished there); returns the markdown table.
    ``part="utility"`` or ``"attacks"`` runs that half only (its run folders or attack files, nothing else) and
    returns a line saying what it wrote; a later ``resume`` run of the whole study reads them back."""
    from fedmerge.privacy.client import releases_per_client

    if part not in STUDY_PARTS:
        raise FedmergeError(f"unknown study part {part!r}; valid: {', '.join(STUDY_PARTS)}")
    if overwrite and resume:
        raise FedmergeError("--resume keeps an earlier study's runs and --overwrite replaces them; pass only one")
    check_output_folder(out_dir)
    check_noise_reaches(cfg, study)
    if part != "utility" and not resume and not overwrite:
        check_no_earlier_attacks(out_dir, study)
    if part != "attacks" and not resume and not overwrite:  # privacy.json is written from the utility half on
        check_no_earlier_study(out_dir, "--resume continues that study, --overwrite replaces it, or choose another "
                               "--out")
    from fedmerge.runners.client import reusing_updates

    out_dir.mkdir(parents=True, exist_ok=True)
    study_json = study_record(study)
    with reusing_updates() as memo:
        if part == "attacks":
            probe = attack_sweep(cfg, study, out_dir, resume=resume)
            return (f"attack scores of {len(probe['rows'])} cell(s) × {len(study.seeds)} seed(s) in "
                    f"{out_dir / 'attacks'}; run the whole study with --resume to read them back")
        utility = utility_sweep(cfg, study, out_dir, overwrite=overwrite, resume=resume)
        write_json_atomic(out_dir / "privacy.json", {"study": study_json, "utility": utility})  # kept if attacks fail
        if part == "utility":
            return (f"utility runs of {len(utility)} cell(s) × {len(study.seeds)} seed(s) in {out_dir}; run the whole "
                    "study with --resume to read them back")
        probe = attack_sweep(cfg, study, out_dir, resume=resume)
    domain_users = {d: cfg.load_domain(d).n_users for d in cfg.data.training_domains()}
    return write_study(out_dir, {"study": study_json, "releases_per_client": releases_per_client(cfg),
                                 "utility": utility, "probe": probe, "scenario": cfg.to_mapping(),
                                 DOMAIN_USERS_KEY: domain_users,
                                 "nonprivate_updates": {"trained": memo.trained, "reused": memo.reused}}, study, cfg)
