"""Distillation losses from a teacher's outputs to a student's (in-place and external distillation).

Classification heads are matched on their logits with a temperature-scaled KL divergence
(Hinton et al. 2015); identity heads (verification, reid, retrieval) on their embeddings with a
cosine loss per sample plus a relational loss that matches the batch's pairwise cosine-similarity
matrices (Park et al. 2019, RKD angle-free variant). The teacher side is always detached, so the
losses only train the student. Each is exactly zero when the student equals the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _full(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 outputs under autocast are promoted; float64 is kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def kl_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softened class distributions, times T^2 so that the gradient
    scale does not depend on T; averaged over the batch. Logits: (B, classes)."""
    T = float(temperature)
    s = F.log_softmax(_full(student) / T, dim=-1)
    t = F.log_softmax(_full(teacher.detach()) / T, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * (T * T)


def cosine_embedding(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(student_i, teacher_i) over the batch. Embeddings: (B, D)."""
    return (1.0 - F.cosine_similarity(_full(student), _full(teacher.detach()), dim=-1)).mean()


def similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """(B, B) pairwise cosine similarities of the rows of x, with autocast off: its matmul would
    run in bf16 even on float32 rows."""
    x = F.normalize(_full(x), dim=-1)
    with torch.autocast(x.device.type, enabled=False):
        return x @ x.T


def relational(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the batch's pairwise cosine-similarity matrices of student and teacher."""
    return F.mse_loss(similarity_matrix(student), similarity_matrix(teacher.detach()))


def distill_terms(
    output: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
) -> dict[str, torch.Tensor]:
    """The distillation terms of one task by its head's output kind ("logits" or "embedding")."""
    if output == "logits":
        return {"kl": kl_logits(student, teacher, temperature)}
    if output == "embedding":
        return {"cos": cosine_embedding(student, teacher), "rel": relational(student, teacher)}
    raise ValueError(f"no distillation loss for head output {output!r}; expected 'logits' or 'embedding'")
