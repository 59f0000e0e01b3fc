"""Loss-attack AUC of the user-level text-LAE over many noise draws, per noise multiplier z (seed-s member split).
Usage: python noise_draws.py SEED Z1,Z2,... DRAWS"""
import sys

import numpy as np

from fedmerge.privacy.lae import train_text_lae_user_level
from probe import probe_split

seed = int(sys.argv[1])
split = probe_split(seed)
theta0 = split.family.initial_weights(split.features.shape[1])
for z in [float(v) for v in sys.argv[2].split(",")]:
    aucs = []
    for k in range(int(sys.argv[3])):
        w = train_text_lae_user_level(split.family, theta0, split.members, split.features, noise_multiplier=z, bound=1.0,
                                      noise_seed=100 + k)[0]["W"].numpy()
        aucs.append(split.loss_auc(w))
    a = np.array(aucs)
    print(f"seed {seed} z {z}: loss AUC over {len(a)} noise draws mean {a.mean():.4f} sd {a.std(ddof=1):.4f} "
          f"min {a.min():.3f} max {a.max():.3f}", flush=True)
