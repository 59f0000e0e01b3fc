"""User-level text-LAE cells of a study folder HERE against those of a study BASE (the stored study, one folder up),
same seeds and noise seeds: per-seed ratios / differences, mean [95 % t-interval].

    python compare_user_cells.py HERE BASE LABEL BASE_LABEL   # e.g. gram-repair-abs: . .. abs clip
"""
import json, sys
import numpy as np
from fedmerge.runners.aggregate import interval
from pathlib import Path
HERE = Path(sys.argv[1]); CLIP = Path(sys.argv[2]); LABEL, BASE = sys.argv[3], sys.argv[4]
def ci(x, f):
    c = interval(x)  # mean and 95 % t-interval over the seeds
    return f"{f.format(c['mean'])} [{f.format(c['low'])}, {f.format(c['high'])}]"
rec = lambda root, eps, s, m: json.load(open(root / "user" / f"eps-{eps}" / f"seed-{s}" / "results.json"))["models"][m]["average"]["recall@10"]
nodp = lambda s, m: json.load(open(CLIP / "none" / "eps-inf" / f"seed-{s}" / "results.json"))["models"][m]["average"]["recall@10"]
models = ["average", "task_arithmetic", "ties", "mergerec_taskwise", "mergerec_layerwise", "fedavg", "individual"]
for eps in ("8", "4", "1"):
    print(f"--- user-level ε = {eps}")
    for m in models:
        a = [rec(HERE, eps, s, m) for s in range(3)]; c = [rec(CLIP, eps, s, m) for s in range(3)]
        print(f"{m:20s} {LABEL} {np.mean(a):.4f}  ×{BASE} {ci(np.divide(a, c), '{:.3f}')}  ×θ₀ {ci([a[s] / rec(HERE, eps, s, 'theta0') for s in range(3)], '{:.3f}')}  ×noDP {ci([a[s] / nodp(s, m) for s in range(3)], '{:.3f}')}")
    for att in ("loss", "lira", "gradient_alignment", "lira_online"):
        a = [json.load(open(HERE / "attacks" / "user" / f"eps-{eps}" / f"seed-{s}.json"))["scores"][att] for s in range(3)]
        c = [json.load(open(CLIP / "attacks" / "user" / f"eps-{eps}" / f"seed-{s}.json"))["scores"][att] for s in range(3)]
        print(f"{att:20s} AUC {LABEL} {ci([x['auc'] for x in a], '{:.3f}')} per seed {[round(x['auc'], 3) for x in a]}  − {BASE} {ci([x['auc'] - y['auc'] for x, y in zip(a, c)], '{:+.3f}')}  TPR@0.1% {ci([x['tpr@0.001'] for x in a], '{:.4f}')}  TPR@1% {ci([x['tpr@0.01'] for x in a], '{:.3f}')}")
