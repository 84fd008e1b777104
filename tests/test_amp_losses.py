"""Losses under bf16 autocast: computed in float32, equal to the float32 loss of the same inputs.

The trainers call the heads' losses (and the MIM and distillation losses) inside
`torch.autocast(..., bfloat16)`. The backbone and the heads' projections may run in bf16 there,
but a loss must not: a margin loss's cosine logits, a miner's similarities, an L1 difference or a
teacher's stored outputs rounded to bf16 keep about 3 significant digits. CPU autocast has the
same matmul rule as CUDA's, so these run on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_slimming import TINY
from ufo.config import parse_config
from ufo.model import build_model
from ufo.tasks import task_class
from ufo.tasks.base import EmbeddingTask
from ufo.train.distill_losses import distill_terms
from ufo.train.mim import masked_l1, masked_l1_sums
from ufo.train.slimming import ChipStage

EMBEDDING_LOSSES = [
    ("verification", {}),
    ("verification", {"loss": "arcface", "margin": 28.6}),
    ("reid", {}),
    ("retrieval", {}),
    ("retrieval", {"loss": "triplet"}),
    ("retrieval", {"loss": "cosface"}),
]


def bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _pk_batch(dim: int, classes: int = 4, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(classes).repeat_interleave(k)
    return torch.randn(len(labels), dim, generator=g), labels


@pytest.mark.parametrize(("kind", "options"), EMBEDDING_LOSSES)
def test_embedding_losses_are_float32_under_autocast(kind, options):
    """The same embedding gives the same loss in and out of autocast (bf16 cosines: ~1e-3 off)."""
    task = task_class(kind)("t", options, num_classes=4, in_dim=32)
    assert isinstance(task, EmbeddingTask)
    feats, labels = _pk_batch(32)
    emb = task.embed(feats).detach().requires_grad_(True)
    task.embed = lambda f: emb  # type: ignore[method-assign]  # the projection is not under test
    ref = task.loss(feats, labels)
    (g_ref,) = torch.autograd.grad(ref, emb)
    with bf16():
        loss = task.loss(feats, labels)
    (g,) = torch.autograd.grad(loss, emb)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("kind", "options"), EMBEDDING_LOSSES)
def test_embedding_losses_run_under_autocast_on_bf16_embeddings(kind, options):
    """A bf16 embedding (the neck under autocast on CUDA) is lifted to float32 for the loss."""
    task = task_class(kind)("t", options, num_classes=4, in_dim=32)
    feats, labels = _pk_batch(32)
    emb = task.embed(feats).detach().bfloat16()
    task.embed = lambda f: emb  # type: ignore[method-assign]
    ref = task.loss(feats, labels)
    with bf16():
        loss = task.loss(feats, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)


def test_classification_cross_entropy_is_float32_on_the_autocast_logits():
    task = task_class("classification")("t", {}, num_classes=4, in_dim=32)
    feats, labels = _pk_batch(32)
    with bf16():
        logits = task(feats)
        loss = task.loss(feats, labels)
    assert logits.dtype == torch.bfloat16  # the head itself may run in bf16
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.float(), labels, label_smoothing=task.opts.label_smoothing)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)


def test_masked_l1_keeps_float32_targets_against_bf16_predictions():
    """A target 1e-3 above a bf16 prediction of 1 is 1.001 in float32 but 1.0 in bf16."""
    pred = torch.ones(2, 6, 12, dtype=torch.bfloat16)
    target = torch.full((2, 6, 12), 1.001)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, :4] = True
    with bf16():
        err, count = masked_l1_sums(pred, target, mask)
        mean = masked_l1(pred, target, mask)
    assert err.dtype == torch.float32 and mean.dtype == torch.float32
    assert int(count) == 2 * 4 * 12
    torch.testing.assert_close(mean, torch.tensor(0.001), rtol=1e-4, atol=0)
    torch.testing.assert_close(err, torch.tensor(0.001 * 96), rtol=1e-4, atol=0)


def test_relational_distillation_is_float32_under_autocast():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    ref = distill_terms("embedding", s, t)
    with bf16():
        got = distill_terms("embedding", s, t)
    for k in ref:
        assert got[k].dtype == torch.float32, k
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=0)


def test_chip_teacher_outputs_are_stored_in_float32():
    """The largest subnet's outputs, which the others distil from, are not rounded to bf16."""
    cfg = parse_config(TINY)  # test_slimming's chip supernet
    torch.manual_seed(0)
    model = build_model(cfg, {"digits": 10, "mnist": 10})
    stage = ChipStage(cfg, model)
    x = torch.randn(8, 3, 16, 16)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    y = torch.tensor([0, 1, 2, 3, 0, 0, 1, 1])
    arch = model.space.largest(stage.routes)
    with bf16():
        _, _, outs = stage._pass(x, ids, y, arch, None)
    assert set(outs) == {"digits", "mnist"}
    for name, out in outs.items():
        assert out.dtype == torch.float32, name
        assert not out.requires_grad, name
