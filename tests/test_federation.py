"""Federation: in-process vs Flower simulation, what clients send, update rejection, 2..N clients, both families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedmerge.config import apply_overrides, load_scenario
from fedmerge.errors import FedmergeError
from fedmerge.runners import protocol
from fedmerge.runners.client import ClientState
from fedmerge.runners.inprocess import InProcessTransport, run_federation, run_inprocess
from fedmerge.runners.server import Federation, fedavg_aggregate, initial_weights

TINY = [
    "run.progress=false", "data.synthetic.n_users=40", "data.synthetic.n_items=30", "data.synthetic.max_len=8",
    "model.params.hidden=16", "model.params.n_layers=1", "model.params.max_len=8", "model.params.max_epochs=1",
    "model.params.n_experts=2", "baselines.fedavg_rounds=1", "merge.mergerec.steps=3", "encoder.params.dim=32",
]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def cfg(tmp_path):
    return load_scenario("quickstart", [*TINY, f"encoder.cache_dir={tmp_path / 'cache'}"])


def test_inprocess_run_reports_every_model_and_consistent_averages(cfg, tmp_path):
    out = run_inprocess(cfg, tmp_path / "out")
    expected = {"theta0", "individual", "average", "task_arithmetic", "ties", "dare", "mergerec_taskwise",
                "mergerec_layerwise", "fedavg", "joint"}
    assert set(out["models"]) == expected
    assert out["status"] == "ok" and not out["errors"] and not out["rejected"]
    for name, per_domain in out["models"].items():
        recalls = [per_domain[d]["recall@10"] for d in out["domains"]]
        assert per_domain["average"]["recall@10"] == pytest.approx(np.mean(recalls))
    assert out["models"]["joint"]["non_private"] is True
    assert all(b["sent"] > 0 and b["received"] > b["sent"] for b in out["bytes"].values())
    assert len(out["fedavg_curve"]) == 1 and out["fedavg_curve"][0]["bytes"] > out["oneshot_bytes"] > 0
    for name in ("results.json", "results.csv", "per_domain.png", "communication.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


class RecordingTransport(InProcessTransport):
    def __init__(self, cfg, corrupt: str | None = None):
        super().__init__(cfg)
        self.replies: list[RecordDict] = []
        self.corrupt = corrupt

    def send(self, message_type, requests):
        replies, errors = super().send(message_type, requests)
        if self.corrupt in replies and message_type == protocol.TRAIN:
            arrays = replies[self.corrupt].array_records[protocol.WEIGHTS]
            bad = protocol.from_record(arrays)
            first = next(iter(bad))
            bad[first] = torch.full_like(bad[first], float("nan"))
            replies[self.corrupt] = RecordDict({**replies[self.corrupt], protocol.WEIGHTS: protocol.to_record(bad)})
        self.replies.extend(replies.values())
        return replies, errors


def _check_reply_has_no_private_data(content: RecordDict, clients: dict[str, ClientState], theta_names: set[str]):
    user_ids = {uid for c in clients.values() for uid in c.domain.user_ids}
    seq_lengths = {len(s) for c in clients.values() for s in c.domain.train}
    for key, record in content.array_records.items():
        assert key == protocol.WEIGHTS and set(record) == theta_names
        for array in record.values():
            values = array.numpy()
            assert np.issubdtype(values.dtype, np.floating), (key, values.dtype)
    for record in content.metric_records.values():
        assert all(isinstance(v, (int, float)) for v in record.values())
    for record in content.config_records.values():
        assert set(record) == {protocol.DOMAIN} and record[protocol.DOMAIN] in clients
        assert record[protocol.DOMAIN] not in user_ids
    assert not seq_lengths & {v.numpy().shape[0] for r in content.array_records.values() for v in r.values()
                               if v.numpy().ndim == 1 and v.numpy().shape[0] == len(next(iter(clients.values())).domain.train)}


def test_clients_send_only_float_weights_metrics_and_domain_names(cfg):
    cfg = apply_overrides(cfg, ["baselines.joint=false"])
    transport = RecordingTransport(cfg)
    theta0 = initial_weights(cfg)
    Federation(cfg, theta0).run(transport)
    assert len(transport.replies) == 3 + 3 + 3 + 3  # one-shot train, evaluate, FedAvg train + evaluate
    for content in transport.replies:
        _check_reply_has_no_private_data(content, transport.clients, set(theta0))


def test_flower_client_app_replies_and_names_domain_on_error(cfg):
    from flwr.supercore.task_identity import TaskIdentity

    from clients.app import build_client_app

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as Flower's simulation sets them

    app = build_client_app(cfg)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(),
                      run_config={})
    theta0 = initial_weights(cfg)
    train = Message(RecordDict({protocol.GLOBAL: protocol.to_record(theta0), protocol.CONFIG: ConfigRecord({"round": 0})}),
                    7, protocol.TRAIN)
    reply = app(train, context)
    assert not reply.has_error()
    assert protocol.reply_domain(reply.content) == "synth-1"
    assert set(reply.content.array_records[protocol.WEIGHTS]) == set(theta0)
    broken = app(Message(RecordDict(), 7, protocol.TRAIN), context)
    assert broken.has_error() and "synth-1" in broken.error.reason


def test_rejected_update_is_left_out_and_min_replies_enforced(cfg):
    cfg = apply_overrides(cfg, ["baselines.joint=false", "baselines.fedavg_rounds=0", 'merge.methods=["average"]',
                                "federation.min_replies=2"])
    federation = Federation(cfg, initial_weights(cfg))
    out = federation.run(RecordingTransport(cfg, corrupt="synth-2"))
    assert set(out["rejected"]) == {"synth-2"} and "non-finite" in out["rejected"]["synth-2"]
    assert "synth-2" not in out["models"]["individual"]
    strict = apply_overrides(cfg, ["federation.min_replies=3"])
    with pytest.raises(FedmergeError, match="need federation.min_replies = 3"):
        Federation(strict, initial_weights(strict)).run(RecordingTransport(strict, corrupt="synth-2"))


def test_fedavg_aggregate_matches_weighted_mean():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    out = fedavg_aggregate({"a": a, "b": b}, {"a": 1.0, "b": 3.0})
    assert torch.allclose(out["w"], (1 * a["w"] + 3 * b["w"]) / 4)


@pytest.mark.parametrize("family", ["sequential", "text-lae"])
@pytest.mark.parametrize("n_domains", [2, 4])
def test_strategy_works_for_2_to_n_clients_and_both_families(cfg, family, n_domains):
    overrides = [f"data.synthetic.n_domains={n_domains}", f"model.family={family}", "baselines.joint=false",
                 "baselines.fedavg_rounds=1", 'merge.methods=["average","ties","mergerec_layerwise"]']
    if family == "text-lae":
        overrides += ["model.params={lam = [10.0, 100.0]}"]
    small = apply_overrides(cfg, overrides)
    out = run_federation(small, InProcessTransport(small))
    assert out["status"] == "ok"
    assert len(out["models"]["average"]) == n_domains + 1  # domains + average
    assert set(out["models"]["individual"]) - {"average"} == {f"synth-{i}" for i in range(n_domains)}


def test_held_out_domain_is_evaluated_zero_shot_only(cfg):
    held = apply_overrides(cfg, ['data.held_out=["synth-2"]', "baselines.joint=false", "baselines.fedavg_rounds=0",
                                 'merge.methods=["average"]'])
    out = run_federation(held, InProcessTransport(held))
    assert "synth-2" in out["models"]["average"] and "synth-2" not in out["models"]["individual"]
    assert out["bytes"]["synth-2"]["sent"] < out["bytes"]["synth-0"]["sent"]  # it never sends weights
    assert out["models"]["average"]["average"]["recall@10"] == pytest.approx(
        np.mean([out["models"]["average"][d]["recall@10"] for d in ("synth-0", "synth-1")]))


def test_flower_simulation_matches_inprocess(cfg, tmp_path):
    from fedmerge.runners.simulation import run_scenario

    small = apply_overrides(cfg, ["baselines.joint=false", 'merge.methods=["average","mergerec_taskwise"]'])
    flower = run_scenario(small, "flower", tmp_path / "flower")
    inprocess = run_scenario(small, "inprocess", tmp_path / "inprocess")
    assert flower["run"]["engine"] == "flower" and (tmp_path / "flower" / "results.json").is_file()
    for name, per_domain in inprocess["models"].items():
        for domain, metrics in per_domain.items():
            assert flower["models"][name][domain] == pytest.approx(metrics), (name, domain)
    assert flower["bytes"] == inprocess["bytes"]
