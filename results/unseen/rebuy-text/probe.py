"""Probe for issue 23's untried lever (a text-conditioned last-item offset b(i) = b0 + v·x_i): does item text tell
which last items a user buys again, and does a re-buy model learned on Pantry (the one training domain whose users
re-buy) rate Toys' and Beauty's items as rarely re-bought? No training of the recommender; logistic regressions on
MiniLM embeddings of the last item. Labels: next item == last item, over every position of train+val sequences."""
import time
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from fedmerge.config import load_scenario
from fedmerge.data import load_domain
from fedmerge.text import EmbeddingCache, encode_catalog

cfg = load_scenario("amazon-unseen")
encoder = cfg.encoder.text_encoder()
cache = EmbeddingCache(cfg.encoder.cache_dir) if cfg.encoder.cache_dir else None
root = "/work/shared/datasets/amazon"
data = {}
for name in ("Pantry", "Toys", "Beauty"):
    t = time.time()
    d = load_domain(f"{root}/{name}.tar.gz")
    emb = encode_catalog(encoder, d.catalog, cache=cache)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    last, label = [], []
    for s, v in zip(d.train, d.val_target):
        seq = np.append(s, v)
        last.extend(seq[:-1]); label.extend(seq[1:] == seq[:-1])
    # test: the input's last item (train+val) and whether the test target repeats it
    test_last = np.array([np.append(s, v)[-1] for s, v in zip(d.train, d.val_target)])
    test_label = d.test_target == test_last
    data[name] = dict(emb=emb, last=np.array(last), y=np.array(label, bool), test_last=test_last, test_y=test_label)
    print(f"{name}: items {len(emb)}, train pairs {len(last)}, immediate re-buys {np.mean(label):.4f}, "
          f"test users re-buying the last item {test_label.mean():.4f} ({time.time()-t:.0f} s)", flush=True)

P = data["Pantry"]
rng = np.random.default_rng(0)
X, y = P["emb"][P["last"]], P["y"]
for C in (0.1, 1.0, 10.0):
    model = LogisticRegression(C=C, max_iter=2000).fit(X, y)
    auc_test = roc_auc_score(P["test_y"], model.decision_function(P["emb"][P["test_last"]]))
    lines = [f"C={C}: Pantry test AUC (text of the last item -> re-buy) {auc_test:.3f}"]
    for name in ("Pantry", "Toys", "Beauty"):
        D = data[name]
        p = model.predict_proba(D["emb"][D["test_last"]])[:, 1]
        lines.append(f"{name} mean p {p.mean():.4f} median {np.median(p):.4f}")
    print("; ".join(lines), flush=True)
# the non-isolated upper bound: pooled Pantry + Beauty (Toys held out) and Pantry + Toys (Beauty held out)
for held, other in (("Toys", "Beauty"), ("Beauty", "Toys")):
    O = data[other]
    X2 = np.vstack([X, O["emb"][O["last"]]]); y2 = np.concatenate([y, O["y"]])
    model = LogisticRegression(C=1.0, max_iter=2000).fit(X2, y2)
    H = data[held]
    ph = model.predict_proba(H["emb"][H["test_last"]])[:, 1]
    pp = model.predict_proba(P["emb"][P["test_last"]])[:, 1]
    po = model.predict_proba(O["emb"][O["test_last"]])[:, 1]
    print(f"pooled Pantry+{other} (held out {held}): mean p on {held} {ph.mean():.4f}, Pantry {pp.mean():.4f}, "
          f"{other} {po.mean():.4f}; intercept-only p {y2.mean():.4f}", flush=True)

# intervals for the data-isolated (Pantry-only, C = 1) model: 1,000 bootstrap resamples of each domain's test users
model = LogisticRegression(C=1.0, max_iter=2000).fit(X, y)
p = {n: model.predict_proba(data[n]["emb"][data[n]["test_last"]])[:, 1] for n in data}
s = model.decision_function(P["emb"][P["test_last"]])
boot = {"auc": [], "Toys/Pantry": [], "Beauty/Pantry": []}
for _ in range(1000):
    idx = {n: rng.integers(len(p[n]), size=len(p[n])) for n in p}
    boot["auc"].append(roc_auc_score(P["test_y"][idx["Pantry"]], s[idx["Pantry"]]))
    for other in ("Toys", "Beauty"):
        boot[f"{other}/Pantry"].append(p[other][idx[other]].mean() / p["Pantry"][idx["Pantry"]].mean())
for key, values in boot.items():
    lo, hi = np.percentile(values, [2.5, 97.5])
    print(f"Pantry-only C=1: {key} {np.mean(values):.3f} [{lo:.3f}, {hi:.3f}] (bootstrap over test users, 1,000)")
