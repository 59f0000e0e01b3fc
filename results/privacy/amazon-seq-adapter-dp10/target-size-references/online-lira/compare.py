"""Online LiRA (8 shadow models) vs the stored offline attacks on the same no-DP adapter-only targets, seeds 0-2."""
import json
from pathlib import Path
from fedmerge.runners.aggregate import interval
HERE = Path(__file__).resolve().parent
R = HERE.parent
def ci(x, f="{:.3f}"):
    c = interval(x)  # mean and 95 % t-interval over the seeds
    return f"{f.format(c['mean'])} [{f.format(c['low'])}, {f.format(c['high'])}]"
new = [json.load(open(f"{HERE}/seed-{s}.json")) for s in range(3)]
old = [json.load(open(f"{R}/none-seed{s}/attacks/none/eps-inf/seed-{s}.json")) for s in range(3)]
print("sizes", new[0]["sizes"], "settings", new[0]["settings"])
for a in ("loss", "gradient_alignment"):
    print(a, "identical to stored:", [n["scores"][a] == o["scores"][a] for n, o in zip(new, old)])
on = [n["scores"]["lira_online"] for n in new]; off = [o["scores"]["lira"] for o in old]
for k, f in (("auc", "{:.3f}"), ("tpr@0.001", "{:.4f}"), ("tpr@0.01", "{:.3f}")):
    print(f"online {k} {ci([x[k] for x in on], f)} per seed {[round(x[k], 4) for x in on]} | offline {ci([x[k] for x in off], f)} | online-offline {ci([x[k]-y[k] for x, y in zip(on, off)], '{:+.4f}')}")
print("theta0 control online", [round(n['theta0']['lira_online']['auc'], 3) for n in new])
