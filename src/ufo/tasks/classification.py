"""Classification: a linear head on the class token, cross-entropy with label smoothing, top-1."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ufo.data.dataset import ImageSet
from ufo.data.splits import split_by_sample
from ufo.nn.elastic import ElasticLinear
from ufo.tasks.base import Options, Predict, Task, TaskData, register
from ufo.tasks.metrics import classification_metrics, confusion


class ClassificationOptions(Options):
    label_smoothing: float = 0.1


@register("classification")
class Classification(Task):
    OptionsModel = ClassificationOptions
    opts: ClassificationOptions
    primary = "top1"
    output = "logits"

    def __init__(self, name: str, options, num_classes: int, in_dim: int) -> None:
        super().__init__(name, options, num_classes, in_dim)
        self.head = ElasticLinear(in_dim, num_classes)
        torch.nn.init.trunc_normal_(self.head.weight, std=0.02)  # timm's default ViT head init
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(features).float(), labels, label_smoothing=self.opts.label_smoothing)

    @classmethod
    def split(cls, ds: ImageSet, test_fraction: float, seed: int, use_official: bool) -> TaskData:
        """Stratified by class; the data set's own train/test split is used when it has one."""
        official = use_official and ds.split is not None
        train, test = split_by_sample(ds, test_fraction, seed, stratify=True, use_official=official)
        how = "official train/test split" if official else f"stratified, {test_fraction:.0%} test"
        return TaskData(train=train, eval={"test": test}, notes=[how])

    def evaluate(self, predict: Predict, data: TaskData, seed: int = 0) -> dict[str, float]:
        test = data.eval["test"]
        return classification_metrics(predict(test), test.labels)

    def curves(self, predict: Predict, data: TaskData, seed: int = 0) -> dict[str, Any]:
        """The confusion matrix on the test split (rows: true class), with the metrics."""
        test = data.eval["test"]
        logits = predict(test)
        return {
            "figure": "confusion_matrix",
            **confusion(logits, test.labels, test.class_names),
            "metrics": classification_metrics(logits, test.labels),
        }
