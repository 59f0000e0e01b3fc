"""What the learned text-conditioned last-item offset b(i) = b + v·x̂_i says about each catalog (issue 23).

    FEDMERGE_AMAZON_DIR=... python results/unseen/rebuy-text/offsets.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a `fedmerge simulate amazon-unseen --seeds ...` output (seed-*/results.json with the merge report's
local parameters). For every seed and every catalog, the mean offset b + v·x̂ over the last items of its test
users whose history repeats no item (the users it applies to; the others get b_r), in cosine units: under each
training domain's own (b, v) and under the shared values a new catalog gets (the clients' median, their mean for
two). More negative: pushed down harder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fedmerge.config import load_scenario
from fedmerge.text import EmbeddingCache, encode_catalog


def last_item_units(domain, encoder, cache, max_len: int) -> np.ndarray:
    """The unit raw text embedding x̂ of the last input item (train + validation) of each test user whose history
    (the last ``max_len`` items) repeats no item: the users b + v·x̂ applies to (a repeating user gets b_r,
    ``repeat_user_bias``). (users, embedding width), float64."""
    inputs = [np.append(s, v)[-max_len:] for s, v in zip(domain.train, domain.val_target)]
    last = np.array([h[-1] for h in inputs if len(np.unique(h)) == len(h)])
    emb = encode_catalog(encoder, domain.catalog, cache=cache).astype(np.float64)
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True))[last]


def main() -> None:
    cfg = load_scenario("amazon-unseen")
    encoder = cfg.encoder.text_encoder()
    cache = EmbeddingCache(cfg.encoder.cache_dir) if cfg.encoder.cache_dir else None
    unit, max_len = {}, cfg.model.make_family().max_len
    for name in ("Beauty", "Pantry", "Toys"):
        unit[name] = last_item_units(cfg.load_domain(name), encoder, cache, max_len)
    for run in sys.argv[1:]:
        for path in sorted(Path(run).glob("seed-*/results.json")) or sorted(Path(run).glob("seed-*.results.json")):
            results = json.loads(path.read_text())
            report, held = results["merge_report"]["local_parameters"], results["held_out"]
            sources = {**{f"own {d}": v for d, v in report["local_parameters"].items()}, "shared": report["shared"]}
            for label, values in sources.items():
                b, v = float(values["last_item_bias"]), np.asarray(values["last_item_text_bias"], np.float64)
                means = {n: float(b + (u @ v).mean()) for n, u in unit.items()}
                print(json.dumps({"run": str(path), "held_out": held, "values": label, "b": b,
                                  "norm_v": float(np.linalg.norm(v)),
                                  "mean_offset": {n: round(m, 4) for n, m in means.items()}}))


if __name__ == "__main__":
    main()
