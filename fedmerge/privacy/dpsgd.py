"""User-level DP-SGD for the sequential family: Poisson-sampled users, per-user clipping, Gaussian noise, accounting.

The unit of privacy is one user: everything the user contributes (all training windows of their sequence). Each
step t

1. samples a batch B_t of users, each user independently with probability q (Poisson sampling, opacus'
   :class:`~opacus.utils.uniform_sampler.UniformWithReplacementSampler`, as its ``DPDataLoader`` does);
2. computes every sampled user's gradient g_u = ∇_θ L_u(θ), L_u the mean next-item cross-entropy over all positions
   of u's windows (the family's own training loss, :meth:`SequentialFamily._batch_loss`);
3. clips and noises them with opacus' :class:`~opacus.optimizers.DPOptimizer`:
   ĝ = (Σ_{u∈B_t} g_u · min(1, C/‖g_u‖₂) + N(0, (zC)² I)) / (qN), then takes an AdamW step with ĝ (post-processing).

A user enters the released weights only through their clipped gradients, so adding or removing one user changes
each step's sum by at most C in L2: T steps of the subsampled Gaussian mechanism, accounted with opacus' RDP
(Mironov et al. 2019) or PRV (Gopi et al. 2021) accountant. R releases of the same users (one-shot + FedAvg
rounds) compose as R·T steps (:func:`user_epsilon`).

Per-user gradients: opacus' :class:`~opacus.GradSampleModule` computes per-*row* gradients of layers whose first
dimension is the batch; here the item adapter runs on the whole catalog (rows are items, shared by all users) and a
user owns several rows (windows), so its hooks cannot give per-user gradients. They are computed exactly instead,
one autograd pass per sampled user (:func:`per_user_gradients`), and handed to the DPOptimizer as ``grad_sample``.
The cost is one forward/backward of the catalog adapter per sampled user and step.

What else is private: no validation data is used (no early stopping, no checkpoint choice: the weights after the
last step are released), and the sampling and the noise draw from a secret seed (OS entropy unless a study sets
``privacy.noise_seed``): a server that knows which users a step sampled gets no amplification by sampling. The
data-independent proximal term μ(θ − θ₀) is added after the noise. Not covered: the floating-point attacks on
Gaussian samplers (opacus' ``secure_mode`` needs torchcsprng).
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from fedmerge.data.domain import Domain
from fedmerge.errors import FedmergeError
from fedmerge.models.base import ModelFamily, StateDict

if TYPE_CHECKING:
    from fedmerge.scenario import PrivacySettings


@dataclass(frozen=True)
class UserLevelDP:
    """DP-SGD settings of one release: noise multiplier z (σ = zC), clip norm C, sampling rate q, expected epochs."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    epochs: float

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must lie in (0, 1], got {self.sample_rate}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be a finite number > 0, got {self.epochs}")

    @property
    def steps(self) -> int:
        """T = ⌈epochs / q⌉: each user is sampled ``epochs`` times in expectation."""
        return math.ceil(self.epochs / self.sample_rate - 1e-9)


def user_steps(privacy: PrivacySettings) -> int:
    """Steps per release of the ``[privacy]`` settings (see :attr:`UserLevelDP.steps`)."""
    return UserLevelDP(0.0, 1.0, privacy.sample_rate, privacy.epochs).steps


def _accountant(name: str) -> Any:
    from opacus.accountants import create_accountant

    try:
        return create_accountant(mechanism=name)
    except ValueError as err:
        raise FedmergeError(f"unknown accountant {name!r}; valid: 'rdp', 'prv'") from err


def user_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian steps (noise multiplier z, rate q) at δ; ∞ for z = 0."""
    if noise_multiplier == 0:
        return math.inf
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    acc = _accountant(accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]  # the accountant's own record format
    return float(acc.get_epsilon(delta=delta))


def user_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest z (within opacus' ε tolerance 0.01) for which ``steps`` steps at rate q are (ε, δ)-DP."""
    from opacus.accountants.utils import get_noise_multiplier

    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if math.isinf(target_epsilon):
        return 0.0
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant))


def per_user_gradients(params: Sequence[torch.Tensor], losses: Sequence[Callable[[], torch.Tensor]]) -> list[torch.Tensor]:
    """Per-user gradients stacked per parameter: out[j][b] = ∂ losses[b]() / ∂ params[j] (zeros where unused)."""
    stacked: list[list[torch.Tensor]] = [[] for _ in params]
    for loss_fn in losses:
        grads = torch.autograd.grad(loss_fn(), list(params), allow_unused=True)
        for j, (p, g) in enumerate(zip(params, grads)):
            stacked[j].append(torch.zeros_like(p) if g is None else g)
    return [torch.stack(g) if g else p.new_zeros((0, *p.shape)) for p, g in zip(params, stacked)]


def train_user_level(
    family: ModelFamily,
    theta0: StateDict,
    domain: Domain,
    item_features: torch.Tensor,
    settings: UserLevelDP,
    *,
    seed: int = 0,
    noise_seed: int | None = None,
    progress: bool = False,
) -> tuple[StateDict, dict[str, Any]]:
    """DP-SGD from ``theta0`` on ``domain`` with per-user clipping (see the module docstring); the last weights.

    ``seed`` drives dropout and sampled negatives; ``noise_seed`` the user sampling and the noise (None: OS entropy).
    """
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    from fedmerge.models.sequential import SequentialFamily, training_windows

    if not isinstance(family, SequentialFamily):
        raise FedmergeError(f"user-level DP-SGD supports the 'sequential' family, got {family.name!r}; "
                            "use privacy.unit = 'domain' for it")
    if family.encoder_layers:
        raise FedmergeError("user-level DP-SGD with encoder_layers > 0 is not supported (per-user passes through the "
                            "text tower); set encoder_layers = 0")
    if family.n_negatives is not None and family.negative_sampling == "popularity":
        raise FedmergeError("user-level DP-SGD cannot sample negatives by popularity (the item counts come from the "
                            "private training data); set negative_sampling = 'uniform' or n_negatives = None")
    users = [w for w in (training_windows([seq], family.max_len) for seq in domain.train) if w]
    if not users:
        raise FedmergeError(f"domain {domain.name!r} has no training sequence with two or more items")
    module, features, frozen_experts = family.training_module(theta0, domain, item_features, seed)
    params = [p for p in module.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if family.proximal_mu else []
    secret = secrets.randbits(62) if noise_seed is None else int(noise_seed)
    sampler = UniformWithReplacementSampler(num_samples=len(users), sample_rate=settings.sample_rate,
                                            generator=torch.Generator().manual_seed(secret), steps=settings.steps)
    optimizer = DPOptimizer(
        torch.optim.AdamW(params, lr=family.lr, weight_decay=family.weight_decay),
        noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
        expected_batch_size=max(1, round(settings.sample_rate * len(users))),
        generator=torch.Generator().manual_seed(secret + 1),
    )
    negatives = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    batch_sizes, clipped, losses = [], 0, []
    module.train()
    for indices in tqdm(sampler, total=settings.steps, desc=f"DP-SGD {domain.name}", disable=not progress, unit="step"):
        step_losses: list[float] = []

        def user_loss(i: int) -> Callable[[], torch.Tensor]:
            def loss() -> torch.Tensor:
                value = family._batch_loss(module, users[i], features, negatives)
                step_losses.append(float(value.detach()))
                return value
            return loss

        grads = per_user_gradients(params, [user_loss(i) for i in indices])
        if indices:
            norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in grads], dim=1).norm(dim=1)
            clipped += int((norms > settings.max_grad_norm).sum())
        for p, g in zip(params, grads):
            p.grad_sample = g
        if optimizer.pre_step():  # clip, sum, noise, scale into p.grad
            for p, a in zip(params, anchor):
                p.grad += family.proximal_mu * (p.detach() - a)
            optimizer.original_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        batch_sizes.append(len(indices))
        losses.extend(step_losses)
    weights = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    sampled = max(1, sum(batch_sizes))
    metrics = {
        "dp_steps": settings.steps,
        "dp_sample_rate": settings.sample_rate,
        "dp_max_grad_norm": settings.max_grad_norm,
        "dp_users": len(users),
        "dp_mean_batch_users": float(np.mean(batch_sizes)),
        "dp_clipped_fraction": clipped / sampled,
        "train_seconds": time.perf_counter() - start,
        "frozen_experts": len(frozen_experts),
    }
    if losses:  # mean user loss over the last tenth of the sampled users
        metrics["final_loss"] = float(np.mean(losses[-max(1, len(losses) // 10):]))
    return weights, metrics
