"""The in-process engine: the same client and server code as the Flower apps, called directly in one process."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import RecordDict

from fedmerge.runners.client import ClientState, client_error_reason
from fedmerge.runners.server import ReplyHandler, run_and_record
from fedmerge.scenario import Scenario

logger = logging.getLogger(__name__)


class InProcessTransport:
    """Delivers each request straight to that domain's :class:`ClientState` (records are passed, not shared)."""

    refused: dict[str, str]  # nothing to refuse: every client is built here
    connect_seconds: float | None = None  # and nothing to connect to

    def __init__(self, cfg: Scenario) -> None:
        self.refused = {}
        self.warnings: list[str] = []  # nothing to warn about: no node comes or goes
        self.undelivered: set[str] = set()  # every request reaches its client
        self.node_of: dict[str, int] = {}  # no Flower nodes
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
                errors[domain] = client_error_reason(domain, exc)
                continue
            if on_reply is not None:
                on_reply(domain, replies[domain])
        return replies, errors


def run_inprocess(cfg: Scenario, out_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Run the scenario in this process; write the results (and saved weights) to ``out_dir`` if given."""
    start = time.perf_counter()  # the total includes loading every client's domain, as Flower's does
    return run_and_record(cfg, InProcessTransport(cfg), out_dir, resume=resume, engine="inprocess", started=start)
