"""The typed Scenario: its fields, its one constructor's errors, and the exact round trip to a table and to TOML."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from dataclasses import FrozenInstanceError, fields, is_dataclass

import pytest

from fedmerge.config import (
    DEFAULTS, FREE_TABLES, SCENARIO_DIR, apply_overrides, lay_over_defaults, load_scenario, write_scenario,
)
from fedmerge.errors import FedmergeError
from fedmerge.scenario import EvalSettings, FederationSettings, RunSettings, Scenario, SyntheticSizes

SHIPPED = sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))
STUDY_SECTION = "privacy_study"  # the privacy study's own table (fedmerge.privacy.study), not a scenario section


def _keys(section: object) -> dict[str, object]:
    """A section's field names, each nested section as its own field names."""
    return {f.name: _keys(getattr(section, f.name)) if is_dataclass(getattr(section, f.name)) else None
            for f in fields(section)}


def _default_keys(section: str) -> dict[str, object]:
    """The same for :data:`DEFAULTS`: a table-valued key that is not a free table is a nested section."""
    return {key: ({sub: None for sub in value} if isinstance(value, dict) and (section, key) not in FREE_TABLES
                  else None) for key, value in DEFAULTS[section].items()}


def test_sections_and_fields_match_the_defaults():
    scenario = load_scenario("quickstart")
    assert _keys(scenario) == {section: _default_keys(section) for section in DEFAULTS}
    assert list(scenario.to_mapping()) == list(DEFAULTS)  # same section order in results.json as before


def test_fields_are_typed_and_frozen():
    scenario = load_scenario("quickstart", ["federation.timeout_s=10", "eval.ks=[5, 10]", "run.seeds=[0, 2]"])
    assert isinstance(scenario.run, RunSettings) and scenario.run.seeds == (0, 2)
    assert isinstance(scenario.eval, EvalSettings) and scenario.eval.ks == (5, 10)
    assert isinstance(scenario.federation, FederationSettings)
    assert scenario.federation.timeout_s == 10.0 and isinstance(scenario.federation.timeout_s, float)
    assert isinstance(scenario.data.synthetic, SyntheticSizes) and scenario.data.synthetic.n_users == 200
    assert scenario.merge.testtime.teacher == "theta0" and scenario.model.params["hidden"] == 32
    assert scenario.data.domain_names() == ["synth-0", "synth-1", "synth-2"]
    with pytest.raises(FrozenInstanceError):
        scenario.run.seed = 3  # type: ignore[misc]


def test_pieces_resolve_what_the_scenario_names():
    scenario = load_scenario("quickstart", ['data.held_out=["synth-1"]', "data.synthetic.n_users=30",
                                            "data.synthetic.n_items=20", 'encoder.name="hashing"'])
    assert scenario.data.training_domains() == ["synth-0", "synth-2"]
    assert scenario.data.held_out_domains() == ["synth-1"]
    family = scenario.model.make_family({"hidden": 8})
    assert family.name == "sequential" and family.config()["hidden"] == 8
    catalog = scenario.load_catalog("synth-2")
    assert catalog.ids == scenario.load_domain("synth-2").catalog.ids
    features = scenario.encoder.item_features(catalog, family)
    assert features.shape[-1] == scenario.encoder.feature_width(family)


@pytest.mark.parametrize(("raw", "message"), [
    ({"eval": {"split": "train"}}, "eval.split must be 'val' or 'test', got 'train'"),
    ({"run": {"seed": "zero"}}, "run.seed must be an integer"),
    ({"federation": {"norm_action": "drop"}}, "federation.norm_action must be one of ['reject', 'clip'], got 'drop'"),
    ({"privacy": {"unit": "row"}}, "privacy.unit must be one of ['domain', 'user'], got 'row'"),
    ({"merge": {"testtime": {"granularity": "row"}}}, "merge.testtime.granularity 'row' is unknown; valid:"),
    ({"model": {"family": "sequential"}, "modell": {}}, "unknown section [modell]; valid:"),
])
def test_a_bad_value_names_its_key_and_the_valid_values(raw, message):
    with pytest.raises(FedmergeError) as info:
        Scenario.from_mapping(raw, source="test.toml")
    assert message in str(info.value)


def _shipped_table(name: str) -> dict:
    raw = tomllib.loads((SCENARIO_DIR / f"{name}.toml").read_text())
    raw.pop(STUDY_SECTION, None)
    return raw


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_scenario_round_trips_through_its_table_and_toml(name, tmp_path):
    raw = _shipped_table(name)
    scenario = Scenario.from_mapping(raw, source=name)
    table = scenario.to_mapping()
    assert table == lay_over_defaults(raw)  # the resolved input, exactly (lists, not tuples)
    assert Scenario.from_mapping(table) == scenario
    written = write_scenario(scenario, tmp_path / f"{name}.toml")
    assert tomllib.loads(written.read_text()) == table
    assert load_scenario(written) == scenario


def test_to_mapping_is_a_copy_and_overrides_leave_the_input_alone():
    scenario = load_scenario("quickstart")
    table = scenario.to_mapping()
    table["model"]["params"]["hidden"] = 999
    assert scenario.model.params["hidden"] == 32
    changed = apply_overrides(scenario, ["model.params.hidden=8"])
    assert changed.model.params["hidden"] == 8 and scenario.model.params["hidden"] == 32


def test_server_side_modules_never_import_client_modules():
    code = ("import sys; import fedmerge.runners.server, fedmerge.runners.baselines, fedmerge.recommender, "
            "fedmerge.merging.methods, fedmerge.merging.mergerec, server.app; "
            "print([m for m in ('fedmerge.runners.client', 'clients.app') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_own_data_mistakes_point_at_data_source(tmp_path):
    """Own folders under the default synthetic source were "unknown synthetic domain(s)"; under the generic source a
    missing folder suggested an Amazon download; a generic folder under the Amazon source was "missing train.json"."""
    import json

    from fedmerge.config import apply_overrides, load_scenario
    from fedmerge.errors import DataError

    shop = tmp_path / "shop"
    shop.mkdir()
    (shop / "interactions.csv").write_text("user,item,timestamp\nu1,i0,1\nu1,i1,2\nu1,i2,3\n")
    (shop / "items.jsonl").write_text("".join(json.dumps({"id": f"i{k}", "title": f"T{k}"}) + "\n" for k in range(3)))
    with pytest.raises(FedmergeError, match=r"data\.source = \"generic\""):
        load_scenario("quickstart", ['data.domains=["shop"]'])
    generic = load_scenario("quickstart", ['data.source="generic"', f'data.root="{tmp_path}"',
                                           'data.domains=["shop", "other"]'])
    assert generic.load_domain("shop").n_users == 1
    with pytest.raises(DataError, match="interactions.csv") as missing:
        generic.load_domain("other")
    assert "download amazon" not in str(missing.value)
    amazon = apply_overrides(generic, ['data.source="amazon"'])
    with pytest.raises(DataError, match=r"generic-format.*data\.source = \"generic\""):
        amazon.load_domain("shop")


def test_with_changes_changes_nested_keys_and_keeps_their_siblings():
    """A nested table replaced the scenario's whole table, laid over the package defaults: changing the hidden width
    of the quickstart silently trained 100 epochs with 2 layers."""
    from fedmerge.config import load_scenario

    base = load_scenario("quickstart", ["data.synthetic.n_items=30", "model.params.max_epochs=1",
                                        "merge.mergerec.steps=5"])
    changed = base.with_changes(data={"synthetic": {"n_users": 50}}, model={"params": {"hidden": 8}},
                                merge={"mergerec": {"lr": 0.01}})
    assert changed.data.synthetic.n_users == 50 and changed.data.synthetic.n_items == 30
    assert changed.model.params == {**base.model.params, "hidden": 8}
    assert changed.merge.mergerec == {"steps": 5, "lr": 0.01}
    assert base.model.params["hidden"] == 32  # the original is unchanged
    with pytest.raises(FedmergeError, match=r"with_changes\(run=3\): give a table of the section's keys"):
        base.with_changes(run=3)
    # another family (or encoder) starts from its own parameters: the old family's would be unknown to it
    lae = base.with_changes(model={"family": "text-lae", "params": {"lam": 50.0}})
    assert lae.model.params == {"lam": 50.0} and lae.make_checked_family().config()["lam"] == 50.0
    batched = base.with_changes(encoder={"params": {"batch_size": 64}})
    assert batched.encoder.params == {"batch_size": 64}
    assert batched.with_changes(encoder={"name": "hashing"}).encoder.params == {}  # no batch_size for hashing


def test_an_override_of_the_family_or_encoder_starts_from_their_own_parameters():
    """`--set model.family="text-lae"` on the sequential quickstart kept hidden, n_layers, ... and failed on them;
    with_changes already started the new family from empty params."""
    cfg = load_scenario("quickstart", ['model.params.lam=10', 'model.family="text-lae"'])  # either order
    assert cfg.model.family == "text-lae" and cfg.model.params == {"lam": 10}
    cfg.make_checked_family()
    hashing = load_scenario("quickstart", ['encoder.name="hashing"'])
    assert hashing.encoder.params == {} and hashing.encoder.text_encoder().dim > 0
    same = load_scenario("quickstart", ['model.family="sequential"'])  # the same family keeps its parameters
    assert same.model.params == load_scenario("quickstart").model.params
