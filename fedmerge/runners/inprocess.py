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
from fedmerge.runners.client import ClientState
from fedmerge.runners.server import ReplyHandler, run_federation
from fedmerge.scenario import Scenario

logger = logging.getLogger(__name__)


class InProcessTransport:
    """Delivers each request straight to that domain's :class:`ClientState` (records are passed, not shared)."""

    def __init__(self, cfg: Scenario) -> None:

        self.clients = {name: ClientState(cfg, partition_id=i) for i, name in enumerate(cfg.data.domain_names())}

    def send(
        self, message_type: str, requests: Mapping[str, RecordDict], on_reply: ReplyHandler | None = None
    ) -> tuple[dict[str, RecordDict], dict[str, str]]:
        replies, errors = {}, {}
        for domain, content in requests.items():
            try:
                replies[domain] = self.clients[domain].handle(message_type, content)
            except Exception as exc:  # a client failure becomes an error reply, as in Flower
                logger.debug("client %s failed:\n%s", domain, traceback.format_exc())
                errors[domain] = f"client {domain}: {type(exc).__name__}: {exc}"
                continue
            if on_reply is not None:
                on_reply(domain, replies[domain])
        return replies, errors


def run_inprocess(cfg: Scenario, out_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Run the scenario in this process; write the results (and saved weights) to ``out_dir`` if given."""
    start = time.perf_counter()
    transport = InProcessTransport(cfg)
    out = run_federation(cfg, transport, out_dir=out_dir, resume=resume)
    out["timings_s"]["total"] = round(time.perf_counter() - start, 3)
    out = results_io.finalize(out, cfg, engine="inprocess")
    if out_dir is not None:
        results_io.write_results(out, out_dir, cfg.eval.primary)
    return out
