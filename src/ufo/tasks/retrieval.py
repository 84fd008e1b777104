"""Open-set retrieval: embedding trained with a metric loss; Recall@K and MAP@R on classes never
seen in training (each test image queries all the others). A set with its own train/test split
(Stanford Online Products) is used as given when `use_official_split` is on; its classes must
then be disjoint."""

from __future__ import annotations

from typing import Any, Literal

import torch

from ufo.data.dataset import ImageSet
from ufo.data.splits import check_disjoint, split_by_class, split_official
from ufo.tasks.base import EmbeddingTask, Options, Predict, TaskData, margin_loss, register
from ufo.tasks.metrics import one_shot_accuracy, retrieval_metrics

RECALL_KS = 20  # the Recall@K curve's last K


class RetrievalOptions(Options):
    embedding_dim: int = 128
    loss: Literal["multi_similarity", "triplet", "cosface", "arcface"] = "multi_similarity"
    margin: float = 0.35
    scale: float = 30.0
    ks: list[int] = [1, 5]
    k: int = 4


@register("retrieval")
class Retrieval(EmbeddingTask):
    OptionsModel = RetrievalOptions
    opts: RetrievalOptions
    primary = "recall@1"
    uses_groups = True

    def __init__(self, name: str, options, num_classes: int, in_dim: int) -> None:
        from pytorch_metric_learning import losses, miners

        super().__init__(name, options, num_classes, in_dim)
        o = self.opts
        self.miner = None
        if o.loss in ("cosface", "arcface"):
            self.margin = margin_loss(o.loss, num_classes, o.embedding_dim, o.margin, o.scale)
            self.metric = None
        elif o.loss == "triplet":
            self.metric, self.miner = losses.TripletMarginLoss(margin=0.2), miners.BatchHardMiner()
        else:
            self.metric, self.miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()

    def embedding_loss(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.metric is None:
            return self.margin(emb, labels)
        assert self.miner is not None  # set with every metric loss
        return self.metric(emb, labels, self.miner(emb, labels))

    @classmethod
    def split(cls, ds: ImageSet, test_fraction: float, seed: int, use_official: bool) -> TaskData:
        """Classes disjoint, a random share held out; or, with `use_official` and a split naming
        train, the samples marked train against all the others (a DataError if classes overlap)."""
        if use_official and ds.split is not None and "train" in set(ds.split):
            parts = split_official(ds, ["train"], rest="test")
            check_disjoint(parts["train"], parts["test"], "classes")
            train, test = parts["train"].relabel(), parts["test"].relabel()
            return TaskData(
                train=train,
                eval={"test": test},
                groups=train.labels,
                notes=["official train/test split (classes disjoint)"],
            )
        train, test = split_by_class(ds, test_fraction=test_fraction, seed=seed)
        train = train.relabel()
        return TaskData(
            train=train,
            eval={"test": test},
            groups=train.labels,
            notes=[f"classes disjoint, {test_fraction:.0%} of classes held out"],
        )

    def evaluate(self, predict: Predict, data: TaskData, seed: int = 0) -> dict[str, float]:
        out = retrieval_metrics(predict(data.eval["test"]), data.eval["test"].labels, ks=self.opts.ks)
        runs = data.extra.get("oneshot_runs")
        if runs:  # Omniglot's 20-way one-shot runs, as an extra metric
            accs = [
                one_shot_accuracy(predict(r["support"]), r["support"].labels, predict(r["query"]), r["query"].labels)
                for r in runs
            ]
            out["oneshot20"] = float(sum(accs) / len(accs))
        return out

    def curves(self, predict: Predict, data: TaskData, seed: int = 0) -> dict[str, Any]:
        """Recall@K for K = 1..20 (at most the test images less one), with the metrics."""
        test = data.eval["test"]
        ks = list(range(1, min(RECALL_KS, len(test) - 1) + 1))
        m = retrieval_metrics(predict(test), test.labels, ks=ks)
        return {
            "figure": "recall_at_k",
            "ks": ks,
            "recall": [m[f"recall@{k}"] for k in ks],
            "metrics": {k: v for k, v in m.items() if not k.startswith("recall@") or int(k[7:]) in self.opts.ks},
        }
