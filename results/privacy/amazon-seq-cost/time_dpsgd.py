"""Time user-level DP-SGD per sampled user on Amazon Pantry (privacy-seq settings), a few steps only."""
import sys, time, json
import torch
from fedmerge.privacy.study import load_study
from fedmerge.scenario import family_of, item_features, load_named_domain
from fedmerge.runners.server import initial_weights
from fedmerge.privacy.dpsgd import UserLevelDP, train_user_level

overrides = sys.argv[2:]
cfg, _ = load_study("privacy-seq", overrides)
domain = load_named_domain(cfg, sys.argv[1])
family = family_of(cfg)
features = item_features(cfg, domain.catalog, family)
theta0 = initial_weights(cfg)
torch.set_num_threads(1)
settings = UserLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.002, epochs=0.006)  # 3 steps
t = time.perf_counter()
_, m = train_user_level(family, theta0, domain, features, settings, seed=0, noise_seed=0)
dt = time.perf_counter() - t
users = m["dp_mean_batch_users"] * m["dp_steps"]
print(json.dumps({"domain": domain.name, "items": domain.n_items, "users": m["dp_users"], "steps": m["dp_steps"],
                  "sampled_users": users, "seconds": dt, "s_per_user": dt / max(users, 1),
                  "n_negatives": family.n_negatives}))
