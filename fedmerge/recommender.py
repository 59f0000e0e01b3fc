"""Saved models as deliverables: model cards, ``save_model`` and :func:`load_recommender`.

A run saves every model it evaluates as ``<name>.safetensors`` (weights only; safetensors holds no code, so nothing
is unpickled on load) with a model card ``<name>.json`` next to it. The card names everything needed to use the
weights without the scenario: the model family and its parameters, the text encoder (name, parameters, identity,
embedding width), the feature width the weights expect, the weights' and θ₀'s digests, the method that built the
model and its parameters, the domains it was built from, its per-domain metrics and the package versions.

:func:`load_recommender` rebuilds the family and the encoder from the card and scores any catalog: the catalog's
item texts are embedded with the card's encoder (through the on-disk embedding cache) and turned into the family's
item features, so a catalog never seen in training works like a training domain.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from fedmerge.checks import MAX_CUTOFF, TYPE_WORDS, is_finite_float, is_integer, too_large_cutoffs
from fedmerge.data.domain import SPLITS
from fedmerge.errors import DataError, FedmergeError
from fedmerge.scenario import EncoderSettings, Scenario

if TYPE_CHECKING:
    import torch

    from fedmerge.data.domain import Domain, ItemCatalog
    from fedmerge.models import ModelFamily, StateDict
    from fedmerge.text.encoder import TextEncoder

logger = logging.getLogger(__name__)

CARD_FORMAT = "fedmerge-model/1"
SAVED_INDIVIDUAL_PREFIX = "individual:"  # saved-model name of a client's one-shot model: individual:<domain>
CARD_SUFFIX = ".json"
MODELS_DIR = "models"
# Histories scored together by LoadedRecommender.scores / recommend (and per output batch of `fedmerge recommend`):
# with texts=True a chunk's history texts join the catalog as extra items, so the scorer's matrix is
# (chunk) × (catalog + the chunk's texts); the whole call in one piece grew as histories² (4,000 histories of 10
# texts over a 100-item catalog: 806 MiB, against 15 MiB by ids).
HISTORY_BATCH = 256
# What a card must hold for the weights to be usable without the scenario.
REQUIRED_CARD_KEYS = ("format", "name", "family", "encoder", "feature_width", "weights_digest")
# The card fields a loaded model reads, and the JSON type each must have.
CARD_FIELD_TYPES: dict[tuple[str, ...], type] = {
    ("name",): str, ("weights_digest",): str, ("feature_width",): int,
    ("family", "name"): str, ("family", "params"): dict,
    ("encoder", "name"): str, ("encoder", "params"): dict, ("encoder", "identity"): str, ("encoder", "dim"): int,
}


def card_path(weights_path: str | Path) -> Path:
    """The card of a weight file: the same path with ``.json`` instead of ``.safetensors``."""
    return Path(weights_path).with_suffix(CARD_SUFFIX)


def model_path(out_dir: str | Path, name: str) -> Path:
    """``<out_dir>/models/<file-safe name>.safetensors``."""
    from fedmerge.storage import WEIGHTS_SUFFIX, safe_file_stem

    return Path(out_dir) / MODELS_DIR / f"{safe_file_stem(name)}{WEIGHTS_SUFFIX}"


def card_encoder(card: Mapping[str, Any]) -> EncoderSettings:
    """The encoder a model card names (with the default embedding cache), on this machine's device: the ``device``
    the model was trained with is left out (not part of the encoder's identity; a card from a CUDA run names
    ``"cuda"``, which a CPU machine does not have)."""
    params = {k: v for k, v in card["encoder"]["params"].items() if k != "device"}
    return EncoderSettings(card["encoder"]["name"], params, "")


def card_family_params(card: Mapping[str, Any]) -> dict[str, Any]:
    """The family parameters a model card names, to rebuild the family on this machine's device: the ``device`` the
    model was trained with is left out, as in :func:`card_encoder` (a card from a run with ``model.params.device =
    "cuda"`` names a device a CPU machine does not have; the card itself, and its scoring digest, keep it)."""
    return {k: v for k, v in card["family"]["params"].items() if k != "device"}


def common_card(
    family: ModelFamily, encoder: EncoderSettings, theta0_digest: str, run: Mapping[str, Any], split: str,
    ks: Sequence[int],
) -> dict[str, Any]:
    """The card fields of any model the family ``family`` trained from θ₀ (its digest) over ``encoder``'s features:
    family (every parameter, defaults included, so that a later change of a default does not change the model the
    card rebuilds), encoder, feature width, θ₀, run, eval protocol, package versions."""
    from fedmerge.provenance import package_versions

    text_encoder = encoder.text_encoder()
    return {
        "format": CARD_FORMAT,
        "family": {"name": family.name, "params": family.config()},
        "encoder": {"name": encoder.name, "params": dict(encoder.params),
                    "identity": text_encoder.identity, "dim": int(text_encoder.dim)},
        "feature_width": family.feature_width(int(text_encoder.dim)),
        "theta0_digest": theta0_digest,
        "run": dict(run),
        "eval": {"split": split, "ks": list(ks)},
        "versions": package_versions(),
    }


def model_card(
    common: Mapping[str, Any], name: str, method: str, method_params: Mapping[str, Any] | None,
    domains: Sequence[str], **extra: Any,
) -> dict[str, Any]:
    """One model's card: the shared fields (:func:`common_card`), its name, the method that built it and its
    parameters, the domains it was built from, whether it is the pooled-data ``joint`` model, no metrics yet (filled
    in after evaluation with :func:`update_card`), and ``extra``."""
    return {**common, "name": name, "method": {"name": method, "params": dict(method_params or {})},
            "domains": list(domains), "joint": name == "joint", "metrics": {}, **extra}


COMMON_CARD_KEYS = ("format", "family", "encoder", "feature_width", "theta0_digest", "run", "eval")  # common_card's


def merged_model_card(theta0_card: Mapping[str, Any], name: str, method: str, params: Mapping[str, Any],
                      domains: Sequence[str], **extra: Any) -> dict[str, Any]:
    """The card of a model merged from θ₀ (whose card is ``theta0_card``) and ``domains``' models by ``method``
    outside a run (``fedmerge merge``): θ₀'s family, encoder, θ₀ digest, run and eval protocol, this process's
    package versions, no metrics, never the pooled-data ``joint`` model whatever its name, and ``extra``."""
    from fedmerge.provenance import package_versions

    common = {k: theta0_card[k] for k in COMMON_CARD_KEYS if k in theta0_card}
    return model_card({**common, "versions": package_versions()}, name, method, params, domains,
                      **{**extra, "joint": False})


def scenario_card(cfg: Scenario, theta0_digest: str) -> dict[str, Any]:
    """The card fields every model of a run shares (:func:`common_card` of the scenario's family and encoder)."""
    return common_card(cfg.model.make_family(), cfg.encoder, theta0_digest,
                       {"name": cfg.run.name, "seed": cfg.run.seed}, cfg.eval.split, cfg.eval.ks)


def save_model(
    path: str | Path, weights: StateDict, card: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write the weights (with safetensors ``metadata``) and then their card, each atomically."""
    from fedmerge.storage import save_weights

    path = Path(path)
    save_weights(path, weights, {**dict(metadata or {}), "format": CARD_FORMAT, "name": str(card.get("name", path.stem))})
    return write_card(path, weights, card)


# the card fields that decide what a model scores besides its weights: the family and its parameters (a temperature),
# the encoder, the feature width and each domain's local parameters (applied by evaluate / recommend --as-domain)
SCORING_FIELDS = ("family", "encoder", "feature_width", "local_parameters")


def scoring_digest(card: Mapping[str, Any]) -> str:
    """Short sha256 of the card's :data:`SCORING_FIELDS` as canonical JSON (as the card file holds them: tuples are
    lists, numpy values plain numbers), so an edited card no longer matches the digest written with it."""
    from fedmerge.storage import json_default

    fields = json.loads(json.dumps({k: card.get(k) for k in SCORING_FIELDS}, default=json_default))
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def write_card(weights_path: str | Path, weights: StateDict, card: Mapping[str, Any]) -> Path:
    """Write the card of already saved ``weights`` (atomically), adding their digest and the card's
    :func:`scoring_digest`; returns the weight path."""
    from fedmerge.storage import weights_digest, write_json_atomic

    card = {k: v for k, v in card.items() if k not in ("weights_digest", "scoring_digest")}
    write_json_atomic(card_path(weights_path), {**card, "weights_digest": weights_digest(weights),
                                                "scoring_digest": scoring_digest(card)})
    return Path(weights_path)


def read_card(weights_path: str | Path) -> dict[str, Any]:
    """The card of a weight file; a DataError naming the problem when it is missing, not JSON or incomplete."""
    path = card_path(weights_path)
    if not path.is_file():
        raise DataError(f"{weights_path} has no model card {path.name} next to it (cards are written by "
                        f"`fedmerge simulate` under <run>/models/ and <run>/clients/, and by `fedmerge train` as weights.json)")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"model card {path} is not readable JSON: {exc}") from exc
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card] if isinstance(card, dict) else list(REQUIRED_CARD_KEYS)
    if missing:
        raise DataError(f"model card {path} lacks {missing}")
    if card["format"] != CARD_FORMAT:
        raise DataError(f"model card {path} has format {card['format']!r}; this fedmerge reads {CARD_FORMAT!r}")
    problems = card_problems(card)
    if problems:
        raise DataError(f"model card {path}: {'; '.join(problems)}")
    if "scoring_digest" in card and card["scoring_digest"] != scoring_digest(card):
        raise DataError(f"model card {path} was changed after it was written: its {', '.join(SCORING_FIELDS)} do not "
                        f"match the digest written with them (scoring_digest {card['scoring_digest']!r}, now "
                        f"{scoring_digest(card)!r}); these fields decide what the model scores")
    return card


def _finite_values(value: Any) -> bool:
    """A number finite as a float, or (nested) lists of them: a local parameter as
    :func:`~fedmerge.merging.local_parameters.card_values` writes it."""
    if isinstance(value, list):
        return all(_finite_values(v) for v in value)
    return is_finite_float(value)


def _rectangular(value: Any) -> bool:
    """Whether nested lists ``value`` have one length per depth (a tensor's shape); a number is."""
    def shape(v: Any) -> tuple[int, ...] | None:
        if not isinstance(v, list):
            return ()
        inner = {shape(item) for item in v}
        return None if None in inner or len(inner) > 1 else (len(v), *next(iter(inner), ()))

    return shape(value) is not None


def card_problems(card: Mapping[str, Any]) -> list[str]:
    """What is malformed in a card's fields that loading reads (:data:`CARD_FIELD_TYPES`) and in its
    ``local_parameters`` ({domain: {weight name: finite number(s)}}); empty when none."""
    problems = []
    for keys, kind in CARD_FIELD_TYPES.items():
        value: Any = card
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            problems.append(f"'{'.'.join(keys)}' must be {TYPE_WORDS[kind]}, got {value!r}")
    for key in ("eval", "metrics"):  # optional, read by evaluate
        if key in card and not isinstance(card[key], dict):
            problems.append(f"'{key}' must be a table, got {card[key]!r}")
    split = card.get("eval", {}).get("split", "test") if isinstance(card.get("eval"), dict) else "test"
    if split not in SPLITS:
        problems.append(f"'eval.split' must be one of {list(SPLITS)}, got {split!r}")
    ks = card["eval"].get("ks") if isinstance(card.get("eval"), dict) else None
    if ks is not None and not (isinstance(ks, list) and ks and all(is_integer(k) and k >= 1 for k in ks)):
        problems.append(f"'eval.ks' must be a non-empty list of positive integers, got {ks!r}")
    elif ks is not None and too_large_cutoffs(ks):
        problems.append(f"'eval.ks' {too_large_cutoffs(ks)} exceed the largest cut-off {MAX_CUTOFF}")
    metrics = card.get("metrics", {})
    if isinstance(metrics, dict) and not all(isinstance(m, dict) for m in metrics.values()):
        problems.append(f"'metrics' must map each domain to its {{metric: value}}, got {metrics!r}")
    local = card.get("local_parameters", {})
    if not isinstance(local, dict) or not all(isinstance(v, dict) for v in local.values()):
        problems.append(f"'local_parameters' must map each domain to its {{weight: value}}, got {local!r}")
    else:
        bad = [f"{d}.{n}" for d, values in local.items() for n, v in values.items() if not _finite_values(v)]
        if bad:
            problems.append(f"'local_parameters' {bad} are not finite numbers (each a number or nested lists of "
                            "numbers, within a float's range)")
        ragged = [f"{d}.{n}" for d, values in local.items() for n, v in values.items()
                  if _finite_values(v) and not _rectangular(v)]
        if ragged:
            problems.append(f"'local_parameters' {ragged} are ragged: the nested lists of one weight need one "
                            "length per depth (the weight's shape)")
    return problems


def update_card(weights_path: str | Path, **fields: Any) -> None:
    """Set ``fields`` in an existing card (atomically), e.g. ``metrics`` once the model has been evaluated."""
    from fedmerge.storage import write_json_atomic

    card = {**read_card(weights_path), **fields}
    if "scoring_digest" in card:  # fedmerge's own change of a scoring field (none today) keeps the card consistent
        card["scoring_digest"] = scoring_digest(card)
    write_json_atomic(card_path(weights_path), card)


def _text_key(text: str) -> str:
    """How a history's item text is matched to catalog items: letter case and runs of white space aside."""
    return " ".join(text.split()).casefold()


def _items_by_text(catalog: ItemCatalog) -> tuple[dict[str, int], dict[str, set[int]]]:
    """(the item a history text is read as, the items it names), both keyed by :func:`_text_key`: a text names every
    item whose full text (:meth:`~fedmerge.data.ItemCatalog.texts`) or title it is, and is read as the first item
    whose full text it is, else the first whose title it is."""
    read_as: dict[str, int] = {}
    by_title: dict[str, int] = {}
    named: dict[str, set[int]] = {}
    for i, text in enumerate(catalog.texts()):
        key, title = _text_key(text), _text_key(str(catalog.fields[i].get("title", "")))
        if key:
            read_as.setdefault(key, i)
            named.setdefault(key, set()).add(i)
        if title:
            by_title.setdefault(title, i)
            named.setdefault(title, set()).add(i)
    for key, i in by_title.items():
        read_as.setdefault(key, i)
    return read_as, named


class Recommendation(NamedTuple):
    """One recommended item: its id in the catalog, its index there and the model's score."""

    item: str
    index: int
    score: float


@dataclass(repr=False)
class LoadedRecommender:
    """A saved model ready to score catalogs. Build it with :func:`load_recommender`."""

    path: Path
    card: dict[str, Any]
    family: ModelFamily
    weights: StateDict
    encoder: TextEncoder
    cache_dir: str = ""
    # (catalog, statistics rows, its features): reused by batches
    _last: tuple[Any, Any, Any] | None = field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:
        return str(self.card["name"])

    def __repr__(self) -> str:
        return (f"LoadedRecommender(name={self.name!r}, family={self.family.name!r}, "
                f"encoder={self.card['encoder']['identity']!r}, path={str(self.path)!r})")

    def features(self, catalog: ItemCatalog, statistics_rows: int | None = None) -> torch.Tensor:
        """The family's item features of ``catalog`` from the card's encoder (embeddings through the cache), its
        catalog-wide statistics from the first ``statistics_rows`` items (default all; see
        :meth:`~fedmerge.models.base.ModelFamily.item_features`); refused when their width is not the one the
        weights were trained for."""
        if statistics_rows == len(catalog):
            statistics_rows = None
        if self._last is not None and self._last[0] is catalog and self._last[1] == statistics_rows:
            return self._last[2]
        from fedmerge.text import EmbeddingCache, encode_catalog

        cache = EmbeddingCache(self.cache_dir) if self.cache_dir else None  # as EncoderSettings.item_features
        features = self.family.catalog_features(catalog, lambda: encode_catalog(self.encoder, catalog, cache=cache),
                                                statistics_rows)
        if features.shape[-1] != int(self.card["feature_width"]):
            raise FedmergeError(
                f"catalog features of width {features.shape[-1]} (family {self.family.name!r}, encoder "
                f"{self.encoder.identity!r}) do not fit model {self.path} (card: width {self.card['feature_width']})"
            )
        self._last = (catalog, statistics_rows, features)
        return features

    def _histories(
        self, histories: Iterable[Sequence[str]], catalog: ItemCatalog | Domain | str | Path, texts: bool
    ) -> tuple[ItemCatalog, list[list[str]]]:
        """(the catalog, the histories as lists), every history checked before any is scored: an empty text (with
        ``texts``) or an unknown item id is refused by row and entry; a history longer than the model reads is
        logged (:meth:`_warn_if_cut`)."""
        histories = _as_histories(histories)
        base = _as_catalog(catalog)
        if texts:
            for row, h in enumerate(histories):
                empty = [j for j, t in enumerate(h) if not str(t).strip()]
                if empty:
                    raise DataError(f"history {row}: entry {empty[0]} is an empty item text (entries are item "
                                    "texts with texts=True / --texts)")
        else:
            known = set(base.ids)
            for row, h in enumerate(histories):
                unknown = [item for item in h if item not in known]
                if unknown:
                    raise DataError(f"history {row}: item id(s) {unknown[:5]} are not in the catalog "
                                    f"({len(base)} items, e.g. {list(base.ids[:3])}); to give item texts instead: "
                                    "--texts (fedmerge recommend) or texts=True")
        self._warn_if_cut(histories)
        return base, histories

    def _inputs(
        self, histories: Sequence[Sequence[str]], base: ItemCatalog, read_as: Mapping[str, int] | None
    ) -> tuple[ItemCatalog, list[np.ndarray]]:
        """(catalog to featurize, histories as item indices into it) of checked histories (:meth:`_histories`).

        ``read_as`` None: the entries are item ids. Else every entry is an item's text: a text that names a catalog
        item (``read_as``, :func:`_items_by_text`) is read as that item, so the model's history offsets (the last
        item's, the earlier items', a repeating user's) land on it as they do by id; any other text joins the
        catalog as an extra item (one per distinct text), featurized as an item of it (its statistics from its own
        items only, :meth:`features`, so one user's scores do not depend on the other texts given), and is never
        recommended.
        """
        from fedmerge.data.domain import ItemCatalog

        if read_as is None:
            index = {item: i for i, item in enumerate(base.ids)}
            return base, [np.array([index[item] for item in h], dtype=np.int64) for h in histories]
        n = len(base)
        extra: dict[str, int] = {}  # a text of no catalog item -> its index after the catalog's items
        seqs = []
        for h in histories:
            items = [read_as.get(_text_key(str(t))) for t in h]
            seqs.append(np.array([extra.setdefault(str(t), n + len(extra)) if i is None else i
                                  for t, i in zip(h, items)], dtype=np.int64))
        if not extra:
            return base, seqs
        prefix = "text:"  # the extra texts' ids: any prefix no catalog id has
        while any(i.startswith(prefix) for i in base.ids):
            prefix = "_" + prefix
        full = ItemCatalog(ids=(*base.ids, *(f"{prefix}{j}" for j in range(len(extra)))),
                           fields=(*base.fields, *({"title": t} for t in extra)))
        return full, seqs

    def _scored(
        self, base: ItemCatalog, rows: Sequence[Sequence[str]], read_as: Mapping[str, int] | None
    ) -> Iterator[tuple[int, list[np.ndarray], np.ndarray]]:
        """(first row, histories as item indices, scores (rows, n_items) over ``base``'s items) of each chunk of
        :data:`HISTORY_BATCH` checked histories (:meth:`_histories`; no history: one empty chunk), given as texts
        unless ``read_as`` is None (:meth:`_inputs`). With texts each chunk's catalog holds that chunk's texts only,
        so the scores matrix is bounded by the chunk and not by the whole call (the texts of 4,000 histories of 10
        items joined one catalog)."""
        n = len(base)
        by_ids = None if read_as is not None else self._scorer(base)
        for start in range(0, max(len(rows), 1), HISTORY_BATCH):
            full, seqs = self._inputs(rows[start : start + HISTORY_BATCH], base, read_as)
            scorer = by_ids or self._scorer(full, n)
            yield start, seqs, scorer(seqs)[:, :n]

    def _warn_if_cut(self, seqs: Sequence[Sized]) -> None:
        """A warning when histories are longer than the ``max_len`` items the model reads (evaluation reads the same
        window; the text-LAE fits on whole histories)."""
        cut = sum(len(seq) > self.family.max_len for seq in seqs)
        if cut:
            logger.warning("%s of %s histories are longer than the %s items the model reads (max_len): only their "
                           "last %s items are scored", cut, len(seqs), self.family.max_len, self.family.max_len)

    def scores(
        self, histories: Iterable[Sequence[str]], catalog: ItemCatalog | Domain | str | Path, *, texts: bool = False
    ) -> np.ndarray:
        """(len(histories), n_items) scores over ``catalog``'s items, higher is better.

        ``histories``: a list with one history per user, each the items interacted with, oldest first, as item ids
        of ``catalog`` (or, with ``texts=True``, as item texts); an empty history is refused. ``catalog``: an
        :class:`~fedmerge.data.ItemCatalog`, a :class:`~fedmerge.data.Domain` (its catalog) or a domain
        folder/tarball (loaded and featurized again on every call: pass the loaded catalog when calling repeatedly).
        Only the last ``max_len`` items of a history are read (as in evaluation; a longer history is logged as a
        warning). Histories are scored in chunks of :data:`HISTORY_BATCH` (with ``texts``, each chunk's texts join
        the catalog); a model whose scores are not finite is refused (:class:`~fedmerge.errors.FedmergeError`).
        """
        base, rows = self._histories(histories, catalog, texts)
        out: np.ndarray | None = None
        for start, _, scores in self._scored(base, rows, _items_by_text(base)[0] if texts else None):
            if out is None:  # the scorer's dtype
                out = np.empty((len(rows), scores.shape[1]), dtype=scores.dtype)
            out[start : start + len(scores)] = scores
        assert out is not None  # _scored yields at least one chunk
        return out

    def _scorer(
        self, catalog: ItemCatalog, statistics_rows: int | None = None
    ) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
        """The family's scorer over ``catalog`` (:meth:`features`), refusing non-finite scores (unusable weights)
        wherever it is used."""
        scorer = self.family.scorer(self.weights, self.features(catalog, statistics_rows))

        def finite_scores(sequences: Sequence[np.ndarray]) -> np.ndarray:
            scores = scorer(sequences)
            if not np.isfinite(scores).all():
                raise FedmergeError(f"model {self.path} gives non-finite scores "
                                    f"({int((~np.isfinite(scores)).sum())} of {scores.size}); its weights are unusable")
            return scores

        return finite_scores

    def recommend(
        self, histories: Iterable[Sequence[str]], k: int = 10, catalog: ItemCatalog | Domain | str | Path | None = None,
        *, texts: bool = False, exclude_history: bool = True,
    ) -> list[list[Recommendation]]:
        """The top-``k`` items of ``catalog`` for each history (ties: lower item index first), best first.

        Items of the history are left out unless ``exclude_history=False`` (so a history may get fewer than ``k``
        items: as many as the catalog has left); with ``texts=True`` those are the catalog items whose text
        (:meth:`~fedmerge.data.ItemCatalog.texts`) or title is one of the history's texts (letter case and runs of
        white space aside), every such item when several share it. See :meth:`scores` for the arguments.
        """
        if catalog is None:
            raise FedmergeError("recommend needs a catalog: an ItemCatalog, a Domain or a domain folder/tarball")
        if not is_integer(k) or k < 1:
            raise FedmergeError(f"k must be an integer of at least 1, got {k!r}")
        base, rows = self._histories(histories, catalog, texts)
        n = len(base)
        read_as, named = _items_by_text(base) if texts else (None, {})
        out = []
        for start, seqs, chunk in self._scored(base, rows, read_as):
            scores = chunk.astype(np.float64)
            excluded = seqs  # the history's catalog items
            if exclude_history and texts:  # a history entry names the items whose full text or title it is
                excluded = [np.array(sorted({i for e in rows[start + r] for i in named.get(_text_key(str(e)), ())}),
                                     dtype=np.int64) for r in range(len(seqs))]
            for row, seq in enumerate(excluded):
                if exclude_history:
                    scores[row, seq] = -np.inf
                order = np.lexsort((np.arange(n), -scores[row]))[:k]
                out.append([Recommendation(base.ids[i], int(i), float(scores[row, i]))
                            for i in order if np.isfinite(scores[row, i])])
        return out

    @property
    def local_domains(self) -> list[str]:
        """The domains whose own local parameters the card holds (:mod:`fedmerge.merging.local_parameters`)."""
        return sorted(self.card.get("local_parameters", {}))

    def for_domain(self, name: str) -> LoadedRecommender:
        """This model as domain ``name`` serves it: with that domain's own local parameters from the card
        (``merge.local_parameters``); the model itself when the card has none for ``name`` (a domain that was not
        merged uses the shared values already in the weights)."""
        from fedmerge.merging.local_parameters import from_card, with_values

        values = self.card.get("local_parameters", {}).get(name)
        if values is None:
            return self
        card = {**self.card, "local_parameters": {}, "served_as": name}  # fixed now: evaluate applies nothing more
        weights = self.weights
        for weight, value in values.items():  # one at a time, so that an error names its field
            try:
                weights = with_values(weights, from_card({weight: value}, weights))
            except FedmergeError as exc:  # a name, shape or value that does not fit this model's weights
                raise DataError(f"model card {card_path(self.path)}: 'local_parameters.{name}.{weight}': {exc}") \
                    from None
        return LoadedRecommender(self.path, card, self.family, weights, self.encoder, self.cache_dir)

    def served_as(self, name: str) -> LoadedRecommender:
        """:meth:`for_domain`, refused (listing the card's domains) when the card holds no local parameters of
        ``name``: the explicit choice of the CLI's ``--as-domain``."""
        if name not in self.local_domains:
            raise FedmergeError(f"model {self.path} holds no local parameters of domain {name!r}; its card has them "
                                f"for {self.local_domains or 'no domain (merge.local_parameters was empty)'}")
        return self.for_domain(name)

    def evaluate(
        self, domain: Domain | str | Path, split: str | None = None, ks: Sequence[int] | None = None, *,
        files: str | Path | None = None,
    ) -> dict[str, float]:
        """Full-ranking Recall@K/NDCG@K, masked and unmasked, on ``domain``'s ``split`` users
        (:func:`fedmerge.metrics.evaluate_scorer`; by default at the cut-offs the model's run reported,
        :attr:`default_ks`), with the domain's own local parameters when the card has them (:meth:`for_domain`), as
        the run evaluated it.

        ``domain``: a :class:`~fedmerge.data.Domain` or a domain folder/tarball. ``split``: ``"test"`` or ``"val"``;
        by default the split the model's run evaluated (from the card; ``"test"`` when it names none), as
        ``fedmerge evaluate`` does. A domain given as a path — or a loaded ``Domain`` with the folder/tarball it
        came from as ``files`` — is checked against the ``data_digests.json`` of the run folder the model lies in
        (a warning when the files differ)."""
        from fedmerge.data import Domain, load_domain
        from fedmerge.metrics import USERS, evaluate_scorer

        from_path = isinstance(domain, (str, Path))
        data_path = Path(domain) if from_path else Path(files) if files is not None else None
        if from_path:
            domain = load_domain(data_path)
        if not isinstance(domain, Domain):
            raise FedmergeError(f"evaluate needs a Domain or a domain folder/tarball path, got {type(domain).__name__}")
        if data_path is not None:
            self._check_run_files(domain.name, data_path)
        ks = None if ks is None else tuple(ks) if isinstance(ks, Iterable) else (ks,)
        if ks is not None and (not ks or not all(is_integer(k) and k >= 1 for k in ks)):
            raise FedmergeError(f"ks must be a non-empty list of positive integers, got {list(ks)!r}")
        if ks is not None and too_large_cutoffs(ks):
            raise FedmergeError(f"ks {too_large_cutoffs(ks)} exceed the largest cut-off {MAX_CUTOFF}")
        split = split or self.default_split
        if split not in SPLITS:
            raise FedmergeError(f"split must be 'test' or 'val', got {split!r}")
        model = self.for_domain(domain.name)
        metrics = evaluate_scorer(model._scorer(domain.catalog), domain, split, ks=tuple(ks or self.default_ks),
                                  max_len=self.family.max_len)
        recorded = self.card.get("metrics", {}).get(domain.name, {}).get("users")
        if split == self.default_split and recorded is not None and recorded != metrics[USERS]:
            logger.warning("%s: the run evaluated domain %r on %s %s users, this data has %s: not the run's data "
                           "(another seed or size of a synthetic domain, or changed files), so the metrics will "
                           "not match the card's", self.path, domain.name, recorded, split, metrics[USERS])
        return metrics

    def _check_run_files(self, name: str, data_path: Path) -> None:
        """Warn when this model lies in a run folder (``models/`` or ``clients/``) whose ``data_digests.json`` records
        domain ``name``'s files and those at ``data_path`` differ (same users, other interactions pass the users
        check)."""
        from fedmerge.data import same_domain_files
        from fedmerge.storage import DATA_DIGESTS_FILE

        record = self.path.parent.parent / DATA_DIGESTS_FILE
        if self.path.parent.name not in ("models", "clients") or not record.is_file():
            return
        try:
            recorded = json.loads(record.read_text()).get(name)
        except (OSError, ValueError, AttributeError):
            logger.warning("%s: unreadable, the data files are not checked against the run's", record)
            return
        if recorded is not None and not same_domain_files(recorded, data_path):
            logger.warning("%s: the files of domain %r differ from those the run recorded (sha256 in %s; a run before "
                           "2026-12-07 recorded a tarball by its own bytes, so its unpacked folder differs): if they "
                           "are not the run's data, the metrics will not match the card's", self.path, name, record)

    @property
    def default_split(self) -> str:
        """The split this model's run evaluated (its card's ``eval.split``), ``"test"`` when the card names none."""
        return str(self.card.get("eval", {}).get("split", "test"))

    @property
    def default_ks(self) -> tuple[int, ...]:
        """The cut-offs this model's run reported (its card's ``eval.ks``; :data:`~fedmerge.metrics.DEFAULT_KS` when
        the card names none), so ``evaluate`` gives the run's metrics (``eval.ks = [1, 3]`` gave K = 5..50)."""
        from fedmerge.metrics import DEFAULT_KS

        return tuple(int(k) for k in self.card.get("eval", {}).get("ks", DEFAULT_KS))


def _as_catalog(catalog: ItemCatalog | Domain | str | Path) -> ItemCatalog:
    from fedmerge.data import Domain, ItemCatalog, load_catalog

    if isinstance(catalog, (str, Path)):
        return load_catalog(catalog)
    if isinstance(catalog, Domain):
        return catalog.catalog
    if not isinstance(catalog, ItemCatalog):
        raise FedmergeError(f"catalog must be an ItemCatalog, a Domain or a domain folder/tarball path, "
                            f"got {type(catalog).__name__}")
    return catalog


def _as_histories(histories: Iterable[Sequence[str]]) -> list[list[str]]:
    """``histories`` as a list of lists (read once: a generator works), refusing a single history given without
    the outer list (a list of strings, or one string) and empty histories, each by its row."""
    if isinstance(histories, (str, bytes)):
        raise FedmergeError("histories must be a list of histories (each a list of item ids), got one string")
    rows = list(histories)
    if rows and all(isinstance(h, str) for h in rows):
        raise FedmergeError(f"histories must be a list of histories (each a list of item ids), got a list of "
                            f"strings {rows[:3]}: wrap a single history as [history]")
    out = []
    for row, history in enumerate(rows):
        if isinstance(history, (str, bytes)):
            raise FedmergeError(f"the history at index {row} is a string, not a list of item ids: {history!r}")
        items = list(history)
        if not items:
            raise FedmergeError(f"the history at index {row} is empty: a recommendation needs at least one item")
        out.append(items)
    return out


def load_recommender(
    path: str | Path, *, encoder: TextEncoder | None = None, cache_dir: str | Path = ""
) -> LoadedRecommender:
    """A saved model (``.safetensors`` with its ``.json`` card, or the card's path) ready to recommend.

    The family and the text encoder are rebuilt from the card on this machine's device (the card's training
    ``device`` is not used: :func:`card_family_params`, :func:`card_encoder`; ``encoder`` overrides the card's, but
    must be the same encoder: identity and width are compared). Refused, with a message naming both sides, when the family is
    unknown, the encoder or the feature width does not fit the card, or the weights do not fit the family; a
    missing, truncated or altered weight file is a :class:`~fedmerge.errors.DataError`. ``cache_dir``: the
    embedding cache (default: the package's default cache folder).
    """
    from fedmerge.models import get_family
    from fedmerge.storage import WEIGHTS_SUFFIX, load_weights, weights_digest

    path = Path(path)
    if path.suffix == CARD_SUFFIX:
        path = path.with_suffix(WEIGHTS_SUFFIX)
    if not path.is_file():
        folder = " (a folder: give a <name>.safetensors file in it, e.g. <run>/models/mergerec_layerwise.safetensors)"
        raise DataError(f"no model file {path}" + (folder if path.is_dir() else ""))
    if encoder is not None and not hasattr(encoder, "identity"):
        raise FedmergeError(f"encoder must be a text encoder object (fedmerge.text), got {encoder!r}; leave it out "
                            "to use the encoder the card names")
    card = read_card(path)
    if "scoring_digest" not in card:
        logger.warning("%s: its card predates scoring digests (2026-12-07): an edit of its %s would not be seen",
                       card_path(path), ", ".join(SCORING_FIELDS))
    weights = load_weights(path)
    if weights_digest(weights) != card["weights_digest"]:
        raise DataError(f"{path} does not hold the weights its card {card_path(path).name} describes "
                        f"(digest {weights_digest(weights)} vs card {card['weights_digest']})")
    try:
        family = get_family(card["family"]["name"], **card_family_params(card))
    except FedmergeError as exc:
        raise DataError(f"model card {card_path(path)}: {exc}") from exc
    enc = card["encoder"]
    if encoder is None:
        from fedmerge.text.encoder import check_encoder_params

        settings = card_encoder(card)
        try:
            check_encoder_params(settings.name, settings.params)
        except ValueError as exc:
            raise DataError(f"model card {card_path(path)}: encoder.params: {exc}") from exc
        try:
            encoder = settings.text_encoder()
        except FedmergeError as exc:  # an unknown name, a model folder that is not there: named with the card
            raise DataError(f"model card {card_path(path)}: {exc}") from exc
    earlier = enc["identity"] in getattr(encoder, "earlier_identities", ())
    if (encoder.identity != enc["identity"] and not earlier) or int(encoder.dim) != int(enc["dim"]):
        raise FedmergeError(f"encoder {encoder.identity!r} (width {encoder.dim}) does not fit model {path}, "
                            f"whose card names encoder {enc['identity']!r} (width {enc['dim']})")
    if earlier:
        logger.warning("%s: its card names encoder %r, an identity from before identities covered the model files' "
                       "bytes; the files now give %r (a model folder changed in place since would not be seen)",
                       path, enc["identity"], encoder.identity)
    width = family.feature_width(int(encoder.dim))
    if width != int(card["feature_width"]):
        raise FedmergeError(f"family {family.name!r} makes features of width {width} from encoder "
                            f"{encoder.identity!r}, but model {path} was trained on width {card['feature_width']}")
    try:
        family.load(weights, width)
    except RuntimeError as exc:
        details = [line.strip() for line in str(exc).splitlines() if line.strip()][:4]
        raise FedmergeError(f"the weights in {path} do not fit family {family.name!r} at feature width {width}: "
                            f"{' '.join(details)}") from exc
    return LoadedRecommender(path, card, family, weights, encoder, str(cache_dir or ""))
