"""Generic CSV/JSONL loader: chronological split, filters, k-core, error messages; writer round trip; concat."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedmerge.data import concat_domains, domain_item_offsets, load_catalog, load_domain
from fedmerge.data.generic import load_generic_domain, save_generic_domain
from fedmerge.errors import DataError

ITEMS = [{"id": f"i{k}", "title": f"Item {k}", "brand": "B" if k % 2 else ""} for k in range(6)]


def write_generic(folder: Path, rows: list[str], items: list[dict] | None = None, header: str = "user,item,timestamp") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "interactions.csv").write_text("\n".join([header, *rows]) + "\n")
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (ITEMS if items is None else items)))
    return folder


def reference_sequences(rows: list[tuple[str, str, float]], min_user: int, k: int) -> dict[str, list[str]]:
    """Independent reference: drop exact repeats of a row, iterate dict-based filtering to a fixed point, then sort
    each user's items by time."""
    first = {}
    for n, row in enumerate(rows):
        first.setdefault(row, n)
    kept = [(n, row) for row, n in sorted(first.items(), key=lambda kv: kv[1])]
    while True:
        users = Counter(r[0] for _, r in kept)
        items = Counter(r[1] for _, r in kept)
        new = [(n, r) for n, r in kept if users[r[0]] >= min_user and items[r[1]] >= k]
        if len(new) == len(kept):
            break
        kept = new
    sequences: dict[str, list[tuple[float, int, str]]] = {}
    for n, (user, item, t) in kept:
        sequences.setdefault(user, []).append((t, n, item))
    return {u: [item for _, _, item in sorted(v)] for u, v in sequences.items()}


def test_chronological_stable_split_and_min_length(tmp_path):
    rows = ["u1,i0,5", "u2,i1,1", "u1,i2,1", "u1,i3,5", "u1,i4,3", "u2,i2,2", "u3,i5,1", "u3,i0,2", "u3,i1,3"]
    domain = load_generic_domain(write_generic(tmp_path / "shop", rows))
    # u1 by time: i2(1) i4(3) i0(5) i3(5, tie keeps file order); u2 has 2 interactions -> dropped
    assert domain.name == "shop"
    assert domain.user_ids == ("u1", "u3")
    assert [s.tolist() for s in domain.train] == [[2, 4], [5]]
    assert domain.val_target.tolist() == [0, 0]
    assert domain.test_target.tolist() == [3, 1]
    assert domain.catalog.ids == tuple(r["id"] for r in ITEMS)  # full catalog, file order
    assert domain.summary()["dropped_users"] == 1  # `fedmerge data info` shows what the filter removed


def test_k_core_matches_independent_fixed_point(tmp_path):
    rng = np.random.default_rng(3)
    n = 120
    triples = [(f"u{rng.integers(15)}", f"i{min(int(rng.zipf(1.6)) - 1, 5)}", float(rng.integers(50))) for _ in range(n)]
    folder = write_generic(tmp_path / "d", [f"{u},{i},{t}" for u, i, t in triples])
    for k in (None, 4, 9):
        expected = reference_sequences(triples, max(3, k or 0), k or 0)
        domain = load_generic_domain(folder, k_core=k)
        got = {
            uid: [domain.catalog.ids[i] for i in [*s.tolist(), v, t]]
            for uid, s, v, t in zip(domain.user_ids, domain.train, domain.val_target, domain.test_target)
        }
        assert got == expected
        assert domain.summary()["dropped_users"] == len({u for u, _, _ in triples}) - len(expected)
    counts = Counter(i for u, i, t in triples)
    assert min(counts.values()) < 9  # k=9 really removes items, so the iteration is exercised


@pytest.mark.parametrize(
    ("rows", "header", "pattern"),
    [
        (["u1,i0,1"], "user,item", r"interactions\.csv:1: header .* lacks column\(s\) timestamp"),
        (["u1,i0,1", "u1,i1,yesterday"], "user,item,timestamp", r"interactions\.csv:3: timestamp 'yesterday' is neither a number nor an ISO 8601 date"),
        (["u1,i0,1", "u1,i1"], "user,item,timestamp", r"interactions\.csv:3: 2 fields, expected 3"),
        (["u1,i0,1,extra"], "user,item,timestamp", r"interactions\.csv:2: 4 fields, expected 3"),
        (["u1,,1"], "user,item,timestamp", r"interactions\.csv:2: empty user or item"),
        ([], "user,item,timestamp", r"interactions\.csv: no interactions"),
        (["u1,zz,1", "u1,i0,2", "u1,i1,3"], "user,item,timestamp", r"interactions\.csv: 1 items have no text record.*zz"),
        (["u1,i0,1", "u2,i1,2"], "user,item,timestamp", r"no user has >= 3 interactions"),
    ],
)
def test_malformed_csv(tmp_path, rows, header, pattern):
    with pytest.raises(DataError, match=pattern):
        load_generic_domain(write_generic(tmp_path / "d", rows, header=header))


def test_extra_columns_in_any_order(tmp_path):
    rows = ["3,x,i1,u1", "1,x,i0,u1", "2,x,i2,u1"]
    domain = load_generic_domain(write_generic(tmp_path / "d", rows, header="timestamp,rating,item,user"))
    assert (domain.train[0].tolist(), int(domain.val_target[0]), int(domain.test_target[0])) == ([0], 2, 1)


@pytest.mark.parametrize(
    ("items_text", "pattern"),
    [
        ('{"id": "i0", "title": "A"}\n{"id": "i1", "title": \n', r"items\.jsonl:2: invalid JSON"),
        ('{"id": "i0", "title": "A"}\n{"id": "i1", "title": "", "brand": ""}\n',
         r"items\.jsonl:2: item 'i1' has no text fields \(every record is an item each model ranks, used or not: give "
         r"it some text or remove the line\)"),
        ('{"title": "no id"}\n', r"items\.jsonl:1: expected a JSON object with an 'id'"),
        ('{"id": null, "title": "A"}\n', r"items\.jsonl:1: expected a JSON object with an 'id'"),
        ('{"id": {"a": 1}, "title": "A"}\n', r"items\.jsonl:1: expected a JSON object with an 'id'"),
        ('{"id": "i0", "title": "A"}\n{"id": "i0", "title": "B"}\n', r"items\.jsonl:2: item id 'i0' occurs twice"),
        # json.loads kept the last copy of a repeated key (item i9 silently); int() of > 4,300 digits named no file
        ('{"id": "i0", "title": "A", "id": "i9"}\n', r"items\.jsonl:1: key 'id' occurs twice in one object"),
        ('{"id": "i0", "title": "A", "year": ' + "9" * 5000 + "}\n", r"items\.jsonl:1: invalid JSON: Exceeds"),
        ("\n", r"items\.jsonl: no items"),
    ],
)
def test_malformed_items(tmp_path, items_text, pattern):
    folder = write_generic(tmp_path / "d", ["u1,i0,1", "u1,i0,2", "u1,i0,3"])
    (folder / "items.jsonl").write_text(items_text)
    with pytest.raises(DataError, match=pattern):
        load_domain(folder)


def test_numeric_ids_that_json_wrote_as_floats_are_named(tmp_path):
    """A pandas export of ids with NaNs writes 0 as 0.0 in items.jsonl: the error says which form the catalog holds."""
    folder = write_generic(tmp_path / "d", ["u1,0,1", "u1,1,2", "u1,2,3"])
    (folder / "items.jsonl").write_text("".join(f'{{"id": {i}.0, "title": "t{i}"}}\n' for i in range(3)))
    with pytest.raises(DataError, match=r"3 items have no text record.*\['0', '1', '2'\].*items\.jsonl holds "
                                        r"'0\.0' .*write the ids as strings"):
        load_domain(folder)


def test_parameter_and_path_errors(tmp_path):
    folder = write_generic(tmp_path / "d", ["u1,i0,1", "u1,i1,2", "u1,i2,3"])
    with pytest.raises(ValueError, match="min_interactions"):
        load_generic_domain(folder, min_interactions=2)
    with pytest.raises(DataError, match="no such folder"):
        load_generic_domain(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a domain"):
        load_domain(tmp_path / "empty")


def test_save_load_round_trip_and_catalog(tmp_path, synthetic_domains):
    for domain in synthetic_domains:
        folder = save_generic_domain(domain, tmp_path / domain.name)
        loaded = load_domain(folder)
        assert loaded.name == domain.name and loaded.catalog == domain.catalog == load_catalog(folder)
        assert loaded.user_ids == domain.user_ids
        assert all(np.array_equal(a, b) for a, b in zip(loaded.train, domain.train))
        assert np.array_equal(loaded.val_target, domain.val_target)
        assert np.array_equal(loaded.test_target, domain.test_target)


def test_users_without_targets_are_left_out_of_a_saved_domain(tmp_path, caplog):
    """Such users (Pantry has two) were written with their known items only, and the reload split them again:
    their last training items came back as val/test targets."""
    from fedmerge.data.domain import Domain, ItemCatalog

    catalog = ItemCatalog(ids=tuple(f"i{k}" for k in range(5)), fields=tuple({"title": f"item {k}"} for k in range(5)))
    domain = Domain("shop", catalog, (np.array([0, 1]), np.array([2, 3, 4]), np.array([1, 2])),
                    np.array([3, -1, 4]), np.array([4, -1, 0]), user_ids=("a", "b", "c"))
    loaded = load_domain(save_generic_domain(domain, tmp_path / "shop"))
    assert loaded.user_ids == ("a", "c") and "1 users without a val/test target left out" in caplog.text
    assert [t.tolist() for t in loaded.train] == [[0, 1], [1, 2]]
    assert loaded.val_target.tolist() == [3, 4] and loaded.test_target.tolist() == [4, 0]
    assert not list((tmp_path / "shop").glob("*.tmp")) and not list((tmp_path / "shop").glob(".*"))


def test_concat_domains_offsets_items_and_users(synthetic_domains):
    joint = concat_domains(synthetic_domains)
    offsets = domain_item_offsets(synthetic_domains)
    assert offsets.tolist() == [0, 60, 120, 180]
    assert joint.n_items == 180 and joint.n_users == sum(d.n_users for d in synthetic_domains)
    assert joint.n_interactions == sum(d.n_interactions for d in synthetic_domains)
    row = 0
    for d, offset in zip(synthetic_domains, offsets):
        for u in range(d.n_users):
            assert np.array_equal(joint.train[row], d.train[u] + offset)
            assert joint.val_target[row] == d.val_target[u] + offset
            assert joint.catalog.fields[joint.test_target[row]] == d.catalog.fields[d.test_target[u]]
            assert joint.user_ids[row] == f"{d.name}:{d.user_ids[u]}"
            row += 1
    assert len(set(joint.catalog.ids)) == 180
    with pytest.raises(ValueError):
        concat_domains([])


ROWS = [f"u{u},i{k},{k}" for u in range(2) for k in range(4)]


def test_non_utf8_files_name_file_and_line(tmp_path):
    folder = write_generic(tmp_path / "d", ROWS)
    csv_file = folder / "interactions.csv"
    csv_file.write_bytes(csv_file.read_bytes().replace(b"u1,i2,2", b"u1,i2\xe9,2"))
    with pytest.raises(DataError, match=rf"{csv_file}:8: not UTF-8 text \(byte 0xe9\)"):
        load_generic_domain(folder)
    folder = write_generic(tmp_path / "e", ROWS)
    items = folder / "items.jsonl"
    items.write_bytes(items.read_bytes().replace(b"Item 3", b"Item \xff3"))
    with pytest.raises(DataError, match=rf"{items}:4: not UTF-8 text \(byte 0xff at column \d+\)"):
        load_generic_domain(folder)


def test_byte_order_mark_is_accepted(tmp_path):
    folder = write_generic(tmp_path / "d", ROWS)
    for name in ("interactions.csv", "items.jsonl"):
        (folder / name).write_bytes(b"\xef\xbb\xbf" + (folder / name).read_bytes())
    domain = load_generic_domain(folder)
    assert domain.n_users == 2 and domain.catalog.ids[0] == "i0"


def test_over_long_fields_and_lines_name_file_and_line(tmp_path, monkeypatch):
    from fedmerge.data import generic

    folder = write_generic(tmp_path / "d", [*ROWS[:3], f"u1,{'x' * 200_000},9", *ROWS[3:]])
    with pytest.raises(DataError, match=rf"{folder / 'interactions.csv'}:5: unreadable CSV \(field larger than field limit"):
        load_generic_domain(folder)
    folder = write_generic(tmp_path / "e", ROWS, items=[*ITEMS[:2], {"id": "long", "title": "t" * 300}, *ITEMS[2:]])
    monkeypatch.setattr(generic, "MAX_LINE_BYTES", 200)
    with pytest.raises(DataError, match=rf"{folder / 'items.jsonl'}:3: line longer than 200 bytes"):
        load_generic_domain(folder)


def test_exact_duplicate_rows_are_dropped_and_counted(tmp_path, caplog):
    """Every row written twice kept both copies side by side, so each user's validation item was its test item and
    the last item of its input: Recall@10 1.00 for the sequential model on own data (0.22 without the copies)."""
    rows = ["u1,i0,1", "u1,i1,2", "u1,i2,3", "u1,i3,4", "u2,i1,1", "u2,i2,2", "u2,i3,3"]
    clean = load_generic_domain(write_generic(tmp_path / "clean", rows))
    with caplog.at_level("WARNING", logger="fedmerge"):
        doubled = load_generic_domain(write_generic(tmp_path / "doubled", rows + rows))
    assert doubled.user_ids == clean.user_ids
    assert [s.tolist() for s in doubled.train] == [s.tolist() for s in clean.train]
    assert doubled.val_target.tolist() == clean.val_target.tolist()
    assert doubled.test_target.tolist() == clean.test_target.tolist()
    assert "7 exact duplicate rows" in caplog.text
    # one real interaction written three times is one interaction: not enough for a user
    with pytest.raises(DataError, match="no user has >= 3 interactions"):
        load_generic_domain(write_generic(tmp_path / "thrice", ["u1,i0,1"] * 3))
    # the same item again at another time is a repeat purchase, kept
    repeat = load_generic_domain(write_generic(tmp_path / "repeat", ["u1,i0,1", "u1,i0,2", "u1,i0,3"]))
    assert repeat.n_users == 1 and repeat.test_target.tolist() == [0]


def test_iso_dates_order_like_their_times(tmp_path):
    rows = ["u1,i0,2021-03-01T10:00:00", "u1,i1,2021-02-28", "u1,i2,2021-03-01T09:00:00+00:00", "u1,i3,2021-03-02"]
    domain = load_generic_domain(write_generic(tmp_path / "d", rows))
    assert (domain.train[0].tolist(), int(domain.val_target[0]), int(domain.test_target[0])) == ([1, 2], 0, 3)


@pytest.mark.parametrize(
    ("header", "pattern"),
    [
        ("user;item;timestamp", r"header .* separated by ';'.* comma-separated"),
        ("user\titem\ttimestamp", r"header .* separated by a tab.* comma-separated"),
    ],
)
def test_a_header_with_another_delimiter_says_so(tmp_path, header, pattern):
    with pytest.raises(DataError, match=pattern):
        load_generic_domain(write_generic(tmp_path / "d", ["u1;i0;1"], header=header.replace("\\t", "\t")))


def test_header_names_are_matched_without_case(tmp_path):
    domain = load_generic_domain(write_generic(tmp_path / "d", ["u1,i0,1", "u1,i1,2", "u1,i2,3"],
                                               header="User, Item ,TIMESTAMP"))
    assert domain.user_ids == ("u1",) and int(domain.test_target[0]) == 2


def test_item_ids_and_text_values_are_read_as_the_csv_reads_them(tmp_path):
    """Ids in items.jsonl kept their spaces (the CSV's are stripped), so ' i0 ' never matched; a list became
    "['Toys', 'Cars']", NaN the word "nan" (an item of NaN fields passed as having text)."""
    items = [{"id": " i0 ", "title": "A", "category": ["Toys", "Cars"]},
             {"id": "i1", "title": "B", "tags": [["x", "y"], "z"], "price": 3.5},
             {"id": "i2", "title": "C", "brand": float("nan"), "size": None}]
    folder = write_generic(tmp_path / "d", ["u1,i0,1", "u1,i1,2", "u1,i2,3"], items=items)
    domain = load_generic_domain(folder)
    assert domain.catalog.ids == ("i0", "i1", "i2")
    assert domain.catalog.texts() == ["A Category: Toys, Cars", "B Tags: x, y, z Price: 3.5", "C"]
    nan_only = write_generic(tmp_path / "e", ["u1,i0,1"], items=[{"id": "i0", "title": float("nan")}])
    with pytest.raises(DataError, match="item 'i0' has no text"):
        load_domain(nan_only)
    nested = write_generic(tmp_path / "f", ["u1,i0,1"], items=[{"id": "i0", "title": "A", "details": {"c": "red"}}])
    with pytest.raises(DataError, match=r"items\.jsonl:1: item 'i0': field 'details' is a JSON object"):
        load_domain(nested)


def test_a_linked_folder_keeps_its_own_name(tmp_path):
    target = write_generic(tmp_path / "plain", ["u1,i0,1", "u1,i1,2", "u1,i2,3"])
    (tmp_path / "shopX").symlink_to(target)
    assert load_domain(tmp_path / "shopX").name == "shopX"


def test_a_tarball_of_a_generic_domain_says_to_unpack_it(tmp_path):
    import tarfile

    folder = write_generic(tmp_path / "plain", ["u1,i0,1", "u1,i1,2", "u1,i2,3"])
    tarball = tmp_path / "plain.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(folder, arcname="plain")
    with pytest.raises(DataError, match=r"generic-format domain.*unpack it into a folder"):
        load_domain(tarball)


def test_float_ids_and_numbers_keep_every_digit(tmp_path):
    """Numbers were written with 6 significant digits: a float id 1234567.0 (pandas' upcast ids) became
    '1.23457e+06' and no longer matched the CSV's, and neighbouring ids collapsed into one."""
    items = [{"id": 1234567.0, "title": "A", "price": 123456789.5}, {"id": 1234568.0, "title": "B"},
             {"id": 7, "title": "C"}]
    folder = write_generic(tmp_path / "d", ["u1,1234567.0,1", "u1,1234568.0,2", "u1,7,3"], items=items)
    domain = load_generic_domain(folder)
    assert domain.catalog.ids == ("1234567.0", "1234568.0", "7")
    assert domain.catalog.texts()[0] == "A Price: 123456789.5"


def test_a_lone_surrogate_in_item_text_is_replaced_and_the_catalog_encodes(tmp_path):
    """JSON's "\\ud83d" (an emoji cut in half) loaded as a lone surrogate and every text encoder failed on it later
    with a UnicodeEncodeError naming no file or item."""
    from fedmerge.data.domain import ItemCatalog
    from fedmerge.text.cache import encode_catalog
    from fedmerge.text.encoder import get_encoder

    folder = write_generic(tmp_path / "d", ["u1,i0,1", "u1,i1,2", "u1,i0,3"])
    (folder / "items.jsonl").write_text('{"id": "i0", "title": "Baby blanket \\ud83d"}\n'
                                        '{"id": "i1", "title": "Toy car", "br\\ud83dnd": "x"}\n')  # a field name too
    catalog = load_catalog(folder)
    assert catalog.fields[0]["title"] == "Baby blanket \ufffd" and "br\ufffdnd" in catalog.fields[1]
    assert encode_catalog(get_encoder("hashing"), catalog, cache=False).shape[0] == 2
    with pytest.raises(DataError, match=r"1 catalog items have a lone surrogate in their text .*\['a'\]"):
        ItemCatalog(ids=("a",), fields=({"title": "Baby blanket \ud83d"},))
