"""Utility of the three PSD repairs of the noisy Gram: Recall@10 on Pantry's and Toys' test users of the user-level
individual text-LAE fitted on all of the domain's users (λ = 1, B = 1, z = 1.04 = the study's ε = 8), 3 noise
draws, against clipping alone."""
import numpy as np
import torch

from fedmerge.metrics import evaluate_scorer
from fedmerge.models.text_lae import SylvesterBasis
from fedmerge.privacy.lae import private_gram, psd_repair
from fedmerge.privacy.study import load_study

cfg, _ = load_study("privacy")
family = cfg.model.make_family()
for name in ("Pantry", "Toys"):
    domain = cfg.load_domain(name)
    features = cfg.encoder.item_features(domain.catalog, family)
    F = features.numpy().astype(np.float64)
    C = F.T @ F

    def recall(G: np.ndarray) -> float:
        W = SylvesterBasis.from_moments(G, C).solve(1.0, np.eye(len(C)))
        scorer = family.scorer({"W": torch.from_numpy(W.astype(np.float32))}, features)
        return evaluate_scorer(scorer, domain)["recall@10"]

    out = {"psd (product)": [], "abs eigenvalues": [], "no projection": []}
    clip_only, _ = private_gram(domain.train_with_val(), F, 1.0, 0.0, 0)
    base = recall(clip_only)
    for k in range(3):
        A, _ = private_gram(domain.train_with_val(), F, 1.0, 1.04, 200 + k)
        for label, G in (("psd (product)", psd_repair(A, "clip")), ("abs eigenvalues", psd_repair(A, "abs")),
                         ("no projection", A)):
            out[label].append(recall(G))
    print(f"{name}: clipping alone {base:.4f}; "
          + "; ".join(f"{k} {np.mean(v):.4f} ({', '.join(f'{x:.4f}' for x in v)})" for k, v in out.items()), flush=True)
