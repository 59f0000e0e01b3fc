"""The privacy study's attack split of Pantry for one seed, drawn as `fedmerge.privacy.study.attack_record` draws it:
the member-trained client's users, the probed members' and held-out users' fitted sequences, and the loss attack's
AUC against a fitted W (shared by the scripts in this folder)."""
from dataclasses import dataclass

import numpy as np
import torch

from fedmerge.data.domain import Domain
from fedmerge.models.base import ModelFamily
from fedmerge.privacy.attacks import attack_metrics, scorable, sequence_losses
from fedmerge.privacy.membership import split_members, split_users
from fedmerge.privacy.study import load_study, probed_users


@dataclass(frozen=True)
class ProbeSplit:
    family: ModelFamily
    features: torch.Tensor
    members: Domain
    member_seqs: list[np.ndarray]
    nonmember_seqs: list[np.ndarray]

    def loss_auc(self, W: np.ndarray) -> float:
        """AUC of the loss attack (score −loss at the last position) against the text-LAE weight ``W``."""
        weights = {"W": torch.from_numpy(np.asarray(W, dtype=np.float32))}
        scores = -sequence_losses(self.family, weights, self.features, [*self.member_seqs, *self.nonmember_seqs], "last")
        n = len(self.member_seqs)
        return attack_metrics(scores[:n], scores[n:])["auc"]


def probe_split(seed: int) -> ProbeSplit:
    cfg, study = load_study("privacy")
    domain = cfg.load_domain("Pantry")
    members, rest = split_members(domain, float(study.member_fraction), seed=seed)
    nonmembers, _ = split_users(rest, min(study.probe_max_users, rest.n_users // 2), seed=seed + 1)
    family = cfg.model.make_family()
    fitted = family.fitted_sequences(members)
    return ProbeSplit(
        family=family,
        features=cfg.encoder.item_features(domain.catalog, family),
        members=members,
        member_seqs=scorable([fitted[u] for u in probed_users(len(fitted), study.probe_max_users, seed)]),
        nonmember_seqs=scorable(family.fitted_sequences(nonmembers)),
    )
