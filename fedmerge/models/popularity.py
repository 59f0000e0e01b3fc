"""Popularity baseline: every user gets the same scores, the items' interaction counts."""

from __future__ import annotations

import numpy as np

from fedmerge.data.domain import Domain
from fedmerge.errors import FedmergeError
from fedmerge.models.base import Recommender


class Popularity(Recommender):
    """score(i) = number of occurrences of item i in the training sequences extended by the validation items.

    There is nothing to select, so it is fitted on train + validation (:meth:`Domain.train_with_val`), the data
    the other models refit on before testing.
    """

    name = "popularity"

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None

    def fit(self, domain: Domain, item_embeddings: np.ndarray | None = None) -> Popularity:
        items = np.concatenate([np.asarray(s, dtype=np.int64) for s in domain.train_with_val()])
        self.counts = np.bincount(items, minlength=domain.n_items).astype(np.float32)
        return self

    def score(self, sequences: list[np.ndarray]) -> np.ndarray:
        if self.counts is None:
            raise FedmergeError("model 'popularity' is not fitted")
        return np.broadcast_to(self.counts, (len(sequences), len(self.counts))).copy()
