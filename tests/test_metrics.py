"""fedmerge.metrics against hand-computed ranks and Recall/NDCG values and an independent sort-based ranking."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedmerge.data.domain import Domain, ItemCatalog, as_sequences
from fedmerge.metrics import (
    EvalBatch,
    evaluate_batches,
    evaluate_scorer,
    evaluation_batches,
    history_pairs,
    metrics_from_ranks,
    metrics_from_ties,
    rank_counts,
    target_ranks,
)

# 1 / log2(r + 2) for ranks 0..2, computed by hand
INV_LOG2 = {0: 1.0, 1: 0.6309297535714575, 2: 0.5}


# --- target_ranks ----------------------------------------------------------------------------------------------


def test_ranks_with_ties_lower_index_wins() -> None:
    scores = np.array([[0.1, 0.5, 0.5, 0.2, 0.9]] * 4)
    targets = np.array([4, 1, 2, 0])
    # item 4 is alone on top; 1 and 2 tie behind it and 1 wins the tie; item 0 is last
    np.testing.assert_array_equal(target_ranks(scores, targets), [0, 1, 2, 4])


def test_constant_scorer_ranks_in_index_order() -> None:
    scores = np.zeros((3, 7))
    np.testing.assert_array_equal(target_ranks(scores, np.array([0, 3, 6])), [0, 3, 6])


def test_masking_removes_history_but_keeps_target() -> None:
    scores = np.array([[0.1, 0.5, 0.5, 0.2, 0.9]] * 3)
    targets = np.array([2, 2, 0])
    histories = [np.array([4, 1]), np.array([2, 4]), np.array([4, 4, 3])]
    # row 0: 4 and 1 removed -> rank 0; row 1: target 2 is in its history and stays, 4 removed, 1 still ties
    # ahead -> rank 1; row 2: 4 and 3 removed (repeats harmless), 1 and 2 remain above 0 -> rank 2
    np.testing.assert_array_equal(target_ranks(scores, targets, histories=histories), [0, 1, 2])
    np.testing.assert_array_equal(target_ranks(scores, targets), [2, 2, 4])  # unmasked unchanged


def test_masked_items_are_removed_even_at_minus_infinity() -> None:
    # a scorer may itself push items to -inf; a masked item must not then tie ahead of a -inf target
    scores = np.array([[-np.inf, 0.0, -np.inf]])
    assert target_ranks(scores, np.array([2]))[0] == 2
    assert target_ranks(scores, np.array([2]), histories=[np.array([0])])[0] == 1


def _rank_by_sorting(score_row: np.ndarray, target: int, history: np.ndarray | None) -> int:
    """Independent definition: position of the target in the list sorted by (-score, index), masked items dropped."""
    removed = set() if history is None else set(history.tolist()) - {target}
    kept = [i for i in range(len(score_row)) if i not in removed]
    return sorted(kept, key=lambda i: (-score_row[i], i)).index(target)


def test_ranks_match_sorting_on_random_tied_scores() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(40, 12)).astype(np.float32)  # many ties
    targets = rng.integers(0, 12, size=40)
    histories = [rng.integers(0, 12, size=rng.integers(0, 6)) for _ in range(40)]
    for r in range(0, 40, 3):
        histories[r] = np.append(histories[r], targets[r])  # some targets inside their history
    expected_unmasked = [_rank_by_sorting(scores[r], targets[r], None) for r in range(40)]
    expected_masked = [_rank_by_sorting(scores[r], targets[r], histories[r]) for r in range(40)]
    np.testing.assert_array_equal(target_ranks(scores, targets), expected_unmasked)
    np.testing.assert_array_equal(target_ranks(scores, targets, histories=histories), expected_masked)


@pytest.mark.parametrize(
    ("scores", "targets", "message"),
    [
        (np.zeros((2, 5)), np.array([0, 1, 2]), "does not match"),
        (np.zeros(5), np.array([0]), "does not match"),
        (np.array([[0.0, np.nan, 1.0]]), np.array([0]), "NaN"),
        (np.zeros((1, 5)), np.array([5]), "out of range"),
        (np.zeros((1, 5)), np.array([-1]), "out of range"),
    ],
)
def test_target_ranks_rejects_bad_input(scores: np.ndarray, targets: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        target_ranks(scores, targets)


def test_bad_histories_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="history of row 0 .* out of range"):
        target_ranks(np.zeros((1, 3)), np.array([0]), histories=[np.array([7])])
    with pytest.raises(ValueError, match="1 histories for 2 targets"):
        target_ranks(np.zeros((2, 3)), np.array([0, 1]), histories=[np.array([2])])


# --- metrics_from_ranks ----------------------------------------------------------------------------------------


def test_recall_and_ndcg_by_hand() -> None:
    out = metrics_from_ranks(np.array([0, 1, 4, 10]), ks=(1, 5, 10, 11))
    # recall@K = share of ranks < K; ndcg@K = mean of 1/log2(rank+2) over ranks < K (0 otherwise)
    # 1/log2(2) = 1, 1/log2(3) = 0.63093, 1/log2(6) = 0.38685, 1/log2(12) = 0.27894
    assert out["recall@1"] == pytest.approx(0.25) and out["ndcg@1"] == pytest.approx(0.25)
    assert out["recall@5"] == pytest.approx(0.75)
    assert out["ndcg@5"] == pytest.approx((1 + 0.6309297536 + 0.3868528072) / 4)
    assert out["recall@10"] == pytest.approx(0.75) and out["ndcg@10"] == pytest.approx(out["ndcg@5"])
    assert out["recall@11"] == pytest.approx(1.0)
    assert out["ndcg@11"] == pytest.approx((1 + 0.6309297536 + 0.3868528072 + 0.2789429456) / 4)
    assert set(metrics_from_ranks(np.array([0]), ks=(3,), suffix="_masked")) == {"recall@3_masked", "ndcg@3_masked"}


def test_metrics_need_users() -> None:
    with pytest.raises(ValueError, match="no users"):
        metrics_from_ranks(np.array([], dtype=int))


# --- expected metrics under random tie orders ------------------------------------------------------------------


def _brute_force_expected(row: np.ndarray, target: int, ks: tuple[int, ...]) -> dict[str, float]:
    """Mean Recall@K / NDCG@K over every permutation of the items, keeping those that sort by score descending:
    each order of tied items is equally likely."""
    totals = dict.fromkeys([f"{m}@{k}" for k in ks for m in ("recall", "ndcg")], 0.0)
    count = 0
    for order in itertools.permutations(range(len(row))):
        if any(row[a] < row[b] for a, b in zip(order, order[1:])):
            continue  # not a valid ranking by score
        count += 1
        rank = order.index(target)  # 0-based
        for k in ks:
            totals[f"recall@{k}"] += rank < k
            totals[f"ndcg@{k}"] += (rank < k) / np.log2(rank + 2)
    return {key: value / count for key, value in totals.items()}


def test_expected_tie_metrics_match_enumeration_of_tie_orders() -> None:
    rng = np.random.default_rng(7)
    ks = (1, 2, 3, 5)
    for _ in range(12):
        row = rng.integers(0, 3, size=6).astype(float)  # 6 items, 3 score levels: many ties
        target = int(rng.integers(6))
        higher, tied, _ = rank_counts(row[None, :], np.array([target]))
        got = metrics_from_ties(higher, tied, ks)
        expected = _brute_force_expected(row, target, ks)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (row, target, key)


def test_expected_ties_on_constant_scorer_by_hand(tiny_domain: Domain) -> None:
    """All 6 items tie: the target's rank is uniform on 1..6 whatever its id."""
    out = evaluate_scorer(lambda seqs: np.zeros((len(seqs), 6)), tiny_domain, split="test", ks=(1, 3))
    assert out["recall@1"] == pytest.approx(1 / 6) and out["recall@3"] == pytest.approx(3 / 6)
    assert out["ndcg@3"] == pytest.approx(sum(1 / np.log2(r + 1) for r in (1, 2, 3)) / 6)
    old = evaluate_scorer(lambda seqs: np.zeros((len(seqs), 6)), tiny_domain, split="test", ks=(1, 3),
                          ties="lower_index")
    assert old["recall@1"] == pytest.approx(0.5)  # targets 0 and 3: item 0 wins every tie
    with pytest.raises(ValueError, match="tie rule 'random'.*expected"):
        evaluate_scorer(RecordingScorer(), tiny_domain, ties="random")  # type: ignore[arg-type]


def test_without_ties_both_rules_agree(tiny_domain: Domain) -> None:
    assert evaluate_scorer(RecordingScorer(), tiny_domain, split="val") == evaluate_scorer(
        RecordingScorer(), tiny_domain, split="val", ties="lower_index")


# --- evaluate_scorer on a hand-made domain ---------------------------------------------------------------------

FIXED_SCORES = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])  # unmasked rank of item t is 5 - t


@pytest.fixture
def tiny_domain() -> Domain:
    catalog = ItemCatalog(ids=tuple("abcdef"), fields=tuple({"title": f"item {c}"} for c in "abcdef"))
    return Domain(
        name="tiny",
        catalog=catalog,
        train=as_sequences([[5, 1], [3], [0], [4, 2]]),
        val_target=np.array([2, 5, -1, 1]),
        test_target=np.array([0, 3, -1, -1]),
    )


class RecordingScorer:
    """Scores every item by FIXED_SCORES and records the input sequences it was given."""

    def __init__(self) -> None:
        self.inputs: list[list[int]] = []

    def __call__(self, seqs: list[np.ndarray]) -> np.ndarray:
        self.inputs.extend(s.tolist() for s in seqs)
        return np.tile(FIXED_SCORES, (len(seqs), 1))


def test_evaluate_test_split(tiny_domain: Domain) -> None:
    scorer = RecordingScorer()
    out = evaluate_scorer(scorer, tiny_domain, split="test", ks=(1, 3))
    # test users 0 and 1 (user 2 has no targets, user 3 no test target); input = train + val
    assert scorer.inputs == [[5, 1, 2], [3, 5]]
    assert out["users"] == 2
    # unmasked ranks: target 0 -> 5, target 3 -> 2
    assert out["recall@1"] == 0.0 and out["recall@3"] == pytest.approx(0.5)
    assert out["ndcg@3"] == pytest.approx(INV_LOG2[2] / 2)
    # masked: user 0 drops 5, 1, 2 -> 4 and 3 above 0 -> rank 2; user 1 keeps its target 3, drops 5 -> rank 1
    assert out["recall@1_masked"] == 0.0 and out["recall@3_masked"] == pytest.approx(1.0)
    assert out["ndcg@3_masked"] == pytest.approx((INV_LOG2[2] + INV_LOG2[1]) / 2)


def test_evaluate_val_split(tiny_domain: Domain) -> None:
    scorer = RecordingScorer()
    out = evaluate_scorer(scorer, tiny_domain, split="val", ks=(1, 3))
    assert scorer.inputs == [[5, 1], [3], [4, 2]]  # input = train only
    assert out["users"] == 3
    # unmasked ranks of targets 2, 5, 1: 3, 0, 4; masked: 2 (5, 1 dropped), 0, 2 (4, 2 dropped)
    assert out["recall@1"] == pytest.approx(1 / 3) and out["recall@3"] == pytest.approx(1 / 3)
    assert out["ndcg@3"] == pytest.approx(1 / 3)
    assert out["recall@3_masked"] == pytest.approx(1.0)
    assert out["ndcg@3_masked"] == pytest.approx((INV_LOG2[2] + INV_LOG2[0] + INV_LOG2[2]) / 3)


def test_max_len_truncates_scorer_input_but_not_the_mask(tiny_domain: Domain) -> None:
    scorer = RecordingScorer()
    out = evaluate_scorer(scorer, tiny_domain, split="test", ks=(3,), max_len=2, batch_size=1)
    assert scorer.inputs == [[1, 2], [3, 5]]
    full = evaluate_scorer(RecordingScorer(), tiny_domain, split="test", ks=(3,))
    assert out == full  # masking still uses the whole input (item 5 of user 0 stays removed)


def test_prepared_batches_serve_many_models_with_the_same_results(tiny_domain: Domain) -> None:
    batches = evaluation_batches(tiny_domain, "test", max_len=2, batch_size=1)
    assert [b.inputs[0].tolist() for b in batches] == [[1, 2], [3, 5]]
    scorers = {"fixed": lambda seqs: np.tile(FIXED_SCORES, (len(seqs), 1)),
               "reversed": lambda seqs: np.tile(FIXED_SCORES[::-1].copy(), (len(seqs), 1))}
    for scorer in scorers.values():
        assert evaluate_batches(scorer, batches, tiny_domain.n_items, ks=(1, 3)) == evaluate_scorer(
            scorer, tiny_domain, "test", ks=(1, 3), max_len=2, batch_size=1)
    with pytest.raises(ValueError, match="no users .*'tiny'.*train|split"):
        evaluation_batches(tiny_domain, "train")  # type: ignore[arg-type]


def test_evaluating_no_batches_or_only_empty_ones_names_the_missing_users() -> None:
    """evaluate_batches(scorer, []) raised a TypeError from inside metrics_from_ties ('tied' missing)."""
    called = []
    scorer = lambda seqs: called.append(seqs) or np.zeros((len(seqs), 3))  # noqa: E731
    empty = EvalBatch([], np.array([], dtype=np.int64), history_pairs([], np.array([], dtype=np.int64), 3))
    for batches in ([], [empty]):
        with pytest.raises(ValueError, match="no users to evaluate"):
            evaluate_batches(scorer, batches, 3, ks=(1,))
    assert called == []  # refused before any scoring


def test_history_pairs_are_distinct_and_leave_out_the_target() -> None:
    rows, items = history_pairs([np.array([3, 1, 3, 2]), np.array([]), np.array([0, 0])], np.array([2, 1, 4]), 5)
    assert list(zip(rows.tolist(), items.tolist())) == [(0, 1), (0, 3), (2, 0)]


def test_batching_does_not_change_results(tiny_domain: Domain) -> None:
    one = evaluate_scorer(RecordingScorer(), tiny_domain, split="val", ks=(1, 2, 3), batch_size=1)
    two = evaluate_scorer(RecordingScorer(), tiny_domain, split="val", ks=(1, 2, 3), batch_size=2)
    assert one == two


def test_scores_follow_the_input(tiny_domain: Domain) -> None:
    """A scorer that puts the last input item first hits every val target that repeats the last item."""
    domain = Domain(
        name="repeat",
        catalog=tiny_domain.catalog,
        train=as_sequences([[1, 4], [2], [0, 3]]),
        val_target=np.array([4, 2, 1]),
        test_target=np.array([-1, -1, -1]),
    )

    def last_item_first(seqs: list[np.ndarray]) -> np.ndarray:
        scores = np.zeros((len(seqs), domain.n_items))
        scores[np.arange(len(seqs)), [s[-1] for s in seqs]] = 1.0
        return scores

    out = evaluate_scorer(last_item_first, domain, split="val", ks=(1,), ties="lower_index")
    # users 0, 1 repeat their last item; user 2's target 1 ranks 2 (3 scores higher, 0 ties first)
    assert out["recall@1"] == pytest.approx(2 / 3)
    # masked: repeated targets stay; user 2 loses 0 and 3 from the ranking, so its target 1 moves to rank 0
    assert out["recall@1_masked"] == pytest.approx(1.0)
    expected = evaluate_scorer(last_item_first, domain, split="val", ks=(1,))
    assert expected["recall@1"] == pytest.approx(2 / 3)  # user 2: 3 scores higher, no chance at rank 1
    # masked: user 2's target 1 ties with 2, 4 and 5 at the top: rank 1 with probability 1/4
    assert expected["recall@1_masked"] == pytest.approx((1 + 1 + 1 / 4) / 3)


@pytest.mark.parametrize(
    ("scorer", "message"),
    [
        (lambda seqs: np.zeros((len(seqs), 5)), r"scorer returned shape \(\d, 5\), expected \(\d, 6\)"),
        (lambda seqs: np.zeros((len(seqs) + 1, 6)), "scorer returned shape"),
        (lambda seqs: np.full((len(seqs), 6), np.nan), "NaN"),
    ],
)
def test_evaluate_rejects_bad_scores(tiny_domain: Domain, scorer, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_scorer(scorer, tiny_domain, split="test")


def test_evaluate_rejects_bad_arguments(tiny_domain: Domain) -> None:
    with pytest.raises(ValueError, match="max_len"):
        evaluate_scorer(RecordingScorer(), tiny_domain, max_len=0)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_scorer(RecordingScorer(), tiny_domain, batch_size=0)
    with pytest.raises(ValueError, match="split"):
        evaluate_scorer(RecordingScorer(), tiny_domain, split="train")  # type: ignore[arg-type]


def test_evaluate_without_users_names_the_split(tiny_domain: Domain) -> None:
    no_test = Domain(
        name="novals",
        catalog=tiny_domain.catalog,
        train=tiny_domain.train,
        val_target=tiny_domain.val_target,
        test_target=np.full(4, -1),
    )
    with pytest.raises(ValueError, match="no users .*'novals'.*test"):
        evaluate_scorer(RecordingScorer(), no_test, split="test")
