"""``fedmerge data split``: sub-domains by a catalog field, users following their majority value."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedmerge.cli import main
from fedmerge.data import load_domain, save_generic_domain
from fedmerge.data.domain import Domain, ItemCatalog
from fedmerge.data.generic import split_leave_one_out
from fedmerge.data.split import pack_values, split_domain
from fedmerge.errors import DataError

CATEGORIES = ["Home Kitchen Pans", "Home Kitchen Knives", "Home Garden Tools", "Home Garden Seeds", "Toys Dolls",
              "Home Kitchen Pans", "Toys Cars", "Home Garden Tools"]


@pytest.fixture
def shop() -> Domain:
    """8 items; users mostly in Kitchen (items 0, 1, 5), Garden (2, 3, 7) or Toys (4, 6)."""
    catalog = ItemCatalog(ids=tuple(f"i{i}" for i in range(8)),
                          fields=tuple({"title": f"item {i}", "category": c} for i, c in enumerate(CATEGORIES)))
    sequences = [
        [0, 1, 5, 2, 0],      # Kitchen 4, Garden 1 -> Kitchen, keeps [0, 1, 5, 0]
        [2, 3, 7, 0],         # Garden
        [4, 6, 4, 6, 2],      # Toys
        [0, 2, 1, 3, 5, 7],   # tie Kitchen 3 / Garden 3 -> the lower group index (Kitchen)
        [3, 7, 0, 1, 5],      # Kitchen 3 vs Garden 2 -> Kitchen [0, 1, 5]
        [2, 0, 4],            # one each: lowest group; keeps 1 item -> dropped
    ]
    return split_leave_one_out("Shop", catalog, sequences, [f"u{u}" for u in range(len(sequences))])


def test_users_follow_their_majority_group_and_items_their_value(shop):
    subs, manifest = split_domain(shop, "category", words=2)
    by_name = {s.name: s for s in subs}
    # values: "Home Kitchen" (interactions 0,1,5: 12), "Home Garden" (2,3,7: 11), "Toys Dolls"/"Toys Cars" (2 words)
    assert [m["values"] for m in manifest][:2] == [["Home Kitchen"], ["Home Garden"]]
    kitchen, garden = by_name["Shop-0"], by_name["Shop-1"]
    assert kitchen.catalog.ids == ("i0", "i1", "i5") and garden.catalog.ids == ("i2", "i3", "i7")
    full = {uid: [*t.tolist(), int(v), int(x)] for s in subs
            for uid, t, v, x in zip(s.user_ids, s.train, s.val_target, s.test_target)}
    ids = {s.name: s.catalog.ids for s in subs}
    assert [ids["Shop-0"][i] for i in full["u0"]] == ["i0", "i1", "i5", "i0"]
    assert [ids["Shop-0"][i] for i in full["u3"]] == ["i0", "i1", "i5"]
    assert kitchen.user_ids == ("u0", "u3", "u4") and garden.user_ids == ("u1",)
    assert "u5" not in full
    assert (kitchen.dropped_users, garden.dropped_users) == (1, 0)  # u5 went to Kitchen (lowest index) with 1 item
    toys = [m for m in manifest if m["values"] == ["Toys Dolls"] or m["values"] == ["Toys Cars"]]
    assert all(m.get("dropped") for m in toys)  # u2 splits 2/2 between Dolls and Cars: 2 items, dropped
    with_toys, _ = split_domain(shop, "category", words=1)  # "Home" / "Toys"
    assert [s.catalog.ids for s in with_toys] == [("i0", "i1", "i2", "i3", "i5", "i7"), ("i4", "i6")]
    assert with_toys[1].user_ids == ("u2",)


def test_groups_pack_values_balanced_by_interactions():
    weights = Counter({"a": 10, "b": 7, "c": 4, "d": 3, "e": 1})
    # a -> 0 (10), b -> 1 (7), c -> 1 (11), d -> 0 (13), e -> 1 (12); heaviest group first
    assert pack_values(weights, 2) == [["a", "d"], ["b", "c", "e"]]
    assert pack_values(weights, 0) == [["a"], ["b"], ["c"], ["d"], ["e"]]
    with pytest.raises(DataError, match="cannot make 6 groups from 5"):
        pack_values(weights, 6)


def test_unsplittable_fields_are_clear_errors(shop):
    with pytest.raises(DataError, match="no item has the field 'colour'.*category"):
        split_domain(shop, "colour")
    with pytest.raises(DataError, match="1 distinct value.*nothing to split"):
        split_domain(shop, "title", words=1)  # every title starts with "item"


def test_split_cli_writes_generic_folders_that_load_back(shop, tmp_path, capsys):
    source = save_generic_domain(shop, tmp_path / "Shop")
    assert main(["data", "split", str(source), "--by", "category", "--words", "1", "--out", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "Shop-split.json").read_text())
    assert manifest["field"] == "category" and [m["name"] for m in manifest["subdomains"]] == ["Shop-0", "Shop-1"]
    expected, _ = split_domain(load_domain(source), "category", words=1)
    for sub in expected:
        loaded = load_domain(tmp_path / "out" / sub.name)
        assert loaded.catalog == sub.catalog and loaded.user_ids == sub.user_ids
        assert all(np.array_equal(a, b) for a, b in zip(loaded.train, sub.train))
        assert np.array_equal(loaded.test_target, sub.test_target)
    assert "Shop-1\t1 users" in capsys.readouterr().out
    assert main(["data", "split", str(source), "--by", "brand", "--out", str(tmp_path / "x")]) == 1


def test_eight_domain_scenario_loads_with_valid_mergerec_keys():
    from fedmerge.config import load_scenario
    from fedmerge.merging import MergeRecConfig

    cfg = load_scenario("amazon-8")
    assert len(cfg.data.domain_names()) == 8 and cfg.data.source == "generic"
    assert MergeRecConfig(**cfg.merge.mergerec).teacher_top_k == 200


@pytest.mark.slow
def test_the_split_commands_in_the_scenario_file_make_its_domains(amazon_dir, tmp_path):
    """Runs the `fedmerge data split` lines of scenarios/amazon-8.toml on the real data, into one folder."""
    import shlex

    from fedmerge.config import load_scenario, scenario_path

    commands = [line.split("fedmerge", 1)[1] for line in scenario_path("amazon-8").read_text().splitlines()
                if line.startswith("#") and "fedmerge data split" in line]
    assert len(commands) == 2
    for command in commands:
        argv = [a.replace("data/amazon/", f"{amazon_dir}/").replace("data/amazon", str(tmp_path))
                for a in shlex.split(command)]
        # the commands name the folder the download leaves (data/amazon/Beauty); the data may be the tarball instead
        argv = [a if not a.startswith(f"{amazon_dir}/") or Path(a).exists() else f"{a}.tar.gz" for a in argv]
        assert main(argv) == 0
    pantry = next(p for p in (amazon_dir / "Pantry.tar.gz", amazon_dir / "Pantry") if p.exists())
    (tmp_path / pantry.name).symlink_to(pantry)
    cfg = load_scenario("amazon-8", [f"data.root={tmp_path}"])
    sizes = {name: cfg.load_domain(name).n_users for name in cfg.data.domain_names()}
    assert min(sizes.values()) > 3000, sizes


def test_split_refuses_existing_output_and_overwrite_removes_only_its_own_stale_groups(shop, tmp_path, caplog,
                                                                                        capsys):
    """A second split into the same --out replaced the sub-domains silently, and one with fewer --groups left the
    earlier split's `Shop-2/` beside the new ones."""
    source = save_generic_domain(shop, tmp_path / "Shop")
    out = tmp_path / "out"
    split = ["data", "split", str(source), "--by", "category", "--words", "2", "--out", str(out)]
    assert main([*split, "--groups", "3"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["Shop-0", "Shop-1", "Shop-2"]
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert main([*split, "--groups", "2"]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(out / "Shop-0") in err and "items.jsonl" in err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before  # nothing written

    caplog.clear()
    assert main([*split, "--groups", "2", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["Shop-0", "Shop-1"]  # the stale Shop-2 removed
    assert str(out / "Shop-2") in caplog.text
    expected, _ = split_domain(load_domain(source), "category", groups=2, words=2)
    for sub in expected:
        assert load_domain(out / sub.name).catalog == sub.catalog
    assert json.loads((out / "Shop-split.json").read_text())["groups"] == 2

    # a stale group folder holding anything else than what the split wrote is left in place, with a warning
    assert main([*split, "--groups", "3", "--overwrite"]) == 0
    (out / "Shop-2" / "notes.txt").write_text("mine")
    caplog.clear()
    assert main([*split, "--groups", "2", "--overwrite"]) == 0
    assert (out / "Shop-2" / "notes.txt").read_text() == "mine" and (out / "Shop-2" / "items.jsonl").exists()
    assert "Shop-2" in caplog.text and "left in place" in caplog.text
