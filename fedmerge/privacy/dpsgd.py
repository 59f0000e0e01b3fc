"""User-level DP-SGD for the sequential family: Poisson-sampled users, per-user clipping, Gaussian noise, accounting.

The unit of privacy is one user: everything the user contributes (all training windows of their sequence). Each
step t

1. samples a batch B_t of users, each user independently with probability q (Poisson sampling, opacus'
   :class:`~opacus.utils.uniform_sampler.UniformWithReplacementSampler`, as its ``DPDataLoader`` does);
2. computes every sampled user's gradient g_u = ∇_θ L_u(θ), L_u the mean next-item cross-entropy over all positions
   of u's windows (the family's own training loss, :meth:`SequentialFamily._batch_loss`, in the fixed-shape form
   :meth:`SequentialFamily.window_loss`);
3. clips and noises them with opacus' :class:`~opacus.optimizers.DPOptimizer`:
   ĝ = (Σ_{u∈B_t} g_u · min(1, C/‖g_u‖₂) + N(0, (zC)² I)) / (qN), then takes an AdamW step with ĝ (post-processing).

A user enters the released weights only through their clipped gradients, so adding or removing one user changes
each step's sum by at most C in L2: T steps of the subsampled Gaussian mechanism, accounted with opacus' RDP
(Mironov et al. 2019) or PRV (Gopi et al. 2021) accountant. R releases of the same users (one-shot + FedAvg
rounds) compose as R·T steps (:func:`user_epsilon`).

Per-user gradients: opacus' :class:`~opacus.GradSampleModule` computes per-*row* gradients of layers whose first
dimension is the batch; here the item adapter runs on the whole catalog (rows are items, shared by all users) and a
user owns several windows, so its hooks cannot give per-user gradients. They are computed exactly with
``torch.func`` instead (:func:`per_user_gradients`: ``vmap(grad(L_u))`` over chunks of users, L_u the fixed-shape
:meth:`~fedmerge.models.sequential.SequentialFamily.window_loss`) and handed to the DPOptimizer as ``grad_sample``.
The cost is one forward/backward of the item adapter per sampled user and step (on the whole catalog, or with the
sampled softmax on the user's items and its negatives): arithmetic, which vectorizing does not remove on a CPU
(results/privacy/amazon-seq-cost/README.md).

What else is private: no validation data is used (no early stopping, no checkpoint choice: the weights after the
last step are released), and the sampling, the noise, the dropout masks and the sampled negatives draw from a
secret seed (OS entropy unless a study sets ``privacy.noise_seed``): a server that knows which users a step sampled
gets no amplification by sampling, and one that knew the draws of a user's neighbours in the stream could tell its
presence from their shifted gradients (until 2026-12-08 masks and negatives came from the client's training seed). The
data-independent proximal term μ(θ − θ₀) is added after the noise.

``secure_mode`` (``privacy.secure_mode``, default off) turns on the DPOptimizer's floating-point-safe sampler: each
noise entry is the sum of 4 Gaussian draws of std σ, halved (Holohan & Braghin 2021), against the attacks that read
the unnoised value from the low-order bits of a floating-point Gaussian sample (Mironov 2012; Jin et al. 2022). It
needs no extra package, refuses a ``noise_seed`` (sampling and noise from OS entropy, so runs are not reproducible)
and costs 4 draws per entry. Not covered: opacus' ``PrivacyEngine`` in secure mode also replaces the generators by a
cryptographic one (torchcsprng, not installed and not used here); the generators here are torch's, seeded with 62
bits of OS entropy.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fedmerge.data.domain import Domain
from fedmerge.errors import FedmergeError
from fedmerge.privacy.dp import noise_generator_seed
from fedmerge.reproducibility import gradient_threads
from fedmerge.models.base import PAD, ModelFamily, StateDict, pad_sequences
from fedmerge.models.sequential import SequentialFamily, training_windows

# users per vmap pass of per_user_gradients, full softmax / sampled softmax: the fastest of those measured on the
# 2-core CPU container (results/privacy/amazon-seq-cost/README.md); larger chunks pad more and leave the caches
CHUNK_USERS_FULL, CHUNK_USERS_SAMPLED = 2, 8


def chunk_users_for(family: SequentialFamily) -> int:
    """Users per vectorized gradient pass for ``family``'s loss (``CHUNK_USERS_FULL`` or ``CHUNK_USERS_SAMPLED``)."""
    return CHUNK_USERS_FULL if family.n_negatives is None else CHUNK_USERS_SAMPLED


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
    """The smallest z (within opacus' ε tolerance 0.01) for which ``steps`` steps at rate q are (ε, δ)-DP.

    opacus' binary search warns ("optimal order is the largest alpha") on each small-z probe it then rejects; those
    warnings are silenced here. :func:`user_epsilon` of the calibrated z (what a client reports) keeps the warning.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if math.isinf(target_epsilon):
        return 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant))


class _WindowLoss(nn.Module):
    """``family.window_loss`` of ``model`` as a module's forward, for ``torch.func.functional_call``."""

    def __init__(self, family: SequentialFamily, model: nn.Module, features: torch.Tensor) -> None:
        super().__init__()
        self.family, self.model, self.features = family, model, features

    def forward(self, windows: torch.Tensor, negatives: torch.Tensor | None,
                log_expected: torch.Tensor | None) -> torch.Tensor:
        return self.family.window_loss(self.model, windows, self.features, negatives, log_expected)


def padded_users(users: Sequence[Sequence[np.ndarray]]) -> torch.Tensor:
    """(B, W, C) int64: user b's training windows right-aligned in rows of its (W, C) slab, PAD elsewhere; W the most
    windows of any user, C the longest window (the fixed shapes of :meth:`SequentialFamily.window_loss`)."""
    n_windows = max(len(w) for w in users)
    width = max(len(x) for w in users for x in w)
    out = torch.full((len(users), n_windows, width), PAD, dtype=torch.long)
    for b, windows in enumerate(users):
        out[b, : len(windows)] = pad_sequences(windows, width)
    return out


def per_user_gradients(
    family: SequentialFamily,
    module: nn.Module,
    users: Sequence[Sequence[np.ndarray]],
    features: torch.Tensor,
    generator: torch.Generator,
    chunk_users: int | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(per-user gradients stacked per trainable parameter, out[j][b] = ∂L_b/∂θ_j; the losses L_b, (B,)) with
    L_b = :meth:`SequentialFamily.window_loss` of user b's windows ``users[b]``.

    ``torch.func``: ``vmap(grad_and_value(L))`` over chunks of ``chunk_users`` users (None: :func:`chunk_users_for`;
    bounds the memory: the full softmax holds a (chunk, n_items, adapter width) activation), the parameters shared
    (``functional_call``).
    Each L_b reads only user b's windows and randomness of its own, so row b is exactly user b's gradient.
    Randomness, as one autograd pass per user would draw it: the sampled softmax draws each user's own negatives
    from ``generator``, user after user in the order of ``users``; dropout (``module`` in training mode) draws an
    independent mask per user from torch's global generator (``randomness="different"``; other numbers than a
    per-user loop's masks, same distribution). The draws are consumed in order, so adding a user shifts the numbers
    every later user gets: with ``generator`` and the global generator seeded from a secret (as
    :func:`train_user_level` does), each user's draws are fresh independent randomness whatever its position, and
    adding or removing a user changes no other user's distribution of gradients (DP-SGD's sensitivity argument);
    seeded from a value the server knows, the clipped sum of a step could move by more than the clipping norm.
    """
    from torch.func import functional_call, grad_and_value, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = {f"model.{n}": p.detach() for n, p in module.named_parameters() if p.requires_grad}
    wrapper = _WindowLoss(family, module, features)

    def loss(theta: dict[str, torch.Tensor], windows: torch.Tensor, negatives: torch.Tensor | None,
             log_expected: torch.Tensor | None) -> torch.Tensor:
        return functional_call(wrapper, theta, (windows, negatives, log_expected))

    sampled = family.n_negatives is not None
    per_user = vmap(grad_and_value(loss), in_dims=(None, 0, *((0, 0) if sampled else (None, None))),
                    randomness="different")
    grads: list[list[torch.Tensor]] = [[] for _ in names]
    values = []
    chunk_users = chunk_users or chunk_users_for(family)
    for start in range(0, len(users), chunk_users):
        chunk = padded_users(users[start : start + chunk_users]).to(features.device)
        negatives = log_expected = None
        if sampled:
            draws = [family._negatives(len(features), generator, None) for _ in range(len(chunk))]
            negatives, log_expected = (torch.stack(t).to(features.device) for t in zip(*draws))
        with sdpa_kernel(SDPBackend.MATH):  # attention as matmuls, which vmap batches (the fused CPU kernels: no rule)
            g, value = per_user(params, chunk, negatives, log_expected)
        for j, n in enumerate(names):
            grads[j].append(g[f"model.{n}"])
        values.append(value.detach())
    if not users:
        return [p.new_zeros((0, *p.shape)) for p in params.values()], torch.zeros(0)
    return [torch.cat(g) for g in grads], torch.cat(values)


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
    chunk_users: int | None = None,
    secure_mode: bool = False,
) -> tuple[StateDict, dict[str, Any]]:
    """DP-SGD from ``theta0`` on ``domain`` with per-user clipping (see the module docstring); the last weights.

    ``seed`` builds the training module (:meth:`SequentialFamily.training_module`); ``noise_seed`` the user
    sampling, the noise, the dropout masks and the sampled negatives (None: OS entropy; the last two must be secret
    as well, see :func:`per_user_gradients`);
    ``chunk_users``: users per vectorized gradient pass (None: :func:`chunk_users_for`; see
    :func:`per_user_gradients`; the negatives do not depend on it, with dropout the masks' numbers do, not their
    distribution). ``secure_mode``: opacus' floating-point-safe noise (see the module docstring); needs
    ``noise_seed=None``.
    """
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    if not isinstance(family, SequentialFamily):
        raise FedmergeError(f"user-level DP-SGD supports the 'sequential' family, got {family.name!r}; "
                            "use privacy.unit = 'domain' for it")
    if family.encoder_layers:
        raise FedmergeError("user-level DP-SGD with encoder_layers > 0 is not supported (per-user passes through the "
                            "text tower); set encoder_layers = 0")
    if family.n_negatives is not None and family.negative_sampling == "popularity":
        raise FedmergeError("user-level DP-SGD cannot sample negatives by popularity (the item counts come from the "
                            "private training data); set negative_sampling = 'uniform' or n_negatives = None")
    if secure_mode and noise_seed is not None:
        raise FedmergeError("secure_mode draws the sampling and the noise from OS entropy; a noise_seed would make "
                            "them reproducible by whoever knows it: pass noise_seed=None (privacy.noise_seed = -1)")
    users = [w for w in (training_windows([seq], family.max_len) for seq in domain.train) if w]
    if not users:
        raise FedmergeError(f"domain {domain.name!r} has no training sequence with two or more items")
    module, features, frozen_experts = family.training_module(theta0, domain, item_features, seed)
    params = [p for p in module.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if family.proximal_mu else []
    secret = noise_generator_seed(noise_seed)
    # dropout masks and sampled negatives are drawn user after user, so one user's presence shifts every later user's
    # draws: they come from the secret too (secret + 2, + 3), never from the client's training seed, which the server
    # knows (see per_user_gradients)
    torch.manual_seed(secret + 3)
    sampler = UniformWithReplacementSampler(num_samples=len(users), sample_rate=settings.sample_rate,
                                            generator=torch.Generator().manual_seed(secret), steps=settings.steps)
    optimizer = DPOptimizer(
        family.optimizer(module),
        noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
        expected_batch_size=max(1, round(settings.sample_rate * len(users))),
        # the noise is drawn on the gradients' device, so its generator lives there (a CPU one fails on CUDA); the
        # same noise_seed gives the same noise per device type, not across CPU and GPU
        generator=torch.Generator(device=features.device).manual_seed(secret + 1), secure_mode=secure_mode,
    )
    negatives = torch.Generator().manual_seed(secret + 2)
    start = time.perf_counter()
    batch_sizes, clipped, losses = [], 0, []
    module.train()
    steps = tqdm(sampler, total=settings.steps, desc=f"DP-SGD {domain.name}", disable=not progress, unit="step")
    with gradient_threads():  # backward passes are bit-identical only at one thread count (as in family.train)
        for indices in steps:
            batch = sorted((users[i] for i in indices), key=lambda w: (len(w), len(w[0])))  # chunks of alike shapes
            grads, step_losses = per_user_gradients(family, module, batch, features, negatives, chunk_users)
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
            losses.extend(step_losses.tolist())
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
