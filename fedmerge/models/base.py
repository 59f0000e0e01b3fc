"""The one model interface.

Two kinds of model share the scoring contract that :func:`fedmerge.metrics.evaluate_scorer` consumes
(a list of input sequences -> a (batch, n_items) score matrix over one domain's catalog):

* :class:`Recommender` - an in-domain model trained on one domain (popularity, item-space LAEs). Not mergeable.
* :class:`ModelFamily` - a mergeable family. Its weights are a :data:`StateDict` of named float tensors that
  live in one parameter space for every domain (no item-id tables), start from a shared θ₀, and score any
  catalog given that catalog's item features. These weights are all a client ever ships.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.data.domain import Domain, ItemCatalog
from fedmerge.metrics import Scorer

StateDict = dict[str, torch.Tensor]
PAD = -1
# Why an iterative training stopped (training metrics ``stop_reason``): its epoch budget ran out, early stopping on
# validation, or the optional wall-clock safety cap ``max_seconds`` (the only one that depends on the machine).
STOP_MAX_EPOCHS = "max_epochs"
STOP_EARLY = "early_stopping"
STOP_MAX_SECONDS = "max_seconds"
STOP_REASONS = (STOP_MAX_EPOCHS, STOP_EARLY, STOP_MAX_SECONDS)


def reported_training(info: Mapping[str, Any]) -> dict[str, Any]:
    """What a result keeps of ``ModelFamily.train``'s info: its numbers and ``stop_reason`` (lists, tensors and other
    diagnostics dropped)."""
    return {k: v for k, v in info.items()
            if isinstance(v, (int, float)) or (k == "stop_reason" and v in STOP_REASONS)}


def pad_sequences(seqs: Sequence[np.ndarray], max_len: int) -> torch.Tensor:
    """Right-aligned (B, max_len) int64 tensor of the last ``max_len`` (>= 1) items of each sequence, padded with
    -1."""
    if max_len < 1:  # 0 kept every item ([-0:]) and failed on the shape
        raise ValueError(f"pad_sequences: max_len must be >= 1, got {max_len!r}")
    out = np.full((len(seqs), max_len), PAD, dtype=np.int64)  # filled in numpy: a torch slice copy per row is slow
    for row, seq in enumerate(seqs):
        tail = np.asarray(seq, dtype=np.int64)[-max_len:]
        if len(tail):
            out[row, max_len - len(tail) :] = tail
    return torch.from_numpy(out)


def stack_item_features(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Several catalogs' item features stacked row-wise; 3-D token features (n, T, d) are zero-padded along T to
    the longest, zero rows being padding there."""
    if all(f.ndim == 2 for f in features):
        return torch.cat(list(features))
    longest = max(f.shape[1] for f in features)
    return torch.cat([F.pad(f, (0, 0, 0, longest - f.shape[1])) for f in features])


def tempered_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · mean_rows KL(softmax(teacher/T) ‖ softmax(student/T))`` for (rows, K) logits: the distillation term
    of MergeRec's objective and of local training's ``theta0_distill`` (the T² keeps gradients' scale as T moves)."""
    return temperature**2 * F.kl_div(F.log_softmax(student / temperature, dim=1),
                                     F.log_softmax(teacher / temperature, dim=1),
                                     reduction="batchmean", log_target=True)


class Recommender(ABC):
    """An in-domain recommender: ``fit`` on one domain, then ``score`` input sequences over its items."""

    name: ClassVar[str]
    needs_embeddings: ClassVar[bool] = False  # whether ``fit`` reads the catalog's text embeddings

    @abstractmethod
    def fit(self, domain: Domain, item_embeddings: np.ndarray | None = None) -> Recommender:
        """Train on ``domain.train`` (plus the validation targets where the model refits after selection)."""

    @abstractmethod
    def score(self, sequences: list[np.ndarray]) -> np.ndarray:
        """(len(sequences), n_items) float32 scores; higher is better."""


class ModelFamily(ABC):
    """A mergeable model family: an ``nn.Module`` architecture plus its training recipe.

    ``build(dim)`` returns a module whose ``forward(seqs, item_features)`` maps a padded (B, L) int64 batch
    (see :func:`pad_sequences`) and a catalog's (n_items, dim_in) features to (B, n_items) scores. Its
    ``state_dict()`` is the shipped weight set; every entry is a float tensor and the set of names and shapes is
    the family's contract, checked when weights arrive.
    """

    name: ClassVar[str]
    # weights that describe how a domain's users shop rather than its items (e.g. the sequential family's
    # last-item bias): θ₀ pretraining on public-catalog pseudo-users, whose re-buying and recency are artificial,
    # leaves them at θ₀ (fedmerge.runners.pretrain)
    behaviour_parameters: ClassVar[tuple[str, ...]] = ()
    max_len: int = 50

    @abstractmethod
    def item_features(self, embeddings: np.ndarray, statistics_rows: int | None = None) -> torch.Tensor:
        """Turn a catalog's raw text embeddings into model input features (a function of the public catalog only).

        Catalog-wide statistics a family uses (a z-score's mean and std, a centring mean) come from the first
        ``statistics_rows`` rows (default: all): rows after them — texts a user gave that are no item of that catalog —
        are featurized as items of it and change no other row's features."""

    def catalog_features(
        self, catalog: ItemCatalog, embeddings: Callable[[], np.ndarray], statistics_rows: int | None = None
    ) -> torch.Tensor:
        """Model input features of a public catalog; ``embeddings()`` gives its (cached) sentence embeddings.

        By default :meth:`item_features` of those embeddings; a family that tunes text-encoder layers reads the
        catalog's texts instead. ``dim`` for :meth:`build` is always the features' last dimension.
        ``statistics_rows``: as in :meth:`item_features` (passed only when set, so a family whose
        ``item_features`` takes the embeddings alone keeps working for whole catalogs).
        """
        if statistics_rows is None:
            return self.item_features(embeddings())
        import inspect

        if "statistics_rows" not in inspect.signature(self.item_features).parameters:
            from fedmerge.errors import FedmergeError

            raise FedmergeError(f"model family {self.name!r}: its item_features takes no statistics_rows, which scoring "
                                "item texts against a catalog (texts=True, --texts) needs; give it that parameter "
                                "(see ModelFamily.item_features)")
        return self.item_features(embeddings(), statistics_rows=statistics_rows)

    def feature_width(self, embedding_width: int) -> int:
        """Width of :meth:`catalog_features` rows (the ``dim`` of :meth:`build`) for sentence embeddings of
        ``embedding_width``, known without encoding any catalog; features keep the embedding width by default."""
        return embedding_width

    @abstractmethod
    def build(self, dim: int) -> nn.Module:
        """A fresh module for item features of width ``dim``."""

    @abstractmethod
    def train(
        self, theta0: StateDict, domain: Domain, item_features: torch.Tensor, *, seed: int = 0, progress: bool = True
    ) -> tuple[StateDict, dict[str, Any]]:
        """Train from ``theta0`` on the domain's private sequences; return (weights, training metrics)."""

    def fitted_sequences(self, domain: Domain) -> list[np.ndarray]:
        """The domain's sequences whose items :meth:`train` fits as targets, and so what a membership attack on the
        shipped weights probes: ``domain.train`` (the validation item only selects the model); a family that refits
        on the validation items after selection returns :meth:`Domain.train_with_val`."""
        return list(domain.train)

    def config(self) -> dict[str, Any]:
        """Every constructor parameter with its value, defaults included (echoed into results.json and model cards;
        ``get_family(name, **config())`` rebuilds the family)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @property
    def reads_text_embeddings(self) -> bool:
        """Whether :meth:`catalog_features` reads the catalog's sentence embeddings (its ``embeddings()``); False for
        a family that reads the texts itself, for which encoding the embeddings ahead would be wasted."""
        return True

    @property
    def init_reads_catalogs(self) -> bool:
        """Whether :meth:`initial_weights` needs the merged domains' public catalog features."""
        return False

    @property
    def trains_on_public_catalogs(self) -> bool:
        """Whether :meth:`train` takes ``public_features=``, the other training domains' public catalog features."""
        return False

    def initial_weights(self, dim: int, seed: int = 0, catalog_features: Sequence[torch.Tensor] = ()) -> StateDict:
        """θ₀: the module's seeded initialization (identical for every client given ``dim`` and ``seed``;
        ``catalog_features`` is read only by families whose :attr:`init_reads_catalogs`)."""
        torch.manual_seed(seed)
        return {k: v.detach().clone() for k, v in self.build(dim).state_dict().items()}

    def fixed_parameters(self, theta0: StateDict) -> frozenset[str]:
        """Names of θ₀'s weights that training never changes (e.g. buffers set when θ₀ is made): a client's update
        must carry them equal to θ₀ bit for bit, or the server rejects it. None by default."""
        return frozenset()

    def load(self, weights: StateDict, dim: int) -> nn.Module:
        """A module in eval mode holding ``weights``."""
        module = self.build(dim)
        module.load_state_dict(weights)
        return module.eval()

    def scorer(self, weights: StateDict, item_features: torch.Tensor, batch_size: int = 512) -> Scorer:
        """A scorer over the catalog whose features are ``item_features``."""
        module = self.load(weights, item_features.shape[-1])

        @torch.no_grad()
        def score(seqs: list[np.ndarray]) -> np.ndarray:
            out = [
                module(pad_sequences(seqs[i : i + batch_size], self.max_len), item_features)
                for i in range(0, len(seqs), batch_size)
            ]
            return torch.cat(out).float().numpy()

        return score

    def parameter_groups(self, names: Iterable[str]) -> dict[str, list[str]]:
        """Layer groups for layer-wise merge coefficients; by default one group per parameter tensor."""
        return {name: [name] for name in names}

    def transformer_layer_groups(self, names: Iterable[str]) -> dict[str, list[str]]:
        """Groups as MergeRec's official layer-wise module forms them: one per Transformer layer and one ``others``
        group holding every other parameter; a family without Transformer layers has only ``others``."""
        return {"others": list(names)}
