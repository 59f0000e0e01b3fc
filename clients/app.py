"""The fedmerge ClientApp (Flower Message API): a thin layer over :class:`fedmerge.runners.client.ClientState`.

The domain is chosen by the node config: ``partition-id`` in simulation, ``data-path`` in deployment. Train
replies carry the trained weights (named float arrays) and numeric training metrics; evaluate replies carry
metrics on the client's private test users. Any exception becomes an error reply naming the client's domain (its
node id while a deployed node's domain has not loaded; never its data path).
What a client keeps between its messages and never sends (``ClientState.memory``, e.g. the seed of a noisy Gram
drawn once) lives in the node's ``context.state``, which Flower keeps for the run in simulation and deployment.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp

from fedmerge.logs import configure_from_env
from fedmerge.runners.appconfig import scenario_from_run_config
from fedmerge.runners.client import ClientState, client_error_reason
from fedmerge.scenario import Scenario

logger = logging.getLogger(__name__)
CLIENT_ERROR_CODE = 1
MEMORY_RECORD = "fedmerge.client-memory"  # context.state's record of ClientState.memory (kept between messages)
_STATES: dict[tuple[str, str], ClientState] = {}  # per process: domain data and features load once


def _node_domain_label(cfg: Scenario, node_config: Mapping[str, Any], node_id: int) -> str:
    """What an error reply names before the node's domain loaded: the domain of a simulated node's partition, a
    deployed node's id (never its data-path: the owner's file system is no business of the server's)."""
    if node_config.get("data-path"):
        return f"node {node_id}"
    names = cfg.data.domain_names()
    pid = int(node_config.get("partition-id", -1))
    return names[pid] if 0 <= pid < len(names) else f"partition {pid}"


def client_state(cfg: Scenario, node_config: Mapping[str, Any]) -> ClientState:
    """This node's client state, cached per process and scenario."""
    key = (json.dumps(cfg.to_mapping(), sort_keys=True, default=str),
           json.dumps(dict(node_config), sort_keys=True, default=str))
    if key not in _STATES:
        _STATES[key] = ClientState(
            cfg, partition_id=node_config.get("partition-id"), data_path=node_config.get("data-path") or None
        )
    return _STATES[key]


def build_client_app(cfg: Scenario | None = None) -> ClientApp:
    """A ClientApp for scenario ``cfg`` (``None``: read it from the run config at each message)."""
    configure_from_env()  # once per process (a simulated client's): the launching CLI's --verbose / --debug
    app = ClientApp()

    def handle(message: Message, context: Context) -> Message:
        scenario = cfg
        label = f"node {context.node_id}"
        try:
            scenario = cfg if cfg is not None else scenario_from_run_config(context.run_config)
            label = _node_domain_label(scenario, context.node_config, context.node_id)
            state = client_state(scenario, context.node_config)
            label = state.domain.name  # once loaded, as the in-process engine names it
            # the node's context.state is the memory's home: this process may not have served the node before
            kept = context.state.config_records.get(MEMORY_RECORD)
            state.memory = dict(kept) if kept is not None else {}
            message_type = message.metadata.message_type.split(".")[0]
            try:
                return Message(state.handle(message_type, message.content), reply_to=message)
            finally:
                context.state[MEMORY_RECORD] = ConfigRecord(dict(state.memory))
        except Exception as exc:  # every failure goes back to the server as an error reply naming the domain
            logger.error("client %s failed:\n%s", label, traceback.format_exc())
            return Message(Error(CLIENT_ERROR_CODE, client_error_reason(label, exc)), reply_to=message)

    app.query()(handle)
    app.train()(handle)
    app.evaluate()(handle)
    return app


app = build_client_app()
