"""Distillation towards θ₀ on other public catalogs during a client's local training (``theta0_distill``).

A client's own interactions say nothing about how its model should rank the items of other catalogs, so local
training is free to move that behaviour anywhere; a held-out catalog, scored zero-shot by the merged model, pays
for it (on Amazon the trained models rank Toys far worse than the untrained θ₀). This term keeps the model's
pseudo-users of the *other* training domains' public catalogs where θ₀ has them:

    L = L_next-item + β · T² · mean over pseudo-users u of KL( softmax(t_u / T) ‖ softmax(s_u / T) )

u is a one-item pseudo-user [i] of a catalog c (drawn each step: a catalog uniformly, then ``n_candidates``
distinct items of it uniformly, the first ``n_users`` of which are the pseudo-users), ``t_u`` θ₀'s and ``s_u``
the trained model's logits ``cos(h_u, e_j)/τ`` over the drawn candidates j without u's own item (both models rank
a one-item user's own item first by construction; the rest of the ranking is what carries information), and T the
distillation temperature (MergeRec's 0.05 by default, with its T² scale). θ₀'s side is computed once per catalog
(its item representations and one-item hidden states; θ₀ is fixed); the model's side runs the adapter on the
candidates only, so a step costs a forward/backward over ``n_candidates`` items and ``n_users`` one-item sequences.

Only public catalog text is read (never another domain's interactions) and no held-out catalog: the client gets the
other training domains' catalog features as the server does for the routed θ₀'s router
(:meth:`fedmerge.scenario.EncoderSettings.item_features` of :meth:`fedmerge.scenario.Scenario.load_catalog`).
Draws come from their own seeded generator, so β = 0 leaves every other draw of training, and its weights, as they
were; the steps run single-threaded like the rest of training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedmerge.errors import FedmergeError
from fedmerge.models.base import tempered_kl
from fedmerge.reproducibility import gradient_threads


def without_own_item(logits: torch.Tensor) -> torch.Tensor:
    """(U, K) logits of pseudo-users whose own item is candidate column r for row r -> (U, K - 1) without it."""
    n_users, n_candidates = logits.shape
    own = torch.zeros_like(logits, dtype=torch.bool)
    own[torch.arange(n_users), torch.arange(n_users)] = True
    return logits[~own].view(n_users, n_candidates - 1)


class Theta0Distillation:
    """The term of the module docstring for one client: θ₀'s tables of each other catalog and the seeded draws."""

    def __init__(
        self,
        theta0_module: nn.Module,
        catalogs: Sequence[torch.Tensor],
        temperature: float,
        n_users: int,
        n_candidates: int,
        seed: int,
    ) -> None:
        """``theta0_module``: an eval-mode :class:`~fedmerge.models.sequential.TextSASRec` holding θ₀;
        ``catalogs``: the other catalogs' item features (each (n_c, dim), on the training device)."""
        small = [len(features) for features in catalogs if len(features) < 2]
        if small:  # a one-item catalog has no candidate beside the pseudo-user's own item (a reshape error)
            raise FedmergeError(f"θ₀ distillation needs public catalogs of 2 or more items; got catalog sizes {small}")
        self.catalogs = list(catalogs)
        self.temperature = temperature
        self.n_users, self.n_candidates = n_users, n_candidates
        self.rng = np.random.default_rng([seed, 0x7E7A0])  # its own stream: no other draw of training moves
        self.teacher = theta0_module
        self.tables: list[tuple[torch.Tensor, torch.Tensor]] = []  # per catalog: θ₀'s (hidden of [i], e_i)
        # one thread, as the steps: forward passes of 5-7 or 9-11 rows differ in the last bits between thread counts
        with torch.no_grad(), gradient_threads():
            for features in self.catalogs:
                items = theta0_module.item_representations(features)
                users = torch.arange(len(features), device=features.device).unsqueeze(1)
                hidden = torch.cat([theta0_module.encode(users[i : i + 4096], items, last_only=True)[:, -1]
                                    for i in range(0, len(users), 4096)])
                self.tables.append((hidden, items))

    def loss(self, module: nn.Module) -> torch.Tensor:
        """``T² · KL`` (not yet weighted by β) over this step's pseudo-users, for the model ``module``."""
        c = int(self.rng.integers(len(self.catalogs)))
        features, (hidden0, items0) = self.catalogs[c], self.tables[c]
        k = min(self.n_candidates, len(features))
        u = min(self.n_users, k - 1)
        candidates = torch.from_numpy(self.rng.choice(len(features), size=k, replace=False)).to(features.device)
        with torch.no_grad():
            teacher = self.teacher.logits(hidden0[candidates[:u]], items0[candidates])
        # the model's dropout masks here come from this term's own stream: the global generator, which draws the
        # training loss's masks, moves as it would without the term
        with torch.random.fork_rng(devices=[] if features.device.type == "cpu" else [features.device]):
            torch.manual_seed(int(self.rng.integers(2**63)))
            items = module.adapter(module.text_embeddings(features[candidates]))
            users = torch.arange(u, device=features.device).unsqueeze(1)  # pseudo-user r's item is candidate r
            student = module.logits(module.encode(users, items, last_only=True)[:, -1], items)
        return tempered_kl(without_own_item(student), without_own_item(teacher), self.temperature)
