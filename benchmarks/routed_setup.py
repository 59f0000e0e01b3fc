"""Set-up of the routed θ₀ from a cold embedding cache: the server encodes the training catalogs of
``amazon-seq-routed`` either on its one thread, one catalog after another (``serial``, what it did before), or in
parallel worker processes, one catalog each (``parallel``, :func:`fedmerge.text.cache.warm_cache`), then builds θ₀.

    python benchmarks/routed_setup.py parallel serial --out results/speed/routed_theta0_setup.json

Prints and writes per mode the encoding and total seconds, the load average and a checksum of θ₀ (equal in both
modes). Needs the Amazon data ($FEDMERGE_AMAZON_DIR); each mode uses its own empty cache folder under a temporary
directory.
"""
import argparse
import json
import os
import shutil
import tempfile
import time

import torch

from fedmerge.config import load_scenario
from fedmerge.reproducibility import process_cpus

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("modes", nargs="+", choices=["serial", "parallel"])
parser.add_argument("--out", required=True)
args = parser.parse_args()
torch.set_num_threads(1)  # the server's default run.server_threads
out = {}
scratch = tempfile.mkdtemp(prefix="fedmerge-setup-")
for mode in args.modes:
    cache = os.path.join(scratch, f"cache-{mode}")
    cfg = load_scenario("amazon-seq-routed", [f'encoder.cache_dir="{cache}"'])
    family = cfg.model.make_family()
    catalogs = [cfg.load_catalog(d) for d in cfg.data.training_domains()]
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    feats = cfg.encoder.catalogs_features(catalogs, family, workers=process_cpus() if mode == "parallel" else 1)
    enc = time.perf_counter() - t
    theta0 = family.initial_weights(cfg.encoder.feature_width(family), seed=0, catalog_features=feats)
    out[mode] = {"encode_s": round(enc, 1), "total_s": round(time.perf_counter() - t, 1),
                 "items": sum(len(c.texts()) for c in catalogs), "load_before": load0, "load_after": os.getloadavg()[0]}
    out[mode]["checksum"] = float(sum(v.double().sum() for v in theta0.values()))
    print(mode, out[mode], flush=True)
shutil.rmtree(scratch, ignore_errors=True)
with open(args.out, "w") as fh:
    json.dump(out, fh, indent=1)
