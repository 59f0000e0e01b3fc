"""Which step of the private fit turns the loss attack? The noisy Gram Â = Ã + N made PSD by clipping its eigenvalues
at 0 (the product's default), by their absolute values, or not at all (SylvesterBasis then clips negative
eigenvalues in its denominators only). Usage: python projection.py SEED"""
import sys

import numpy as np

from fedmerge.models.text_lae import SylvesterBasis
from fedmerge.privacy.lae import private_gram, psd_repair
from probe import probe_split

seed = int(sys.argv[1])
split = probe_split(seed)
F = split.features.numpy().astype(np.float64)
C = F.T @ F
for z in (0.0, 1.04):
    res = {"psd (product)": [], "abs eigenvalues": [], "no projection": []}
    for k in range(4 if z else 1):  # without noise the fit is deterministic
        A, _ = private_gram(split.members.train_with_val(), F, 1.0, z, 100 + k)
        for name, G in (("psd (product)", psd_repair(A, "clip")), ("abs eigenvalues", psd_repair(A, "abs")),
                        ("no projection", A)):
            res[name].append(split.loss_auc(SylvesterBasis.from_moments(G, C).solve(1.0, np.eye(len(C)))))
    print(f"seed {seed} z {z}: " + "; ".join(f"{k} {np.mean(v):.3f}" for k, v in res.items()),
          f"(negative eigenvalues: {(np.linalg.eigvalsh(A) < 0).sum()} of {len(A)})", flush=True)
