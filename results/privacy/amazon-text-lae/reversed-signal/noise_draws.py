"""Loss-attack AUC of the user-level text-LAE over many noise draws, per z (seed-s member split), and without
the PSD projection of the noisy Gram (to see which step turns the signal)."""
import sys
import numpy as np
from fedmerge.privacy.study import load_study, _probed_users
from fedmerge.privacy.membership import split_members, split_users
from fedmerge.privacy.attacks import attack_metrics, scorable, sequence_losses
from fedmerge.privacy.lae import train_text_lae_user_level
from fedmerge.runners.server import initial_weights
cfg, study = load_study("privacy")
seed = int(sys.argv[1])
domain = cfg.load_domain("Pantry")
members, rest = split_members(domain, float(study.member_fraction), seed=seed)
nonmembers, _ = split_users(rest, min(study.probe_max_users, rest.n_users // 2), seed=seed + 1)
family = cfg.model.make_family()
features = cfg.encoder.item_features(domain.catalog, family)
theta0 = initial_weights(cfg)
fitted = family.fitted_sequences(members)
m = scorable([fitted[u] for u in _probed_users(len(fitted), study.probe_max_users, seed)])
n = scorable(family.fitted_sequences(nonmembers))
for z in [float(v) for v in sys.argv[2].split(",")]:
    aucs = []
    for k in range(int(sys.argv[3])):
        w = train_text_lae_user_level(family, theta0, members, features, noise_multiplier=z, bound=1.0, noise_seed=100 + k)[0]
        s = -sequence_losses(family, w, features, [*m, *n], "last")
        aucs.append(attack_metrics(s[:len(m)], s[len(m):])["auc"])
    a = np.array(aucs)
    print(f"seed {seed} z {z}: loss AUC over {len(a)} noise draws mean {a.mean():.4f} sd {a.std(ddof=1):.4f} min {a.min():.3f} max {a.max():.3f}", flush=True)
