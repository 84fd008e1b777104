"""Evaluation protocols of the four task kinds, as pure functions on embeddings and labels.

Every function accepts torch tensors or numpy arrays, compares embeddings by cosine similarity
(rows are L2-normalised first), and returns a dict of Python floats whose keys are stable: they
become report columns. Library code computes the metric wherever one exists (torchmetrics for
top-k accuracy, scikit-learn for ROC, pytorch-metric-learning for MAP@R); what they lack (the
k-fold threshold protocol, CMC with the Market-1501 camera filter, metric-learning Recall@K) is
written here and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold
from torchmetrics.functional.classification import multiclass_accuracy

from ufo.errors import DataError

# TAR is reported at these FARs, each only when there are at least 1/FAR negative pairs.
FAR_LEVELS: tuple[str, ...] = ("1e-1", "1e-2", "1e-3", "1e-4", "1e-5", "1e-6")
_CHUNK = 1024  # query rows per similarity block: bounds memory at _CHUNK x gallery

ArrayLike = Any  # torch.Tensor | np.ndarray | a nested sequence


# ---------------------------------------------------------------------------- input checks
def _embeddings(x: ArrayLike, name: str) -> torch.Tensor:
    """[N, D] float tensor, finite, rows L2-normalised (so a dot product is cosine)."""
    t = torch.as_tensor(x).detach()
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise DataError(f"{name} must be a 2-D [N, D] array with N, D >= 1; got shape {tuple(t.shape)}")
    if t.dtype != torch.float64:
        t = t.float()
    if not torch.isfinite(t).all():
        raise DataError(f"{name} contains NaN or infinite values")
    return F.normalize(t, dim=1)


def _vector(x: ArrayLike, name: str) -> np.ndarray:
    """A 1-D numpy array (labels, ids, cameras, indices)."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 1:
        raise DataError(f"{name} must be 1-D; got shape {a.shape}")
    return a


def _same_length(n: int, a: np.ndarray, name: str, ref: str) -> None:
    if len(a) != n:
        raise DataError(f"{name} has {len(a)} entries but {ref} has {n}")


def _encode(*arrays: np.ndarray) -> list[np.ndarray]:
    """Map labels of any type (ints, strings) to int64 codes shared across the arrays."""
    codes = np.unique(np.concatenate(arrays), return_inverse=True)[1].reshape(-1).astype(np.int64)
    out, start = [], 0
    for a in arrays:
        out.append(codes[start : start + len(a)])
        start += len(a)
    return out


# ---------------------------------------------------------------------------- classification
def classification_metrics(logits: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Micro top-1 accuracy (and top-5 when there are >= 5 classes), via torchmetrics."""
    lg = torch.as_tensor(logits).detach()
    if lg.ndim != 2 or lg.shape[0] == 0 or lg.shape[1] == 0:
        raise DataError(f"logits must be 2-D [N, num_classes]; got shape {tuple(lg.shape)}")
    y = _vector(labels, "labels")
    _same_length(lg.shape[0], y, "labels", "logits")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be integer class indices; got dtype {y.dtype}")
    c = lg.shape[1]
    if y.min() < 0 or y.max() >= c:
        raise DataError(f"labels must lie in [0, {c}) for {c} logits; got range [{y.min()}, {y.max()}]")
    yt = torch.as_tensor(y, dtype=torch.long, device=lg.device)
    lg = lg.float()
    out = {"top1": float(multiclass_accuracy(lg, yt, num_classes=c, average="micro", top_k=1))}
    if c >= 5:
        out["top5"] = float(multiclass_accuracy(lg, yt, num_classes=c, average="micro", top_k=5))
    return out


def confusion(
    logits: ArrayLike, labels: ArrayLike, class_names: Sequence[str] | None = None, max_classes: int = 30
) -> dict[str, Any]:
    """Confusion matrix of argmax predictions (scikit-learn's `confusion_matrix`, rows = true
    class). With more than `max_classes` classes only the ones with the most errors (as true or
    predicted class) are kept, in class order. Keys: classes (names), matrix (counts), kept, total."""
    lg = torch.as_tensor(logits).detach().float()
    y = _vector(labels, "labels")
    c = lg.shape[1]
    m = confusion_matrix(y, lg.argmax(1).cpu().numpy(), labels=np.arange(c))
    keep = np.arange(c)
    if c > max_classes:
        errors = m.sum(0) + m.sum(1) - 2 * np.diag(m)
        keep = np.sort(np.argsort(-errors, kind="stable")[:max_classes])
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    return {
        "classes": [names[i] for i in keep],
        "matrix": m[np.ix_(keep, keep)].tolist(),
        "kept": len(keep),
        "total": c,
    }


# ---------------------------------------------------------------------------- verification
def make_pairs(identities: ArrayLike, num_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw `num_pairs` distinct image pairs, half same-identity and half different when possible.

    Pairs are uniform over all same (resp. different) pairs, without repeats, and depend only on
    `identities` and `seed`. If fewer same pairs exist than half, the rest are different pairs.
    Returns (idx_a, idx_b, is_same), shuffled, with idx_a < idx_b.
    """
    codes = _encode(_vector(identities, "identities"))[0]
    n = len(codes)
    if num_pairs < 2:
        raise DataError(f"num_pairs must be >= 2 (one same and one different pair); got {num_pairs}")
    counts = np.bincount(codes)
    total_same = int((counts * (counts - 1) // 2).sum())
    if total_same == 0:
        raise DataError(
            f"make_pairs: no identity has two or more images ({n} images, {len(counts)} identities), "
            "so no same-identity pair can be made"
        )
    total_diff = n * (n - 1) // 2 - total_same
    num_same = min(num_pairs // 2, total_same)
    num_diff = num_pairs - num_same
    if num_diff > total_diff:
        raise DataError(
            f"make_pairs: num_pairs={num_pairs} needs {num_diff} different-identity pairs but only "
            f"{total_diff} exist ({n} images, {len(counts)} identities)"
        )
    rng = np.random.default_rng(seed)
    same = _sample_same(codes, counts, num_same, total_same, rng)
    diff = _sample_diff(codes, num_diff, total_diff, rng)
    keys = np.concatenate([same, diff])
    is_same = np.concatenate([np.ones(len(same), bool), np.zeros(len(diff), bool)])
    perm = rng.permutation(len(keys))
    keys, is_same = keys[perm], is_same[perm]
    return (keys // n).astype(np.int64), (keys % n).astype(np.int64), is_same


def _take_unique(draw, num: int) -> np.ndarray:
    """Rejection-sample `num` distinct pair keys from `draw(batch) -> keys`, keeping draw order."""
    seen: dict[int, None] = {}
    while len(seen) < num:
        for k in draw(2 * (num - len(seen)) + 16).tolist():
            seen.setdefault(k, None)
            if len(seen) == num:
                break
    return np.fromiter(seen, dtype=np.int64, count=num)


def _sample_same(codes: np.ndarray, counts: np.ndarray, num: int, total: int, rng: np.random.Generator) -> np.ndarray:
    """`num` distinct same-identity pair keys a * n + b (a < b), uniform over all such pairs."""
    n = len(codes)
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if 2 * num >= total:  # dense request: enumerate every same pair and choose without repeats
        keys = []
        for ident in np.flatnonzero(counts >= 2):
            members = order[starts[ident] : starts[ident] + counts[ident]]
            i, j = np.triu_indices(len(members), k=1)
            a, b = members[i], members[j]
            keys.append(np.minimum(a, b) * n + np.maximum(a, b))
        every = np.concatenate(keys)
        return every[rng.choice(len(every), size=num, replace=False)]
    weights = counts * (counts - 1) / 2.0
    weights /= weights.sum()

    def draw(m: int) -> np.ndarray:
        ident = rng.choice(len(counts), size=m, p=weights)
        i = rng.integers(0, counts[ident])
        j = rng.integers(0, counts[ident] - 1)
        j = j + (j >= i)  # a second, distinct member
        a, b = order[starts[ident] + i], order[starts[ident] + j]
        return np.minimum(a, b) * n + np.maximum(a, b)

    return _take_unique(draw, num)


def _sample_diff(codes: np.ndarray, num: int, total: int, rng: np.random.Generator) -> np.ndarray:
    """`num` distinct different-identity pair keys a * n + b (a < b), uniform over all such pairs."""
    n = len(codes)
    if 2 * num >= total and n * (n - 1) // 2 <= 50_000_000:  # dense request: enumerate
        a, b = np.triu_indices(n, k=1)
        keep = codes[a] != codes[b]
        keys = a[keep].astype(np.int64) * n + b[keep]
        return keys[rng.choice(len(keys), size=num, replace=False)]

    def draw(m: int) -> np.ndarray:
        a, b = rng.integers(0, n, size=m), rng.integers(0, n, size=m)
        keep = codes[a] != codes[b]
        a, b = a[keep], b[keep]
        return np.minimum(a, b) * n + np.maximum(a, b)

    return _take_unique(draw, num)


def pair_scores(emb: ArrayLike, idx_a: ArrayLike, idx_b: ArrayLike) -> np.ndarray:
    """Cosine similarity of each pair's two embeddings (float64), the score every verification
    metric thresholds."""
    return _pair_scores(_embeddings(emb, "emb"), _vector(idx_a, "idx_a"), _vector(idx_b, "idx_b"))


def _pair_scores(e: torch.Tensor, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`pair_scores` of rows already L2-normalised."""
    at = torch.as_tensor(a, dtype=torch.long, device=e.device)
    bt = torch.as_tensor(b, dtype=torch.long, device=e.device)
    return (e[at] * e[bt]).sum(1).double().cpu().numpy()


def roc_points(scores: ArrayLike, is_same: ArrayLike, threshold: float) -> dict[str, Any]:
    """The ROC curve of pair scores (scikit-learn's `roc_curve`) and the operating point of a
    threshold (predict same when score > threshold): keys fpr, tpr, auc, threshold, at_threshold."""
    s, same = np.asarray(scores, dtype=np.float64), _vector(is_same, "is_same").astype(bool)
    fpr, tpr, _ = roc_curve(same, s)
    return {
        "fpr": fpr.tolist(),
        "tpr": tpr.tolist(),
        "auc": float(roc_auc_score(same, s)),
        "threshold": threshold,
        "at_threshold": {"fpr": float(np.mean(s[~same] > threshold)), "tpr": float(np.mean(s[same] > threshold))},
    }


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """Threshold (predict same when score > t) maximising accuracy on these pairs.

    Candidates are the midpoints of the sorted unique scores plus one below and one above all
    of them; ties go to the smallest candidate. Written by hand: no library has the protocol.
    """
    u = np.unique(scores)
    cands = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2.0, [u[-1] + 1.0]])
    pos, neg = np.sort(scores[same]), np.sort(scores[~same])
    true_pos = len(pos) - np.searchsorted(pos, cands, side="right")
    true_neg = np.searchsorted(neg, cands, side="right")
    return float(cands[np.argmax(true_pos + true_neg)])


def verification_metrics(
    emb: ArrayLike,
    idx_a: ArrayLike,
    idx_b: ArrayLike,
    is_same: ArrayLike,
    folds: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """k-fold pair accuracy (threshold fitted on k-1 folds, scored on the held-out one), ROC AUC
    and TAR@FAR, with scores = cosine similarity of the two embeddings of each pair.

    Keys: f"acc_{folds}fold" and f"acc_{folds}fold_std" (mean and population std over folds),
    "threshold" (mean fitted threshold), "roc_auc", and "tar@far=1e-1", ... for each FAR in
    FAR_LEVELS with at least 1/FAR negative pairs.
    """
    e = _embeddings(emb, "emb")
    a, b = _vector(idx_a, "idx_a"), _vector(idx_b, "idx_b")
    same = _vector(is_same, "is_same").astype(bool)
    _same_length(len(a), b, "idx_b", "idx_a")
    _same_length(len(a), same, "is_same", "idx_a")
    for name, idx in (("idx_a", a), ("idx_b", b)):
        if not np.issubdtype(idx.dtype, np.integer):
            raise DataError(f"{name} must hold integer row indices into emb; got dtype {idx.dtype}")
        if len(idx) and (idx.min() < 0 or idx.max() >= e.shape[0]):
            raise DataError(f"{name} must lie in [0, {e.shape[0]}) (rows of emb); got range [{idx.min()}, {idx.max()}]")
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    if folds < 2 or min(n_pos, n_neg) < folds:
        raise DataError(
            f"verification needs folds >= 2 and at least `folds` same and different pairs; "
            f"got folds={folds}, {n_pos} same and {n_neg} different pairs"
        )
    scores = _pair_scores(e, a, b)

    accs, thresholds = [], []
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(scores, same):
        t = best_threshold(scores[train], same[train])
        accs.append(float(np.mean((scores[test] > t) == same[test])))
        thresholds.append(t)
    out = {
        f"acc_{folds}fold": float(np.mean(accs)),
        f"acc_{folds}fold_std": float(np.std(accs)),
        "threshold": float(np.mean(thresholds)),
        "roc_auc": float(roc_auc_score(same, scores)),
    }
    fpr, tpr, _ = roc_curve(same, scores)
    for far in FAR_LEVELS:
        if n_neg >= round(1.0 / float(far)):
            out[f"tar@far={far}"] = float(tpr[fpr <= float(far)].max())
    return out


# ---------------------------------------------------------------------------- re-identification
def reid_metrics(
    q_emb: ArrayLike,
    q_ids: ArrayLike,
    g_emb: ArrayLike,
    g_ids: ArrayLike,
    q_cams: ArrayLike | None = None,
    g_cams: ArrayLike | None = None,
    ranks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Query/gallery mAP and CMC@k, gallery ranked by cosine similarity (ties keep gallery order).

    With cameras, gallery entries of the query's identity seen by the query's camera are dropped
    (Market-1501 protocol); a negative camera is unknown and never the query's. Queries left with
    no match are skipped. Keys: "mAP", "cmc@{k}" for k in `ranks`, "num_queries" (scored) and
    "skipped_queries". Written by hand (vectorised): the
    per-query camera filter and CMC share one sort, and torchmetrics' retrieval AP (1.9) treats a
    relevant item scored <= 0 as irrelevant, which cosine scores hit. Tests check it against
    torchmetrics on shifted scores.
    """
    qe, ge = _embeddings(q_emb, "q_emb"), _embeddings(g_emb, "g_emb")
    if qe.shape[1] != ge.shape[1]:
        raise DataError(f"q_emb has dimension {qe.shape[1]} but g_emb has {ge.shape[1]}")
    qi, gi = _vector(q_ids, "q_ids"), _vector(g_ids, "g_ids")
    _same_length(qe.shape[0], qi, "q_ids", "q_emb")
    _same_length(ge.shape[0], gi, "g_ids", "g_emb")
    qi, gi = _encode(qi, gi)
    if (q_cams is None) != (g_cams is None):
        raise DataError("q_cams and g_cams must be given together (or both left out)")
    if q_cams is not None:
        qc, gc = _vector(q_cams, "q_cams"), _vector(g_cams, "g_cams")
        _same_length(qe.shape[0], qc, "q_cams", "q_emb")
        _same_length(ge.shape[0], gc, "g_cams", "g_emb")
        unknown_q, unknown_g = _unknown(qc), _unknown(gc)
        qc, gc = _encode(qc, gc)
        qc[unknown_q], gc[unknown_g] = -1, -2  # unequal to each other and to every known camera
    else:
        qc, gc = np.zeros(len(qi), np.int64), np.ones(len(gi), np.int64)  # never equal: no filter
    ranks = _positive_ints(ranks, "ranks")
    dev = qe.device
    ge = ge.to(device=dev, dtype=qe.dtype)
    gi_t, gc_t = torch.as_tensor(gi, device=dev), torch.as_tensor(gc, device=dev)

    aps, first_hits = [], []
    for s in range(0, len(qi), _CHUNK):
        qid = torch.as_tensor(qi[s : s + _CHUNK], device=dev)[:, None]
        qcam = torch.as_tensor(qc[s : s + _CHUNK], device=dev)[:, None]
        sim = qe[s : s + _CHUNK] @ ge.T  # (q, G)
        junk = (gi_t == qid) & (gc_t == qcam)
        match = (gi_t == qid) & ~junk
        # Dropped entries score -inf, so they sort after every kept one and the 1-based rank of
        # a kept entry is its sorted position + 1.
        order = torch.sort(sim.masked_fill(junk, -torch.inf), dim=1, descending=True, stable=True).indices
        hit = match.gather(1, order)
        n_pos = hit.sum(1)
        row, col = hit.nonzero(as_tuple=True)  # row-major: each row's hits in rank order
        start = n_pos.cumsum(0) - n_pos  # index of each row's first hit in (row, col)
        nth_hit = torch.arange(len(row), device=dev) - start[row] + 1
        precision = nth_hit.double() / (col + 1)  # precision at each hit
        ap = torch.zeros(len(n_pos), dtype=torch.float64, device=dev).index_add_(0, row, precision)
        keep = n_pos > 0
        aps.append(ap[keep] / n_pos[keep])
        first_hits.append(col[start[keep]] + 1)
    ap, first = torch.cat(aps), torch.cat(first_hits)
    if len(ap) == 0:
        raise DataError(
            f"reid_metrics: none of the {len(qi)} queries has a valid match in the gallery "
            "(same identity, and a different camera when cameras are given)"
        )
    out = {"mAP": float(ap.double().mean())}
    for k in ranks:
        out[f"cmc@{k}"] = float((first <= k).double().mean())
    out["num_queries"] = float(len(ap))
    out["skipped_queries"] = float(len(qi) - len(ap))
    return out


def _unknown(values: np.ndarray) -> np.ndarray:
    """Which entries are unknown: negative numbers (a CSV manifest's empty camera is -1)."""
    return values < 0 if np.issubdtype(values.dtype, np.number) else np.zeros(len(values), dtype=bool)


def _positive_ints(ks: Sequence[int], name: str) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise DataError(f"{name} must be a non-empty list of positive integers; got {ks}")
    return ks


# ---------------------------------------------------------------------------- retrieval
def retrieval_metrics(emb: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Leave-one-out open-set retrieval: every sample queries all the others.

    Recall@K (metric-learning definition: a same-class sample among the K nearest, written by
    hand since pytorch-metric-learning has only precision@1) and MAP@R (pytorch-metric-learning's
    AccuracyCalculator). Samples whose class has no other member cannot be answered and are
    skipped by both. Keys: "recall@{k}" for k in `ks`, "map@r", "num_queries".
    """
    e = _embeddings(emb, "emb")
    y = _vector(labels, "labels")
    _same_length(e.shape[0], y, "labels", "emb")
    ks = _positive_ints(ks, "ks")
    n = e.shape[0]
    if max(ks) > n - 1:
        raise DataError(f"ks must be <= {n - 1} (the other samples each query can see); got {ks}")
    codes = _encode(y)[0]
    counts = np.bincount(codes)
    answerable = counts[codes] >= 2
    if not answerable.any():
        raise DataError(f"retrieval_metrics: no class among {n} samples has two members, so no query has an answer")
    yt = torch.as_tensor(codes, device=e.device)

    hits = []
    for s in range(0, n, _CHUNK):
        sim = e[s : s + _CHUNK] @ e.T
        rows = torch.arange(sim.shape[0], device=e.device)
        sim[rows, rows + s] = -torch.inf  # the query itself is never its own neighbour
        nn_idx = sim.topk(max(ks), dim=1).indices
        hits.append(yt[nn_idx] == yt[s : s + _CHUNK, None])
    hit = torch.cat(hits)[torch.as_tensor(answerable, device=e.device)]
    out = {f"recall@{k}": float(hit[:, :k].any(1).double().mean()) for k in ks}

    calc = AccuracyCalculator(
        include=("mean_average_precision_at_r",),
        k="max_bin_count",
        device=e.device,
        knn_func=CustomKNN(CosineSimilarity(), batch_size=_CHUNK),
    )
    out["map@r"] = float(calc.get_accuracy(e, yt)["mean_average_precision_at_r"])
    out["num_queries"] = float(answerable.sum())
    return out


# ---------------------------------------------------------------------------- few-shot
def one_shot_accuracy(
    support_emb: ArrayLike, support_labels: ArrayLike, query_emb: ArrayLike, query_labels: ArrayLike
) -> float:
    """Nearest-neighbour (cosine) classification accuracy of queries against a labelled support
    set, as in Omniglot's 20-way one-shot runs."""
    se, qe = _embeddings(support_emb, "support_emb"), _embeddings(query_emb, "query_emb")
    if se.shape[1] != qe.shape[1]:
        raise DataError(f"support_emb has dimension {se.shape[1]} but query_emb has {qe.shape[1]}")
    sy, qy = _vector(support_labels, "support_labels"), _vector(query_labels, "query_labels")
    _same_length(se.shape[0], sy, "support_labels", "support_emb")
    _same_length(qe.shape[0], qy, "query_labels", "query_emb")
    sy, qy = _encode(sy, qy)
    nearest = (qe @ se.to(device=qe.device, dtype=qe.dtype).T).argmax(1).cpu().numpy()
    return float(np.mean(sy[nearest] == qy))
