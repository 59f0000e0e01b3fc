"""text_specificity.py's JSON lines as mean over seeds [95 % t-interval] per file, catalog and variant, with the
paired ratio flat / as run (per seed).

    python results/unseen/rebuy-text/specificity_table.py LINES.jsonl [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fedmerge.runners.aggregate import interval


def main() -> None:
    rows: dict[tuple[str, str, str], dict[int, dict]] = {}
    for path in sys.argv[1:]:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            name = row.get("domain", row.get("held_out"))
            rows.setdefault((Path(path).stem, name, row["values"]), {})[row["seed"]] = row
    for (source, name, label), by_seed in rows.items():
        cells = []
        for key in ("recall@10 x theta0", "ndcg@10 x theta0"):
            i = interval([r[key] for r in by_seed.values()])
            cell = f"{key} {i['mean']:.3f} [{i['low']:.3f}, {i['high']:.3f}]"
            if label == "flat":
                base = rows[(source, name, "as run")]
                p = interval([r[key] / base[s][key] for s, r in by_seed.items()])
                cell += f" (flat / as run {p['mean']:.3f} [{p['low']:.3f}, {p['high']:.3f}])"
            cells.append(cell)
        print(f"{source}: {name:7s} {label:7s} seeds {sorted(by_seed)}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
