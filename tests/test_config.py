"""Scenario loading, --set overrides and validation errors."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from fedmerge.config import (
    DEFAULTS,
    apply_overrides,
    load_scenario,
    parse_params,
    parse_value,
    validate,
)
from fedmerge.errors import FedmergeError

SCENARIOS = ("quickstart", "amazon-seq", "amazon-seq-routed", "amazon-lae", "amazon-unseen")


@pytest.mark.parametrize("name", SCENARIOS)
def test_shipped_scenarios_load_and_validate(name):
    cfg = load_scenario(name)
    assert set(cfg.to_mapping()) == set(DEFAULTS)
    assert cfg.run.name == name
    assert cfg.data.training_domains()


def test_unseen_scenario_holds_one_domain_out():
    cfg = load_scenario("amazon-unseen")
    assert set(cfg.data.domain_names()) - set(cfg.data.training_domains()) == set(cfg.data.held_out) == {"Toys"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3", 3), ("2.5", 2.5), ("true", True), ('["a", "b"]', ["a", "b"]), ("{x = 1}", {"x": 1}), ("/data/dir", "/data/dir"),
     ('"quoted"', "quoted")],
)
def test_parse_value_reads_toml_with_string_fallback(text, expected):
    assert parse_value(text) == expected


def test_overrides_apply_without_mutating_input():
    cfg = load_scenario("quickstart")
    before = copy.deepcopy(cfg)
    out = apply_overrides(cfg, ['data.domains=["synth-0","synth-2"]', "baselines.fedavg_rounds=5", "data.root=/tmp/x",
                                "model.params.hidden=8", "merge.params.ties.density=0.5", "federation.timeout_s=10"])
    assert cfg == before
    assert out.data.domain_names() == ["synth-0", "synth-2"]
    assert out.baselines.fedavg_rounds == 5
    assert out.data.root == "/tmp/x"
    assert out.model.params["hidden"] == 8
    assert out.merge.params["ties"] == {"density": 0.5}
    assert out.federation.timeout_s == 10.0 and isinstance(out.federation.timeout_s, float)


def test_nested_schema_table_override():
    out = apply_overrides(load_scenario("quickstart"), ["data.synthetic.n_users=50"])
    assert out.data.synthetic.n_users == 50


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.rooot=/x", "unknown key data.rooot; valid: ['domains', 'held_out', 'root', 'source', 'synthetic']"),
        ("dataa.root=/x", "unknown section 'dataa'"),
        ("baselines.fedavg_rounds=three", "baselines.fedavg_rounds must be an integer"),
        ("run.seed=true", "run.seed must be an integer"),
        ("data.source=s3", "data.source must be one of"),
        ('data.held_out=["nope"]', "held_out names unknown domain(s) ['nope']"),
        ("data.synthetic.n_userz=3", "unknown key data.synthetic.n_userz"),
        ("noequals", "must look like section.key=value"),
        ("run=3", "key must be section.key"),
        ('data.held_out=["synth-0","synth-1","synth-2"]', "every domain is held out"),
        ("eval.split=train", "eval.split must be"),
        ("run.server_threads=-1", "run.server_threads must be >= 0"),
        ("run.torch_threads=-1", "run.torch_threads and run.server_threads must be >= 0"),
        ("privacy.noise_seed=1.5", "privacy.noise_seed must be an integer"),
        ('encoder.params={backend="ort"}', "encoder.params: unknown backend 'ort'; valid: ['torch', 'onnxruntime']"),
        ('encoder.params={max_lenght=32}', "encoder.params: unknown parameter(s) ['max_lenght'] for SentenceEncoder"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(FedmergeError) as info:
        apply_overrides(load_scenario("quickstart"), [override])
    assert message in str(info.value)


def test_scenario_file_errors(tmp_path):
    with pytest.raises(FedmergeError, match="unknown scenario 'nosuch'; valid: \\["):
        load_scenario("nosuch")
    with pytest.raises(FedmergeError, match="does not exist"):
        load_scenario(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nname=")
    with pytest.raises(FedmergeError, match="invalid TOML"):
        load_scenario(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text('[modell]\nfamily = "sequential"\n')
    with pytest.raises(FedmergeError, match=r"unknown section \[modell\]"):
        load_scenario(typo)


def test_amazon_source_requires_domains(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text('[data]\nsource = "amazon"\n')
    with pytest.raises(FedmergeError, match="data.domains must list"):
        load_scenario(path)


def test_parse_params_reads_toml_values_and_names_bad_items():
    assert parse_params(["lam=[10, 50]", "adapter=linear", "n_negatives=1024", "flag=true"]) == {
        "lam": [10, 50], "adapter": "linear", "n_negatives": 1024, "flag": True}
    with pytest.raises(FedmergeError, match="--family-set 'hidden' is not KEY=VALUE"):
        parse_params(["hidden"], "--family-set")
    with pytest.raises(FedmergeError, match="given twice"):
        parse_params(["a=1", "a=2"])


def test_unknown_merge_method_is_named_before_any_training():
    base = load_scenario("quickstart")
    cfg = replace(base, merge=replace(base.merge, methods=("average", "tiez", "mergerec_layerwise")))
    with pytest.raises(FedmergeError, match=r"\['tiez'\].*valid: .*ties.*mergerec_tensorwise"):
        validate(cfg)


def test_mergerec_preset_and_keys_are_checked_before_any_training():
    base = load_scenario("quickstart")
    with_mergerec = lambda keys: replace(base, merge=replace(base.merge, mergerec=keys))  # noqa: E731
    validate(with_mergerec({"preset": "paper", "steps": 10}))
    with pytest.raises(FedmergeError,
                       match=r"merge.mergerec: unknown MergeRec preset 'offical'; valid: \['fedmerge', 'paper'\]"):
        validate(with_mergerec({"preset": "offical"}))
    with pytest.raises(FedmergeError, match=r"unknown MergeRec key\(s\) \['temprature'\]"):
        validate(with_mergerec({"temprature": 0.1}))


@pytest.mark.parametrize(("key", "value"), [
    ("temperature", "inf"), ("temperature", "nan"), ("distill_weight", "inf"), ("distill_weight", "nan"),
    ("lr", "inf"), ("lr", "nan"), ("init_coefficient", "inf"), ("init_coefficient", "-inf"),
    ("init_coefficient", "nan"), ("max_coefficient", "inf"), ("max_coefficient", "nan"),
])
def test_mergerec_float_keys_must_be_finite(key, value):
    """TOML allows inf and nan: a non-finite MergeRec constant is refused when the scenario loads, naming the key
    and the value (it passed, and MergeRec failed after every client had trained, blaming divergence)."""
    with pytest.raises(FedmergeError, match=rf"merge\.mergerec: invalid MergeRecConfig values: .*'{key}', {value}\)"):
        load_scenario("quickstart", [f"merge.mergerec.{key}={value}", 'merge.methods=["mergerec_taskwise"]'])


@pytest.mark.parametrize("name", SCENARIOS)
def test_written_scenario_loads_back_unchanged(name, tmp_path):
    from fedmerge.config import write_scenario

    cfg = apply_overrides(load_scenario(name), ['merge.params={ties = {density = 0.3}}', "baselines.fedavg_rounds=1",
                                                'data.root="/d/x y"'])
    assert load_scenario(write_scenario(cfg, tmp_path / "s.toml")) == cfg
    bad = replace(cfg, eval=replace(cfg.eval, split="train"))
    with pytest.raises(FedmergeError, match="eval.split"):
        write_scenario(bad, tmp_path / "bad.toml")
    assert not (tmp_path / "bad.toml").exists()


@pytest.mark.parametrize(("override", "message"), [
    ("federation.norm_action=\"drop\"", r"federation.norm_action must be one of \['reject', 'clip'\], got 'drop'"),
    ("federation.fedavg_aggregation=\"ties\"",
     r"federation.fedavg_aggregation must be one of \['mean', 'median', 'trimmed_mean', 'clipped_average'\]"),
    ("federation.fedavg_weighting=\"bytes\"", r"federation.fedavg_weighting must be one of \['users', 'equal'\]"),
    ("federation.fedavg_max_share=0", r"federation.fedavg_max_share must be a number in \(0, 1\]"),
    ("federation.max_abs_value=1e38", r"federation.max_abs_value must be a number in \(0, 1e\+30\]"),
    ("federation.norm_multiple=-1", r"federation.norm_multiple must be a number >= 0 \(0: off\)"),
    ("federation.max_num_users=0", r"federation.max_num_users must be a number > 0"),
    ("federation.max_update_slack=0.5", r"federation.max_update_slack must be a finite number >= 1"),
    ("federation.max_update_slack=nan", r"federation.max_update_slack must be a finite number >= 1"),
])
def test_defence_keys_are_validated(override, message):
    with pytest.raises(FedmergeError, match=message):
        load_scenario("quickstart", [override])


def test_a_scenario_without_an_encoder_table_gets_minilm(tmp_path):
    """The product's text encoder by default, not the n-gram hashing one the unit tests ask for by name."""
    path = tmp_path / "own.toml"
    path.write_text('[data]\nsource = "synthetic"\n')
    assert load_scenario(path).encoder.name == "minilm"


@pytest.mark.parametrize(("override", "message"), [
    # TOML's inf passed the range checks (> 0, >= 0): every client trained, then results.json, which holds the
    # scenario, could not be written (JSON has no infinity)
    ("federation.timeout_s=inf", r"federation.timeout_s must be a finite number, got inf; .*large finite number"),
    ("federation.startup_timeout_s=inf", r"federation.startup_timeout_s must be a finite number, got inf; .*large"),
    ("federation.norm_cap=inf", r"federation.norm_cap must be a finite number, got inf; .*0 turns"),
    ("federation.norm_multiple=inf", r"federation.norm_multiple must be a finite number, got inf; .*0 turns"),
    ("federation.max_num_users=inf", r"federation.max_num_users must be a finite number, got inf; .*large finite"),
    # free tables: the family's own checks (`not v > 0`) let inf through, and NaN reached them only at the run
    ("model.params.lr=inf", r"model.params.lr must be a finite number, got inf"),
    ("model.params.temperature=inf", r"model.params.temperature must be a finite number, got inf"),
    ("model.params.temperature=nan", r"model.params.temperature must be a finite number, got nan"),
    ("model.params.max_seconds=-inf", r"model.params.max_seconds must be a finite number, got -inf"),
    ("baselines.fedavg_local_params.lr=inf", r"baselines.fedavg_local_params.lr must be a finite number, got inf"),
    ("model.params.trainable=[1.0, nan]", r"model.params.trainable\[1\] must be a finite number, got nan"),
])
def test_non_finite_numbers_are_refused_at_load(override, message):
    with pytest.raises(FedmergeError, match=message):
        load_scenario("quickstart", [override])


def test_finite_values_of_the_same_keys_still_load():
    cfg = load_scenario("quickstart", ["federation.timeout_s=1e9", "federation.norm_cap=5.0", "model.params.lr=0.01"])
    assert (cfg.federation.timeout_s, cfg.federation.norm_cap, cfg.model.params["lr"]) == (1e9, 5.0, 0.01)


@pytest.mark.parametrize("override", ["run.seed=18446744073709551616", "run.seed=9223372036854775808",
                                      "run.seeds=[0, 18446744073709551616]"])
def test_a_seed_too_large_for_torch_is_refused_at_load(override):
    """run.seed >= 2**64 passed validation and crashed in torch.manual_seed naming no key (each client also adds
    1000·round + its position to the run seed): seeds are now integers below 2**63."""
    key, value = override.split("=")
    with pytest.raises(FedmergeError, match=rf"{key} must .*below 2\*\*63") as err:
        load_scenario("quickstart", [override])
    assert f"got {value}" in str(err.value)
    assert load_scenario("quickstart", ["run.seed=9223372036854775807"]).run.seed == 2**63 - 1


@pytest.mark.parametrize("text", ["18446744073709551616", "0,9223372036854775808",
                                  "9223372036854775806-9223372036854775808"])
def test_seeds_option_refuses_a_seed_too_large_for_torch(text):
    from fedmerge.config import parse_seeds

    with pytest.raises(FedmergeError, match=rf"--seeds {text!r}: .* below 2\*\*63"):
        parse_seeds(text)
    assert parse_seeds("9223372036854775806-9223372036854775807") == [2**63 - 2, 2**63 - 1]
