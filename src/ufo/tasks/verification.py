"""Face verification: BN-neck embedding, CosFace/ArcFace margin loss, 10-fold pair accuracy.

Training and test identities are disjoint. Pairs are drawn from the test identities,
deterministically from the seed, and scored by the 10-fold protocol (threshold chosen on 9
folds, accuracy on the tenth), with ROC AUC and TAR@FAR where there are enough pairs.

With `use_official_split` and a set that has its own train/test split (LFW), the samples marked
train are trained on and the others tested; when the set also has official pairs (`ImageSet.pairs`,
LFW's pairs.txt) those are scored instead of drawn pairs, and LFW's own 10 folds replace the
random ones (a single-set pairs file, with one fold, is scored with random stratified folds).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import torch

from ufo.data.dataset import ImageSet
from ufo.data.splits import check_disjoint, split_by_identity, split_official
from ufo.errors import DataError
from ufo.tasks.base import EmbeddingTask, Options, Predict, TaskData, margin_loss, register
from ufo.tasks.metrics import best_threshold, make_pairs, pair_scores, roc_points, verification_metrics

FOLDS = 10  # the protocol's folds; official pairs keep their own when they have exactly this many


class VerificationOptions(Options):
    embedding_dim: int = 128
    loss: Literal["cosface", "arcface"] = "cosface"
    margin: float = 0.35  # CosFace: cosine margin; ArcFace: degrees (pytorch-metric-learning's unit)
    scale: float = 30.0
    num_pairs: int = 3000
    k: int = 4  # images per identity in a P x K batch


@register("verification")
class Verification(EmbeddingTask):
    OptionsModel = VerificationOptions
    opts: VerificationOptions
    primary = "acc_10fold"
    uses_groups = True

    def __init__(self, name: str, options, num_classes: int, in_dim: int) -> None:
        super().__init__(name, options, num_classes, in_dim)
        o = self.opts
        self.margin = margin_loss(o.loss, num_classes, o.embedding_dim, o.margin, o.scale)

    def embedding_loss(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.margin(emb, labels)

    @classmethod
    def split(cls, ds: ImageSet, test_fraction: float, seed: int, use_official: bool) -> TaskData:
        """Identities disjoint, a random share held out; or, with `use_official` and a split, the
        samples marked train against all the others (test, query, gallery, ...), scored on the set's
        official pairs when it has them (re-indexed into the test part). A split that marks nothing
        train is an error rather than ignored: the data says how to split, and cannot be followed."""
        if use_official and ds.split is not None:
            if "train" not in set(ds.split):
                raise DataError(
                    f"{ds.name}: its split marks no sample train (its values are {sorted(set(ds.split))}); "
                    "verification trains on the samples marked train and tests on the others: mark "
                    "the training samples train, or set use_official_split: false to draw a split"
                )
            return cls._official_split(ds)
        train, test = split_by_identity(ds.replace(pairs=None), test_fraction, seed)
        train = train.relabel()
        return TaskData(
            train=train,
            eval={"test": test},
            groups=train.labels,
            notes=[f"identities disjoint, {test_fraction:.0%} held out"],
        )

    @staticmethod
    def _official_split(ds: ImageSet) -> TaskData:
        parts = split_official(ds, ["train"], rest="test")
        train, test = parts["train"].relabel(), parts["test"].relabel()
        check_disjoint(train, test, "identities")
        if ds.pairs is not None:
            if test.pairs is None or len(test.pairs) == 0:
                raise DataError(
                    f"{ds.name}: none of its {len(ds.pairs)} official pairs has both images in the "
                    "test split; use use_official_split: false to draw pairs"
                )
            lost = len(ds.pairs) - len(test.pairs)
            folds = len(np.unique(test.pairs[:, 3]))
            note = f"official train/test split, {len(test.pairs)} official pairs in {folds} fold(s)" + (
                f" ({lost} naming a training image left out)" if lost else ""
            )
            return TaskData(train=train, eval={"test": test}, groups=train.labels, notes=[note])
        ids = test.identities
        if ids is not None and bool((ids < 0).any()):
            warnings.warn(
                f"{ds.name}: left {int((ids < 0).sum())} test samples with unknown (negative) identity "
                "out of the official test split",
                stacklevel=3,
            )
            test = test.subset(ids >= 0)
        return TaskData(
            train=train,
            eval={"test": test},
            groups=train.labels,
            notes=["official train/test split, pairs drawn from the test identities"],
        )

    def pairs(self, test: ImageSet, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pairs the protocol scores, (a, b, same): the set's official pairs, else
        `num_pairs` drawn from the test identities with `seed`."""
        if test.pairs is not None and len(test.pairs):
            return test.pairs[:, 0], test.pairs[:, 1], test.pairs[:, 2]
        ids = test.identities if test.identities is not None else test.labels
        n_same_max = int(sum(c * (c - 1) // 2 for c in torch.bincount(ids - ids.min()).tolist()))
        return make_pairs(ids.numpy(), min(self.opts.num_pairs, 2 * n_same_max), seed)

    def _metrics(self, emb: torch.Tensor, test: ImageSet, seed: int) -> dict[str, float]:
        if test.pairs is not None and len(test.pairs):
            return official_pair_metrics(emb, test.pairs, seed)
        a, b, same = self.pairs(test, seed)
        return verification_metrics(emb, a, b, same, folds=FOLDS, seed=seed)

    def evaluate(self, predict: Predict, data: TaskData, seed: int = 0) -> dict[str, float]:
        test = data.eval["test"]
        return self._metrics(predict(test), test, seed)

    def curves(self, predict: Predict, data: TaskData, seed: int = 0) -> dict[str, Any]:
        """The ROC curve of the scored pairs, with the operating point of the protocol's
        threshold (the mean of the thresholds fitted on the folds) and the metrics."""
        test = data.eval["test"]
        emb = predict(test)
        m = self._metrics(emb, test, seed)
        a, b, same = self.pairs(test, seed)
        return {"figure": "roc", **roc_points(pair_scores(emb, a, b), same, m["threshold"]), "metrics": m}


def official_pair_metrics(emb: torch.Tensor, pairs: np.ndarray, seed: int = 0) -> dict[str, float]:
    """`verification_metrics` on official (a, b, same, fold) pairs. When the pairs come in exactly
    FOLDS folds (LFW's pairs.txt) the accuracy, its std and the threshold follow those folds (the
    threshold fitted on the other nine, as LFW's protocol asks) instead of random stratified ones."""
    a, b, same, fold = (pairs[:, i] for i in range(4))
    out = verification_metrics(emb, a, b, same, folds=FOLDS, seed=seed)
    folds = np.unique(fold)
    if len(folds) != FOLDS:
        return out
    scores = pair_scores(emb, a, b)  # as verification_metrics scores them
    is_same = same.astype(bool)
    accs, thresholds = [], []
    for k in folds:
        held = fold == k
        t = best_threshold(scores[~held], is_same[~held])
        accs.append(float(np.mean((scores[held] > t) == is_same[held])))
        thresholds.append(t)
    out.update(
        {
            f"acc_{FOLDS}fold": float(np.mean(accs)),
            f"acc_{FOLDS}fold_std": float(np.std(accs)),
            "threshold": float(np.mean(thresholds)),
        }
    )
    return out
