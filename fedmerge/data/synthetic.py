"""Seeded synthetic multi-domain data with a shared latent topic structure visible in item text.

Generative story (all draws from ``numpy.random.default_rng``):

* Shared across domains (seeded by ``seed``): ``n_topics`` topics, each with a vocabulary of pseudo-words.
  An item of topic ``k`` gets a title of words from vocabulary ``k`` plus one word from a common filler pool,
  so a text encoder maps same-topic items of *different* domains close together (transferable signal).
* Per domain ``d`` (seeded by ``(seed, d)``): items are assigned to topics round-robin; brands are tied to topics;
  the domain differs in its sequential dynamics:

  - topic transition matrix ``T_d = s_d I + r_d P_d + (1 - s_d - r_d) U``: stickiness ``s_d``, a per-domain
    successor permutation ``P_d`` (topic k is followed by topic P_d(k) with weight ``r_d``), uniform rest ``U``;
  - within-topic item popularity ``p(i | k) ∝ (rank of i in topic k)^(-a_d)`` with a per-domain Zipf skew ``a_d``.

* A user of length ``L ~ U{min_len..max_len}`` starts in a topic drawn from the domain's topic popularity and walks
  ``k_{t+1} ~ T_d[k_t]``, emitting ``i_t ~ p(· | k_t)``. The next item is thus mostly from the same or the successor
  topic: a learnable signal. The last item is the test target, the second last the validation target.
"""

from __future__ import annotations

import logging

import numpy as np

from fedmerge.data.domain import Domain, ItemCatalog
from fedmerge.data.generic import split_leave_one_out

logger = logging.getLogger(__name__)

_CONSONANTS = "bcdfghklmnprstvz"
_VOWELS = "aeiou"
WORDS_PER_TOPIC = 10
TITLE_TOPIC_WORDS = 3
FILLER_WORDS = 12
BRANDS_PER_TOPIC = 2


def _pseudo_words(rng: np.random.Generator, count: int, taken: set[str]) -> list[str]:
    """``count`` distinct pronounceable words of 2-3 consonant-vowel syllables, none of them in ``taken``."""
    words: list[str] = []
    while len(words) < count:
        n_syllables = int(rng.integers(2, 4))
        word = "".join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                       for _ in range(n_syllables))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def _draw_categorical(rng: np.random.Generator, cumulative: np.ndarray) -> np.ndarray:
    """One draw per row of a (n, m) matrix of cumulative probabilities (inverse-CDF sampling)."""
    u = rng.random((cumulative.shape[0], 1))
    return np.minimum((cumulative < u).sum(axis=1), cumulative.shape[1] - 1)


# the generator's sizes, also a scenario's [data.synthetic] defaults and `fedmerge data synth`'s: one home, so the
# domains `data synth` writes by default are the ones the default scenario trains on
SYNTHETIC_SIZES: dict[str, int] = {"n_domains": 3, "n_users": 200, "n_items": 100, "n_topics": 8, "min_len": 4,
                                   "max_len": 20}


WORD_SPACE = (len(_CONSONANTS) * len(_VOWELS)) ** 2 + (len(_CONSONANTS) * len(_VOWELS)) ** 3  # 2-3 syllables
# distinct words drawn by rejection: kept to half the space, so a draw never takes more than two tries on average
MAX_TOPICS = (WORD_SPACE // 2 - FILLER_WORDS) // (WORDS_PER_TOPIC + BRANDS_PER_TOPIC)


def check_synthetic_sizes(n_domains: int, n_users: int, n_items: int, n_topics: int, min_len: int, max_len: int) -> None:
    """ValueError naming the sizes :func:`make_synthetic_domains` cannot generate (checked when a scenario loads)."""
    if n_domains < 1 or n_users < 1:
        raise ValueError(f"need n_domains >= 1 and n_users >= 1, got {n_domains}, {n_users}")
    if n_topics < 1 or n_items < n_topics:
        raise ValueError(f"need 1 <= n_topics <= n_items, got n_topics={n_topics}, n_items={n_items}")
    if n_topics > MAX_TOPICS:  # its words would near the whole pseudo-word space: drawing them never ended
        raise ValueError(f"need n_topics <= {MAX_TOPICS} (the pseudo-words the generator can draw), got {n_topics}")
    if not 3 <= min_len <= max_len:
        raise ValueError(f"need 3 <= min_len <= max_len (leave-one-out keeps >= 1 training item), got {min_len}, {max_len}")


def synthetic_domain_name(index: int) -> str:
    """The name of the ``index``-th synthetic domain: ``synth-<index>``."""
    return f"synth-{index}"


def make_synthetic_domains(
    n_domains: int = SYNTHETIC_SIZES["n_domains"],
    n_users: int = SYNTHETIC_SIZES["n_users"],
    n_items: int = SYNTHETIC_SIZES["n_items"],
    n_topics: int = SYNTHETIC_SIZES["n_topics"],
    min_len: int = SYNTHETIC_SIZES["min_len"],
    max_len: int = SYNTHETIC_SIZES["max_len"],
    seed: int = 0,
) -> list[Domain]:
    """``n_domains`` seeded synthetic domains named ``synth-0``, ``synth-1``, ... (see the module docstring)."""
    check_synthetic_sizes(n_domains, n_users, n_items, n_topics, min_len, max_len)
    shared_rng = np.random.default_rng(seed)
    taken: set[str] = set()
    vocab = [_pseudo_words(shared_rng, WORDS_PER_TOPIC, taken) for _ in range(n_topics)]
    fillers = _pseudo_words(shared_rng, FILLER_WORDS, taken)
    domains = []
    for d in range(n_domains):
        rng = np.random.default_rng([seed, d])
        domains.append(_make_domain(rng, synthetic_domain_name(d), vocab, fillers, taken, n_users, n_items, min_len, max_len))
    logger.debug("generated %d synthetic domains (seed %d)", n_domains, seed)
    return domains


def _make_domain(
    rng: np.random.Generator,
    name: str,
    vocab: list[list[str]],
    fillers: list[str],
    taken: set[str],
    n_users: int,
    n_items: int,
    min_len: int,
    max_len: int,
) -> Domain:
    n_topics = len(vocab)
    item_topic = rng.permutation(np.arange(n_items) % n_topics)
    brands = _pseudo_words(rng, n_topics * BRANDS_PER_TOPIC, set(taken))
    fields = []
    for topic in item_topic:
        words = rng.choice(vocab[topic], size=TITLE_TOPIC_WORDS, replace=False).tolist()
        words.insert(int(rng.integers(TITLE_TOPIC_WORDS + 1)), fillers[rng.integers(len(fillers))])
        brand = brands[topic * BRANDS_PER_TOPIC + rng.integers(BRANDS_PER_TOPIC)]
        fields.append({"title": " ".join(words).capitalize(), "brand": brand.capitalize(), "category": name})
    catalog = ItemCatalog(ids=tuple(f"{name}-i{i:05d}" for i in range(n_items)), fields=tuple(fields))

    stickiness, successor_weight = rng.uniform(0.35, 0.65), rng.uniform(0.15, 0.3)
    cycle = rng.permutation(n_topics)  # successor: one random cycle through all topics (never k itself if n > 1)
    successor = np.empty(n_topics, dtype=np.int64)
    successor[cycle] = np.roll(cycle, -1)
    transition = np.full((n_topics, n_topics), (1.0 - stickiness - successor_weight) / n_topics)
    transition[np.arange(n_topics), np.arange(n_topics)] += stickiness
    transition[np.arange(n_topics), successor] += successor_weight
    topic_cdf = np.cumsum(transition, axis=1)

    # within-topic Zipf popularity: topic_items[k] lists topic k's items, padded with -1; item_cdf the matching CDF
    skew = rng.uniform(0.6, 1.2)
    per_topic = [rng.permutation(np.flatnonzero(item_topic == k)) for k in range(n_topics)]
    width = max(len(items) for items in per_topic)
    topic_items = np.full((n_topics, width), -1, dtype=np.int64)
    item_cdf = np.ones((n_topics, width))
    for k, items in enumerate(per_topic):
        weights = np.arange(1, len(items) + 1, dtype=np.float64) ** -skew
        topic_items[k, : len(items)] = items
        item_cdf[k, : len(items)] = np.cumsum(weights / weights.sum())
    start_popularity = rng.dirichlet(np.full(n_topics, 2.0))

    lengths = rng.integers(min_len, max_len + 1, size=n_users)
    topics = _draw_categorical(rng, np.tile(np.cumsum(start_popularity), (n_users, 1)))
    steps = np.empty((n_users, max_len), dtype=np.int64)
    for t in range(max_len):
        if t:
            topics = _draw_categorical(rng, topic_cdf[topics])
        steps[:, t] = topic_items[topics, _draw_categorical(rng, item_cdf[topics])]
    sequences = [steps[u, : lengths[u]] for u in range(n_users)]
    user_ids = tuple(f"{name}-u{u:05d}" for u in range(n_users))
    return split_leave_one_out(name, catalog, sequences, user_ids)
