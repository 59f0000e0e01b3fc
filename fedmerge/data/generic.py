"""Generic domain format: ``interactions.csv`` (``user,item,timestamp``) plus ``items.jsonl`` (``id`` + text fields).

Sequences are built per user by a stable sort on timestamp (ties keep file order), users with fewer than
``min_interactions`` interactions are dropped (default 3, so that train keeps >= 1 item), an optional k-core filter
is applied, and each sequence is split leave-one-out: last item = test target, second last = validation target,
the rest = train.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedmerge.data.domain import Domain, ItemCatalog, as_sequences, item_text
from fedmerge.errors import DataError

logger = logging.getLogger(__name__)

INTERACTIONS_FILE = "interactions.csv"
ITEMS_FILE = "items.jsonl"
REQUIRED_COLUMNS = ("user", "item", "timestamp")


def split_leave_one_out(
    name: str, catalog: ItemCatalog, sequences: Sequence[Sequence[int]], user_ids: Sequence[str] = ()
) -> Domain:
    """Domain from full chronological sequences: train = s[:-2], val target = s[-2], test target = s[-1].

    Every sequence needs >= 3 items so that train keeps at least one.
    """
    short = [i for i, s in enumerate(sequences) if len(s) < 3]
    if short:
        raise DataError(f"domain {name!r}: {len(short)} users have fewer than 3 interactions (e.g. user #{short[0]})")
    return Domain(
        name=name,
        catalog=catalog,
        train=as_sequences([s[:-2] for s in sequences]),
        val_target=np.array([s[-2] for s in sequences], dtype=np.int64),
        test_target=np.array([s[-1] for s in sequences], dtype=np.int64),
        user_ids=tuple(user_ids),
    )
