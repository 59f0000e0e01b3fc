"""The Flower strategy: the Message-API transport for :class:`fedmerge.runners.server.Federation`.

It maps domains to SuperNodes (a ``query`` to each node as it comes online, also between phases: a late node may
serve a domain without node, never take a served one), sends each request as a Message, waits at most
``federation.timeout_s`` for replies, turns error replies into per-domain errors, and never mutates a reply
(the federation copies weights out of the records). Merging, FedAvg and evaluation bookkeeping live in the
framework-free federation, so simulation, deployment and the in-process engine share one code path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import NoReturn

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmerge.errors import FedmergeError
from fedmerge.runners import protocol
from fedmerge.runners.server import ReplyHandler
from fedmerge.scenario import Scenario

logger = logging.getLogger(__name__)
PULL_INTERVAL_S = 0.1
LATE_QUERY_S = 10.0  # how long a send waits for the query answers of nodes that came online after start-up


class MergeStrategy(Strategy):
    """Collects individual replies, lets the federation merge them, broadcasts models and gathers metrics."""

    def __init__(self, cfg: Scenario, grid: Grid) -> None:
        self.cfg = cfg
        self.grid = grid
        self.timeout = cfg.federation.timeout_s
        self.startup_timeout = cfg.federation.startup_timeout_s
        self.node_of: dict[str, int] = {}
        self.refused: dict[str, str] = {}  # query:node<id> -> why that node failed to start or its claim was refused
        self.claims: dict[int, str] = {}  # node -> the domain it claimed (nodes online now that answered a query)
        self.failed: set[int] = set()  # nodes online now that answered with an error or no domain
        self.contested: set[str] = set()  # domains several nodes claimed at start-up: no node serves them
        self.warnings: list[str] = []  # what the run's results must say about the transport (a refused late claim)
        self.undelivered: set[str] = set()  # domains whose request of the last send reached no node
        self.connect_seconds: float | None = None  # None until connected
        self._group = 0

    # ---- transport ------------------------------------------------------------------------------------------
    def connect(self) -> dict[str, int]:
        """Wait for the SuperNodes and learn which domain each one holds (a ``query`` to each node as it comes
        online), within ``federation.startup_timeout_s`` (not ``timeout_s``: a short reply timeout must not cut short
        start-up). The wait ends once every node online has answered and every domain of the run is claimed or
        accounted for by a node that failed to start — not once as many nodes as domains are online: a spare node, or
        one claiming a domain the run does not have, no longer ends it before an owner's node is asked.

        :meth:`send` connects on first use, so server work before it (θ₀, the joint oracle) overlaps the nodes'
        start-up (in simulation: Ray actors importing torch and loading their domain).
        """
        start = time.perf_counter()
        wanted = self.cfg.data.domain_names()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            online = self.ask_new_nodes(max(deadline - time.monotonic(), 1.0))
            claimed = {d for n, d in self.claims.items() if d in wanted}
            answered = online <= set(self.claims) | self.failed
            if (answered and len(claimed) + len(self.failed) >= len(wanted)) or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        self.assign(wanted, self.claims)
        missing = [d for d in wanted if d not in self.node_of]
        if missing:
            logger.warning("no SuperNode holds domain(s) %s", missing)
        self.connect_seconds = time.perf_counter() - start
        return self.node_of

    def ask_new_nodes(self, timeout: float, retry_failed: bool = False) -> set[int]:
        """Forget the nodes no longer online, send a ``query`` to every node online that has not answered one (with
        ``retry_failed`` also to those that answered with an error: restarted, they may hold their data now) and
        record the answers (``claims``; a node that fails to start or names no domain is refused with its reason and
        kept in ``failed``); a node that does not answer within ``timeout``, or whose query the SuperLink answered
        (it went offline), is asked again next time. Returns the nodes online."""
        online = set(self.grid.get_node_ids())
        self.claims = {n: d for n, d in self.claims.items() if n in online}  # back online: asked again
        self.failed = set() if retry_failed else self.failed & online
        nodes = sorted(online - set(self.claims) - self.failed)
        if not nodes:
            return online
        messages = [Message(RecordDict(), node, protocol.QUERY, group_id="connect") for node in nodes]
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error() and node == SUPERLINK_NODE_ID:  # the SuperLink's: that node went offline meanwhile
                continue
            if reply.has_error():  # e.g. its data folder is missing: the node's own reason goes into results.json
                self.failed.add(node)
                self.refuse(node, f"node {node} failed to start: {reply.error.reason}")
                continue
            try:
                self.claims[node] = protocol.reply_domain(reply.content)
            except FedmergeError as exc:
                self.failed.add(node)
                self.refuse(node, f"node {node}'s reply names no domain ({exc}); refused")
        return online

    def assign(self, wanted: list[str], claims: Mapping[int, str]) -> None:
        """Map each domain ``claims`` (node -> domain: every claim at start-up, the claims of domains without node
        later) names to the one node that claims it. A claim of a domain the run does not have is refused, and so is
        every claimant of a domain several nodes claim (which of them is honest cannot be told: no node answers for
        it, whatever order the replies came in); each refusal is logged and kept in ``refused``, and an assigned
        node's earlier refusal, which no longer holds, is dropped."""
        by_domain: dict[str, list[int]] = {}
        for node, domain in sorted(claims.items()):
            by_domain.setdefault(domain, []).append(node)
        for domain, nodes in sorted(by_domain.items()):
            if domain not in wanted:
                for node in nodes:
                    self.refuse(node, f"node {node} claims domain {domain!r}, which is not a domain of this run "
                                      f"({wanted}); refused")
            elif len(nodes) > 1:
                self.contested.add(domain)
                for node in nodes:
                    self.refuse(node, f"nodes {nodes} all claim domain {domain!r}; each is refused (no node "
                                      "answers for it)")
            else:
                self.refused.pop(f"{protocol.QUERY}:node{nodes[0]}", None)
                self.node_of[domain] = nodes[0]

    def admit_late_nodes(self) -> None:
        """Between phases: a domain whose node is no longer online loses it, and the nodes that came online since, or
        answered with an error before, are asked (each at most :data:`LATE_QUERY_S`, asked again next phase when
        silent). A domain that has no node is served by its one claimant (its owner's node came late, or restarted
        — with node authentication under its old id — after failing or going offline; two claimants at once
        contest it, as at start-up); a claim of a domain another node serves is refused with a warning, so no node
        registering mid-run can take or deny a served domain."""
        wanted = self.cfg.data.domain_names()
        self.ask_new_nodes(min(self.timeout, LATE_QUERY_S), retry_failed=True)
        for domain, node in list(self.node_of.items()):
            if node not in self.claims:
                logger.warning("node %d of domain %s is no longer online", node, domain)
                del self.node_of[domain]
        serving = set(self.node_of.values())
        unserved: dict[int, str] = {}  # claims of domains without node (or of no domain of the run): as at start-up
        for node, domain in sorted(self.claims.items()):
            if node in serving:
                continue
            if domain in self.contested:
                self.refuse(node, f"node {node} claims domain {domain!r}, which several nodes claimed at start-up; "
                                  "refused (no node answers for it)")
            elif domain in self.node_of:
                reason = (f"node {node} claims domain {domain!r}, which node {self.node_of[domain]} serves: refused; "
                          f"if node {node} is that domain's owner, node {self.node_of[domain]} is not (check the "
                          "registered node keys)")
                if reason not in self.warnings:
                    self.warnings.append(reason)
                self.refuse(node, reason)
            else:
                unserved[node] = domain
        self.assign(wanted, unserved)

    def refuse(self, node: int, reason: str) -> None:
        key = f"{protocol.QUERY}:node{node}"
        if self.refused.get(key) != reason:  # assign runs again as late nodes come: each refusal is logged once
            logger.error("%s", reason)
        self.refused[key] = reason

    def send(
        self, message_type: str, requests: Mapping[str, RecordDict], on_reply: ReplyHandler | None = None
    ) -> tuple[dict[str, RecordDict], dict[str, str]]:
        """One Message per domain; replies and errors keyed by domain (unknown or silent domains are errors).

        Replies are pulled as they arrive (every :data:`PULL_INTERVAL_S`) and handed to ``on_reply`` at once, so
        a slow client does not hold back what the others already sent.
        """
        if self.connect_seconds is None:
            self.connect()
        else:
            self.admit_late_nodes()
        self._group += 1
        errors = {d: "no SuperNode holds this domain" for d in requests if d not in self.node_of}
        domain_of = {self.node_of[d]: d for d in requests if d in self.node_of}
        messages = [Message(requests[d], node, message_type, group_id=str(self._group)) for node, d in domain_of.items()]
        # the ids of the messages the SuperLink took: a refused one is "" or None (gRPC grid) or left out (in-memory
        # grid), and the list is empty when the whole push failed (e.g. a payload too large); each message carries
        # its own id once pushed
        taken = {i for i in self.grid.push_messages(messages) if i}
        sent: dict[str, tuple[int, str]] = {}  # message id -> (node, domain)
        not_taken: set[str] = set()
        for message, (node, domain) in zip(messages, domain_of.items()):
            if message.metadata.message_id in taken:
                sent[message.metadata.message_id] = (node, domain)
            else:
                not_taken.add(domain)
                errors[domain] = (f"the SuperLink did not accept the {message_type} message for node {node} "
                                  "(the ServerApp's log says why)")
        pending = set(sent)
        replies: dict[str, RecordDict] = {}
        deadline = time.monotonic() + self.timeout
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(pending):
                reply_to = reply.metadata.reply_to_message_id
                pending.discard(reply_to)
                node, domain = sent.get(reply_to, (None, None))
                if domain is None:
                    continue
                if reply.has_error():  # the node's own error, or the SuperLink's (source SUPERLINK_NODE_ID) when the
                    errors[domain] = reply.error.reason  # node went offline or the message expired
                    if reply.metadata.src_node_id == SUPERLINK_NODE_ID != node:
                        not_taken.add(domain)  # it never reached the node: no traffic
                    continue
                if reply.metadata.src_node_id != node:  # content only from the node the message went to
                    errors[domain] = (f"a reply came from node {reply.metadata.src_node_id}, not from node {node} "
                                      "the message went to; ignored")
                    continue
                replies[domain] = reply.content
                if on_reply is not None:
                    on_reply(domain, reply.content)
            if pending:
                time.sleep(PULL_INTERVAL_S)
        for d in domain_of.values():
            if d not in replies and d not in errors:
                errors[d] = f"no reply within federation.timeout_s = {self.timeout:g} s"
        self.undelivered = {d for d in requests if d not in domain_of.values() or d in not_taken}
        return replies, errors

    # ---- Flower's Strategy interface ----------------------------------------------------------------------------
    # Flower's round loop (``Strategy.start``: configure → aggregate, one model per round) cannot merge: MergeRec
    # needs every domain's model at once and its own phases (FedAvg rounds, merges, evaluation), which
    # run_federation drives through :meth:`send`. Every entry to that loop says so instead of half-running it.
    def _not_the_round_loop(self, *_: object, **__: object) -> NoReturn:
        raise FedmergeError("MergeStrategy is driven by fedmerge.runners.server.run_federation (server/app.py), not "
                            "by Flower's Strategy.start round loop")

    start = _not_the_round_loop
    configure_train = _not_the_round_loop
    aggregate_train = _not_the_round_loop
    configure_evaluate = _not_the_round_loop
    aggregate_evaluate = _not_the_round_loop

    def summary(self) -> None:
        logger.info("MergeStrategy: domains %s, merges %s, timeout %gs", self.cfg.data.domain_names(),
                    list(self.cfg.merge.methods), self.timeout)
