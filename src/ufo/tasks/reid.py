"""Instance re-identification (e.g. a traffic sign seen over a track of frames).

BN-neck embedding trained with a margin loss plus a batch-hard triplet loss on P x K batches.
Identities are disjoint from training; each test identity gives query images, the rest of its
images form the gallery. A set with its own train / query / gallery split (Market-1501) is used
as given when `use_official_split` is on. Reports mAP and CMC rank-1/5.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch

from ufo.data.dataset import ImageSet
from ufo.data.splits import split_by_identity, split_official, split_query_gallery
from ufo.tasks.base import EmbeddingTask, Options, Predict, TaskData, margin_loss, register
from ufo.tasks.metrics import reid_metrics

CMC_RANKS = 20  # the CMC curve's last rank


class ReidOptions(Options):
    embedding_dim: int = 128
    loss: Literal["cosface", "arcface"] = "cosface"
    margin: float = 0.35
    scale: float = 30.0
    triplet_margin: float = 0.3
    triplet_weight: float = 1.0
    queries_per_identity: int = 1
    k: int = 4


@register("reid")
class Reid(EmbeddingTask):
    OptionsModel = ReidOptions
    opts: ReidOptions
    primary = "mAP"
    uses_groups = True

    def __init__(self, name: str, options, num_classes: int, in_dim: int) -> None:
        from pytorch_metric_learning import losses, miners

        super().__init__(name, options, num_classes, in_dim)
        o = self.opts
        self.margin = margin_loss(o.loss, num_classes, o.embedding_dim, o.margin, o.scale)
        self.triplet = losses.TripletMarginLoss(margin=o.triplet_margin)
        self.miner = miners.BatchHardMiner()

    def embedding_loss(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        triplets = self.miner(emb, labels)
        return self.margin(emb, labels) + self.opts.triplet_weight * self.triplet(emb, labels, triplets)

    @classmethod
    def split(cls, ds: ImageSet, test_fraction: float, seed: int, use_official: bool) -> TaskData:
        """Identities disjoint, a random share held out as query/gallery; or, with `use_official`
        and a split naming train, query and gallery, those three parts as given."""
        if use_official and ds.split is not None and {"train", "query", "gallery"} <= set(ds.split):
            parts = split_official(ds, ["train", "query", "gallery"])
            train, query = parts["train"].relabel(), parts["query"]
            ids = query.identities
            if ids is not None and bool((ids < 0).any()):  # a query of unknown identity has no true match
                warnings.warn(
                    f"{ds.name}: left {int((ids < 0).sum())} queries with unknown (negative) identity out "
                    "of the official query split",
                    stacklevel=3,
                )
                query = query.subset(ids >= 0)
            return TaskData(
                train=train,
                eval={"query": query, "gallery": parts["gallery"]},
                groups=train.labels,
                notes=["official train / query / gallery split"],
            )
        train, test = split_by_identity(ds, test_fraction, seed)
        query, gallery = split_query_gallery(test, seed)
        train = train.relabel()
        return TaskData(
            train=train,
            eval={"query": query, "gallery": gallery},
            groups=train.labels,
            notes=[f"identities disjoint, {test_fraction:.0%} held out as query/gallery"],
        )

    def evaluate(self, predict: Predict, data: TaskData, seed: int = 0) -> dict[str, float]:
        return self._metrics(predict, data)

    def curves(self, predict: Predict, data: TaskData, seed: int = 0) -> dict[str, Any]:
        """The CMC curve (share of queries whose first match is within rank k) for k = 1..20 (at
        most the gallery's size), with the metrics at the protocol's ranks."""
        ranks = list(range(1, min(CMC_RANKS, len(data.eval["gallery"])) + 1))
        m = self._metrics(predict, data, ranks)
        return {
            "figure": "cmc",
            "ranks": ranks,
            "cmc": [m[f"cmc@{k}"] for k in ranks],
            "metrics": {k: v for k, v in m.items() if not k.startswith("cmc@") or int(k[4:]) in (1, 5)},
        }

    @staticmethod
    def _metrics(predict: Predict, data: TaskData, ranks: Sequence[int] = (1, 5)) -> dict[str, float]:
        q, g = data.eval["query"], data.eval["gallery"]
        ids = lambda s: s.identities if s.identities is not None else s.labels
        return reid_metrics(predict(q), ids(q), predict(g), ids(g), q.cameras, g.cameras, ranks=ranks)
