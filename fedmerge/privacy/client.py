"""A client's private training: the ``[privacy]`` settings, the noise calibration and ε of each unit of privacy.

Two units (``privacy.unit``):

``"domain"``
    The client's whole data set is the unit: the trained update is clipped to ``clip_norm`` and Gaussian noise is
    added before it leaves the client (:func:`fedmerge.privacy.dp.privatize_update`); ε from the analytic Gaussian
    mechanism composed over the client's releases (:func:`fedmerge.privacy.dp.epsilon_for`).
``"user"``
    One user (all of their interactions) is the unit. Sequential family: DP-SGD inside the client, users
    Poisson-sampled per step, each user's gradient clipped to ``max_grad_norm`` (:mod:`fedmerge.privacy.dpsgd`);
    ε from opacus' RDP or PRV accountant over every step of every release. Text-LAE: the Gaussian mechanism on the
    Gram matrix of the users' text profiles, each bounded by ``user_norm_bound`` (:mod:`fedmerge.privacy.lae`);
    ε from the analytic Gaussian mechanism. The Gram does not depend on the round's weights, so by default
    (``gram_noise = "once"``) a client draws its noisy Gram once per run and every release reuses it
    (post-processing: ε of one release; the noise seed drawn from OS entropy at the first release stays in the
    client's memory, Flower's ``context.state``, and a later release that finds none is refused rather than drawn
    again); ``"per_release"`` draws it afresh for each release and composes them, as for the domain unit.

A client ships ``R = 1 + baselines.fedavg_rounds`` updates (the one-shot update, then one per FedAvg round; the same
users take part in each; under DP-SGD the one-shot update runs ``privacy.epochs`` and each FedAvg round
``privacy.fedavg_epochs``, by default as many). With ``target_epsilon > 0`` the noise multiplier is calibrated so
that all R releases together are (ε, δ)-DP (:func:`accounted_releases` of them composed); otherwise
``noise_multiplier`` is used as given. The train metrics report ``dp_epsilon`` (after the releases so far, round r:
r + 1 releases, :func:`accounted_releases` of them composed) and ``dp_epsilon_run`` (after all R).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedmerge.errors import FedmergeError

if TYPE_CHECKING:  # torch-free at import: scenario validation runs validate_privacy
    import torch

    from fedmerge.data.domain import Domain
    from fedmerge.models.base import ModelFamily, StateDict
    from fedmerge.scenario import PrivacySettings, Scenario

UNITS = ("domain", "user")
ACCOUNTANTS = ("rdp", "prv")
GRAM_REPAIRS = ("clip", "abs")  # text-LAE, unit "user": how the noisy Gram is made PSD (fedmerge.privacy.lae.psd_repair)
GRAM_NOISE = ("once", "per_release")  # text-LAE, unit "user": one noisy Gram per client and run, or one per release
USER_LEVEL_FAMILIES = ("sequential", "text-lae")  # DP-SGD and the private Gram closed form


def uses_dpsgd(cfg: Scenario) -> bool:
    """Whether the run's clients train with DP-SGD (unit "user", sequential family): subsampled-Gaussian accounting;
    every other mechanism is one Gaussian release per round (analytic Gaussian accounting)."""
    return cfg.privacy.unit == "user" and cfg.model.family == "sequential"


def check_user_level(cfg: Scenario) -> None:
    """FedmergeError unless the scenario's family has a user-level mechanism it can run with (sequential: no text
    tower, no popularity negatives; text-lae: one λ), in the one-shot round and, with their own
    ``baselines.fedavg_local_params``, in the FedAvg rounds (refused only when the first round trained)."""
    family = cfg.model.family
    if family not in USER_LEVEL_FAMILIES:
        raise FedmergeError(f"privacy.unit = 'user' supports model.family {list(USER_LEVEL_FAMILIES)}, got "
                            f"{family!r}; use privacy.unit = 'domain'")
    settings = [("model.params", cfg.model.params)]
    if cfg.baselines.fedavg_rounds and cfg.baselines.fedavg_local_params:
        settings.append(("baselines.fedavg_local_params", {**cfg.model.params, **cfg.baselines.fedavg_local_params}))
    for key, params in settings:
        if family == "sequential":  # what DP-SGD refuses when a client starts training, hours into a study
            if params.get("encoder_layers", 0):
                raise FedmergeError(f"privacy.unit = 'user' with {key}.encoder_layers > 0 is not supported "
                                    "(per-user passes through the text tower); set encoder_layers = 0")
            if params.get("n_negatives") is not None and params.get("negative_sampling", "uniform") == "popularity":
                raise FedmergeError(f"privacy.unit = 'user' cannot sample negatives by popularity (the item counts "
                                    f"come from the private training data); set {key}.negative_sampling = 'uniform' "
                                    "or drop n_negatives")
        lam = params.get("lam")
        if family == "text-lae" and (lam is None or isinstance(lam, (list, tuple))):
            raise FedmergeError(f"privacy.unit = 'user' with text-lae needs one λ ({key}.lam = value), got "
                                f"{'the default grid' if lam is None else lam}: choosing λ on the users' validation "
                                "items would spend privacy that is not accounted")


def privacy_setting_warnings(cfg: Scenario) -> list[str]:
    """Settings that load but do not do what they seem to (a results.json ``warnings`` line each): DP on with no
    noise (a clip-only run can be meant, so not refused), both ways of setting the noise given, noise or secure-mode
    settings with DP off, seeded DP noise, and the pooled-data joint baseline beside a DP run."""
    privacy, lines = cfg.privacy, []
    if privacy.enabled and privacy.target_epsilon <= 0 and privacy.noise_multiplier == 0:
        lines.append("privacy.enabled with neither target_epsilon nor noise_multiplier: updates are clipped, not "
                     "noised (ε = ∞, no DP guarantee)")
    if privacy.enabled and privacy.target_epsilon > 0 and privacy.noise_multiplier > 0:
        lines.append(f"privacy.target_epsilon = {privacy.target_epsilon:g} sets the noise; privacy.noise_multiplier "
                     f"= {privacy.noise_multiplier:g} is not used")
    if not privacy.enabled and (privacy.target_epsilon > 0 or privacy.noise_multiplier > 0):
        lines.append("privacy.enabled is false: privacy.target_epsilon / noise_multiplier are not used (no DP)")
    if not privacy.enabled and privacy.secure_mode:
        lines.append("privacy.enabled is false: privacy.secure_mode is not used (no DP noise to draw)")
    if privacy.enabled and privacy.noise_seed >= 0:
        lines.append(f"privacy.noise_seed = {privacy.noise_seed}: every client's DP noise and sampling follow from the "
                     "scenario, so whoever knows it (the server, which hands it out) can recompute and subtract the "
                     "noise: the ε reported holds only against parties that do not know the seed (reproducible "
                     "studies; deployed nodes refuse it, set -1)")
    if privacy.enabled and cfg.baselines.joint:
        lines.append("baselines.joint pools the domains' private data: the joint model has no DP (set "
                     "baselines.joint = false in a private run)")
    return lines


def validate_privacy(cfg: Scenario) -> None:
    """Clear errors for ``[privacy]`` values no mechanism can run with."""
    privacy = cfg.privacy
    if privacy.unit not in UNITS:
        raise FedmergeError(f"privacy.unit must be one of {list(UNITS)}, got {privacy.unit!r}")
    if privacy.accountant not in ACCOUNTANTS:
        raise FedmergeError(f"privacy.accountant must be one of {list(ACCOUNTANTS)}, got {privacy.accountant!r}")
    for key in ("clip_norm", "max_grad_norm", "epochs", "user_norm_bound"):
        if not 0 < getattr(privacy, key) < math.inf:
            raise FedmergeError(f"privacy.{key} must be a positive finite number, got {getattr(privacy, key)}")
    if privacy.gram_repair not in GRAM_REPAIRS:
        raise FedmergeError(f"privacy.gram_repair must be one of {list(GRAM_REPAIRS)}, got {privacy.gram_repair!r}")
    if privacy.gram_noise not in GRAM_NOISE:
        raise FedmergeError(f"privacy.gram_noise must be one of {list(GRAM_NOISE)}, got {privacy.gram_noise!r}")
    if not 0 <= privacy.fedavg_epochs < math.inf:
        raise FedmergeError(f"privacy.fedavg_epochs must be a finite number >= 0 (0: as privacy.epochs), got "
                            f"{privacy.fedavg_epochs}")
    if not 0 < privacy.sample_rate <= 1:
        raise FedmergeError(f"privacy.sample_rate must lie in (0, 1], got {privacy.sample_rate}")
    if not 0 < privacy.delta < 1:
        raise FedmergeError(f"privacy.delta must lie in (0, 1), got {privacy.delta}")
    for key in ("target_epsilon", "noise_multiplier"):
        if not 0 <= getattr(privacy, key) < math.inf:
            raise FedmergeError(f"privacy.{key} must be a finite number >= 0, got {getattr(privacy, key)}")
    if privacy.enabled and privacy.unit == "user":
        check_user_level(cfg)
    if privacy.enabled and privacy.secure_mode:
        if not uses_dpsgd(cfg):
            raise FedmergeError("privacy.secure_mode = true covers the DP-SGD noise only (privacy.unit = 'user' with "
                                f"model.family = 'sequential'), got unit {privacy.unit!r}, family {cfg.model.family!r}; "
                                "set secure_mode = false")
        if privacy.noise_seed >= 0:
            raise FedmergeError(f"privacy.secure_mode = true draws the sampling and the noise from OS entropy; "
                                f"privacy.noise_seed must be -1, got {privacy.noise_seed}")


# What a DP client ships beside its weights: the mechanism's public settings and its ε, all fixed by the scenario,
# never by the data. Everything else its training reports depends on the private data without being covered by ε
# (the user count, losses, validation metrics, clipped fractions, epochs and the stop reason chosen by early
# stopping, training time) and stays on the client unless ``privacy.release_diagnostics``; only a wall-clock cap
# that fired is still reported (``stop_reason = "max_seconds"``), since a result it cut must say so. The evaluation
# metrics a client reports on its private test users (and their number) are outside ε too: they are what the
# federation measures.
RELEASED_METRICS = frozenset({
    "dp_noise_multiplier", "dp_delta", "dp_unit", "dp_epsilon", "dp_epsilon_run", "dp_clip_norm", "dp_user_bound",
    "dp_steps", "dp_sample_rate", "dp_max_grad_norm",
})


def released_metrics(metrics: Mapping[str, Any], privacy: PrivacySettings) -> dict[str, Any]:
    """The training metrics a client under ``privacy`` ships: all of them without DP or with
    ``release_diagnostics``, else only :data:`RELEASED_METRICS` and a ``stop_reason`` that says the wall-clock
    cap cut the training."""
    from fedmerge.models.base import STOP_MAX_SECONDS

    if not privacy.enabled or privacy.release_diagnostics:
        return dict(metrics)
    out = {k: v for k, v in metrics.items() if k in RELEASED_METRICS}
    if metrics.get("stop_reason") == STOP_MAX_SECONDS:
        out["stop_reason"] = STOP_MAX_SECONDS
    return out


def releases_per_client(cfg: Scenario) -> int:
    """Updates each client ships in a run: the one-shot update plus one per FedAvg round."""
    return 1 + cfg.baselines.fedavg_rounds


def gram_drawn_once(cfg: Scenario) -> bool:
    """Whether the run's clients draw their noisy Gram once and reuse it (text-LAE, unit "user", ``gram_noise =
    "once"``): every release is then a function of the one Gaussian release Â and public weights (post-processing),
    so a client's ε is that of one release however many it ships."""
    from fedmerge.config import runs_user_gram_mechanism

    privacy = cfg.privacy
    return runs_user_gram_mechanism(cfg.model.family, privacy.enabled, privacy.unit) and privacy.gram_noise == "once"


def accounted_releases(cfg: Scenario, releases: int) -> int:
    """Gaussian releases composed in a client's ε after it shipped ``releases`` updates: all of them, or at most one
    when the noisy Gram is drawn once (:func:`gram_drawn_once`)."""
    return min(releases, 1) if gram_drawn_once(cfg) else releases


def release_epochs(privacy: PrivacySettings, round_index: int) -> float:
    """DP-SGD epochs of a client's release ``round_index`` (0: the one-shot update, r ≥ 1: FedAvg round r):
    ``privacy.epochs``, and ``privacy.fedavg_epochs`` for the FedAvg rounds when it is set (> 0)."""
    return privacy.fedavg_epochs if round_index > 0 and privacy.fedavg_epochs > 0 else privacy.epochs


def dpsgd_steps(cfg: Scenario, releases: int) -> int:
    """DP-SGD steps of a client's first ``releases`` releases (same noise multiplier and rate: their composition is
    that of this many subsampled Gaussian steps)."""
    from fedmerge.privacy.dpsgd import UserLevelDP

    privacy = cfg.privacy
    return sum(UserLevelDP(0.0, 1.0, privacy.sample_rate, release_epochs(privacy, r)).steps for r in range(releases))


def run_noise_multiplier(cfg: Scenario) -> float:
    """The run's noise multiplier: ``privacy.noise_multiplier``, or calibrated to ``target_epsilon`` over all releases."""
    privacy = cfg.privacy
    target = privacy.target_epsilon
    if target <= 0:
        return privacy.noise_multiplier
    releases = accounted_releases(cfg, releases_per_client(cfg))
    if not uses_dpsgd(cfg):
        from fedmerge.privacy.dp import noise_multiplier_for

        return noise_multiplier_for(target, privacy.delta, rounds=releases)
    from fedmerge.privacy.dpsgd import user_noise_multiplier

    return user_noise_multiplier(target, privacy.delta, privacy.sample_rate, dpsgd_steps(cfg, releases),
                                 privacy.accountant)


def run_epsilon(cfg: Scenario, z: float, releases: int) -> float:
    """ε after a client shipped ``releases`` updates with noise multiplier ``z`` (∞ for z = 0) at ``privacy.delta``
    (:func:`accounted_releases` of them composed)."""
    privacy = cfg.privacy
    if not uses_dpsgd(cfg):
        from fedmerge.privacy.dp import epsilon_for

        return epsilon_for(z, privacy.delta, rounds=accounted_releases(cfg, releases))
    from fedmerge.privacy.dpsgd import user_epsilon

    return user_epsilon(z, privacy.sample_rate, dpsgd_steps(cfg, releases), privacy.delta, privacy.accountant)


def private_train(
    family: ModelFamily, theta0: StateDict, domain: Domain, features: torch.Tensor, cfg: Scenario, *,
    seed: int, round_index: int, noise_seed: int | None, progress: bool = False,
) -> tuple[StateDict, dict[str, Any]]:
    """Train under ``privacy.unit`` (``privacy.enabled`` must be true): the weights the client may ship, and metrics
    with ``dp_*`` entries (noise multiplier, δ, unit code 0 = domain, 1 = user; for z > 0 ε so far and over the
    run)."""
    privacy = cfg.privacy
    z = run_noise_multiplier(cfg)
    if privacy.unit == "domain":
        from fedmerge.privacy.dp import privatize_update
        from fedmerge.runners.client import nonprivate_update

        weights, metrics = nonprivate_update(family, theta0, domain, features, seed=seed, progress=progress)
        weights = privatize_update(theta0, weights, privacy.clip_norm, z, seed=noise_seed)
        metrics = {**metrics, "dp_clip_norm": privacy.clip_norm}
    elif family.name == "text-lae":
        from fedmerge.privacy.lae import train_text_lae_user_level

        weights, metrics = train_text_lae_user_level(family, theta0, domain, features, noise_multiplier=z,
                                                     bound=privacy.user_norm_bound, noise_seed=noise_seed,
                                                     repair=privacy.gram_repair)
    else:
        from fedmerge.privacy.dpsgd import UserLevelDP, train_user_level

        settings = UserLevelDP(noise_multiplier=z, max_grad_norm=privacy.max_grad_norm,
                               sample_rate=privacy.sample_rate, epochs=release_epochs(privacy, round_index))
        weights, metrics = train_user_level(family, theta0, domain, features, settings, seed=seed,
                                            noise_seed=noise_seed, progress=progress, secure_mode=privacy.secure_mode)
    metrics = {**metrics, "dp_noise_multiplier": z, "dp_delta": privacy.delta,
               "dp_unit": UNITS.index(privacy.unit)}
    if z > 0:  # z = 0 guarantees nothing (ε = ∞, which JSON results cannot hold): no ε entries
        metrics["dp_epsilon"] = run_epsilon(cfg, z, round_index + 1)
        metrics["dp_epsilon_run"] = run_epsilon(cfg, z, releases_per_client(cfg))
    return weights, metrics
