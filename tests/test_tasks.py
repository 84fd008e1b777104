"""Task plug-ins: heads, losses, gradients, splits and the registry."""

from __future__ import annotations

import pytest
import torch

from ufo.data.recipes import load_recipe
from ufo.errors import ConfigError, TaskError
from ufo.tasks import TASK_KINDS, TaskData, task_class
from ufo.tasks.base import EmbeddingTask

KINDS = ["classification", "verification", "reid", "retrieval"]


def _pk_batch(classes: int = 4, k: int = 4, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(classes).repeat_interleave(k)
    return torch.randn(len(labels), dim), labels


def test_registry_has_the_four_kinds_and_names_unknown_ones():
    assert set(KINDS) <= set(TASK_KINDS)
    with pytest.raises(TaskError, match="unknown task kind 'segmentation'.*classification"):
        task_class("segmentation")


@pytest.mark.parametrize("kind", KINDS)
def test_loss_is_finite_and_reaches_every_head_parameter(kind):
    task = task_class(kind)("t", {}, num_classes=4, in_dim=32)
    task.set_input_dim(16)  # the backbone runs a narrower subnet
    feats, labels = _pk_batch()
    feats.requires_grad_(True)
    loss = task.loss(feats, labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    for name, p in task.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{kind}: {name} got no gradient"
    out = task.eval()(torch.randn(3, 16))
    if isinstance(task, EmbeddingTask):
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    else:
        assert out.shape == (3, 4)


def test_margin_weights_are_reported_for_their_own_group():
    for kind in ("verification", "reid"):
        task = task_class(kind)("t", {}, num_classes=5, in_dim=32)
        (w,) = task.margin_parameters()
        assert w.shape[-1] == 5 or w.shape[0] == 5
    assert task_class("classification")("t", {}, 5, 32).margin_parameters() == []


def test_options_are_validated_with_the_field_named():
    with pytest.raises(ConfigError, match=r"tasks.faces.options.margn.*verification"):
        task_class("verification")("faces", {"margn": 0.3}, 4, 32)
    with pytest.raises(ConfigError, match=r"tasks.faces.options.loss"):
        task_class("verification")("faces", {"loss": "hinge"}, 4, 32)


def test_arcface_option_and_reid_triplet_term():
    arc = task_class("verification")("f", {"loss": "arcface", "margin": 28.6}, 4, 32)
    feats, labels = _pk_batch(dim=32)
    assert torch.isfinite(arc.loss(feats, labels))
    reid = task_class("reid")("r", {"triplet_weight": 0.0}, 4, 32)
    reid_t = task_class("reid")("r", {"triplet_weight": 1.0}, 4, 32)
    reid_t.load_state_dict(reid.state_dict())
    assert reid_t.loss(feats, labels) >= reid.loss(feats, labels)


def _digits():
    return load_recipe("digits")


def test_splits_follow_each_kinds_protocol():
    ds = _digits()
    cls = task_class("classification").split(ds, 0.25, 0, True)
    assert set(cls.eval) == {"test"} and set(cls.train.class_names) == set(cls.eval["test"].class_names)
    ret = task_class("retrieval").split(ds, 0.3, 0, True)
    assert not set(ret.train.class_names) & set(ret.eval["test"].class_names)
    ver = task_class("verification").split(ds, 0.3, 0, True)
    assert not set(ver.train.class_names) & set(ver.eval["test"].class_names)
    reid = task_class("reid").split(ds, 0.3, 0, True)
    assert set(reid.eval) == {"query", "gallery"}
    assert not set(reid.train.class_names) & set(reid.eval["query"].class_names)
    # deterministic given the seed
    again = task_class("retrieval").split(ds, 0.3, 0, True)
    assert again.eval["test"].class_names == ret.eval["test"].class_names


@pytest.mark.parametrize(
    "kind,key", [("classification", "top1"), ("retrieval", "recall@1"), ("verification", "acc_10fold"), ("reid", "mAP")]
)
def test_evaluate_with_a_perfect_predictor_scores_one(kind, key):
    ds = _digits()
    cls = task_class(kind)
    data: TaskData = cls.split(ds, 0.3, 0, True)
    task = cls("t", {}, num_classes=len(data.train.class_names), in_dim=8)

    def oracle(s):  # one-hot of the true class: logits for classification, embeddings otherwise
        return torch.nn.functional.one_hot(
            s.labels, 10 if kind == "classification" else int(s.labels.max()) + 1
        ).float()

    assert cls.primary == key
    assert task.evaluate(oracle, data)[key] == pytest.approx(1.0)
