"""Scenario values that are otherwise read only after every client trained fail when the scenario is loaded."""

from __future__ import annotations

import time

import pytest

from fedmerge.config import load_scenario
from fedmerge.errors import FedmergeError


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.ks=[0, 10]", r"eval.ks must be a non-empty list of positive integers"),
        ("eval.ks=[-5]", r"eval.ks must be"),
        ("eval.ks=[2.5]", r"eval.ks must be"),
        ('eval.ks=["10"]', r"eval.ks must be"),
        ("eval.ks=[]", r"eval.ks must be"),
        ("merge.params.ties.density=2.0", r"merge.params.ties: .*density=2.0 is invalid; expected a number in \(0, 1\]"),
        ("merge.params.ties.densty=0.5", r"merge.params.ties: unknown parameter\(s\) \['densty'\]"),
        ("merge.params.tiez.density=0.5", r"merge.params.tiez: not a method with parameters; valid: \["),
        ("merge.params.average.weights=[1, 2]", r"merge.params.average: .*2 weights for 3 models"),
        ("merge.params.dare.p=1.0", r"merge.params.dare: .*p=1.0 is invalid"),
        ("merge.mergerec.steps=-1", r"merge.mergerec: invalid MergeRecConfig values: \[\('steps', -1\)\]"),
        ("merge.mergerec.step=10", r"merge.mergerec: unknown MergeRec key\(s\) \['step'\]; valid: \["),
        ('merge.mergerec.init_method="fisher"', r"merge.mergerec: unknown merge method 'fisher'"),
        ("merge.mergerec.init_params.scale=\"x\"", r"merge.mergerec: .*scale='x' is invalid"),
        ("privacy.clip_norm=0.0", r"privacy.clip_norm must be a positive finite number, got 0.0"),
        ("privacy.clip_norm=nan", r"privacy.clip_norm must be a positive finite number, got nan"),
        ("privacy.noise_multiplier=-0.5", r"privacy.noise_multiplier must be a finite number >= 0, got -0.5"),
        ("privacy.noise_multiplier=inf", r"privacy.noise_multiplier must be a finite number >= 0, got inf"),
        ("merge.params.average.weights=[1, 2, 3]", r"weights are matched to the clients by position, so they need "
                                                   r"every client: set federation.min_replies = 3"),
        ("federation.min_replies=4", r"federation.min_replies = 4 exceeds the 3 training clients"),
        ('merge.methods=["average", "mergerec_testtime"]', r"lists 'mergerec_testtime'.*data.held_out is empty"),
    ],
)
def test_bad_values_fail_at_scenario_load(override, message):
    with pytest.raises(FedmergeError, match=message):
        load_scenario("quickstart", [override])


def test_pretrained_theta0_with_the_unseen_item_fallback_is_refused():
    with pytest.raises(FedmergeError, match=r"theta0.pretrain with model.params.routed_unseen is not supported"):
        load_scenario("quickstart", ["theta0.pretrain=true", 'model.params.adapter="routed"',
                                     'model.params.routed_unseen="theta0"'])


def test_position_weights_pass_with_every_client_required():
    cfg = load_scenario("quickstart", ["merge.params.average.weights=[1, 2, 3]", "federation.min_replies=3"])
    assert cfg.merge.params["average"]["weights"] == [1, 2, 3]


def test_good_values_pass():
    cfg = load_scenario("quickstart", ["eval.ks=[5, 50]", "merge.params.ties.density=0.5",
                                       "merge.mergerec.steps=0", "privacy.noise_multiplier=0.0", "encoder.name=minilm"])
    assert cfg.eval.ks == (5, 50)
    load_scenario("quickstart", ["encoder.name=./models/my-encoder"])  # a path: its folder is checked where it loads


def test_unknown_encoder_name_fails_at_once_without_a_hub_download(monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("a hub download was tried")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    start = time.perf_counter()
    with pytest.raises(FedmergeError, match=r"unknown text encoder 'no-such-org/no-such-model': not a local model "
                                            r"folder and not in the Hugging Face cache .*valid: \['minilm', 'hashing'\]"):
        load_scenario("quickstart", ["encoder.name=no-such-org/no-such-model"])
    with pytest.raises(FedmergeError, match="unknown text encoder 'mini lm'"):
        load_scenario("quickstart", ['encoder.name="mini lm"'])
    assert time.perf_counter() - start < 5.0


def test_sentence_encoder_never_downloads():
    from fedmerge.text.encoder import SentenceEncoder

    with pytest.raises(FedmergeError, match="unknown text encoder 'no-such-org/no-such-model'"):
        SentenceEncoder("no-such-org/no-such-model")


def test_cosine_logit_norm_is_refused_at_load_for_a_family_without_cosine_scores():
    """It failed only at merge time, after every client had trained."""
    with pytest.raises(FedmergeError, match=r"logit_norm = 'cosine' needs a family that scores cos/τ "
                                            r"\(\['sequential'\]\); model.family is 'text-lae'"):
        load_scenario("quickstart", ['model.family="text-lae"', "model.params={}", 'merge.mergerec.logit_norm="cosine"'])
    assert load_scenario("quickstart", ['merge.mergerec.logit_norm="cosine"']).merge.mergerec["logit_norm"] == "cosine"
    from fedmerge.merging.mergerec_config import FAMILIES_SCORING_COSINE
    from fedmerge.models import get_family

    for name in ("sequential", "text-lae"):  # the torch-free list agrees with the families themselves
        assert (name in FAMILIES_SCORING_COSINE) == hasattr(get_family(name), "temperature")
