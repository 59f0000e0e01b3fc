"""One hostile client against the server's defences: honest domains' Recall@10 relative to the honest run.

    PYTHONPATH=$PWD python benchmarks/attacks.py --seeds 0 1           # every attack, every configuration
    PYTHONPATH=$PWD python benchmarks/attacks.py --attacks users_1e7 --set 'federation.fedavg_weighting="users"'

Runs the quickstart scenario in process (MiniLM encoder, 3 synthetic domains) with small settings
(``baselines.fedavg_rounds=1``, ``merge.mergerec.steps=50``, no joint oracle) and every merge method, the robust
ones included. The last domain's client attacks; the attack wraps the client's handler here, never the product
path. For each (attack, configuration, seed) it prints the mean Recall@10 of the *honest* domains per model,
divided by the same model's figure in the honest run of that configuration and seed, plus what the server
recorded (rejections, clipped updates) and whether the results serialize as strict JSON.

Configurations: ``defaults`` (the shipped settings: ``federation.min_replies = 0`` needs a strict majority, so
the run goes on without a rejected attacker and warns about it; equal FedAvg weights) and ``off`` (every defence
a key can switch off: no norm test, max_abs_value 1e30, max_num_users 1e30, FedAvg weighted by the reported user
counts with share cap 1). The fixed-weight and metric checks have no switch; they are on in both. The
fixed-buffer attack needs the routed adapter (``model.params.adapter="routed"``), so it is measured against its
own honest routed run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import MetricRecord, RecordDict

from fedmerge.config import load_scenario
from fedmerge.runners import protocol
from fedmerge.runners.inprocess import InProcessTransport
from fedmerge.runners.server import run_federation
from fedmerge.scenario import Scenario

SMALL = ["run.progress=false", "baselines.fedavg_rounds=1", "merge.mergerec.steps=50", "baselines.joint=false",
         "baselines.individual=false",
         'merge.methods=["average","task_arithmetic","ties","dare","mergerec_taskwise","mergerec_layerwise",'
         '"median","trimmed_mean","clipped_average"]']
CONFIGS = {
    "defaults": [],
    "off": ["federation.norm_multiple=0", "federation.max_abs_value=1e30", "federation.max_num_users=1e30",
            'federation.fedavg_weighting="users"', "federation.fedavg_max_share=1.0"],
}
ROUTED = ["model.params.adapter=\"routed\"", "model.params.n_experts=4"]

Attack = Callable[[str, RecordDict, RecordDict], RecordDict]  # (message type, request, honest reply) -> reply


def _with_weights(reply: RecordDict, weights: Mapping[str, torch.Tensor]) -> RecordDict:
    return RecordDict({**reply, protocol.WEIGHTS: protocol.to_record(dict(weights))})


def _train_attack(fn: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Attack:
    """An attack on training replies: ``fn(start weights, honest weights)`` -> the weights sent instead."""

    def attack(message_type: str, request: RecordDict, reply: RecordDict) -> RecordDict:
        if message_type != protocol.TRAIN:
            return reply
        start = protocol.from_record(request.array_records[protocol.GLOBAL])
        return _with_weights(reply, fn(start, protocol.from_record(reply.array_records[protocol.WEIGHTS])))

    return attack


def _scaled(factor: float) -> Attack:
    return _train_attack(lambda g, w: {n: g[n] + factor * (w[n] - g[n]) for n in g})


def _noise(g: dict[str, torch.Tensor], w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gaussian noise with the honest task vector's norm, tensor by tensor (fixed weights stay at θ₀)."""
    gen = torch.Generator().manual_seed(1)
    out = {}
    for n in g:
        tau = w[n] - g[n]
        eps = torch.randn(tau.shape, generator=gen)
        out[n] = g[n] + eps * (tau.norm() / eps.norm().clamp(min=1e-12))
    return out


def _fixed_buffer(g: dict[str, torch.Tensor], w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move the router centre so that every item's nearest centroid is expert 0."""
    return {**w, "adapter.centre": w["adapter.centre"] - 100.0 * w["adapter.centroids"][0]}


def _train_metric(value: float) -> Attack:
    def attack(message_type: str, request: RecordDict, reply: RecordDict) -> RecordDict:
        if message_type != protocol.TRAIN:
            return reply
        metrics = dict(reply.metric_records[protocol.TRAIN_METRICS])
        return RecordDict({**reply, protocol.TRAIN_METRICS: MetricRecord({**metrics, protocol.NUM_USERS: value})})

    return attack


def _eval_lies(message_type: str, request: RecordDict, reply: RecordDict) -> RecordDict:
    """NaN Recall@10 for every model, an invented metric and an invented model."""
    if message_type != protocol.EVALUATE:
        return reply
    out = RecordDict(dict(reply))
    for key, record in reply.metric_records.items():
        if key.startswith(protocol.METRICS_PREFIX):
            out[key] = MetricRecord({**dict(record), "recall@10": float("nan"), "accuracy": 1.0})
    out[protocol.METRICS_PREFIX + "best_model_ever"] = MetricRecord({"recall@10": 1.0})
    return out


ATTACKS: dict[str, Attack] = {
    "scale_1e6": _scaled(1e6),
    "scale_-100": _scaled(-100.0),
    "overflow_3e38": _train_attack(lambda g, w: {n: torch.full_like(v, 3e38) for n, v in w.items()}),
    "noise": _train_attack(_noise),
    "noise_2.9x": _train_attack(lambda g, w: {n: g[n] + 2.9 * (v - g[n]) for n, v in _noise(g, w).items()}),
    # its own update scaled to just under the norm test's 3× bound (when the honest norms are alike): the largest
    # update the default screen admits
    "scale_2.9": _scaled(2.9),
    "scale_-2.9": _scaled(-2.9),
    "theta0_copy": _train_attack(lambda g, w: {n: v.clone() for n, v in g.items()}),
    "fixed_buffer": _train_attack(_fixed_buffer),
    "users_1e9": _train_metric(1e9),
    "users_1e7": _train_metric(1e7),
    "users_nan": _train_metric(float("nan")),
    "eval_metric_lies": _eval_lies,
}


class AttackTransport(InProcessTransport):
    """In-process transport whose ``attacker`` client's replies go through ``attack``."""

    def __init__(self, cfg: Scenario, attacker: str, attack: Attack | None) -> None:
        super().__init__(cfg)
        self.attacker, self.attack = attacker, attack
        if attack is not None:
            client = self.clients[attacker]
            honest = client.handle
            client.handle = lambda message_type, content: attack(message_type, content, honest(message_type, content))


def honest_recall(out: Mapping[str, Any], honest: list[str]) -> dict[str, float]:
    """Mean Recall@10 over the ``honest`` domains per model (NaN where a domain is missing or NaN)."""
    return {name: float(np.mean([per[d]["recall@10"] if d in per else math.nan for d in honest]))
            for name, per in out["models"].items() if name != "theta0"}


def run_one(overrides: list[str], attack: str | None, seed: int) -> dict[str, Any]:
    cfg = load_scenario("quickstart", [*SMALL, *overrides, f"run.seed={seed}"])
    attacker = cfg.data.training_domains()[-1]
    start = time.perf_counter()
    try:
        out = run_federation(cfg, AttackTransport(cfg, attacker, ATTACKS[attack] if attack else None))
    except Exception as exc:  # a crash is a result here
        return {"crash": f"{type(exc).__name__}: {exc}", "attacker": attacker, "seconds": time.perf_counter() - start}
    try:
        json.dumps(out, allow_nan=False)
        strict_json = True
    except ValueError:
        strict_json = False
    return {"recall": honest_recall(out, [d for d in cfg.data.training_domains() if d != attacker]),
            "status": out["status"], "rejected": out["rejected"], "clipped": out["clipped"],
            "warnings": out["warnings"],
            "strict_json": strict_json, "attacker": attacker, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="scenario override added to every configuration (repeatable)")
    parser.add_argument("--json", default=None, help="also write every run's record to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    records = []
    for config in args.configs:
        for seed in args.seeds:
            for routed in (False, True):
                attacks = [a for a in args.attacks if (a == "fixed_buffer") == routed]
                if not attacks:
                    continue
                overrides = [*CONFIGS[config], *(ROUTED if routed else []), *args.overrides]
                honest = run_one(overrides, None, seed)
                for attack in attacks:
                    run = run_one(overrides, attack, seed)
                    relative = {m: run["recall"].get(m, math.nan) / v for m, v in honest["recall"].items()} \
                        if "recall" in run and "recall" in honest else {}  # the honest run may have crashed too
                    records.append({"attack": attack, "config": config, "seed": seed, "routed": routed,
                                    "honest": honest.get("recall", honest.get("crash")), "relative": relative,
                                    **{k: v for k, v in run.items() if k != "recall"}})
                    print(json.dumps(records[-1], default=str), flush=True)  # noqa: T201
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1, default=str)
    print(table(records))  # noqa: T201


COLUMNS = {"average": "avg", "task_arithmetic": "TA", "ties": "TIES", "dare": "DARE", "mergerec_taskwise": "MR task",
           "mergerec_layerwise": "MR layer", "median": "median", "trimmed_mean": "trim", "clipped_average": "clip",
           "fedavg": "FedAvg"}


def verdict(run: Mapping[str, Any]) -> str:
    """What the server did with the attacker (domain ``attacker``) and with the honest clients: rejected, clipped,
    entries left out, or a stop."""
    if "crash" in run:
        return "run stops: " + run["crash"][:60]
    rejected, said = sorted(run["rejected"]), []
    if run["attacker"] in rejected:
        said.append("update rejected")
    honest = sorted({k.split(":")[-1] for k in rejected if ":" not in k or k.startswith("fedavg_round")}
                    - {run["attacker"]})
    if honest:
        said.append(f"HONEST client(s) {honest} rejected")
    if any(k.startswith("fedavg_round") for k in rejected):
        said.append("also in the FedAvg round")
    left_out = sum(k.startswith(protocol.EVALUATE + ":") for k in rejected)
    if left_out:
        said.append(f"{left_out} evaluate entries left out")
    if run["clipped"]:
        said.append("clipped")
    if any(w.startswith(f"client {run['attacker']} was left out") for w in run["warnings"]):
        said.append("left-out warning")
    if run["status"] != "ok":
        said.append(f"status {run['status']}")
    if not run["strict_json"]:
        said.append("results not strict JSON")
    return "; ".join(said) or "accepted"


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per (attack, configuration): honest domains' Recall@10 / honest run per model (mean over
    seeds; a crashed configuration shows its error) and what the server did (per seed where the seeds differ)."""
    lines = ["| attack | config | " + " | ".join(COLUMNS.values()) + " | server |", "|---|---|" + "---|" * (len(COLUMNS) + 1)]
    keys = sorted({(r["attack"], r["config"]) for r in records}, key=lambda k: (list(ATTACKS).index(k[0]), k[1]))
    for attack, config in keys:
        runs = [r for r in records if (r["attack"], r["config"]) == (attack, config)]
        ran = [r for r in runs if r["relative"]]
        cells = [f"{np.mean(found):.2f}" if (found := [r["relative"][m] for r in ran if m in r["relative"]]) else "-"
                 for m in COLUMNS]  # "-": no seed has that model (--set baselines.fedavg_rounds=0, merge.methods)
        verdicts = {r["seed"]: verdict(r) for r in runs}
        said = (next(iter(verdicts.values())) if len(set(verdicts.values())) == 1
                else "; ".join(f"seed {s}: {v}" for s, v in verdicts.items()))
        lines.append(f"| {attack} | {config} | " + " | ".join(cells) + f" | {said} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
