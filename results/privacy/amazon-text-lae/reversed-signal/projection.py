"""Which step of the private fit turns the loss attack? The noisy Gram Â = Ã + N, then (product) its negative
eigenvalues set to 0; variants: eigenvalues made |a| instead, or the noise added with the PSD projection skipped
but negative eigenvalues dropped only in the denominators (SylvesterBasis clips them there)."""
import sys
import numpy as np
import torch
from fedmerge.privacy.study import load_study, _probed_users
from fedmerge.privacy.membership import split_members, split_users
from fedmerge.privacy.attacks import attack_metrics, scorable, sequence_losses
from fedmerge.privacy.lae import private_gram
from fedmerge.models.text_lae import SylvesterBasis
cfg, study = load_study("privacy")
seed = int(sys.argv[1])
domain = cfg.load_domain("Pantry")
members, rest = split_members(domain, float(study.member_fraction), seed=seed)
nonmembers, _ = split_users(rest, min(study.probe_max_users, rest.n_users // 2), seed=seed + 1)
family = cfg.model.make_family()
features = cfg.encoder.item_features(domain.catalog, family)
F = features.numpy().astype(np.float64)
fitted = family.fitted_sequences(members)
m = scorable([fitted[u] for u in _probed_users(len(fitted), study.probe_max_users, seed)])
n = scorable(family.fitted_sequences(nonmembers))
C = F.T @ F
def auc(W):
    s = -sequence_losses(family, {"W": torch.from_numpy(W.astype(np.float32))}, features, [*m, *n], "last")
    return attack_metrics(s[:len(m)], s[len(m):])["auc"]
for z in (0.0, 1.04):
    res = {"psd (product)": [], "abs eigenvalues": [], "no projection": []}
    for k in range(4):
        A, _ = private_gram(members.train_with_val(), F, 1.0, z, 100 + k)
        a, U = np.linalg.eigh(A)
        for name, G in (("psd (product)", (U * np.clip(a, 0, None)) @ U.T), ("abs eigenvalues", (U * np.abs(a)) @ U.T),
                        ("no projection", A)):
            res[name].append(auc(SylvesterBasis.from_moments(G, C).solve(1.0, np.eye(len(C)))))
        if z == 0.0:
            break
    print(f"seed {seed} z {z}: " + "; ".join(f"{k} {np.mean(v):.3f}" for k, v in res.items()), f"(negative eigenvalues: {(a < 0).sum()} of {len(a)})", flush=True)
