"""MergeRec Amazon loader: folder and tarball, validation errors naming file and problem, real-data counts."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fedmerge.cli import main
from fedmerge.data import load_catalog, load_domain
from fedmerge.data.amazon import load_amazon_domain
from fedmerge.errors import DataError
from tests.conftest import AMAZON_COUNTS, AMAZON_DOMAINS, amazon_domain_source

# users: index 0 "rA", 1 "rB", 2 "rC" (umap deliberately not in index order); rC has no val/test (like Pantry)
TINY = {
    "train.json": {"0": [0, 1], "2": [3, 3, 1], "1": [2]},
    "val.json": {"0": [2], "1": [0]},
    "test.json": {"0": [3], "1": [1]},
    "smap.json": {"A3": 3, "A0": 0, "A2": 2, "A1": 1},
    "umap.json": {"rC": 2, "rA": 0, "rB": 1},
    "meta_data.json": {
        "A0": {"title": "Zero", "brand": "B", "category": ""},
        "A1": {"title": "One", "brand": "", "category": "C"},
        "A2": {"title": "Two", "brand": "", "category": ""},
        "A3": {"title": "Three", "brand": "B", "category": "C"},
        "UNMAPPED": {"title": "not in smap", "brand": "", "category": ""},
    },
}


def write_folder(root: Path, name: str = "Tiny", **overrides) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for file, content in {**TINY, **overrides}.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / file).write_text(text)
    return folder


def write_tarball(folder: Path, tarball: Path) -> Path:
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(folder, arcname=folder.name)
    return tarball


def test_folder_loads_with_umap_user_ids_and_missing_targets(tmp_path):
    domain = load_amazon_domain(write_folder(tmp_path))
    assert domain.name == "Tiny"
    assert domain.catalog.ids == ("A0", "A1", "A2", "A3")
    assert domain.catalog.fields[3] == TINY["meta_data.json"]["A3"]
    assert domain.user_ids == ("rA", "rB", "rC")
    assert [s.tolist() for s in domain.train] == [[0, 1], [2], [3, 3, 1]]
    assert domain.val_target.tolist() == [2, 0, -1]
    assert domain.test_target.tolist() == [3, 1, -1]
    assert domain.n_interactions == 6


def test_tarball_matches_folder_and_is_not_unpacked(tmp_path):
    folder = write_folder(tmp_path / "src")
    tarball = write_tarball(folder, tmp_path / "Tiny.tar.gz")
    before = set(tmp_path.rglob("*"))
    from_tar, from_folder = load_domain(tarball), load_domain(folder, name="Other")
    assert set(tmp_path.rglob("*")) == before
    assert from_tar.name == "Tiny" and from_folder.name == "Other"
    assert from_tar.catalog == from_folder.catalog and from_tar.user_ids == from_folder.user_ids
    assert all(np.array_equal(a, b) for a, b in zip(from_tar.train, from_folder.train))
    assert np.array_equal(from_tar.test_target, from_folder.test_target)


def test_a_tarball_and_its_unpacked_folder_have_one_files_digest(tmp_path):
    """Runs record their data by content, so evaluating a run's model on the unpacked folder of the tarball it ran on
    raises no false alarm; a changed file changes the digest; the tarball-file digest that runs recorded before is
    still recognised for that tarball (and only for it)."""
    import hashlib

    from fedmerge.data import domain_files_digest, same_domain_files

    folder = write_folder(tmp_path / "src")
    tarball = write_tarball(folder, tmp_path / "Tiny.tar.gz")
    assert domain_files_digest(tarball) == domain_files_digest(folder)
    legacy = hashlib.sha256(b"Tiny.tar.gz\0" + hashlib.sha256(tarball.read_bytes()).digest()).hexdigest()
    assert same_domain_files(legacy, tarball) and not same_domain_files(legacy, folder)
    assert same_domain_files(domain_files_digest(tarball), folder)
    changed = write_folder(tmp_path / "changed", **{"test.json": {"rA": [2], "rB": [1]}})
    assert not same_domain_files(domain_files_digest(tarball), changed)
    assert domain_files_digest(write_tarball(changed, tmp_path / "Changed.tar.gz")) == domain_files_digest(changed)


def test_load_catalog_reads_only_public_files(tmp_path):
    folder = write_folder(tmp_path)
    expected = load_domain(folder).catalog
    for private in ("train.json", "val.json", "test.json", "umap.json"):
        (folder / private).unlink()
    assert load_catalog(folder) == expected
    with pytest.raises(DataError, match="train.json"):
        load_domain(folder)


def test_truncated_tarball(tmp_path):
    tarball = write_tarball(write_folder(tmp_path / "src"), tmp_path / "Tiny.tar.gz")
    data = tarball.read_bytes()
    tarball.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"Tiny\.tar\.gz.*(truncated|unreadable)"):
        load_domain(tarball)


def test_a_tarball_whose_gzip_checksum_fails_is_refused(tmp_path):
    """tarfile's "r|gz" stream never read the gzip trailer: a flipped byte that still inflated (here, stored blocks:
    "Zero" read as "Xero") or a cut-off trailer loaded without an error."""
    folder = write_folder(tmp_path / "src")
    tarball = tmp_path / "Tiny.tar.gz"
    with tarfile.open(tarball, "w:gz", compresslevel=0) as archive:  # stored blocks: the text is there as it is
        archive.add(folder, arcname=folder.name)
    data = tarball.read_bytes()
    assert load_domain(tarball).catalog.fields[0]["title"] == "Zero"
    tarball.write_bytes(data.replace(b'"Zero"', b'"Xero"', 1))
    with pytest.raises(DataError, match=r"Tiny\.tar\.gz: unreadable or truncated tarball \(BadGzipFile: CRC check failed"):
        load_domain(tarball)
    tarball.write_bytes(data[:-4])  # the trailer's length field cut off
    with pytest.raises(DataError, match=r"Tiny\.tar\.gz: unreadable or truncated tarball"):
        load_domain(tarball)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"train.json": {"0": [0, 7], "1": [2], "2": [1]}}, r"train\.json: user 0: item index 7 out of range 0\.\.3"),
        ({"test.json": {"0": [-1], "1": [1]}}, r"test\.json: user 0: item index -1 out of range"),
        ({"meta_data.json": {k: v for k, v in TINY["meta_data.json"].items() if k != "A2"}}, r"meta_data\.json: 1 items .*no text.*A2"),
        ({"meta_data.json": {**TINY["meta_data.json"], "A1": {"title": " ", "brand": ""}}}, r"meta_data\.json: .*no text.*A1"),
        ({"val.json": '{"0": [2], "1": [0'}, r"val\.json: invalid JSON"),
        ({"train.json": {}}, r"train\.json: the domain has no users"),
        ({"val.json": {"0": [2], "5": [0]}}, r"val\.json: user 5 is not in train\.json"),
        ({"val.json": {"0": [2, 1]}}, r"val\.json: user 0: expected exactly one target item"),
        ({"smap.json": {"A0": 0, "A1": 1, "A2": 2, "A3": 5}}, r"smap\.json: item indices are not exactly 0\.\.3"),
        ({"umap.json": {"rA": 0, "rB": 1}}, r"umap\.json: .*do not match"),
        ({"train.json": {"x": [0]}}, r"train\.json: user key 'x' is not an integer"),
        ({"train.json": {"0": "abc"}}, r"train\.json: user 0: expected a list of integer item indices"),
        # json.loads kept the last copy of a repeated key; "00" and "0" both filled user 0's target, the last won
        ({"train.json": '{"0": [0, 1], "1": [2], "0": [3], "2": [1]}'}, r"train\.json: key '0' occurs twice"),
        ({"val.json": {"0": [2], "1": [0], "00": [1]}}, r"val\.json: user 00 is listed twice"),
        ({"val.json": "[" * 100_000 + "]" * 100_000}, r"val\.json: invalid JSON"),  # a RecursionError before
        # int() of > 4,300 digits: a plain ValueError that named no file
        ({"train.json": '{"0": [0, 1], "1": [2], "2": [' + "9" * 5000 + "]}"}, r"train\.json: invalid JSON: Exceeds"),
        ({"meta_data.json": {**TINY["meta_data.json"], "A1": {"title": "One", "brand": {"name": "B"}}}},
         r"meta_data\.json: item 'A1': a field is a JSON object"),
        ({"meta_data.json": {**TINY["meta_data.json"], "A1": {"title": float("nan")}}},
         r"meta_data\.json: 1 items .*no text.*A1"),  # NaN was the text "nan"
    ],
)
def test_invalid_inputs_are_data_errors_naming_file_and_problem(tmp_path, overrides, pattern):
    with pytest.raises(DataError, match=pattern):
        load_amazon_domain(write_folder(tmp_path, **overrides))


def test_missing_file_and_invalid_json_inside_tarball(tmp_path):
    folder = write_folder(tmp_path / "src", **{"smap.json": "{not json"})
    with pytest.raises(DataError, match=r"Tiny\.tar\.gz:Tiny/smap\.json: invalid JSON"):
        load_domain(write_tarball(folder, tmp_path / "Tiny.tar.gz"))
    (folder / "umap.json").unlink()
    with pytest.raises(DataError, match=r"umap\.json: missing"):
        load_domain(folder)
    bare = tmp_path / "Bare.tar.gz"
    with tarfile.open(bare, "w:gz") as archive:
        info = tarfile.TarInfo("Bare/readme.txt")
        archive.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match=r"Bare\.tar\.gz: missing .*train\.json"):
        load_domain(bare)


def test_meta_values_are_read_as_the_generic_format_reads_them(tmp_path):
    """str() of each value gave "True", "['Beauty', 'Skin']" and "nan" as item text; the generic format's rules
    (field_text) apply to Amazon metadata too, and the strings of the real data keep their text."""
    meta = {**TINY["meta_data.json"], "A1": {"title": " One ", "categories": [["Beauty", "Skin"], []], "new": True,
                                             "rank": 1.5, "gone": None, "brand": "", "score": float("nan")}}
    catalog = load_amazon_domain(write_folder(tmp_path, **{"meta_data.json": meta})).catalog
    assert catalog.fields[1] == {"title": "One", "categories": "Beauty, Skin", "new": "true", "rank": "1.5"}
    assert catalog.texts()[1] == "One Categories: Beauty, Skin New: true Rank: 1.5"
    assert catalog.texts()[0] == "Zero Brand: B" and catalog.fields[0] == {"title": "Zero", "brand": "B"}


def test_field_text_walks_nested_lists_of_any_depth():
    from fedmerge.data.domain import field_text

    deep: list = ["x"]
    for _ in range(5000):  # a recursive walk overflowed the stack near 1000 levels
        deep = [deep, "y"]
    assert field_text(deep) == ", ".join(["x", *["y"] * 5000])
    assert field_text([1, [2.0, [float("inf"), None, " a "]], False]) == "1, 2.0, a, false"
    with pytest.raises(TypeError):
        field_text([[{"a": 1}]])


def _tarball_with(tmp_path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    tarball = tmp_path / "Tiny.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return tarball


def test_a_tarball_whose_files_are_in_different_folders_or_links_is_refused(tmp_path):
    """Each file was taken from whichever folder held it (A's users with B's catalog loaded silently); a link was
    reported as a missing file; '../' names were read."""
    files = {name: json.dumps(content).encode() for name, content in TINY.items()}
    mixed = {f"{'B' if name in ('smap.json', 'meta_data.json') else 'A'}/{name}": data for name, data in files.items()}
    with pytest.raises(DataError, match=r"in different folders: one domain's files must share one folder"):
        load_domain(_tarball_with(tmp_path / "mixed", mixed))
    linked = {f"T/{name}": data for name, data in files.items() if name != "train.json"}
    with pytest.raises(DataError, match=r"T/train\.json is a link, not a file"):
        load_domain(_tarball_with(tmp_path / "linked", linked, {"T/train.json": "/etc/passwd"}))
    outside = {f"T/{name}": data for name, data in files.items() if name != "val.json"} | {"../val.json": files["val.json"]}
    with pytest.raises(DataError, match=r"member '\.\./val\.json' points outside"):
        load_domain(_tarball_with(tmp_path / "outside", outside))
    folder_named_like_a_tarball = write_folder(tmp_path / "named", name="Tiny.tar.gz")
    assert load_domain(folder_named_like_a_tarball).catalog.ids == ("A0", "A1", "A2", "A3")


def test_saving_a_catalog_with_a_field_named_id_is_refused(tmp_path):
    """items.jsonl keeps the item id under "id": the field overwrote it and the saved folder did not load back."""
    from fedmerge.data import save_generic_domain

    meta = {**TINY["meta_data.json"], "A1": {"title": "One", "id": "legacy-7"}}
    domain = load_amazon_domain(write_folder(tmp_path, **{"meta_data.json": meta}))
    with pytest.raises(DataError, match=r"1 items of 'Tiny' have a text field named 'id', e.g. \['A1'\]"):
        save_generic_domain(domain, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def readme_counts(readme: Path) -> dict[str, tuple[int, int, int]]:
    """(users, items, train interactions) per domain from the shared README's table."""
    rows = re.findall(r"^\| (\w+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \|", readme.read_text(), flags=re.M)
    return {name: tuple(int(v.replace(",", "")) for v in values) for name, *values in rows}


@pytest.mark.parametrize("domain", AMAZON_DOMAINS)
def test_real_domain_info_matches_readme(amazon_dir, domain, capsys):
    """About 0.5 s per domain on a 2-core CPU, so not marked slow. Works on tarballs and unpacked folders; the
    data's README, when present next to them, must agree with the counts kept here."""
    source = amazon_domain_source(amazon_dir, domain)
    if (amazon_dir / "README.md").is_file():
        assert readme_counts(amazon_dir / "README.md")[domain] == AMAZON_COUNTS[domain]
    assert main(["data", "info", str(source), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["users"], info["items"], info["train_interactions"]) == AMAZON_COUNTS[domain]
    assert info["domain"] == domain


def test_real_data_fixture_accepts_unpacked_folders_without_readme(amazon_dir, tmp_path, monkeypatch, capsys):
    """An unpacked domain folder with no README.md beside it is found and read like the tarball."""
    tarball = amazon_domain_source(amazon_dir, "Pantry")
    if tarball.is_dir():
        unpacked = tarball
    else:
        with tarfile.open(tarball) as archive:
            archive.extractall(tmp_path, filter="data")
        unpacked = tmp_path / "Pantry"
    assert amazon_domain_source(unpacked.parent, "Pantry") == unpacked and not (unpacked.parent / "README.md").exists()
    assert main(["data", "info", str(unpacked), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == AMAZON_COUNTS["Pantry"][1]


def test_concat_keeps_missing_targets(tmp_path):
    from fedmerge.data import concat_domains

    from dataclasses import replace

    tiny = load_amazon_domain(write_folder(tmp_path))
    joint = concat_domains([tiny, replace(tiny, name="Other")])  # one domain twice: its ids clash, refused
    assert joint.val_target.tolist() == [2, 0, -1, 6, 4, -1]
    assert joint.test_target.tolist() == [3, 1, -1, 7, 5, -1]


def test_oversized_member_refused_before_reading(tmp_path, monkeypatch):
    from fedmerge.data import amazon

    folder = write_folder(tmp_path / "Tiny")
    tarball = write_tarball(folder, tmp_path / "Tiny.tar.gz")
    monkeypatch.setattr(amazon, "MAX_FILE_BYTES", 16)
    with pytest.raises(DataError, match=rf"{tarball}:Tiny/\w+\.json: \d+ bytes, more than the 16 bytes one data file"):
        load_domain(tarball)
    with pytest.raises(DataError, match=rf"{folder}/\w+\.json: \d+ bytes, more than the 16 bytes"):
        load_domain(folder)


def test_a_domain_loaded_as_dot_is_named_after_its_folder(tmp_path, monkeypatch):
    """Path(".").name is "": the domain had the empty name (a split of it wrote X/-0/)."""
    monkeypatch.chdir(write_folder(tmp_path))
    assert load_domain(".").name == "Tiny"
