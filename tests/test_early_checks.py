"""Scenario values that are otherwise read only after every client trained fail when the scenario is loaded."""

from __future__ import annotations

import json
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
        # MergeRec's start: its weights were checked only at the merge, after every client trained
        ('merge.mergerec={init_method="average", init_params={weights=[1, 2]}}',
         r"merge.mergerec.init_params: .*2 weights for 3 models"),
        ("federation.timeout_s=nan", r"federation.timeout_s > 0, got 0 and nan"),  # NaN never waited for a reply
        ("federation.startup_timeout_s=nan", r"federation.startup_timeout_s must be > 0, got nan"),
        ('merge.methods=["ties", "ties"]', r"merge.methods lists \['ties'\] more than once"),
        ("merge.methods=[1]", r"merge.methods must be a list of names \(strings\), got \[1\]"),
        ("data.held_out=[2]", r"data.held_out must be a list of names"),
        ("federation.timeout_s=" + "9" * 400, r"federation.timeout_s must be a number"),
        ("federation.min_replies=4", r"federation.min_replies = 4 exceeds the 3 training clients"),
        ('merge.methods=["average", "mergerec_testtime"]', r"lists 'mergerec_testtime'.*data.held_out is empty"),
        # values checked only once every client had trained (or never: a misspelled metric, a negative seed)
        ('eval.primary="recal@10"', r"eval.primary 'recal@10' is not a metric of eval.ks = \[5, 10, 20, 50\]; valid: \["),
        ('eval.primary="recall@15"', r"eval.primary 'recall@15' is not a metric"),
        ('eval.primary="users"', r"eval.primary 'users' is not a metric"),
        ("run.seed=-3", r"run.seed must be an integer >= 0, got -3"),
        ("merge.mergerec.steps=2.5", r"merge.mergerec: steps must be an integer, got 2.5"),
        ('merge.mergerec.multi_start="yes"', r"merge.mergerec: multi_start must be true or false, got 'yes'"),
        ('merge.mergerec.sampling="users"', r"merge.mergerec: sampling must be one of \['union', 'domain'\], got 'users'"),
        ('merge.mergerec.lr="fast"', r"merge.mergerec: lr must be a number, got 'fast'"),
        ("merge.mergerec.init_coefficient=true", r"init_coefficient must be a number or None, got True"),
        # accepted at load and refused only later (when the domains were generated, the family built), or ignored
        ("data.synthetic.n_users=0", r"data.synthetic: need n_domains >= 1 and n_users >= 1, got 3, 0"),
        ("data.synthetic.n_topics=200", r"data.synthetic: need 1 <= n_topics <= n_items"),
        ("data.synthetic.min_len=2", r"data.synthetic: need 3 <= min_len <= max_len"),
        ('model.family="sequentail"', r"model.family 'sequentail' is unknown; valid: \['sequential', 'text-lae'\]"),
        ('merge.mergerec.granularity="layer"', r"merge.mergerec.granularity is set by each method's name"),
        # a device torch does not know ("gpu") and an empty encoder name (Path("") exists: the working folder) failed
        # only when the clients built the encoder, blaming the model
        ('encoder.params.device="gpu"', r"encoder.params: device 'gpu' is not a torch device; valid: 'cpu', 'cuda'"),
        ('encoder.name=""', r"text encoder name '' names no model; valid: \['minilm', 'hashing'\]"),
    ],
)
def test_bad_values_fail_at_scenario_load(override, message):
    with pytest.raises(FedmergeError, match=message):
        load_scenario("quickstart", [override])


def test_domain_names_that_give_one_file_name_are_refused():
    """"x a" and "x_a" saved their clients' weights into one file: one replaced the other and the run ended ok."""
    with pytest.raises(FedmergeError, match=r"domain names \['x a', 'x_a'\] give one file name \('x_a'"):
        load_scenario("quickstart", ['data.source="generic"', 'data.root="/tmp"', 'data.domains=["x a", "x_a"]'])
    # on a case-insensitive file system (macOS, Windows defaults) "Beauty" and "beauty" share one file too
    with pytest.raises(FedmergeError, match=r"domain names \['Beauty', 'beauty'\] give one file name \('Beauty'.*"
                                            r"letter case"):
        load_scenario("quickstart", ['data.source="generic"', 'data.root="/tmp"', 'data.domains=["Beauty", "beauty"]'])


def test_pretrained_theta0_with_the_unseen_item_fallback_is_refused():
    with pytest.raises(FedmergeError, match=r"theta0.pretrain with model.params.routed_unseen is not supported"):
        load_scenario("quickstart", ["theta0.pretrain=true", 'model.params.adapter="routed"',
                                     'model.params.routed_unseen="theta0"'])


def test_per_domain_weights_pass_without_requiring_every_client():
    """They are matched to domains by name, so a left-out client no longer shifts them (they once needed
    min_replies = K)."""
    cfg = load_scenario("quickstart", ["merge.params.average.weights=[1, 2, 3]",
                                       'merge.mergerec={init_method="average", init_params={weights=[1, 2, 3]}}'])
    assert cfg.merge.params["average"]["weights"] == [1, 2, 3] and cfg.federation.min_replies == 0


def test_mergerec_start_weights_go_with_their_domains():
    """MergeRec's start applied init_params.weights by position over the models sorted by name."""
    from fedmerge.runners.server import mergerec_config_for

    cfg = load_scenario("quickstart", ['merge.mergerec={init_method="average", init_params={weights=[1, 2, 3]}}'])
    models = {"synth-0": {}, "synth-2": {}}  # synth-1's update was left out
    assert mergerec_config_for(cfg, "task", models).init_params["weights"] == [1, 3]


def test_good_values_pass():
    cfg = load_scenario("quickstart", ["eval.ks=[5, 50]", 'eval.primary="ndcg@50_masked"', "merge.params.ties.density=0.5",
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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('data.domains=["synth-0", "synth-0"]', r"data.domains lists \['synth-0'\] more than once"),
        ("data.synthetic.n_domains=0", r"the scenario has no domains"),
        ("merge.methods=[ties]", r"merge.methods must be a list, got '\[ties\]' \(not valid TOML, so read as text: "
                                 r"quote the strings inside"),
        ('run.seed="0"', r"run.seed must be an integer, got '0'"),
    ],
)
def test_scenario_mistakes_a_trial_found_are_named(override, message):
    """A repeated domain trained and then failed on 'only 1 usable update'; n_domains = 0 said 'every domain is held
    out'; an unquoted list said only 'must be a list'; 'must be a int'."""
    with pytest.raises(FedmergeError, match=message):
        load_scenario("quickstart", [override])


def test_a_privacy_study_or_a_folder_given_to_simulate_says_what_to_do(tmp_path):
    with pytest.raises(FedmergeError, match=r"is a privacy study .* `fedmerge privacy run --scenario NAME_OR_PATH`"):
        load_scenario("privacy")
    with pytest.raises(FedmergeError, match=r"scenario file .* is a folder"):
        load_scenario(str(tmp_path) + "/")


def test_a_misspelled_amazon_domain_is_not_sent_to_the_download(tmp_path, monkeypatch):
    """'Toyz' was told to run `fedmerge data download amazon --domains Beauty,Toyz`, which then failed."""
    from fedmerge.errors import DataError

    (tmp_path / "Beauty.tar.gz").write_bytes(b"")
    cfg = load_scenario("amazon-seq", [f"data.root={json.dumps(str(tmp_path))}", 'data.domains=["Beauty", "Toyz"]'])
    with pytest.raises(DataError, match=r"'Toyz' is not one of the Amazon domains \['Beauty', 'Pantry', 'Toys'\] "
                                        r"\(present there: \['Beauty'\]\)"):
        cfg.data.domain_path("Toyz")


def test_the_flower_engine_refuses_bad_model_params_before_flower_starts():
    """A bad model.params value failed only inside Flower's simulation (28 s, a traceback, 'Exit Code: 700'); the
    launcher now builds the family in a short-lived process first, staying free of torch itself."""
    from fedmerge.runners.simulation import run_scenario

    start = time.perf_counter()
    with pytest.raises(FedmergeError, match=r"model family 'sequential': parameters must be positive: \{'hidden': 0\}"):
        run_scenario(load_scenario("quickstart", ["model.params.hidden=0"]), engine="flower")
    with pytest.raises(FedmergeError, match=r"model family 'sequential': lr must be a number, got 'fast'"):
        run_scenario(load_scenario("quickstart", ['baselines.fedavg_local_params.lr="fast"']), engine="flower")
    assert time.perf_counter() - start < 120  # seconds, not a Flower start (which also needs a free port and Ray)


def test_the_flower_launcher_checks_the_family_in_a_child_that_imports_this_copy(monkeypatch):
    """The launcher (torch-free) checks model.params in a child interpreter: a bad value is the family's one-line
    error. The child imports the fedmerge beside this file (as the encoding workers and the supervisor do), not
    whatever copy its environment finds, so the check cannot degrade to a warning or test other code."""
    import os
    import subprocess

    from fedmerge.paths import REPO_ROOT
    from fedmerge.runners.simulation import check_family_in_subprocess

    with pytest.raises(FedmergeError, match=r"model family 'sequential': unknown adapter 'mlpp'; valid: \["):
        check_family_in_subprocess(load_scenario("quickstart", ['model.params.adapter="mlpp"']))
    seen = {}
    real_run = subprocess.run

    def recording_run(*args, **kwargs):
        seen.update(kwargs)
        return real_run(*args, **kwargs)

    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setattr(subprocess, "run", recording_run)
    check_family_in_subprocess(load_scenario("quickstart"))
    assert seen["env"]["PYTHONPATH"].split(os.pathsep) == [str(REPO_ROOT), "/elsewhere"]


@pytest.mark.parametrize("overrides, message", [
    (['encoder.name="hashing"', 'encoder.params={dim = "x"}'], r"HashingEncoder: dim must be an integer, got 'x'"),
    (['encoder.name="hashing"', "encoder.params={dim = -3}"], r"HashingEncoder needs dim >= 1"),
    (['encoder.params={batch_size = "x"}'], r"SentenceEncoder: batch_size must be an integer, got 'x'"),
])
def test_encoder_parameter_types_and_ranges_fail_at_load(overrides, message):
    """Only unknown keys (and the sentence encoder's option ranges) failed at load: a hashing dim of "x" or -3 loaded,
    and a string batch size failed with "'<' not supported between instances of 'str' and 'int'"."""
    with pytest.raises(FedmergeError, match=message):
        load_scenario("quickstart", overrides)


def test_a_domain_named_like_a_results_key_is_refused(tmp_path):
    """A domain folder named "average" had its metrics overwritten by the mean over domains in every model's table,
    without a warning."""
    from fedmerge.config import RESERVED_DOMAIN_NAMES
    from fedmerge.runners.aggregate import AVERAGE

    assert AVERAGE in RESERVED_DOMAIN_NAMES
    with pytest.raises(FedmergeError, match=r"domain name\(s\) \['average'\] are reserved"):
        load_scenario("quickstart", ['data.source="generic"', f'data.root="{tmp_path}"',
                                     'data.domains=["average", "shop"]'])


def test_user_count_weights_beside_a_robust_fedavg_rule_are_refused():
    """fedavg_weighting = "users" was silently ignored by the robust FedAvg rules (median, trimmed mean, clipped
    average): results.json recorded "users" for rounds that weighed every client alike."""
    with pytest.raises(FedmergeError, match=r"federation.fedavg_weighting = 'users' has no effect with "
                                            r"federation.fedavg_aggregation = 'median'"):
        load_scenario("quickstart", ['federation.fedavg_weighting="users"', 'federation.fedavg_aggregation="median"'])
    load_scenario("quickstart", ['federation.fedavg_weighting="users"'])  # with the mean: McMahan et al.'s weights
