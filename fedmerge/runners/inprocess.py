"""The in-process engine: the same client and server code as the Flower apps, called directly in one process."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import RecordDict

from fedmerge.runners import results as results_io
from fedmerge.runners.baselines import joint_oracle
from fedmerge.runners.client import ClientState
from fedmerge.runners.server import Federation, initial_weights

logger = logging.getLogger(__name__)


class InProcessTransport:
    """Delivers each request straight to that domain's :class:`ClientState` (records are passed, not shared)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        from fedmerge.config import domain_names

        self.clients = {name: ClientState(cfg, partition_id=i) for i, name in enumerate(domain_names(cfg))}

    def send(self, message_type: str, requests: Mapping[str, RecordDict]) -> tuple[dict[str, RecordDict], dict[str, str]]:
        replies, errors = {}, {}
        for domain, content in requests.items():
            try:
                replies[domain] = self.clients[domain].handle(message_type, content)
            except Exception as exc:  # a client failure becomes an error reply, as in Flower
                logger.debug("client %s failed:\n%s", domain, traceback.format_exc())
                errors[domain] = f"client {domain}: {type(exc).__name__}: {exc}"
        return replies, errors


def run_federation(cfg: Mapping[str, Any], transport: Any) -> dict[str, Any]:
    """θ₀, the optional joint oracle, then the federation phases over ``transport`` (shared by both engines)."""
    import torch

    torch.set_num_threads(int(cfg["run"]["torch_threads"]))  # server-side merging, as on clients
    start = time.perf_counter()
    theta0 = initial_weights(cfg)
    setup = time.perf_counter() - start
    extra, joint_seconds = {}, 0.0
    if cfg["baselines"]["joint"]:
        start = time.perf_counter()
        extra["joint"] = joint_oracle(cfg, theta0)
        joint_seconds = time.perf_counter() - start
    federation = Federation(cfg, theta0, extra_models=extra)
    out = federation.run(transport)
    out["timings_s"] = {"setup": round(setup, 3), "joint_training": round(joint_seconds, 3), **out["timings_s"]}
    if "joint" in out["models"]:
        out["models"]["joint"]["non_private"] = True
    return out


def run_inprocess(cfg: Mapping[str, Any], out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the scenario in this process; write the results to ``out_dir`` if given."""
    start = time.perf_counter()
    transport = InProcessTransport(cfg)
    out = run_federation(cfg, transport)
    out["timings_s"]["total"] = round(time.perf_counter() - start, 3)
    out = results_io.finalize(out, cfg, engine="inprocess")
    if out_dir is not None:
        results_io.write_results(out, out_dir)
    return out
