"""Seconds per sampled user of user-level DP-SGD's per-user gradients on an Amazon domain (privacy-seq model):
the per-user autograd loop of commit e610696 against the torch.func path of :mod:`fedmerge.privacy.dpsgd`,
interleaved in one process, on the same sampled users (ordered per step as train_user_level orders them), in training mode (dropout on), one torch thread.

    PYTHONPATH=$PWD python results/privacy/amazon-seq-cost/time_dpsgd.py Pantry [--reps 3] [override ...]

Prints one JSON line per (repetition, path) and a summary line; then times 3 whole DP-SGD steps of the new code
(:func:`train_user_level`, optimizer and noise included).
"""
import argparse
import json
import os
import time

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from fedmerge.models.sequential import training_windows
from fedmerge.privacy.dpsgd import UserLevelDP, chunk_users_for, per_user_gradients, train_user_level
from fedmerge.privacy.study import load_study
from fedmerge.runners.server import initial_weights

parser = argparse.ArgumentParser()
parser.add_argument("domain")
parser.add_argument("overrides", nargs="*")
parser.add_argument("--reps", type=int, default=3)
parser.add_argument("--rate", type=float, default=0.002)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--chunks", default="", help="comma-separated chunk_users of the new path (default: the code's)")
args = parser.parse_args()

torch.set_num_threads(1)
cfg, _ = load_study("privacy-seq", args.overrides)
domain = cfg.load_domain(args.domain)
family = cfg.model.make_family()
features = cfg.encoder.item_features(domain.catalog, family)
theta0 = initial_weights(cfg)
module, feats, _ = family.training_module(theta0, domain, features, seed=0)
module.train()
params = [p for p in module.parameters() if p.requires_grad]
users = [w for w in (training_windows([s], family.max_len) for s in domain.train) if w]
sampler = UniformWithReplacementSampler(num_samples=len(users), sample_rate=args.rate,
                                        generator=torch.Generator().manual_seed(0), steps=args.steps)
sampled = [w for step in sampler for w in sorted((users[i] for i in step), key=lambda w: (len(w), len(w[0])))]


def loop_gradients() -> None:
    """The per-user loop of e610696: one forward/backward of the family's batch loss per user."""
    gen = torch.Generator().manual_seed(0)
    for windows in sampled:
        grads = torch.autograd.grad(family._batch_loss(module, windows, feats, gen), params, allow_unused=True)
        [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def vmap_gradients(chunk: int) -> None:
    per_user_gradients(family, module, sampled, feats, torch.Generator().manual_seed(0), chunk_users=chunk)


chunks = [int(c) for c in args.chunks.split(",")] if args.chunks else [chunk_users_for(family)]
paths = {"loop": loop_gradients, **{f"vmap chunk {c}": (lambda c=c: vmap_gradients(c)) for c in chunks}}
base = {"domain": domain.name, "items": domain.n_items, "users": len(users), "sampled_users": len(sampled),
        "n_negatives": family.n_negatives, "adapter": family.adapter, "dropout": family.dropout}
per_path: dict[str, list[float]] = {name: [] for name in paths}
for rep in range(args.reps):
    for name, fn in paths.items():
        load = os.getloadavg()[0]
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        per_path[name].append(wall / len(sampled))
        print(json.dumps({**base, "rep": rep, "path": name, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                          "s_per_user": round(wall / len(sampled), 4), "cpu_s_per_user": round(cpu / len(sampled), 4),
                          "load_1min": load, "utc": time.strftime("%H:%M:%S", time.gmtime())}), flush=True)
t = time.perf_counter()
_, metrics = train_user_level(family, theta0, domain, features,
                              UserLevelDP(1.0, 1.0, args.rate, args.rate * args.steps), seed=0, noise_seed=0)
step_users = metrics["dp_mean_batch_users"] * metrics["dp_steps"]
print(json.dumps({**base, "summary_s_per_user": {k: sorted(v) for k, v in per_path.items()},
                  "train_user_level_s_per_user": round((time.perf_counter() - t) / max(step_users, 1), 4),
                  "load_1min_end": os.getloadavg()[0]}))
