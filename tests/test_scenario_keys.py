"""scenarios/README.md, the reference of scenario keys, lists every key of the defaults with its default value."""

from __future__ import annotations

import re
import tomllib

from fedmerge.config import DEFAULTS, FREE_TABLES, SCENARIO_DIR

ROW = re.compile(r"^\| `([a-z_.0-9]+)` \| `(.+?)` \| (.+) \|$")


def default_keys() -> dict[str, object]:
    """Every key a scenario may set, dotted, with its default; a fixed sub-table (data.synthetic, merge.testtime)
    by its keys, a free table (model.params, ...) as one key."""
    keys: dict[str, object] = {}
    for section, table in DEFAULTS.items():
        for key, value in table.items():
            if isinstance(value, dict) and value and (section, key) not in FREE_TABLES:
                keys.update({f"{section}.{key}.{sub}": v for sub, v in value.items()})
            else:
                keys[f"{section}.{key}"] = value
    return keys


def documented_rows() -> dict[str, str]:
    rows = {}
    for line in (SCENARIO_DIR / "README.md").read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} listed twice"
            rows[match.group(1)] = match.group(2)
    return rows


def test_every_scenario_key_is_documented_with_its_default():
    documented, defaults = documented_rows(), default_keys()
    assert sorted(set(defaults) - set(documented)) == [], "keys missing from scenarios/README.md"
    assert sorted(set(documented) - set(defaults)) == [], "scenarios/README.md lists keys that do not exist"
    for key, text in documented.items():
        assert tomllib.loads(f"v = {text}")["v"] == defaults[key], f"{key}: README says {text}"
