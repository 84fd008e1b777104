"""Face verification: BN-neck embedding, CosFace/ArcFace margin loss, 10-fold pair accuracy.

Training and test identities are disjoint. Pairs are drawn from the test identities,
deterministically from the seed, and scored by the 10-fold protocol (threshold chosen on 9
folds, accuracy on the tenth), with ROC AUC and TAR@FAR where there are enough pairs.
"""

from __future__ import annotations

from typing import Literal

import torch

from ufo.data.dataset import ImageSet
from ufo.data.splits import split_by_identity
from ufo.tasks.base import EmbeddingTask, Options, Predict, TaskData, margin_loss, register
from ufo.tasks.metrics import make_pairs, verification_metrics


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
    primary = "acc_10fold"
    uses_groups = True

    def __init__(self, name: str, options, num_classes: int, in_dim: int) -> None:
        super().__init__(name, options, num_classes, in_dim)
        o = self.opts
        self.margin = margin_loss(o.loss, num_classes, o.embedding_dim, o.margin, o.scale)

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # float32: PML casts its class centres to the embedding dtype, which breaks under autocast.
        return self.margin(self.embed(features).float(), labels)

    @classmethod
    def split(cls, ds: ImageSet, test_fraction: float, seed: int, use_official: bool) -> TaskData:
        train, test = split_by_identity(ds, test_fraction, seed)
        train = train.relabel()
        return TaskData(train=train, eval={"test": test}, groups=train.labels,
                        notes=[f"identities disjoint, {test_fraction:.0%} held out"])

    def evaluate(self, predict: Predict, data: TaskData, seed: int = 0) -> dict[str, float]:
        test = data.eval["test"]
        ids = test.identities if test.identities is not None else test.labels
        n_same_max = int(sum(c * (c - 1) // 2 for c in torch.bincount(ids - ids.min()).tolist()))
        num_pairs = min(self.opts.num_pairs, 2 * n_same_max)
        a, b, same = make_pairs(ids.numpy(), num_pairs, seed)
        return verification_metrics(predict(test), a, b, same, folds=10, seed=seed)
