"""Evaluation protocols on hand-built cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.retrieval import retrieval_average_precision

from ufo.errors import DataError
from ufo.tasks.metrics import (
    classification_metrics,
    make_pairs,
    one_shot_accuracy,
    reid_metrics,
    retrieval_metrics,
    verification_metrics,
)


def unit(angles_deg) -> np.ndarray:
    """2-D unit vectors at these angles: cosine similarity falls as the angle gap grows."""
    r = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    return np.stack([np.cos(r), np.sin(r)], axis=1)


# ---------------------------------------------------------------------------- classification
def test_classification_top1_top5() -> None:
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [1, 0.5, 0, -1, -2, -3]])
    labels = np.array([0, 0, 5, 1])  # right, last of 6 (not in top 5), right, 2nd (in top 5)
    out = classification_metrics(logits, labels)
    assert set(out) == {"top1", "top5"}
    assert out["top1"] == pytest.approx(0.5)
    assert out["top5"] == pytest.approx(0.75)
    assert all(type(v) is float for v in out.values())


def test_classification_no_top5_below_five_classes() -> None:
    out = classification_metrics(np.array([[1.0, 0, 0], [0, 0, 1]]), torch.tensor([0, 1]))
    assert out == {"top1": pytest.approx(0.5)}


def test_classification_bad_input() -> None:
    with pytest.raises(DataError, match="labels has 3 entries but logits has 2"):
        classification_metrics(torch.zeros(2, 3), [0, 1, 2])
    with pytest.raises(DataError, match=r"\[0, 3\)"):
        classification_metrics(torch.zeros(2, 3), [0, 3])


# ---------------------------------------------------------------------------- pairs
def test_make_pairs_balanced_valid_and_deterministic() -> None:
    ids = np.repeat(np.arange(30), 4)
    a, b, same = make_pairs(ids, 200, seed=3)
    assert len(a) == len(b) == len(same) == 200
    assert same.sum() == 100
    assert np.all(a < b)
    assert np.array_equal(ids[a] == ids[b], same)
    assert len(set(zip(a.tolist(), b.tolist()))) == 200  # no repeated pair
    a2, b2, same2 = make_pairs(ids, 200, seed=3)
    assert np.array_equal(a, a2) and np.array_equal(b, b2) and np.array_equal(same, same2)
    a3, b3, _ = make_pairs(ids, 200, seed=4)
    assert not (np.array_equal(a, a3) and np.array_equal(b, b3))


def test_make_pairs_singletons_only_in_different_pairs() -> None:
    ids = np.array(["x", "x", "y", "z", "w"])  # only one same pair exists: (0, 1)
    a, b, same = make_pairs(ids, 6, seed=0)
    assert same.sum() == 1 and (a[same][0], b[same][0]) == (0, 1)
    assert np.all(ids[a[~same]] != ids[b[~same]])
    with pytest.raises(DataError, match="no identity has two or more images"):
        make_pairs(np.arange(10), 10, seed=0)
    with pytest.raises(DataError, match="different-identity pairs"):
        make_pairs(np.array([0, 0, 1]), 10, seed=0)


def test_make_pairs_enumerates_when_dense() -> None:
    ids = np.repeat(np.arange(4), 3)  # 12 same pairs, 54 different ones
    a, b, same = make_pairs(ids, 60, seed=1)
    assert same.sum() == 12 and (~same).sum() == 48
    assert len(set(zip(a.tolist(), b.tolist()))) == 60


# ---------------------------------------------------------------------------- verification
def test_verification_perfect_embeddings() -> None:
    ids = np.repeat(np.arange(20), 5)
    emb = np.eye(20)[ids]
    out = verification_metrics(emb, *make_pairs(ids, 400, seed=0))
    assert out["acc_10fold"] == 1.0 and out["acc_10fold_std"] == 0.0
    assert out["roc_auc"] == 1.0
    assert 0.0 < out["threshold"] < 1.0
    assert out["tar@far=1e-1"] == 1.0 and out["tar@far=1e-2"] == 1.0
    assert "tar@far=1e-3" not in out  # only 200 negative pairs


def test_verification_ten_fold_by_hand() -> None:
    # 10 same pairs with scores cos(10..55 deg), 9 different pairs at cos(80..160 deg), and one
    # different pair at cos(2 deg) that beats every same pair. Stratified folds hold one pair of
    # each kind: the fold with the outlier scores 1/2, the other nine score 1 (the outlier is the
    # only training error there). Mean 0.95, population std 0.15. AUC = 90/100.
    pos = 10.0 + 5.0 * np.arange(10)
    neg = np.concatenate([[2.0], 80.0 + 10.0 * np.arange(9)])
    gaps = np.concatenate([pos, neg])
    emb = np.concatenate([unit(np.zeros(20)), unit(gaps)])
    idx_a, idx_b = np.arange(20), np.arange(20) + 20
    same = np.arange(20) < 10
    out = verification_metrics(emb, idx_a, idx_b, same, folds=10, seed=0)
    assert out["acc_10fold"] == pytest.approx(0.95)
    assert out["acc_10fold_std"] == pytest.approx(0.15)
    assert out["roc_auc"] == pytest.approx(0.9)
    # 10 negatives: FAR 1e-1 allows the outlier alone, and every same pair is above the rest.
    assert out["tar@far=1e-1"] == 1.0
    assert "tar@far=1e-2" not in out
    # Any seed gives the same answer: it does not depend on how pairs fall into folds.
    assert verification_metrics(torch.tensor(emb), idx_a, idx_b, same, seed=7)["acc_10fold"] == pytest.approx(0.95)


def test_verification_random_embeddings_near_chance() -> None:
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(100), 10)
    emb = rng.standard_normal((len(ids), 64))
    out = verification_metrics(emb, *make_pairs(ids, 2000, seed=0))
    assert abs(out["roc_auc"] - 0.5) < 0.07
    assert out["acc_10fold"] < 0.6


def test_verification_bad_input() -> None:
    emb = np.eye(4)
    with pytest.raises(DataError, match="is_same has 3 entries but idx_a has 2"):
        verification_metrics(emb, [0, 1], [2, 3], [True, False, True])
    with pytest.raises(DataError, match=r"idx_b must lie in \[0, 4\)"):
        verification_metrics(emb, [0, 1], [2, 4], [True, False])
    with pytest.raises(DataError, match="at least `folds` same and different pairs"):
        verification_metrics(emb, [0, 1], [2, 3], [True, False])


# ---------------------------------------------------------------------------- re-identification
def _reid_case():
    """One query (id 1, camera 0) at 0 deg; gallery ranked [wrong, right, wrong, right]."""
    g_emb = unit([10, 20, 30, 40])
    g_ids = np.array([2, 1, 3, 1])
    g_cams = np.array([1, 0, 1, 1])  # the first right answer was seen by the query's camera
    return unit([0]), np.array([1]), g_emb, g_ids, np.array([0]), g_cams


def test_reid_by_hand() -> None:
    q_emb, q_ids, g_emb, g_ids, _, _ = _reid_case()
    out = reid_metrics(q_emb, q_ids, g_emb, g_ids)
    assert out["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert out["cmc@1"] == 0.0 and out["cmc@5"] == 1.0
    assert out["num_queries"] == 1.0 and out["skipped_queries"] == 0.0


def test_reid_camera_filter_changes_result() -> None:
    q_emb, q_ids, g_emb, g_ids, q_cams, g_cams = _reid_case()
    # Dropping the same-camera match leaves [wrong, wrong, right]: AP = 1/3, first hit at rank 3.
    out = reid_metrics(q_emb, q_ids, g_emb, g_ids, q_cams, g_cams, ranks=(1, 2, 3))
    assert out["mAP"] == pytest.approx(1 / 3)
    assert (out["cmc@1"], out["cmc@2"], out["cmc@3"]) == (0.0, 0.0, 1.0)


def test_reid_skips_queries_without_valid_match() -> None:
    q_emb, _q_ids, g_emb, g_ids, _q_cams, g_cams = _reid_case()
    q_emb2 = np.concatenate([q_emb, unit([15])])
    q_ids2, q_cams2 = np.array([1, 2]), np.array([0, 1])  # id 2 was only seen by camera 1
    out = reid_metrics(q_emb2, q_ids2, g_emb, g_ids, q_cams2, g_cams)
    assert out["num_queries"] == 1.0 and out["skipped_queries"] == 1.0
    assert out["mAP"] == pytest.approx(1 / 3)
    with pytest.raises(DataError, match="none of the 1 queries"):
        reid_metrics(unit([15]), [2], g_emb, g_ids, [1], g_cams)


def test_reid_perfect_embeddings_and_torchmetrics_agreement() -> None:
    ids = np.repeat(np.arange(8), 4)
    out = reid_metrics(np.eye(8)[ids[::4]], ids[::4], np.eye(8)[ids], ids)
    assert out["mAP"] == 1.0 and out["cmc@1"] == 1.0 and out["cmc@5"] == 1.0

    rng = np.random.default_rng(1)
    q, g = torch.tensor(rng.standard_normal((20, 8))), torch.tensor(rng.standard_normal((50, 8)))
    q_ids, g_ids = rng.integers(0, 5, 20), rng.integers(0, 5, 50)
    # torchmetrics 1.9 counts a relevant item with score <= 0 as irrelevant, so shift the cosine
    # scores (a monotone change) into (1, 3) before comparing.
    sim = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(g, dim=1).T + 2.0
    expected = [
        float(retrieval_average_precision(sim[i], torch.as_tensor(g_ids == q_ids[i])))
        for i in range(20)
        if (g_ids == q_ids[i]).any()
    ]
    assert reid_metrics(q, q_ids, g, g_ids)["mAP"] == pytest.approx(np.mean(expected), abs=1e-6)

    # With cameras: drop each query's same-identity same-camera entries, then compare per query.
    q_cams, g_cams = rng.integers(0, 3, 20), rng.integers(0, 3, 50)
    aps, firsts = [], []
    for i in range(20):
        kept = ~((g_ids == q_ids[i]) & (g_cams == q_cams[i]))
        rel = torch.as_tensor((g_ids == q_ids[i])[kept])
        if rel.any():
            aps.append(float(retrieval_average_precision(sim[i][torch.as_tensor(kept)], rel)))
            firsts.append(int(torch.nonzero(rel[sim[i][torch.as_tensor(kept)].argsort(descending=True)])[0]) + 1)
    out = reid_metrics(q, q_ids, g, g_ids, q_cams, g_cams, ranks=(1, 3))
    assert out["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)
    assert out["cmc@1"] == pytest.approx(np.mean(np.array(firsts) <= 1))
    assert out["cmc@3"] == pytest.approx(np.mean(np.array(firsts) <= 3))
    assert out["num_queries"] + out["skipped_queries"] == 20


def test_reid_bad_input() -> None:
    with pytest.raises(DataError, match="g_ids has 3 entries but g_emb has 4"):
        reid_metrics(unit([0]), [1], unit([1, 2, 3, 4]), [1, 2, 3])
    with pytest.raises(DataError, match="must be given together"):
        reid_metrics(unit([0]), [1], unit([1, 2]), [1, 2], q_cams=[0])
    with pytest.raises(DataError, match="q_emb has dimension 3 but g_emb has 2"):
        reid_metrics(np.ones((1, 3)), [1], unit([1, 2]), [1, 2])


# ---------------------------------------------------------------------------- retrieval
def test_retrieval_perfect_embeddings() -> None:
    labels = np.repeat(np.arange(5), 4)
    out = retrieval_metrics(np.eye(5)[labels], labels)
    assert out == {"recall@1": 1.0, "recall@5": 1.0, "map@r": 1.0, "num_queries": 20.0}


def test_retrieval_by_hand_excludes_the_query() -> None:
    # labels A A B B at 0, 12, 5, 90 deg. Nearest others: 0 -> 5(B), 12(A); 12 -> 5(B), 0(A);
    # 5 -> 0(A), 12(A), 90(B); 90 -> 12(A), 5(B). Recall@1 = 0, Recall@2 = 3/4; R = 1 for every
    # query and no first neighbour is right, so MAP@R = 0. Were the query its own neighbour,
    # recall@1 would be 1.
    out = retrieval_metrics(torch.tensor(unit([0, 12, 5, 90])), ["A", "A", "B", "B"], ks=(1, 2))
    assert out == {"recall@1": 0.0, "recall@2": 0.75, "map@r": 0.0, "num_queries": 4.0}


def test_retrieval_map_at_r_partial() -> None:
    # Class A at 0, 9, 30 deg, class B at 20, 100, 110 deg. R = 2 for every query, and
    # AP@R = (1/R) * sum over the first R neighbours of precision@i at each hit.
    emb = unit([0, 9, 30, 20, 100, 110])
    labels = np.array([0, 0, 0, 1, 1, 1])
    # 0 -> 9(A), 20(B): 1/2.   9 -> 0(A) d9, 20(B) d11: 1/2.   30 -> 20(B) d10, 9(A) d21: (1/2)/2.
    # 20 -> 30(A) d10, 9(A) d11: 0.   100 -> 110(B) d10, 30(A) d70: 1/2.   110 -> 100(B), 30(A): 1/2.
    out = retrieval_metrics(emb, labels, ks=(1, 2))
    assert out["map@r"] == pytest.approx(2.25 / 6)
    assert out["recall@1"] == pytest.approx(4 / 6)
    assert out["recall@2"] == pytest.approx(5 / 6)


def test_retrieval_random_embeddings_near_chance() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(50), 10)
    out = retrieval_metrics(rng.standard_normal((500, 64)), labels)
    assert out["recall@1"] < 0.3 and out["map@r"] < 0.1


def test_retrieval_bad_input() -> None:
    with pytest.raises(DataError, match="labels has 2 entries but emb has 3"):
        retrieval_metrics(np.eye(3), [0, 1])
    with pytest.raises(DataError, match="no class among 3 samples has two members"):
        retrieval_metrics(np.eye(3), [0, 1, 2], ks=(1,))
    with pytest.raises(DataError, match="ks must be <= 2"):
        retrieval_metrics(np.eye(3), [0, 0, 1], ks=(1, 5))
    with pytest.raises(DataError, match="NaN"):
        retrieval_metrics(np.full((3, 2), math.nan), [0, 0, 1], ks=(1,))


# ---------------------------------------------------------------------------- one-shot
def test_one_shot_accuracy() -> None:
    support = unit([0, 90, 180, 270])
    queries = unit([10, 100, 170, 300, 50])  # the last is nearer 90 deg but labelled 0
    acc = one_shot_accuracy(support, [0, 1, 2, 3], torch.tensor(queries), np.array([0, 1, 2, 3, 0]))
    assert acc == pytest.approx(4 / 5)
    assert type(acc) is float
    with pytest.raises(DataError, match="query_labels has 4 entries but query_emb has 5"):
        one_shot_accuracy(support, [0, 1, 2, 3], queries, [0, 1, 2, 3])
