"""Federation: in-process vs Flower simulation, what clients send, update rejection, 2..N clients, both families."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedmerge.config import apply_overrides, load_scenario
from fedmerge.errors import FedmergeError
from fedmerge.runners import protocol
from fedmerge.runners.client import ClientState
from fedmerge.runners.inprocess import InProcessTransport, run_inprocess
from fedmerge.runners.server import Federation, fedavg_aggregate, initial_weights, run_federation
from fedmerge.storage import load_weights, save_weights

TINY = [
    "run.progress=false", "data.synthetic.n_users=40", "data.synthetic.n_items=30", "data.synthetic.max_len=8",
    "model.params.hidden=16", "model.params.n_layers=1", "model.params.max_len=8", "model.params.max_epochs=1",
    "model.params.n_experts=2", "baselines.fedavg_rounds=1", "merge.mergerec.steps=3", "encoder.name=hashing",
    "encoder.params.dim=32",
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
    # FedAvg's own traffic: one round sends θ down and an update up, as the one-shot phase does (no evaluation traffic)
    assert len(out["fedavg_curve"]) == 1 and out["oneshot_bytes"] > 0
    assert out["fedavg_curve"][0]["bytes"] == pytest.approx(out["oneshot_bytes"], rel=0.01)
    for name in ("results.json", "results.csv", "per_domain.png", "communication.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def _with_nan_weights(content: RecordDict) -> RecordDict:
    bad = protocol.from_record(content.array_records[protocol.WEIGHTS])
    first = next(iter(bad))
    bad[first] = torch.full_like(bad[first], float("nan"))
    return RecordDict({**content, protocol.WEIGHTS: protocol.to_record(bad)})


class RecordingTransport(InProcessTransport):
    """Records every reply; optionally corrupts one domain's training replies before the server sees them."""

    def __init__(self, cfg, corrupt: str | None = None):
        super().__init__(cfg)
        self.replies: list[RecordDict] = []
        self.corrupt = corrupt

    def send(self, message_type, requests, on_reply=None):
        seen = {}

        def forward(domain, content):
            if domain == self.corrupt and message_type == protocol.TRAIN:
                content = _with_nan_weights(content)
            seen[domain] = content
            self.replies.append(content)
            if on_reply is not None:
                on_reply(domain, content)

        replies, errors = super().send(message_type, requests, on_reply=forward)
        return {d: seen[d] for d in replies}, errors


@pytest.mark.parametrize("local", [[], ['merge.local_parameters=["final_norm.bias"]']], ids=["shared", "local"])
def test_results_do_not_depend_on_the_order_replies_arrive_in(cfg, local):
    """train_metrics, fedavg_train_metrics, rejected and errors were filled in arrival order: the same run wrote
    another results.json when the clients answered in another order (and, with local parameters, the merge report's
    and the cards' per-domain values)."""

    class Reversed(RecordingTransport):
        def send(self, message_type, requests, on_reply=None):
            return super().send(message_type, dict(reversed(list(requests.items()))), on_reply)

    def without_times(value):
        if isinstance(value, dict):
            return {k: without_times(v) for k, v in value.items() if "seconds" not in k and k != "timings_s"}
        return [without_times(v) for v in value] if isinstance(value, list) else value

    small = apply_overrides(cfg, ["baselines.joint=false", 'merge.methods=["average"]', *local])
    texts = [json.dumps(without_times(run_federation(small, transport(small, corrupt="synth-1"))))
             for transport in (RecordingTransport, Reversed)]
    assert '"rejected": {"fedavg_round1:synth-1"' in texts[0] and texts[0] == texts[1]


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


def test_flower_client_app_replies_and_names_domain_on_error(cfg, flower_task_identity):
    from clients.app import build_client_app

    app = build_client_app(cfg)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(),
                      run_config={})
    theta0 = initial_weights(cfg)
    oneshot = ConfigRecord({protocol.PHASE: protocol.PHASE_ONESHOT, protocol.ROUND: 0})
    train = Message(RecordDict({protocol.GLOBAL: protocol.to_record(theta0), protocol.CONFIG: oneshot}), 7, protocol.TRAIN)
    reply = app(train, context)
    assert not reply.has_error()
    assert protocol.reply_domain(reply.content) == "synth-1"
    assert set(reply.content.array_records[protocol.WEIGHTS]) == set(theta0)
    broken = app(Message(RecordDict(), 7, protocol.TRAIN), context)
    assert broken.has_error() and "synth-1" in broken.error.reason


def test_a_deployed_client_names_its_domain_or_node_on_error_never_its_data_path(cfg, tmp_path, flower_task_identity):
    """A deployed ClientApp (node config data-path) labelled its error replies with the data path, so results.json's
    errors read `client /home/owner/private data/synth-0: ...` (the owner's file system, sent to the server) where
    simulation and in-process read `client synth-0: ...`. Now the loaded domain's name, before that the node id."""
    from clients.app import build_client_app
    from fedmerge.data.generic import save_generic_domain

    private = save_generic_domain(cfg.load_domain("synth-0"), tmp_path / "private data" / "synth-0")
    app = build_client_app(cfg)
    bad = RecordDict({protocol.CONFIG: ConfigRecord({protocol.PHASE: protocol.PHASE_ONESHOT, protocol.ROUND: 0})})
    _, inprocess = InProcessTransport(cfg).send(protocol.TRAIN, {"synth-0": bad})
    for path, label in ((private, "synth-0"), (tmp_path / "private data" / "missing", "node 7")):
        context = Context(run_id=1, node_id=7, node_config={"data-path": str(path)}, state=RecordDict(), run_config={})
        reply = app(Message(bad, 7, protocol.TRAIN), context)
        assert reply.has_error() and reply.error.reason.startswith(f"client {label}: "), reply.error.reason
        assert not reply.error.reason.startswith(f"client {tmp_path}")
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(private)}, state=RecordDict(), run_config={})
    assert app(Message(bad, 7, protocol.TRAIN), context).error.reason == inprocess["synth-0"]


def test_a_client_refuses_malformed_train_requests_and_releases_dp_ε_does_not_cover(cfg):
    """A train request of any phase but "fedavg" trained as one-shot, a missing round was round 0, a missing weights
    record a KeyError; a DP client shipped as many noisy releases as it was asked for (a repeated round averages its
    noise away; ε counted it once), reporting ε for the round number it was sent."""
    from fedmerge.runners.client import ClientState

    small = apply_overrides(cfg, ["baselines.fedavg_rounds=1", "privacy.enabled=true", "privacy.noise_multiplier=1.0"])
    client = ClientState(small, partition_id=0)
    theta0 = protocol.to_record(initial_weights(small))

    def train(config, weights=True):
        content = {protocol.CONFIG: ConfigRecord(config), **({protocol.GLOBAL: theta0} if weights else {})}
        return client.handle(protocol.TRAIN, RecordDict(content))

    oneshot, fedavg = protocol.PHASE_ONESHOT, protocol.PHASE_FEDAVG
    for config, weights, problem in (({protocol.PHASE: oneshot, protocol.ROUND: 0}, False, "without its 'global'"),
                                     ({protocol.PHASE: "evaluate", protocol.ROUND: 0}, True, "phase 'evaluate'"),
                                     ({protocol.PHASE: fedavg}, True, "round None"),
                                     ({protocol.PHASE: oneshot, protocol.ROUND: 1}, True, "one-shot round is 0")):
        with pytest.raises(FedmergeError, match=problem):
            train(config, weights)
    assert protocol.WEIGHTS in train({protocol.PHASE: oneshot, protocol.ROUND: 0}).array_records
    with pytest.raises(FedmergeError, match="round 0 refused: this client released it already"):
        train({protocol.PHASE: oneshot, protocol.ROUND: 0})
    with pytest.raises(FedmergeError, match=r"round 2 refused: ε covers this client's 2 releases \(rounds 0 to 1\)"):
        train({protocol.PHASE: fedavg, protocol.ROUND: 2})
    assert protocol.WEIGHTS in train({protocol.PHASE: fedavg, protocol.ROUND: 1}).array_records


def test_flower_client_app_takes_the_cli_log_level_and_logs_each_training(
    cfg, monkeypatch, caplog, flower_task_identity,
):
    """A simulated client runs in a Ray worker that never saw the CLI's --verbose: the ClientApp reads it from
    FEDMERGE_LOG_LEVEL like the ServerApp, and says when a training is done."""
    import logging

    from clients.app import build_client_app
    from fedmerge.logs import LEVEL_ENV

    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.WARNING)  # restored after the test
    monkeypatch.setenv(LEVEL_ENV, "INFO")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config={})
    train = Message(RecordDict({protocol.GLOBAL: protocol.to_record(initial_weights(cfg)),
                                protocol.CONFIG: ConfigRecord({protocol.PHASE: protocol.PHASE_ONESHOT,
                                                               protocol.ROUND: 0})}), 7, protocol.TRAIN)
    assert not build_client_app(cfg)(train, context).has_error()
    assert root.level == logging.INFO
    assert any(r.levelno == logging.INFO and r.getMessage().startswith("synth-0: round 0 trained in ")
               for r in caplog.records)


def test_default_run_goes_on_without_a_rejected_client_and_warns(cfg):
    """Default min_replies (0: a strict majority): one of three clients rejected, the run still ends ok, the client
    is recorded and a WARNING line per left-out client is printed; min_replies = 3 (every client) stops the run."""
    from fedmerge.runners.results import summary_table

    cfg = apply_overrides(cfg, ["baselines.joint=false", 'merge.methods=["average"]'])
    out = Federation(cfg, initial_weights(cfg)).run(RecordingTransport(cfg, corrupt="synth-2"))
    assert out["status"] == "ok"
    assert set(out["rejected"]) == {"synth-2", "fedavg_round1:synth-2"} and "non-finite" in out["rejected"]["synth-2"]
    assert "synth-2" not in out["models"]["individual"] and out["merge_report"]["domains"] == ["synth-0", "synth-1"]
    left_out = [w for w in out["warnings"] if w.startswith("client ")]
    reason = out["rejected"]["synth-2"]
    assert left_out == [f"client synth-2 was left out of the one-shot merges, FedAvg round 1: {reason}"]
    assert f"WARNING: {left_out[0]}" in summary_table({**out, "run": {"engine": "inprocess"}}).splitlines()
    strict = apply_overrides(cfg, ["federation.min_replies=3"])
    with pytest.raises(FedmergeError, match="need 3: federation.min_replies = 3;"):
        Federation(strict, initial_weights(strict)).run(RecordingTransport(strict, corrupt="synth-2"))


def test_default_run_goes_on_without_a_client_that_fails_to_train(cfg):
    """A client whose training fails (no update) is recorded in ``errors`` and named in a warning; the run is ok."""
    cfg = apply_overrides(cfg, ["baselines.joint=false", "baselines.fedavg_rounds=0", 'merge.methods=["average"]'])
    transport = InProcessTransport(cfg)
    honest = transport.clients["synth-1"].handle

    def fail_training(message_type, content):
        if message_type == protocol.TRAIN:
            raise RuntimeError("disk full")
        return honest(message_type, content)

    transport.clients["synth-1"].handle = fail_training
    out = Federation(cfg, initial_weights(cfg)).run(transport)
    assert out["status"] == "ok" and out["errors"] == {"train:synth-1": "client synth-1: RuntimeError: disk full"}
    assert out["warnings"] == ["client synth-1 was left out of the one-shot merges: client synth-1: RuntimeError: "
                               "disk full",
                               "the average of individual covers ['synth-0', 'synth-2'] only (no metrics of "
                               "['synth-1']): not comparable with the averages over every training domain"]


def test_a_client_that_vanished_for_good_leaves_the_run_ok_a_missing_evaluation_of_a_used_client_fails_it(cfg):
    """README: one vanished client of three no longer stops the run (min_replies). It did: the vanished client also
    missed every evaluation, and any missing evaluation reply marked the run failed. A domain left out of a phase's
    training missing that phase's evaluation is now a warning; a client whose update was used and whose evaluation
    is missing still fails the run."""

    class Vanishing(InProcessTransport):
        """synth-2's node is gone after its first ``after`` requests (0: before the run)."""

        def __init__(self, cfg, after):
            super().__init__(cfg)
            self.left = after

        def send(self, message_type, requests, on_reply=None):
            gone = "synth-2" in requests and self.left == 0
            if "synth-2" in requests and self.left:
                self.left -= 1
            replies, errors = super().send(message_type, {d: r for d, r in requests.items()
                                                          if not (gone and d == "synth-2")}, on_reply)
            self.undelivered = {"synth-2"} if gone else set()
            if gone:
                errors["synth-2"] = "no SuperNode holds this domain"
            return replies, errors

    one_round = apply_overrides(cfg, ["baselines.joint=false", 'merge.methods=["average"]', "baselines.fedavg_rounds=1"])
    out = run_federation(one_round, Vanishing(one_round, after=0))
    assert out["status"] == "ok", out["errors"]
    assert set(out["errors"]) == {"train:synth-2", "evaluate:synth-2", "fedavg_round1:train:synth-2",
                                  "fedavg_round1:evaluate:synth-2"}
    assert "client synth-2 sent no evaluation (left out of its training): no SuperNode holds this domain" in out["warnings"]
    out = run_federation(one_round, Vanishing(one_round, after=1))  # gone after its one-shot update was used
    assert out["merge_report"]["domains"] == ["synth-0", "synth-1", "synth-2"] and out["status"] == "failed"


def test_a_fedavg_round_averaged_over_fewer_domains_is_flagged_on_its_curve_point_and_warned(cfg):
    """A FedAvg round whose evaluation lacked a training domain's metrics got a curve point averaged over fewer
    domains than the others, plotted as one curve, and no warning said so (only the last round, renamed fedavg,
    was checked)."""

    class DropsRound1Metrics(InProcessTransport):
        def send(self, message_type, requests, on_reply=None):
            replies, errors = super().send(message_type, requests, on_reply)
            if message_type == protocol.EVALUATE and protocol.MODEL_PREFIX + "fedavg_round1" in requests["synth-2"]:
                replies["synth-2"] = RecordDict({protocol.INFO: protocol.info_record("synth-2")})  # no metrics
            return replies, errors

    two = apply_overrides(cfg, ["baselines.joint=false", 'merge.methods=["average"]', "baselines.fedavg_rounds=2"])
    out = run_federation(two, DropsRound1Metrics(two))
    assert [p.get("domains") for p in out["fedavg_curve"]] == [["synth-0", "synth-1"], None]
    assert [w for w in out["warnings"] if "fedavg_curve" in w] == [
        "fedavg_curve's round 1 averages ['synth-0', 'synth-1'] only: not comparable with the rounds averaged over "
        "every training domain"]


def test_a_run_that_fails_in_fedavg_keeps_the_merges_metrics_in_their_cards(cfg, tmp_path):
    """Two of three clients vanish in the FedAvg round: the run fails, and the merges measured before it keep their
    metrics in results.json and in their saved model cards."""
    from fedmerge.recommender import read_card

    cfg = apply_overrides(cfg, ["baselines.joint=false", "baselines.fedavg_rounds=1", 'merge.methods=["average"]'])
    transport = InProcessTransport(cfg)
    for domain in ("synth-1", "synth-2"):
        honest = transport.clients[domain].handle

        def vanish_in_fedavg(message_type, content, honest=honest):
            if message_type == protocol.TRAIN and content.config_records[protocol.CONFIG][protocol.PHASE] != protocol.PHASE_ONESHOT:
                raise RuntimeError("node lost")
            return honest(message_type, content)

        transport.clients[domain].handle = vanish_in_fedavg
    out = run_federation(cfg, transport, out_dir=tmp_path)
    assert out["status"] == "failed" and "only 1 usable updates" in out["errors"]["run"]
    card = read_card(tmp_path / "models" / "average.safetensors")
    assert card["metrics"]["synth-0"] == out["models"]["average"]["synth-0"]


@pytest.mark.parametrize(("k", "needed"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3)])
def test_default_min_replies_is_a_strict_majority(cfg, k, needed):
    federation = Federation(cfg, initial_weights(cfg))
    federation.train_domains = [f"d{i}" for i in range(k)]
    federation.require_enough({f"d{i}": {} for i in range(needed)})
    with pytest.raises(FedmergeError, match=f"need {needed}: federation.min_replies = 0 \\(0: a strict majority"):
        federation.require_enough({f"d{i}": {} for i in range(needed - 1)})


def test_clipping_scales_the_over_norm_update_to_the_bound_and_keeps_the_others(cfg):
    """The clip must change the weights, not only the record: limit 3 × the upper median of the others' norms."""
    federation = Federation(cfg.with_changes(federation={"norm_action": "clip"}), initial_weights(cfg))
    reference = {"w": torch.zeros(4)}
    updates = {"synth-0": {"w": torch.tensor([1.0, 0, 0, 0])}, "synth-1": {"w": torch.tensor([2.0, 0, 0, 0])},
               "synth-2": {"w": torch.tensor([0.0, 9.0, 0, 0])}}
    kept = federation.screen_updates(updates, reference)
    torch.testing.assert_close(kept["synth-2"]["w"], torch.tensor([0.0, 6.0, 0.0, 0.0]), rtol=0, atol=0)
    assert kept["synth-0"] is updates["synth-0"] and kept["synth-1"] is updates["synth-1"]
    assert "scaled by 0.6667" in federation.clipped["synth-2"]


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


def test_held_out_domain_evaluates_every_training_domains_model(cfg, tmp_path):
    from fedmerge.recommender import read_card
    from fedmerge.storage import client_weights_path

    held = apply_overrides(cfg, ['data.held_out=["synth-2"]', "baselines.joint=false", "baselines.fedavg_rounds=0",
                                 'merge.methods=["average"]'])
    out = run_federation(held, InProcessTransport(held), out_dir=tmp_path)
    for d in ("synth-0", "synth-1"):
        zero_shot = out["models"][f"individual_{d}"]
        assert set(zero_shot) == {"synth-2", "average"} and zero_shot["average"] == {}
        card = read_card(client_weights_path(tmp_path, d))  # the client's model card lists its zero-shot metrics
        assert card["metrics"]["synth-2"] == zero_shot["synth-2"] and d in card["metrics"]
    assert out["models"]["individual_synth-0"]["synth-2"] != out["models"]["individual_synth-1"]["synth-2"]


def test_testtime_merge_is_built_and_evaluated_for_each_held_out_domain_only(cfg, tmp_path):
    from fedmerge.recommender import model_path, read_card

    held = apply_overrides(cfg, ['data.held_out=["synth-2"]', "baselines.joint=false", "baselines.fedavg_rounds=0",
                                 'merge.methods=["mergerec_testtime"]', "merge.mergerec.steps=0",
                                 "merge.mergerec.init_coefficient=0.0"])
    out = run_federation(held, InProcessTransport(held), out_dir=tmp_path)
    testtime = out["models"]["mergerec_testtime"]
    assert set(testtime) == {"synth-2", "average"}  # λ = 0 after 0 steps: θ₀ itself
    assert testtime["synth-2"] == out["models"]["theta0"]["synth-2"]
    report = out["merge_report"]["mergerec_testtime"]["synth-2"]
    assert report["teacher"] == "theta0" and report["domains"] == ["synth-0", "synth-1"]
    card = read_card(model_path(tmp_path, "mergerec_testtime:synth-2"))
    assert card["held_out_domain"] == "synth-2" and card["metrics"]["synth-2"] == testtime["synth-2"]
    with pytest.raises(FedmergeError, match=r"valid: \['theta0', 'synth-0', 'synth-1'\]"):
        apply_overrides(held, ["merge.testtime.teacher=synth-2"])


def test_testtime_merge_is_skipped_with_a_warning_when_its_teacher_client_was_left_out(cfg):
    """The run goes on without a failed minority; a test-time merge whose teacher is that client is skipped and
    warned about instead of failing the whole run after training."""
    from fedmerge.runners.server import testtime_merges

    held = apply_overrides(cfg, ['data.held_out=["synth-2"]', 'merge.methods=["mergerec_testtime"]',
                                 'merge.testtime.teacher="synth-1"'])
    theta0 = initial_weights(held)
    merged, report = testtime_merges(theta0, {"synth-0": theta0}, held)  # synth-1's update never arrived
    assert merged == {} and report == {"synth-2": {"skipped": "teacher 'synth-1' has no usable update"}}


def test_a_held_out_catalog_the_testtime_merge_cannot_use_skips_that_merge_only(cfg):
    """A held-out catalog of fewer items than pseudo_user_length failed the whole run after every client had
    trained; now that test-time merge is left out with its reason."""
    from fedmerge.runners.server import testtime_merges

    held = apply_overrides(cfg, ['data.held_out=["synth-2"]', 'merge.methods=["mergerec_testtime"]',
                                 "model.params.max_len=40", "merge.mergerec.pseudo_user_length=31",  # 30 items
                                 "merge.testtime.include_seen=false"])
    theta0 = initial_weights(held)
    merged, report = testtime_merges(theta0, {"synth-0": theta0, "synth-1": theta0}, held)
    assert merged == {} and report["synth-2"]["skipped"] == ("its catalog has 30 items, fewer than "
                                                             "merge.mergerec.pseudo_user_length = 31")
    # a setting no catalog decides still fails the run, now before any client trains
    too_long = apply_overrides(held, ["model.params.max_len=8", "merge.mergerec.pseudo_user_length=10"])
    with pytest.raises(FedmergeError, match=r"pseudo_user_length = 10 exceeds the 8 items the 'sequential' model "
                                            r"reads \(model.params.max_len\)"):
        too_long.make_checked_family()


def test_a_training_catalog_smaller_than_the_pseudo_users_fails_the_run_before_any_client_trains(cfg, tmp_path):
    """MergeRec's pseudo-users of pseudo_user_length distinct items from a training catalog of fewer items failed
    the whole run at the merge, after every client had trained; the catalogs are public, so the server now refuses
    the setting when it starts, naming the domain."""
    small = apply_overrides(cfg, ['merge.methods=["average", "mergerec_taskwise"]', "model.params.max_len=40",
                                  "merge.mergerec.pseudo_user_length=31", "baselines.joint=false"])  # 30 items
    with pytest.raises(FedmergeError, match=r"pseudo_user_length = 31 exceeds the 30 items of training domain "
                                            r"'synth-0'"):
        run_federation(small, InProcessTransport(small), out_dir=tmp_path)
    assert not list(tmp_path.rglob("*.safetensors")) and not (tmp_path / "results.json").exists()
    # a test-time merge that leaves the seen catalogs out does not need them
    testtime_only = apply_overrides(small, ['data.held_out=["synth-2"]', 'merge.methods=["mergerec_testtime"]',
                                            "merge.testtime.include_seen=false"])
    from fedmerge.runners.server import check_training_catalogs

    check_training_catalogs(testtime_only)
    with pytest.raises(FedmergeError, match="training domain 'synth-0'"):
        check_training_catalogs(apply_overrides(testtime_only, ["merge.testtime.include_seen=true"]))


def test_the_testtime_merge_does_not_depend_on_the_order_the_replies_arrived_in(cfg):
    """Flower hands the updates over in arrival order: λ's rows, DARE's masks and the pseudo-users followed it, so two
    runs of one seed gave other test-time merges (merge_replies sorted its input; this path did not)."""
    from fedmerge.runners.server import testtime_merges

    held = apply_overrides(cfg, ['data.held_out=["synth-2"]', 'merge.methods=["mergerec_testtime"]'])
    theta0 = initial_weights(held)
    generator = torch.Generator().manual_seed(0)
    models = {d: {n: t + 0.05 * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t
                  for n, t in theta0.items()} for d in ("synth-0", "synth-1")}
    first, _ = testtime_merges(theta0, models, held)
    swapped, _ = testtime_merges(theta0, dict(reversed(models.items())), held)
    for name, tensor in first["synth-2"].items():
        torch.testing.assert_close(swapped["synth-2"][name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("concurrency", [[], ["federation.parallel_clients=1", "run.torch_threads=0"]],
                         ids=["one-clientapp-per-cpu", "one-clientapp-with-every-cpu"])
def test_flower_simulation_matches_inprocess(cfg, tmp_path, concurrency):
    """Also with one ClientApp at a time that scores with every CPU (run.torch_threads = 0): same numbers."""
    from fedmerge.runners.simulation import run_scenario

    small = apply_overrides(cfg, ["baselines.joint=false", 'merge.methods=["average","mergerec_taskwise"]', *concurrency])
    flower = run_scenario(small, "flower", tmp_path / "flower")
    inprocess = run_scenario(small, "inprocess", tmp_path / "inprocess")
    assert flower["run"]["engine"] == "flower" and (tmp_path / "flower" / "results.json").is_file()
    # the file is what the run returned (timings_s.simulation_wall was in the returned dict only)
    assert json.loads((tmp_path / "flower" / "results.json").read_text()) == flower
    for name, per_domain in inprocess["models"].items():
        for domain, metrics in per_domain.items():
            assert flower["models"][name][domain] == pytest.approx(metrics), (name, domain)
    assert flower["bytes"] == inprocess["bytes"]
    # one recording path: the same result fields; only Flower has a connection step and a simulation around it
    assert set(flower) == set(inprocess) and set(flower["timings_s"]) == set(inprocess["timings_s"]) | {"connect", "simulation_wall"}
    # the ServerApp runs from Flower's unpacked app bundle (no .git): the launcher's checkout commit is recorded all
    # the same, since the bundle holds the same source
    assert flower["versions"] == inprocess["versions"]
    from fedmerge.recommender import read_card

    assert read_card(tmp_path / "flower" / "models" / "average.safetensors")["versions"] == inprocess["versions"]
    # which Flower node served each domain (an operator's audit trail); none in process
    assert sorted(flower["nodes"]) == ["synth-0", "synth-1", "synth-2"] and inprocess["nodes"] == {}
    assert len(set(flower["nodes"].values())) == 3 and all(isinstance(n, int) for n in flower["nodes"].values())
    from fedmerge.storage import load_client_weights

    saved_flower, saved_inprocess = load_client_weights(tmp_path / "flower"), load_client_weights(tmp_path / "inprocess")
    assert sorted(saved_flower) == ["synth-0", "synth-1", "synth-2"]
    for domain, weights in saved_inprocess.items():
        for name, tensor in weights.items():
            torch.testing.assert_close(saved_flower[domain][name], tensor)


# ---- saved client weights and --resume -----------------------------------------------------------------------


@pytest.fixture
def counted_training(monkeypatch):
    """Counts client training calls and records, per call, which client weight files already existed."""
    from fedmerge.runners import client as client_module

    calls: list[tuple[str, set[str]]] = []
    real = client_module.client_train

    def counting(domain, theta0, cfg, *args, **kwargs):
        calls.append((domain.name, set(counting.saved_dir.glob("clients/*.safetensors")) if counting.saved_dir else set()))
        return real(domain, theta0, cfg, *args, **kwargs)

    counting.saved_dir = None
    monkeypatch.setattr(client_module, "client_train", counting)
    return counting, calls


def test_resume_remerges_saved_weights_without_client_training(cfg, tmp_path, counted_training):
    from fedmerge.runners.simulation import run_scenario
    from fedmerge.storage import load_client_weights

    counting, calls = counted_training
    out_dir = tmp_path / "run"
    counting.saved_dir = out_dir
    small = apply_overrides(cfg, ['merge.methods=["average","ties","mergerec_taskwise"]', "baselines.fedavg_rounds=1"])
    first = run_scenario(small, "inprocess", out_dir)
    assert [d for d, _ in calls] == ["synth-0", "synth-1", "synth-2"] * 2  # one-shot + one FedAvg round
    # each accepted update is on disk before the next client trains (saved as it arrives)
    assert [sorted(p.stem for p in before) for _, before in calls[:3]] == [[], ["synth-0"], ["synth-0", "synth-1"]]
    saved = load_client_weights(out_dir)
    assert sorted(saved) == ["synth-0", "synth-1", "synth-2"]
    calls.clear()

    again = apply_overrides(small, ['merge.methods=["average","ties","mergerec_taskwise","task_arithmetic"]'])
    resumed = run_scenario(again, "inprocess", out_dir, resume=True)
    assert calls == []  # no client trained
    assert resumed["resumed"]["clients"] == ["synth-0", "synth-1", "synth-2"]
    for name in ("average", "ties", "mergerec_taskwise", "individual", "theta0", "joint"):
        for domain, metrics in first["models"][name].items():
            assert resumed["models"][name][domain] == pytest.approx(metrics), (name, domain)
    assert "task_arithmetic" in resumed["models"] and "fedavg" not in resumed["models"]
    # FedAvg retrains the clients, so --resume skips it: said in the warnings, not only in "resumed"
    assert any(w.startswith("--resume skips FedAvg") and "baselines.fedavg_rounds = 1" in w and "models/fedavg" in w
               for w in resumed["warnings"]), resumed["warnings"]
    for domain, metrics in first["train_metrics"].items():
        assert resumed["train_metrics"][domain] == pytest.approx(metrics)
    archived = list(out_dir.glob("results.*.json"))
    assert len(archived) == 1 and json.loads(archived[0].read_text())["models"]["fedavg"]  # the first run is kept
    assert json.loads((out_dir / "results.json").read_text())["resumed"]["from"] == str(out_dir)


def test_resume_refuses_weights_from_another_configuration(cfg, tmp_path):
    from fedmerge.runners.simulation import run_scenario

    small = apply_overrides(cfg, ['merge.methods=["average"]', "baselines.fedavg_rounds=0", "baselines.joint=false"])
    with pytest.raises(FedmergeError, match="no saved client weights"):
        run_scenario(small, "inprocess", tmp_path / "empty", resume=True)
    with pytest.raises(FedmergeError, match="needs the output folder"):
        run_scenario(small, "inprocess", None, resume=True)
    run_scenario(small, "inprocess", tmp_path / "run")
    other = apply_overrides(small, ["model.params.hidden=8"])
    with pytest.raises(FedmergeError, match=r"trained with a different .* configuration"):
        run_scenario(other, "inprocess", tmp_path / "run", resume=True)
    fewer = apply_overrides(small, ['data.domains=["synth-0","synth-1"]'])
    with pytest.raises(FedmergeError, match=r"\['synth-2'\] .* not training domains"):
        run_scenario(fewer, "inprocess", tmp_path / "run", resume=True)
    # a refused --resume leaves the run as it was (results.json was renamed before the saved weights were checked)
    assert (tmp_path / "run" / "results.json").is_file() and not list((tmp_path / "run").glob("results.*.json"))
    theta0_file = tmp_path / "run" / "models" / "theta0.safetensors"
    save_weights(theta0_file, load_weights(theta0_file), {"config_sha256": "another run"})
    with pytest.raises(FedmergeError, match=r"theta0.safetensors: trained with a different"):
        run_scenario(small, "inprocess", tmp_path / "run", resume=True)


def test_resume_refuses_weights_trained_on_data_that_changed_since(cfg, tmp_path, synthetic_domains):
    """The fingerprint covered the settings, not the data: a domain folder edited after the run resumed with
    status ok, its weights (trained on the old users) evaluated on the new ones."""
    from fedmerge.data import save_generic_domain
    from fedmerge.runners.simulation import run_scenario

    for domain in synthetic_domains[:2]:
        save_generic_domain(domain, tmp_path / "data" / domain.name)
    own = apply_overrides(cfg, ['data.source="generic"', f'data.root="{tmp_path / "data"}"',
                                'data.domains=["synth-0","synth-1"]', 'merge.methods=["average"]',
                                "baselines.fedavg_rounds=0", "baselines.joint=false"])
    run_scenario(own, "inprocess", tmp_path / "run")
    assert run_scenario(own, "inprocess", tmp_path / "run", resume=True)["status"] == "ok"  # same data: resumes
    csv_file = tmp_path / "data" / "synth-1" / "interactions.csv"
    csv_file.write_text("".join(csv_file.read_text().splitlines(keepends=True)[:-40]))
    with pytest.raises(FedmergeError, match=r"synth-1.*changed since the run"):
        run_scenario(own, "inprocess", tmp_path / "run", resume=True)
    from fedmerge.runners.multiseed import run_seeds

    seeds = apply_overrides(own, ["run.seeds=[0]"])
    run_seeds(seeds, "inprocess", tmp_path / "seeds")
    csv_file.write_text("".join(csv_file.read_text().splitlines(keepends=True)[:-40]))
    with pytest.raises(FedmergeError, match=r"synth-1.*changed since the run"):  # a complete seed is not kept
        run_seeds(seeds, "inprocess", tmp_path / "seeds", resume=True)


def test_resume_checks_saved_client_weights_like_replies(cfg, tmp_path):
    """A saved client file goes through the checks a reply passes: a NaN weight is a recorded rejection (the other
    clients are merged), not merged or clipped into NaN models; a file whose metadata names another domain than
    its file name is refused."""
    from fedmerge.runners.simulation import run_scenario
    from fedmerge.storage import read_metadata

    small = apply_overrides(cfg, ['merge.methods=["average"]', "baselines.fedavg_rounds=0", "baselines.joint=false",
                                  'federation.norm_action="clip"'])
    run_scenario(small, "inprocess", tmp_path / "run")
    path = tmp_path / "run" / "clients" / "synth-2.safetensors"
    metadata = read_metadata(path)
    weights = load_weights(path)
    save_weights(path, {n: torch.full_like(t, float("nan")) for n, t in weights.items()}, metadata)
    resumed = run_scenario(small, "inprocess", tmp_path / "run", resume=True)
    assert resumed["status"] == "ok"
    assert "saved weights" in resumed["rejected"]["synth-2"] and "non-finite" in resumed["rejected"]["synth-2"]
    assert resumed["merge_report"]["domains"] == ["synth-0", "synth-1"]
    # the record of the resume named synth-2 among the clients merged from saved weights, and FedAvg (0 rounds) skipped
    assert resumed["resumed"]["clients"] == ["synth-0", "synth-1"] and resumed["resumed"]["refused"] == ["synth-2"]
    assert resumed["resumed"]["skipped"] == ["local_training"]
    assert all(np.isfinite(m["recall@10"]) for m in resumed["models"]["average"].values())
    from fedmerge.recommender import read_card

    card = read_card(path)  # the earlier card's metrics belonged to the earlier weights
    assert card["rejected"] == resumed["rejected"]["synth-2"] and card["metrics"] == {}
    assert "synth-2" not in resumed["train_metrics"]

    save_weights(path, weights, {**metadata, "domain": "synth-1"})
    with pytest.raises(FedmergeError, match=r"synth-2.safetensors names domain 'synth-1'"):
        run_scenario(small, "inprocess", tmp_path / "run", resume=True)


def test_resume_accepts_settings_added_since_at_their_default_and_names_real_differences(cfg, tmp_path, caplog):
    """A run saved by a fedmerge without a newer setting resumes when the scenario leaves it at its default (the
    earlier behaviour); any other difference is refused naming the key and both values."""
    from fedmerge.runners.server import SETTINGS_KEY
    from fedmerge.runners.simulation import run_scenario
    from fedmerge.storage import read_metadata

    small = apply_overrides(cfg, ['merge.methods=["average"]', "baselines.fedavg_rounds=0", "baselines.joint=false"])
    run_scenario(small, "inprocess", tmp_path / "run")
    files = [*(tmp_path / "run" / "clients").glob("*.safetensors"), tmp_path / "run" / "models" / "theta0.safetensors"]

    def rewrite(change):
        for path in files:
            metadata = read_metadata(path)
            settings = json.loads(metadata[SETTINGS_KEY])
            change(settings)
            save_weights(path, load_weights(path), {**metadata, SETTINGS_KEY: json.dumps(settings),
                                                    "config_sha256": "an older fedmerge"})

    rewrite(lambda settings: settings["privacy"].pop("secure_mode"))  # the run predates privacy.secure_mode
    with caplog.at_level("WARNING"):
        resumed = run_scenario(small, "inprocess", tmp_path / "run", resume=True)
    assert resumed["status"] == "ok" and "privacy.secure_mode" in caplog.text
    on = apply_overrides(small, ["privacy.secure_mode=true", "privacy.enabled=true", 'privacy.unit="user"',
                                 "privacy.noise_seed=-1"])
    with pytest.raises(FedmergeError, match=r"privacy.secure_mode: saved '<absent>', now True"):
        run_scenario(on, "inprocess", tmp_path / "run", resume=True)
    rewrite(lambda settings: settings["model"]["params"].update(hidden=8))
    with pytest.raises(FedmergeError, match=r"Differences: model.params.hidden: saved 8, now "):
        run_scenario(small, "inprocess", tmp_path / "run", resume=True)


def test_simulate_cli_resume(cfg, tmp_path, counted_training, capsys):
    from fedmerge.cli import main

    _, calls = counted_training
    overrides = [*TINY, "encoder.cache_dir=" + str(tmp_path / "cache"), "baselines.fedavg_rounds=0",
                 "baselines.joint=false", 'merge.methods=["average"]']
    args = ["simulate", "quickstart", "--engine", "inprocess", "--out", str(tmp_path / "run")]
    args += [item for o in overrides for item in ("--set", o)]
    assert main(args) == 0
    assert len(calls) == 3
    assert main([*args, "--resume"]) == 0
    assert len(calls) == 3
    assert "resumed from" in capsys.readouterr().out


# ---- Flower transport: replies handed over as they arrive ---------------------------------------------------


class FakeGrid:
    """Two nodes; node 1 answers at the first pull, node 2 at the second, node 3 never."""

    def __init__(self):
        self.pulls = 0
        self.pushed: list[Message] = []

    online_nodes: list[int] = []  # set by _connect_by_hand

    def get_node_ids(self):
        return list(self.online_nodes)

    def push_messages(self, messages):
        self.pushed = list(messages)
        for m in self.pushed:  # what the SuperLink does on push
            m.metadata.__dict__["_message_id"] = f"id-{m.metadata.dst_node_id}"
        return [m.metadata.message_id for m in self.pushed]

    def pull_messages(self, ids):
        self.pulls += 1
        out = []
        for m in self.pushed:
            due = {1: 1, 2: 2}.get(m.metadata.dst_node_id)
            if due == self.pulls and f"id-{m.metadata.dst_node_id}" in ids:
                out.append(Message(RecordDict({protocol.INFO: protocol.info_record(f"d{m.metadata.dst_node_id}")}), reply_to=m))
        return out


def _connect_by_hand(strategy, node_of: dict[str, int]) -> None:
    """``strategy`` connected to ``node_of``'s nodes (online, each having claimed its domain), no query sent."""
    strategy.node_of, strategy.connect_seconds = dict(node_of), 0.0
    strategy.claims = {node: domain for domain, node in node_of.items()}
    strategy.grid.online_nodes = list(node_of.values())


def test_merge_strategy_hands_over_replies_as_they_arrive(cfg, monkeypatch, flower_task_identity):
    from server import strategy as strategy_module

    monkeypatch.setattr(strategy_module, "PULL_INTERVAL_S", 0.0)
    grid = FakeGrid()
    strategy = strategy_module.MergeStrategy(apply_overrides(cfg, ["federation.timeout_s=0.2"]), grid)
    _connect_by_hand(strategy, {"d1": 1, "d2": 2, "d3": 3})  # already connected
    arrived: list[tuple[str, int]] = []
    requests = {d: RecordDict() for d in ("d1", "d2", "d3", "d4")}
    replies, errors = strategy.send(protocol.EVALUATE, requests, on_reply=lambda d, c: arrived.append((d, grid.pulls)))
    assert arrived == [("d1", 1), ("d2", 2)]  # each handed over at the pull that brought it
    assert set(replies) == {"d1", "d2"}
    assert "no reply within" in errors["d3"] and errors["d4"] == "no SuperNode holds this domain"


def test_a_node_the_superlink_reports_unavailable_is_recorded_with_flowers_reason(
    cfg, monkeypatch, flower_task_identity,
):
    """A SuperNode killed mid-run: the SuperLink answers its message with an error reply of its own (source node
    SUPERLINK_NODE_ID), which send() skipped, then recorded "no reply within federation.timeout_s = 3600 s" for a run
    that ended after a minute."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
    from server import strategy as strategy_module

    class DeadNodeGrid(FakeGrid):
        def pull_messages(self, ids):
            out = super().pull_messages(ids)
            dead = [m for m in self.pushed if m.metadata.dst_node_id == 3 and m.metadata.message_id in ids]
            return out + [create_message_error_unavailable_res_message(m.metadata, "node_unavail") for m in dead]

    monkeypatch.setattr(strategy_module, "PULL_INTERVAL_S", 0.0)
    strategy = strategy_module.MergeStrategy(apply_overrides(cfg, ["federation.timeout_s=0.5"]), DeadNodeGrid())
    _connect_by_hand(strategy, {"d1": 1, "d2": 2, "d3": 3})
    replies, errors = strategy.send(protocol.EVALUATE, {d: RecordDict() for d in ("d1", "d2", "d3")})
    assert set(replies) == {"d1", "d2"}
    assert "no reply within" not in errors["d3"] and "unavailable" in errors["d3"].lower(), errors
    assert strategy.undelivered == {"d3"}  # the message never reached it: no traffic


def test_messages_the_superlink_did_not_take_and_replies_from_another_node_are_named(
    cfg, monkeypatch, flower_task_identity,
):
    """Flower returns "" (or None) as the id of a message the SuperLink refused, and [] when the whole push failed:
    those domains waited out federation.timeout_s and were recorded as silent. A reply whose source is not the node
    the message went to carries no content for that domain."""
    from server import strategy as strategy_module

    class PartlyRefusingGrid(FakeGrid):
        def push_messages(self, messages):
            ids = super().push_messages(messages)
            return ["" if m.metadata.dst_node_id == 3 else i for m, i in zip(self.pushed, ids)]

        def pull_messages(self, ids):
            out = super().pull_messages(ids)
            for reply in out:  # node 2's reply claims to come from node 7
                if reply.metadata.reply_to_message_id == "id-2":
                    reply.metadata.__dict__["_src_node_id"] = 7
            return out

    monkeypatch.setattr(strategy_module, "PULL_INTERVAL_S", 0.0)
    strategy = strategy_module.MergeStrategy(apply_overrides(cfg, ["federation.timeout_s=0.3"]), PartlyRefusingGrid())
    _connect_by_hand(strategy, {"d1": 1, "d2": 2, "d3": 3})
    replies, errors = strategy.send(protocol.EVALUATE, {d: RecordDict() for d in ("d1", "d2", "d3")})
    assert set(replies) == {"d1"}
    assert errors["d3"].startswith("the SuperLink did not accept the evaluate message for node 3")
    assert errors["d2"] == "a reply came from node 7, not from node 2 the message went to; ignored"

    class LeavingOutGrid(FakeGrid):  # Flower's in-memory grid leaves a refused message's id out of the list
        def push_messages(self, messages):
            ids = super().push_messages(messages)
            return [i for m, i in zip(self.pushed, ids) if m.metadata.dst_node_id != 3]

    strategy = strategy_module.MergeStrategy(apply_overrides(cfg, ["federation.timeout_s=0.3"]), LeavingOutGrid())
    _connect_by_hand(strategy, {"d1": 1, "d2": 2, "d3": 3})
    replies, errors = strategy.send(protocol.EVALUATE, {d: RecordDict() for d in ("d1", "d2", "d3")})
    assert set(replies) == {"d1", "d2"} and "did not accept" in errors["d3"]

    class FailedPushGrid(FakeGrid):
        def push_messages(self, messages):
            super().push_messages(messages)
            return []

    strategy = strategy_module.MergeStrategy(apply_overrides(cfg, ["federation.timeout_s=0.3"]), FailedPushGrid())
    _connect_by_hand(strategy, {"d1": 1, "d2": 2})
    replies, errors = strategy.send(protocol.EVALUATE, {d: RecordDict() for d in ("d1", "d2")})
    assert replies == {} and all("did not accept" in errors[d] for d in ("d1", "d2"))


# ---- DP noise seed and data root ---------------------------------------------------------------------------


def test_dp_noise_seed_is_os_entropy_unless_configured(cfg, monkeypatch):
    from fedmerge.privacy import dp
    from fedmerge.runners.client import client_train, load_client_domain, noise_seed

    seeds: list[int | None] = []
    real = dp.privatize_update
    monkeypatch.setattr(dp, "privatize_update", lambda *a, seed, **k: seeds.append(seed) or real(*a, seed=seed, **k))
    private = apply_overrides(cfg, ["privacy.enabled=true", "privacy.noise_multiplier=1.0"])
    domain = load_client_domain(private, partition_id=1)
    theta0 = initial_weights(private)
    first, _ = client_train(domain, theta0, private)
    second, _ = client_train(domain, theta0, private)
    assert seeds == [None, None]
    assert any(not torch.equal(first[k], second[k]) for k in first)  # fresh noise each release
    fixed = apply_overrides(private, ["privacy.noise_seed=77"])
    repeat = [client_train(domain, theta0, fixed, round_index=2)[0] for _ in range(2)]
    assert seeds[2] == seeds[3] == noise_seed(fixed, "synth-1", 2) is not None
    assert all(torch.equal(repeat[0][k], repeat[1][k]) for k in repeat[0])


def test_a_seeded_noise_stream_is_no_client_training_or_sampling_stream(cfg):
    """With ``privacy.noise_seed`` = the run seed (what a study's seed 0 uses), a client's noise seed must be
    none of the run's client seeds (its own dropout/negatives stream, another client's) nor one off them (DP-SGD
    seeds its user sampling with the noise seed and its noise with the noise seed + 1), and stays reproducible."""
    from fedmerge.runners.client import client_seed, noise_seed

    seeded = apply_overrides(cfg, ["privacy.enabled=true", "privacy.noise_multiplier=1.0",
                                   f"privacy.noise_seed={cfg.run.seed}"])
    names, rounds = seeded.data.domain_names(), range(3)
    training = {client_seed(seeded, d, r) for d in names for r in rounds}
    noise = [noise_seed(seeded, d, r) for d in names for r in rounds]
    assert len(set(noise)) == len(noise)  # every client and release its own stream
    assert not ({s + k for s in noise for k in (-1, 0, 1)} & training)
    assert not ({s + 1 for s in noise} & set(noise))
    assert noise == [noise_seed(seeded, d, r) for d in names for r in rounds]
    assert all(0 <= s < 2**62 for s in noise)


def test_amazon_data_root_defaults_to_data_amazon_and_names_the_download(tmp_path, monkeypatch):
    from fedmerge.errors import DataError

    cfg = load_scenario("amazon-unseen")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDMERGE_AMAZON_DIR", raising=False)
    assert cfg.data.root_path() == Path("data/amazon")
    with pytest.raises(DataError) as info:
        cfg.data.domain_path("Toys")
    assert "fedmerge data download amazon --domains Beauty,Pantry,Toys --dest data/amazon" in str(info.value)
    (tmp_path / "elsewhere" / "Toys").mkdir(parents=True)
    monkeypatch.setenv("FEDMERGE_AMAZON_DIR", str(tmp_path / "elsewhere"))
    assert cfg.data.domain_path("Toys") == tmp_path / "elsewhere" / "Toys"
    explicit = apply_overrides(cfg, [f"data.root={tmp_path / 'mine'}"])
    assert explicit.data.root_path() == tmp_path / "mine"  # an explicit data.root wins over the variable


def test_simulated_clientapps_get_cpus_by_parallel_clients(cfg):
    from fedmerge.runners.simulation import client_cpus

    assert client_cpus(cfg, 2) == 1  # default 0: one ClientApp per CPU
    assert client_cpus(apply_overrides(cfg, ["federation.parallel_clients=1"]), 2) == 2
    assert client_cpus(apply_overrides(cfg, ["federation.parallel_clients=2"]), 8) == 4
    assert client_cpus(apply_overrides(cfg, ["federation.parallel_clients=3"]), 2) == 1  # never below one CPU
    with pytest.raises(FedmergeError, match="federation.parallel_clients must be >= 0"):
        apply_overrides(cfg, ["federation.parallel_clients=-1"])


def test_zero_threads_mean_the_cpus_this_process_is_given(monkeypatch):
    """Ray sets OMP_NUM_THREADS to a simulated ClientApp's CPU share; without it, the affinity mask counts."""
    from fedmerge.reproducibility import process_cpus, thread_count

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert process_cpus() == 3 and thread_count(0) == 3 and thread_count(2) == 2
    for unusable in ("", "0", "two"):
        monkeypatch.setenv("OMP_NUM_THREADS", unusable)
        assert process_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert thread_count(0) == len(os.sched_getaffinity(0))


def test_the_server_works_on_replies_at_its_own_thread_count_in_process(cfg, monkeypatch):
    """The in-process clients set torch's threads to run.torch_threads; the merges were reset to the server's, but
    the checks and norm screens of each reply and FedAvg's aggregation ran at the clients' count."""
    seen = []
    real_accept, real_aggregate = Federation.accept_update, Federation.aggregate_round

    def accept_update(self, *args, **kwargs):
        seen.append(("accept", torch.get_num_threads()))
        return real_accept(self, *args, **kwargs)

    def aggregate_round(self, *args, **kwargs):
        seen.append(("aggregate", torch.get_num_threads()))
        return real_aggregate(self, *args, **kwargs)

    monkeypatch.setattr(Federation, "accept_update", accept_update)
    monkeypatch.setattr(Federation, "aggregate_round", aggregate_round)
    small = apply_overrides(cfg, ["baselines.joint=false", 'merge.methods=["average"]', "run.torch_threads=1",
                                  "run.server_threads=2"])
    previous = torch.get_num_threads()
    try:
        run_federation(small, InProcessTransport(small))
    finally:
        torch.set_num_threads(previous)
    assert {step for step, _ in seen} == {"accept", "aggregate"} and {n for _, n in seen} == {2}, seen


def test_a_merge_named_like_a_merge_report_entry_is_saved_as_a_registry_merge(cfg, tmp_path):
    """save_merged took any mapping under merge_report[method] for MergeRec's report: a plugin method named
    "seconds" or "failed" failed the run with KeyError: 'coefficients'."""
    from fedmerge.recommender import read_card

    small = apply_overrides(cfg, ["baselines.joint=false"])
    federation = Federation(small, initial_weights(small), out_dir=tmp_path)
    federation.merge_report = {"domains": ["synth-0", "synth-1"], "seconds": {"seconds": 0.1}, "failed": {}}
    federation.save_merged("seconds", federation.theta0)
    card = read_card(tmp_path / "models" / "seconds.safetensors")
    assert "mergerec" not in card and card["domains"] == ["synth-0", "synth-1"]


def test_a_machine_dependent_thread_count_is_warned_about(cfg):
    """run.torch_threads / server_threads = 0 follow the machine's CPU count, and forward passes of a few batch sizes
    differ in the last bits between thread counts: nothing in results.json said the figures could follow the
    machine."""
    small = apply_overrides(cfg, ["baselines.joint=false"])
    assert not [w for w in Federation(small, initial_weights(small)).setup_warnings if "threads" in w]
    zero = apply_overrides(small, ["run.torch_threads=0", "run.server_threads=0"])
    warned = [w for w in Federation(zero, initial_weights(zero)).setup_warnings if "threads = 0" in w]
    assert [w.split(" = ")[0] for w in warned] == ["run.torch_threads", "run.server_threads"]


def test_merge_weights_follow_data_domains_in_the_merge_and_on_its_card(cfg, tmp_path):
    """With data.domains unsorted, average's weights were applied to the domains sorted by name, and (once the merge
    was fixed) its card still paired the weights as written with the sorted domains."""
    from fedmerge.recommender import read_card
    from fedmerge.runners.server import merge_replies, mergerec_config_for

    small = apply_overrides(cfg, ["baselines.joint=false", 'data.domains=["synth-2", "synth-0", "synth-1"]',
                                  "merge.params.average.weights=[3, 1, 1]", "federation.min_replies=3",
                                  'merge.methods=["average"]',
                                  'merge.mergerec={init_method="average", init_params={weights=[3, 1, 1]}}'])
    theta0 = {"w": torch.zeros(1)}
    models = {d: {"w": torch.full((1,), value)} for d, value in (("synth-0", 0.0), ("synth-1", 0.0), ("synth-2", 5.0))}
    merged, report = merge_replies(theta0, models, {}, small)
    assert merged["average"]["w"].item() == pytest.approx(3.0)  # synth-2's weight 3 of 5: 5 · 3/5
    federation = Federation(small, initial_weights(small), out_dir=tmp_path)
    federation.merge_report = report
    federation.save_merged("average", merged["average"])
    card = read_card(tmp_path / "models" / "average.safetensors")
    assert card["domains"] == ["synth-0", "synth-1", "synth-2"] and card["method"]["params"]["weights"] == [1.0, 1.0, 3.0]
    assert mergerec_config_for(small, "task", models).init_params["weights"] == [1, 1, 3]


def test_per_domain_weights_with_a_client_left_out(cfg, tmp_path):
    """Per-domain weights once needed every client (min_replies = K, refused at load); they go with their domain by
    name, so a rejected client takes its weight with it and the others keep theirs (average renormalizes them)."""
    from fedmerge.recommender import model_path, read_card
    from fedmerge.storage import client_weights_path, load_weights

    small = apply_overrides(cfg, ["baselines.joint=false", "baselines.fedavg_rounds=0", 'merge.methods=["average"]',
                                  'data.domains=["synth-2", "synth-0", "synth-1"]',
                                  "merge.params.average.weights=[1, 3, 1]"])
    transport = RecordingTransport(small, corrupt="synth-2")
    out = Federation(small, initial_weights(small), out_dir=tmp_path).run(transport)
    assert out["status"] == "ok" and set(out["rejected"]) == {"synth-2"}
    first, second = (load_weights(client_weights_path(tmp_path, d)) for d in ("synth-0", "synth-1"))
    merged = load_weights(model_path(tmp_path, "average"))
    for name, value in merged.items():
        torch.testing.assert_close(value, 0.75 * first[name] + 0.25 * second[name])
    card = read_card(model_path(tmp_path, "average"))
    assert card["domains"] == ["synth-0", "synth-1"] and card["method"]["params"]["weights"] == [3.0, 1.0]


def test_server_threads_default_one_and_zero_means_all_usable_cores(cfg, monkeypatch):
    from fedmerge.runners.server import server_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    assert server_threads(cfg) == 1
    assert server_threads(apply_overrides(cfg, ["run.server_threads=0"])) == len(os.sched_getaffinity(0))
    assert server_threads(apply_overrides(cfg, ["run.server_threads=3"])) == 3


# ---- one hostile client of three (issue 19): the run ends ok with that client rejected ----------------------


class HostileTransport(InProcessTransport):
    """In-process transport whose ``attacker`` client's replies pass through ``attack(type, request, reply)``."""

    def __init__(self, cfg, attack, attacker: str = "synth-2"):
        super().__init__(cfg)
        client = self.clients[attacker]
        honest = client.handle
        client.handle = lambda message_type, content: attack(message_type, content, honest(message_type, content))


def _weights_attack(fn):
    def attack(message_type, request, reply):
        if message_type != protocol.TRAIN:
            return reply
        start = protocol.from_record(request.array_records[protocol.GLOBAL])
        weights = fn(start, protocol.from_record(reply.array_records[protocol.WEIGHTS]))
        return RecordDict({**reply, protocol.WEIGHTS: protocol.to_record(weights)})

    return attack


def _train_metrics_attack(**metrics):
    def attack(message_type, request, reply):
        if message_type != protocol.TRAIN:
            return reply
        return RecordDict({**reply, protocol.TRAIN_METRICS: MetricRecord(
            {**dict(reply.metric_records[protocol.TRAIN_METRICS]), **metrics})})

    return attack


def _hostile_run(cfg, attack, *overrides, out_dir=None):
    small = apply_overrides(cfg, ["baselines.joint=false", 'merge.methods=["average","mergerec_taskwise"]', *overrides])
    out = run_federation(small, HostileTransport(small, attack), out_dir=out_dir)
    json.dumps(out, allow_nan=False)  # results.json can be written
    return out


def _assert_attacker_left_out(out):
    """The rejected client's update is in no merge and in no FedAvg round; the run still evaluates every model on
    the honest domains (a range check on their metrics held whatever was merged)."""
    assert out["status"] == "ok" and out["merge_report"]["domains"] == ["synth-0", "synth-1"]
    assert "fedavg_round1:synth-2" in out["rejected"]
    for name in ("average", "mergerec_taskwise", "fedavg"):
        assert set(out["models"][name]) >= {"synth-0", "synth-1"}, name


@pytest.mark.parametrize("factor", [1e3, -100.0])  # weights stay under max_abs_value: the norm test must catch them
def test_scaled_task_vector_is_rejected_by_the_norm_test(cfg, factor):
    out = _hostile_run(cfg, _weights_attack(lambda g, w: {n: g[n] + factor * (w[n] - g[n]) for n in g}))
    assert out["status"] == "ok"
    assert "task-vector norm" in out["rejected"]["synth-2"] and "norm_multiple = 3" in out["rejected"]["synth-2"]
    assert "task-vector norm" in out["rejected"]["fedavg_round1:synth-2"]  # screened against the round's start too
    assert out["merge_report"]["domains"] == ["synth-0", "synth-1"]
    _assert_attacker_left_out(out)


def test_a_norm_rejected_update_is_saved_with_a_card_that_says_so(cfg, tmp_path):
    from fedmerge.recommender import read_card
    from fedmerge.storage import client_weights_path

    out = _hostile_run(cfg, _weights_attack(lambda g, w: {n: g[n] + 1e3 * (w[n] - g[n]) for n in g}), out_dir=tmp_path)
    card = read_card(client_weights_path(tmp_path, "synth-2"))
    assert card["rejected"] == out["rejected"]["synth-2"] and card["metrics"] == {}
    assert "rejected" not in read_card(client_weights_path(tmp_path, "synth-0"))
    # rejected in the FedAvg round too: the FedAvg model's card names only the clients it averaged
    assert "fedavg_round1:synth-2" in out["rejected"]
    assert read_card(tmp_path / "models" / "fedavg.safetensors")["domains"] == ["synth-0", "synth-1"]


def test_scaled_task_vector_is_clipped_with_norm_action_clip(cfg, tmp_path):
    from fedmerge.recommender import read_card
    from fedmerge.storage import client_weights_path

    out = _hostile_run(cfg, _weights_attack(lambda g, w: {n: g[n] + 1e3 * (w[n] - g[n]) for n in g}),
                       "federation.norm_action=\"clip\"", out_dir=tmp_path)
    assert "synth-2" not in out["rejected"] and "scaled by" in out["clipped"]["synth-2"]
    # a clipped update enters every merge at the bound: said in warnings (and so under the summary), not only here
    assert any(w.startswith("the update of synth-2 was clipped to the norm bound") for w in out["warnings"])
    # the saved file holds what the client sent; its card says it was clipped and claims no metrics for it
    card = read_card(client_weights_path(tmp_path, "synth-2"))
    assert card["clipped"] == out["clipped"]["synth-2"] and card["metrics"] == {}
    assert read_card(client_weights_path(tmp_path, "synth-0"))["metrics"]["synth-0"] == out["models"]["individual"]["synth-0"]
    assert out["merge_report"]["domains"] == ["synth-0", "synth-1", "synth-2"]


def test_huge_finite_weights_are_rejected(cfg):
    out = _hostile_run(cfg, _weights_attack(lambda g, w: {n: torch.full_like(v, 3e38) for n, v in w.items()}))
    assert "over federation.max_abs_value = 10000" in out["rejected"]["synth-2"]
    _assert_attacker_left_out(out)


def test_changed_router_buffer_is_rejected(cfg):
    def move_centre(g, w):
        return {**w, "adapter.centre": w["adapter.centre"] - 100.0 * w["adapter.centroids"][0]}

    out = _hostile_run(cfg, _weights_attack(move_centre), 'model.params.adapter="routed"')
    assert "fixed parameters 'adapter.centre' differ from θ₀" in out["rejected"]["synth-2"]
    _assert_attacker_left_out(out)


def test_unreadable_weight_arrays_are_rejected_not_fatal(cfg):
    from flwr.app import Array, ArrayRecord

    def strings(message_type, request, reply):
        if message_type != protocol.TRAIN:
            return reply
        names = list(reply.array_records[protocol.WEIGHTS])
        return RecordDict({**reply, protocol.WEIGHTS: ArrayRecord({n: Array(np.array(["x", "y"])) for n in names})})

    out = _hostile_run(cfg, strings)
    assert out["status"] == "ok"
    assert "cannot be read as float tensors" in out["rejected"]["synth-2"]
    _assert_attacker_left_out(out)


@pytest.mark.parametrize("payload", ["empty", "oversized"])
def test_empty_or_oversized_weight_payloads_are_rejected_before_decoding(cfg, payload):
    """An empty array payload raised EOFError out of the reply handler: status failed, no model evaluated, no client
    named; an oversized one was decoded in full before any size check (which could then never fire)."""
    from flwr.app import Array, ArrayRecord

    def forged(message_type, request, reply):
        if message_type != protocol.TRAIN:
            return reply
        arrays = dict(reply.array_records[protocol.WEIGHTS].items())
        name = sorted(arrays)[0]
        real = arrays[name]
        data = b"" if payload == "empty" else real.data + b"\0" * (len(real.data) + 8192)
        arrays[name] = Array(dtype=real.dtype, shape=real.shape, stype=real.stype, data=data)
        return RecordDict({**reply, protocol.WEIGHTS: ArrayRecord(arrays)})

    out = _hostile_run(cfg, forged)
    assert out["status"] == "ok", out.get("errors")
    reason = out["rejected"]["synth-2"]
    assert ("cannot be read as float tensors: EOFError" in reason if payload == "empty"
            else "bytes serialized, over the limit" in reason), reason
    _assert_attacker_left_out(out)


def test_a_client_failing_each_evaluation_keeps_one_reason_per_phase(cfg):
    """A failure in a FedAvg round's evaluation was stored under the main evaluation's key and replaced its reason."""
    calls = []

    def fail_evaluations(message_type, request, reply):
        if message_type == protocol.EVALUATE:
            calls.append(message_type)
            raise RuntimeError(f"evaluation #{len(calls)} failed")
        return reply

    out = _hostile_run(cfg, fail_evaluations)
    assert out["status"] == "failed"  # a client that cannot evaluate fails the run, as before
    assert "evaluation #1 failed" in out["errors"]["evaluate:synth-2"]
    assert "evaluation #2 failed" in out["errors"]["fedavg_round1:evaluate:synth-2"]


def test_nan_user_count_is_rejected_and_fedavg_still_finishes(cfg):
    out = _hostile_run(cfg, _train_metrics_attack(**{protocol.NUM_USERS: float("nan")}))
    assert "'num-users' = nan" in out["rejected"]["synth-2"]
    assert "'num-users' = nan" in out["rejected"]["fedavg_round1:synth-2"]
    _assert_attacker_left_out(out)


def test_non_finite_training_metric_is_dropped_not_stored(cfg):
    out = _hostile_run(cfg, _train_metrics_attack(final_loss=float("nan")))
    assert "final_loss" not in out["train_metrics"]["synth-2"] and "final_loss" in out["train_metrics"]["synth-0"]
    assert "'final_loss'" in out["rejected"]["train_metrics:synth-2"] and "synth-2" not in out["rejected"]


def test_fedavg_share_of_a_client_claiming_1e9_users_is_capped(cfg):
    from fedmerge.runners.server import capped_shares

    assert capped_shares({"a": 100.0, "b": 300.0, "x": 1e9}, 0.5) == pytest.approx({"a": 0.125, "b": 0.375, "x": 0.5})
    assert capped_shares({"a": 1.0, "b": 1.0, "x": 1e9}, 0.2) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "x": 1 / 3})
    assert capped_shares({"a": 1.0, "b": 2.0}, 1.0) == pytest.approx({"a": 1 / 3, "b": 2 / 3})
    claims = {"a": 0.1, "b": 0.2, "c": 0.3}  # summed in arrival order, the shares differed in the last bit
    assert capped_shares(claims, 1.0) == capped_shares(dict(reversed(claims.items())), 1.0)
    small = apply_overrides(cfg, ["baselines.joint=false"])
    users = Federation(apply_overrides(small, ['federation.fedavg_weighting="users"']), initial_weights(small))
    assert users.fedavg_shares({"a": 200.0, "b": 200.0, "x": 1e9}) == pytest.approx({"a": 0.25, "b": 0.25, "x": 0.5})
    equal = Federation(small, initial_weights(small))  # the default: a claimed user count buys nothing
    assert equal.fedavg_shares({"a": 200.0, "b": 200.0, "x": 1e9}) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "x": 1 / 3})


def test_fedavg_round_can_aggregate_with_the_median(cfg):
    small = apply_overrides(cfg, ["baselines.joint=false", 'federation.fedavg_aggregation="median"'])
    federation = Federation(small, initial_weights(small))
    start = {"w": torch.zeros(3)}
    federation.theta0 = start
    updates = {"a": {"w": torch.tensor([1.0, 2.0, 3.0])}, "b": {"w": torch.tensor([2.0, 0.0, 3.0])},
               "x": {"w": torch.tensor([1e6, -1e6, 1e6])}}
    new = federation.aggregate_round(start, updates, {"a": 0.25, "b": 0.25, "x": 0.5})
    torch.testing.assert_close(new["w"], torch.tensor([2.0, 0.0, 3.0]))


def test_fedavg_mean_does_not_depend_on_the_order_replies_arrive_in(cfg):
    """Flower delivers replies in any order; the float sum runs in the domains' order, so the round is exact."""
    small = apply_overrides(cfg, ["baselines.joint=false"])
    federation = Federation(small, initial_weights(small))
    federation.theta0 = start = {"w": torch.zeros(1)}
    updates = {"synth-0": {"w": torch.tensor([1e15])}, "synth-1": {"w": torch.tensor([-1e15])},
               "synth-2": {"w": torch.tensor([1.0])}}
    shares = {d: 1 / 3 for d in updates}
    arrived = {d: updates[d] for d in ("synth-0", "synth-2", "synth-1")}
    assert torch.equal(federation.aggregate_round(start, arrived, shares)["w"],
                       federation.aggregate_round(start, updates, shares)["w"])


def test_lying_evaluation_replies_are_left_out_and_recorded(cfg):
    sent = {}

    def lie(message_type, request, reply):
        if message_type != protocol.EVALUATE:
            return reply
        out = RecordDict({protocol.INFO: reply.config_records[protocol.INFO]})
        for key, record in reply.metric_records.items():
            name = key[len(protocol.METRICS_PREFIX):]
            if name == "individual":
                out[key] = MetricRecord({**dict(record), "accuracy": 1.0})
            elif name == "mergerec_taskwise":
                out[key] = record
                sent.update(dict(record))
            elif name != "theta0":
                out[key] = MetricRecord({**dict(record), "recall@10": float("nan")})
        out[protocol.METRICS_PREFIX + "best_model_ever"] = MetricRecord({"recall@10": 1.0})
        return out

    out = _hostile_run(cfg, lie)
    assert out["status"] == "ok"
    assert "synth-2" not in out["models"]["average"] and "synth-2" not in out["models"]["individual"]
    assert "best_model_ever" not in out["models"]
    assert out["models"]["mergerec_taskwise"]["synth-2"] == {k: sent[k] for k in out["models"]["mergerec_taskwise"]["synth-2"]}
    assert sent["recall@10"] == out["models"]["mergerec_taskwise"]["synth-2"]["recall@10"]  # its honest entries kept
    assert "recall@10 = nan is not in [0, 1]" in out["rejected"]["evaluate:synth-2:average"]
    assert "unexpected metrics 'accuracy'" in out["rejected"]["evaluate:synth-2:individual"]
    assert "did not send" in out["rejected"]["evaluate:synth-2:best_model_ever"]
    assert out["rejected"]["evaluate:synth-2:theta0"] == "no metrics reported"
    assert "evaluate:synth-2:fedavg_round1" in out["rejected"] and "synth-2" not in out["models"]["fedavg"]


@pytest.mark.parametrize("order", [[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]])
def test_nodes_claiming_one_domain_are_all_refused_whatever_the_reply_order(cfg, flower_task_identity, order):
    """The first of two nodes claiming a domain got it (an impostor answering first took it, another run the honest
    node); a node whose reply named no domain failed the whole run ("client reply carries no domain name")."""
    from server.strategy import MergeStrategy

    class QueryGrid:
        """Nodes 1 and 2 both claim synth-0, node 3 synth-1, node 4 a domain the run does not have, node 5 none."""

        claims = {1: "synth-0", 2: "synth-0", 3: "synth-1", 4: "synth-9", 5: None}

        def get_node_ids(self):
            return list(self.claims)

        def send_and_receive(self, messages, timeout):
            by_node = {m.metadata.dst_node_id: m for m in messages}
            return [Message(RecordDict({} if self.claims[node] is None else
                                       {protocol.INFO: protocol.info_record(self.claims[node])}), reply_to=by_node[node])
                    for node in order]

    strategy = MergeStrategy(apply_overrides(cfg, ["federation.timeout_s=0.1", "federation.startup_timeout_s=30"]),
                             QueryGrid())
    strategy.connect()
    assert strategy.connect_seconds < 5  # every node answered, each domain claimed or its node failed
    assert strategy.node_of == {"synth-1": 3}
    assert strategy.refused == {
        "query:node1": "nodes [1, 2] all claim domain 'synth-0'; each is refused (no node answers for it)",
        "query:node2": "nodes [1, 2] all claim domain 'synth-0'; each is refused (no node answers for it)",
        "query:node4": "node 4 claims domain 'synth-9', which is not a domain of this run "
                       "(['synth-0', 'synth-1', 'synth-2']); refused",
        "query:node5": "node 5's reply names no domain (client reply carries no domain name); refused",
    }


def test_a_node_that_fails_to_start_is_a_recorded_rejection_with_its_reason(cfg, flower_task_identity):
    """A SuperNode whose data folder is missing answered the query with an error that only the ServerApp's log
    showed; results.json said "no SuperNode holds this domain"."""
    from flwr.app import Error

    from server.strategy import MergeStrategy

    class QueryGrid:
        def get_node_ids(self):
            return [1, 2, 3]

        def send_and_receive(self, messages, timeout):
            replies = []
            for m in messages:
                if m.metadata.dst_node_id == 2:
                    replies.append(Message(Error(code=0, reason="DataError: /data/shop: no such file or folder"),
                                           reply_to=m))
                else:
                    domain = {1: "synth-0", 3: "synth-1"}[m.metadata.dst_node_id]
                    replies.append(Message(RecordDict({protocol.INFO: protocol.info_record(domain)}), reply_to=m))
            return replies

    strategy = MergeStrategy(apply_overrides(cfg, ["federation.timeout_s=0.1", "federation.startup_timeout_s=30"]),
                             QueryGrid())
    strategy.connect()
    assert strategy.connect_seconds < 5  # every node answered, each domain claimed or its node failed
    assert strategy.node_of == {"synth-0": 1, "synth-1": 3}
    assert strategy.refused == {"query:node2": "node 2 failed to start: DataError: /data/shop: no such file or folder"}


class LateNodeGrid:
    """Nodes online from the start and nodes that come online later (``joins``: node -> seconds after start); every
    node answers a query with its claim and a train/evaluate message with an empty reply at once."""

    def __init__(self, claims: dict[int, str], joins: dict[int, float]):
        self.claims, self.start = claims, time.monotonic()
        self.joins = joins
        self.online = set(claims)  # a node taken out of it has gone offline
        self.asked: list[int] = []
        self.pushed: list[Message] = []

    def get_node_ids(self):
        now = time.monotonic() - self.start
        return [n for n in self.claims if n in self.online and self.joins.get(n, 0.0) <= now]

    def send_and_receive(self, messages, timeout=None):
        self.asked.extend(m.metadata.dst_node_id for m in messages)
        return [self._reply(m, RecordDict({protocol.INFO: protocol.info_record(self.claims[m.metadata.dst_node_id])}))
                for m in messages]

    def push_messages(self, messages):
        self.pushed = list(messages)
        for m in self.pushed:
            m.metadata.__dict__["_message_id"] = f"id-{m.metadata.dst_node_id}"
        return [m.metadata.message_id for m in self.pushed]

    def pull_messages(self, ids):
        return [self._reply(m, RecordDict()) for m in self.pushed if m.metadata.message_id in ids]

    @staticmethod
    def _reply(message, content):
        reply = Message(content, reply_to=message)
        reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
        return reply


def test_start_up_waits_for_every_domain_not_for_as_many_nodes_as_domains(cfg, flower_task_identity):
    """The wait ended once as many nodes as domains were online: a spare node (here one claiming a domain the run
    does not have) made the owner of synth-2, online 1 s later, never asked, and the domain had no node."""
    from server.strategy import MergeStrategy

    grid = LateNodeGrid({1: "synth-0", 2: "synth-1", 9: "synth-9", 3: "synth-2"}, joins={3: 1.0})
    strategy = MergeStrategy(apply_overrides(cfg, ["federation.startup_timeout_s=30"]), grid)
    assert strategy.connect() == {"synth-0": 1, "synth-1": 2, "synth-2": 3}
    assert sorted(grid.asked) == [1, 2, 3, 9] and list(strategy.refused) == ["query:node9"]


def test_nodes_coming_online_after_start_up_fill_a_domain_without_node_but_never_take_or_deny_a_served_one(
    cfg, flower_task_identity,
):
    """After start-up, nodes coming online were never asked: a domain whose owner's node came late, or restarted
    (a new node id without node authentication), had no node for the rest of the run. A late node is now asked at
    the next request: it serves a domain that has no node; a claim of a domain another node serves is refused with
    a warning (a node registering mid-run can neither take nor deny it)."""
    from server.strategy import MergeStrategy

    grid = LateNodeGrid({1: "synth-0", 2: "synth-1", 66: "synth-2", 3: "synth-2", 4: "synth-1"},
                        joins={3: 3600.0, 4: 3600.0})
    strategy = MergeStrategy(apply_overrides(cfg, ["federation.startup_timeout_s=30", "federation.timeout_s=5"]),
                             grid)
    assert strategy.connect() == {"synth-0": 1, "synth-1": 2, "synth-2": 66}  # synth-2's owner is not online yet
    grid.joins[3] = 0.0  # the owner comes online: node 66 keeps the domain, the operator is told
    grid.online.discard(2)  # synth-1's node restarts as node 4
    grid.joins[4] = 0.0
    replies, errors = strategy.send(protocol.TRAIN, {d: RecordDict() for d in ["synth-0", "synth-1", "synth-2"]})
    assert strategy.node_of == {"synth-0": 1, "synth-1": 4, "synth-2": 66} and set(replies) == set(strategy.node_of)
    reason = ("node 3 claims domain 'synth-2', which node 66 serves: refused; if node 3 is that domain's owner, node "
              "66 is not (check the registered node keys)")
    assert strategy.refused == {"query:node3": reason} and strategy.warnings == [reason]
    strategy.send(protocol.EVALUATE, {d: RecordDict() for d in ["synth-0", "synth-1", "synth-2"]})
    assert strategy.warnings == [reason]  # once


def test_a_node_refused_or_failed_earlier_serves_its_domain_once_it_has_no_node(cfg, flower_task_identity):
    """A node once refused or failed was never asked or considered again: an owner whose node failed to start (data
    folder missing) and restarted under its old id (node authentication keeps the id), or whose restarted node was
    refused while the old id still looked online, never served its domain for the rest of the run. A SuperLink
    error answering a query (the node went offline meanwhile) was booked as node 1 failing to start."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    from server.strategy import MergeStrategy

    class RestartingGrid(LateNodeGrid):
        broken = {2}  # nodes whose ClientApp fails to start
        vanishing = set()  # nodes that go offline while their query is pending

        def send_and_receive(self, messages, timeout=None):
            replies = []
            for m, reply in zip(messages, super().send_and_receive(messages, timeout)):
                m.metadata.__dict__["_message_id"] = f"q-{m.metadata.dst_node_id}"
                node = m.metadata.dst_node_id
                if node in self.broken:
                    reply = Message(Error(code=0, reason="DataError: missing"), reply_to=m)
                    reply.metadata.__dict__["_src_node_id"] = node
                elif node in self.vanishing:
                    reply = create_message_error_unavailable_res_message(m.metadata, "node_unavail")
                replies.append(reply)
            return replies

    grid = RestartingGrid({1: "synth-0", 2: "synth-1", 3: "synth-2", 4: "synth-2"}, joins={4: 3600.0})
    grid.vanishing = {3}
    strategy = MergeStrategy(apply_overrides(cfg, ["federation.startup_timeout_s=3"]), grid)
    strategy.connect()
    assert strategy.node_of == {"synth-0": 1} and "query:node1" not in strategy.refused
    grid.broken, grid.vanishing = set(), set()  # node 2 restarted with its data; node 3 answers now
    strategy.send(protocol.TRAIN, {d: RecordDict() for d in ["synth-0", "synth-1", "synth-2"]})
    assert strategy.node_of == {"synth-0": 1, "synth-1": 2, "synth-2": 3} and strategy.refused == {}
    grid.joins[4] = 0.0  # synth-2's node restarts as node 4 while node 3 still looks online: refused for now
    strategy.send(protocol.EVALUATE, {d: RecordDict() for d in ["synth-0", "synth-1", "synth-2"]})
    assert strategy.node_of["synth-2"] == 3 and "query:node4" in strategy.refused
    grid.online.discard(3)  # node 3's heartbeat runs out: node 4 serves synth-2 from then on
    strategy.send(protocol.EVALUATE, {d: RecordDict() for d in ["synth-0", "synth-1", "synth-2"]})
    assert strategy.node_of["synth-2"] == 4 and "query:node4" not in strategy.refused


def test_a_node_that_fails_to_start_does_not_hold_start_up_until_its_timeout(cfg, flower_task_identity):
    """Waiting for every domain to be claimed waited startup_timeout_s (600 s by default) when a node failed to
    start: its domain could never be claimed. Every node online answering ends the wait when each domain is claimed
    or accounted for by a failed node."""
    from server.strategy import MergeStrategy

    class FailingGrid(LateNodeGrid):
        def send_and_receive(self, messages, timeout=None):
            replies = super().send_and_receive(messages, timeout)
            return [Message(Error(code=0, reason="DataError: missing"), reply_to=next(
                m for m in messages if m.metadata.dst_node_id == 2)) if r.metadata.src_node_id == 2 else r
                for r in replies]

    strategy = MergeStrategy(apply_overrides(cfg, ["federation.startup_timeout_s=30"]),
                             FailingGrid({1: "synth-0", 2: "synth-1", 3: "synth-2"}, joins={}))
    assert strategy.connect() == {"synth-0": 1, "synth-2": 3} and strategy.connect_seconds < 5


def test_requests_that_reached_no_client_are_no_traffic(cfg):
    """A request no node took (no node holds the domain, the SuperLink refused the message) was counted as traffic."""

    class NoNodeForSynth1(InProcessTransport):
        def send(self, message_type, requests, on_reply=None):
            replies, errors = super().send(message_type, requests, on_reply)
            self.undelivered = set()
            if message_type == protocol.EVALUATE:
                replies.pop("synth-1")
                errors["synth-1"], self.undelivered = "no SuperNode holds this domain", {"synth-1"}
            return replies, errors

    small = apply_overrides(cfg, ["baselines.joint=false", "baselines.fedavg_rounds=0", 'merge.methods=["average"]'])
    out = run_federation(small, NoNodeForSynth1(small))
    theta0 = initial_weights(small)
    train_request = Federation(small, theta0).train_requests(theta0, protocol.PHASE_ONESHOT, 0)["synth-1"]
    assert out["bytes"]["synth-1"]["received"] == protocol.record_bytes(train_request)  # its evaluation never left
    assert out["bytes"]["synth-0"]["received"] > protocol.record_bytes(train_request)


def test_flowers_round_loop_is_refused_by_name_not_half_run(cfg):
    """MergeStrategy is a Flower Strategy, but merging needs every domain's model at once: Strategy.start and its
    configure/aggregate steps name the entry point that runs the federation instead of sending anything."""
    from flwr.app import ArrayRecord

    from server.strategy import MergeStrategy

    class NoGrid:
        def __getattr__(self, name):
            raise AssertionError(f"the grid was used ({name})")

    strategy = MergeStrategy(cfg, NoGrid())
    calls = [lambda: strategy.start(NoGrid(), ArrayRecord()),
             lambda: strategy.configure_train(1, ArrayRecord(), None, NoGrid()),
             lambda: strategy.aggregate_train(1, []),
             lambda: strategy.configure_evaluate(1, ArrayRecord(), None, NoGrid()),
             lambda: strategy.aggregate_evaluate(1, [])]
    for call in calls:
        with pytest.raises(FedmergeError, match="run_federation"):
            call()


def test_dp_noise_leaves_the_routed_router_exact_so_honest_private_clients_pass(cfg):
    private = apply_overrides(cfg, ["baselines.joint=false", "baselines.fedavg_rounds=0", 'merge.methods=["average"]',
                                    'model.params.adapter="routed"', "privacy.enabled=true",
                                    "privacy.noise_multiplier=0.5", "privacy.noise_seed=3"])
    out = run_federation(private, InProcessTransport(private))
    assert out["status"] == "ok" and out["rejected"] == {}


@pytest.mark.parametrize("diagnostics", [False, True])
def test_a_dp_client_ships_only_what_epsilon_covers_unless_diagnostics_are_released(cfg, diagnostics):
    """Under DP a reply carries the mechanism's settings and ε, not the user count, losses or validation metrics
    (data-dependent, outside ε); FedAvg then weights the clients equally and says so. privacy.release_diagnostics
    ships everything, as without DP."""
    from fedmerge.privacy.client import RELEASED_METRICS

    private = apply_overrides(cfg, ["baselines.joint=false", "baselines.fedavg_rounds=1", 'merge.methods=["average"]',
                                    "privacy.enabled=true", "privacy.target_epsilon=8.0", "privacy.noise_seed=3",
                                    f"privacy.release_diagnostics={str(diagnostics).lower()}",
                                    "federation.fedavg_weighting=\"users\""])
    out = run_federation(private, InProcessTransport(private))
    assert out["status"] == "ok" and out["rejected"] == {}
    for metrics in [*out["train_metrics"].values(), *out["fedavg_train_metrics"][0].values()]:
        assert "dp_epsilon_run" in metrics
        if diagnostics:
            assert protocol.NUM_USERS in metrics and "best_val_ndcg@10" in metrics
        else:
            assert set(metrics) <= RELEASED_METRICS, sorted(set(metrics) - RELEASED_METRICS)
    weighted_equally = [w for w in out["warnings"] if "FedAvg weighted the clients equally" in w]
    assert len(weighted_equally) == (0 if diagnostics else 1)
    assert "fedavg" in out["models"]


def test_a_misspelt_fedavg_local_parameter_fails_when_the_run_starts(cfg):
    """Not after local training, merging and evaluation, when the first FedAvg round would read it."""
    bad = apply_overrides(cfg, ["baselines.fedavg_local_params.max_epoch=1"])
    with pytest.raises(FedmergeError, match=r"unknown parameter\(s\) \['max_epoch'\].*max_epochs"):
        Federation(bad, initial_weights(bad))
    Federation(apply_overrides(cfg, ["baselines.fedavg_local_params.max_epochs=1"]), initial_weights(cfg))
    Federation(apply_overrides(bad, ["baselines.fedavg_rounds=0"]), initial_weights(cfg))  # never read: not checked


def test_a_run_that_failed_on_bad_data_leaves_a_folder_a_rerun_may_use(cfg, tmp_path, synthetic_domains):
    """The data digests are recorded when the run starts: a run that then failed on bad data left data_digests.json,
    which refused the plain rerun after the fix ("already holds an earlier run's files") and --resume ("changed
    since the run", with no saved weights at all)."""
    from fedmerge.data import save_generic_domain
    from fedmerge.errors import DataError
    from fedmerge.runners.simulation import run_scenario

    for domain in synthetic_domains[:2]:
        save_generic_domain(domain, tmp_path / "data" / domain.name)
    csv_file = tmp_path / "data" / "synth-1" / "interactions.csv"
    good = csv_file.read_text()
    csv_file.write_text(good.replace(",0\n", ",notatime\n", 1))
    own = apply_overrides(cfg, ['data.source="generic"', f'data.root="{tmp_path / "data"}"',
                                'data.domains=["synth-0","synth-1"]', 'merge.methods=["average"]',
                                "baselines.fedavg_rounds=0", "baselines.joint=false"])
    with pytest.raises(DataError, match="notatime"):
        run_scenario(own, "inprocess", tmp_path / "run")
    csv_file.write_text(good)
    with pytest.raises(FedmergeError, match="no saved client weights"):  # not "changed since the run"
        run_scenario(own, "inprocess", tmp_path / "run", resume=True)
    assert run_scenario(own, "inprocess", tmp_path / "run")["status"] == "ok"


def test_flower_engine_refuses_bad_data_before_flower_starts(cfg, tmp_path, synthetic_domains, monkeypatch):
    """A domain with items missing from items.jsonl failed only inside Flower's simulation (after ~20 s, ~30 lines
    of Flower output), while the in-process engine fails at once with one line."""
    from fedmerge.data import save_generic_domain
    from fedmerge.errors import DataError
    from fedmerge.runners import simulation

    for domain in synthetic_domains[:2]:
        save_generic_domain(domain, tmp_path / "data" / domain.name)
    items = tmp_path / "data" / "synth-1" / "items.jsonl"
    items.write_text("".join(items.read_text().splitlines(keepends=True)[1:]))
    own = apply_overrides(cfg, ['data.source="generic"', f'data.root="{tmp_path / "data"}"',
                                'data.domains=["synth-0","synth-1"]'])
    monkeypatch.setattr(simulation, "run_flower_simulation", lambda *a, **k: pytest.fail("Flower started"))
    with pytest.raises(DataError, match=r"synth-1.*items have no text record"):
        simulation.run_scenario(own, "flower", tmp_path / "run")


def test_a_domain_with_a_handful_of_test_users_is_warned_about(cfg, tmp_path, synthetic_domains):
    """A one-user domain federated without a word, its Recall@10 (0 or 1) weighing 1/K in every average."""
    from fedmerge.data import save_generic_domain
    from fedmerge.data.domain import Domain
    from fedmerge.runners.simulation import run_scenario

    big, small = synthetic_domains[:2]
    save_generic_domain(big, tmp_path / "data" / "big")
    few = Domain(name="few", catalog=small.catalog, train=small.train[:4], val_target=small.val_target[:4],
                 test_target=small.test_target[:4], user_ids=small.user_ids[:4])
    save_generic_domain(few, tmp_path / "data" / "few")
    own = apply_overrides(cfg, ['data.source="generic"', f'data.root="{tmp_path / "data"}"',
                                'data.domains=["big","few"]', 'merge.methods=["average"]', "baselines.fedavg_rounds=0",
                                "baselines.joint=false"])
    out = run_scenario(own, "inprocess", tmp_path / "run")
    lines = [w for w in out["warnings"] if "test users" in w]
    assert len(lines) == 1 and lines[0].startswith("domain few: 4 test users evaluated")


def test_an_empty_merge_list_runs_the_baselines_and_says_so(tmp_path):
    """merge.methods = [] ran every client and the baselines with status ok and no word that nothing was merged."""
    out = run_inprocess(load_scenario("quickstart", [*TINY, "merge.methods=[]", "baselines.fedavg_rounds=0",
                                                     f"encoder.cache_dir={tmp_path / 'cache'}"]))
    assert out["status"] == "ok" and "merge.methods is empty: no merge was built, only the baselines" in out["warnings"]


def test_the_joint_oracle_times_text_encoding_apart_from_training(tmp_path, monkeypatch):
    """A cold text cache was encoded inside joint_training (the oracle runs first): 12 s of 'training' for 1.5 s of
    local training on a newcomer's data."""
    import time as time_module

    from fedmerge.scenario import EncoderSettings

    real = EncoderSettings.item_features
    calls = []

    def slow(self, catalog, family):
        if not calls:  # the oracle's pooled catalog: it runs first
            time_module.sleep(3.0)
        calls.append(len(catalog))
        return real(self, catalog, family)

    monkeypatch.setattr(EncoderSettings, "item_features", slow)
    out = run_inprocess(load_scenario("quickstart", [*TINY, 'merge.methods=["average"]', "baselines.fedavg_rounds=0",
                                                     "baselines.joint=true", f"encoder.cache_dir={tmp_path / 'c'}"]))
    assert out["timings_s"]["joint_encoding"] >= 3.0
    assert out["timings_s"]["joint_training"] < 3.0  # the encoding is not counted twice (one epoch of 40 users)


def test_one_training_domain_runs_and_says_nothing_was_merged(tmp_path):
    """A "federation" of one training domain (another held out) ran every merge on one model with no warning."""
    out = run_inprocess(load_scenario("quickstart", [*TINY, 'data.held_out=["synth-1", "synth-2"]',
                                                     'merge.methods=["average"]', "baselines.fedavg_rounds=0",
                                                     f"encoder.cache_dir={tmp_path / 'cache'}"]))
    assert out["status"] == "ok"
    assert any(w.startswith("one training domain (synth-0)") for w in out["warnings"]), out["warnings"]


def test_the_python_api_runs_one_seed_or_several_and_refuses_what_would_be_ignored(cfg, tmp_path):
    """From Python: fedmerge.simulate runs a scenario as `fedmerge simulate` does (in-process by default), one run or
    one per run.seeds entry with the aggregate; run_scenario ran only run.seed and ignored run.seeds silently."""
    import fedmerge
    from fedmerge.runners.simulation import run_scenario

    small = fedmerge.load_scenario("quickstart", [*TINY, f"encoder.cache_dir={tmp_path / 'cache'}",
                                                  "baselines.joint=false", 'merge.methods=["average"]'])
    assert isinstance(small, fedmerge.Scenario)
    one = fedmerge.simulate(small, tmp_path / "one")
    assert one["status"] == "ok" and one["run"]["engine"] == "inprocess"
    seeded = small.with_changes(run={"seeds": [0, 1]})
    with pytest.raises(FedmergeError, match=r"run.seeds = \[0, 1\]: run_scenario runs one seed \(run.seed\); use "
                                            r"fedmerge.simulate"):
        run_scenario(seeded, "inprocess", tmp_path / "ignored")
    aggregate = fedmerge.simulate(seeded, tmp_path / "two")
    assert sorted(aggregate["seeds"]) == [0, 1] and (tmp_path / "two" / "seed-1" / "results.json").is_file()
    with pytest.raises(FedmergeError, match=r"several seeds need an output folder"):
        fedmerge.simulate(seeded)


def test_a_server_trained_models_card_writes_a_non_finite_metric_as_null():
    """θ₀'s card got its pretraining's metrics as they came: a NaN loss made the strict-JSON card write fail the run
    before any results.json."""
    import math

    from fedmerge.runners.server import card_training

    assert card_training(None) == {}
    card = card_training({"final_loss": math.nan, "epochs": 2, "stop_reason": "max_epochs"})
    assert card == {"training": {"final_loss": None, "epochs": 2, "stop_reason": "max_epochs"}}
