"""Popularity baseline: every user gets the same scores, the items' user counts."""

from __future__ import annotations

import numpy as np

from fedmerge.data.domain import Domain, interaction_matrix
from fedmerge.errors import FedmergeError
from fedmerge.models.base import Recommender


class Popularity(Recommender):
    """score(i) = number of users whose training sequence (extended by the validation item) holds item i.

    That is the column sum of the binary X the LAEs use (diag(G)); repeats within a user count once.

    There is nothing to select, so it is fitted on train + validation (:meth:`Domain.train_with_val`), the data
    the other models refit on before testing.
    """

    name = "popularity"

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None

    def fit(self, domain: Domain, item_embeddings: np.ndarray | None = None) -> Popularity:
        x = interaction_matrix(domain.train_with_val(), domain.n_items)
        self.counts = np.asarray(x.sum(axis=0), dtype=np.float32).ravel()
        return self

    def score(self, sequences: list[np.ndarray]) -> np.ndarray:
        if self.counts is None:
            raise FedmergeError("model 'popularity' is not fitted")
        return np.broadcast_to(self.counts, (len(sequences), len(self.counts))).copy()
