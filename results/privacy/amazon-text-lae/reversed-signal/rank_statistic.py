"""Is the reversed signal the softmax's temperature? Compare the loss-attack AUC with a scale-free statistic (the
target's rank among the catalog's items, given the prefix) for z = 0 and z = 0.3 / 1.04 noise draws."""
import sys
import numpy as np
import torch
from fedmerge.privacy.study import load_study, _probed_users
from fedmerge.privacy.membership import split_members, split_users
from fedmerge.privacy.attacks import attack_metrics, scorable, sequence_losses


def roc_auc_score(labels, scores):
    return attack_metrics(scores[labels == 1], scores[labels == 0])["auc"]

from fedmerge.privacy.lae import train_text_lae_user_level
from fedmerge.runners.server import initial_weights
cfg, study = load_study("privacy")
seed = 0
domain = cfg.load_domain("Pantry")
members, rest = split_members(domain, float(study.member_fraction), seed=seed)
nonmembers, _ = split_users(rest, min(study.probe_max_users, rest.n_users // 2), seed=seed + 1)
family = cfg.model.make_family()
features = cfg.encoder.item_features(domain.catalog, family)
E = features.numpy().astype(np.float64)
theta0 = initial_weights(cfg)
fitted = family.fitted_sequences(members)
m = scorable([fitted[u] for u in _probed_users(len(fitted), study.probe_max_users, seed)])
n = scorable(family.fitted_sequences(nonmembers))
cand = [*m, *n]; lab = np.r_[np.ones(len(m)), np.zeros(len(n))]
P = np.stack([E[np.unique(s[:-1])].sum(0) for s in cand]); T = np.array([s[-1] for s in cand])
for z, k in [(0.0, 0), (0.3, 0), (1.04, 0), (1.04, 1), (6.46, 0)]:
    W = train_text_lae_user_level(family, theta0, members, features, noise_multiplier=z, bound=1.0, noise_seed=100 + k)[0]["W"].numpy().astype(np.float64)
    S = P @ W @ E.T
    tgt = S[np.arange(len(T)), T]
    rank = (S > tgt[:, None]).sum(1)
    loss = -sequence_losses(family, {"W": torch.from_numpy(W.astype(np.float32))}, features, cand, "last")
    scale = S.std(1)
    print(f"z {z} draw {k}: loss AUC {roc_auc_score(lab, loss):.3f}  -rank AUC {roc_auc_score(lab, -rank):.3f}  "
          f"z-scored target logit AUC {roc_auc_score(lab, (tgt - S.mean(1)) / scale):.3f}  "
          f"logit scale (members/non) {scale[lab == 1].mean():.3f}/{scale[lab == 0].mean():.3f}  ‖W‖ {np.linalg.norm(W):.1f}", flush=True)
