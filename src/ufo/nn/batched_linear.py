"""`batched_linear`: S linear layers, each on its own rows, as batched matmuls.

Autograd's own backward of `torch.baddbmm(b, x, w.transpose(1, 2))` computes the weight gradient
as the transpose of `x^T @ g` ((S, C, H), then transposed): on the CPU that batched product of a
transposed operand took 0.7 s a layer at ViT-B width with 20 experts (against 0.11 s in the
weight's own layout), and every expert's gradient, a non-contiguous slice of it, was then copied
once more by autograd. This backward computes `g^T @ x`, (S, H, C), already in the weights' layout,
so each expert's gradient is a contiguous view that autograd takes as it is.
"""

from __future__ import annotations

from typing import Any

import torch


class _BatchedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # Under autocast compute in its dtype, as baddbmm would, and keep the cast operands for
        # backward, which autograd runs outside autocast.
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
        ctx.save_for_backward(x, w)
        with torch.autocast(dev, enabled=False):
            return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))  # (S, L, H)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        g = g.to(x.dtype)
        gx = torch.bmm(g, w) if ctx.needs_input_grad[0] else None  # (S, L, C)
        gw = torch.bmm(g.transpose(1, 2), x) if ctx.needs_input_grad[1] else None  # (S, H, C)
        gb = g.sum(1) if ctx.needs_input_grad[2] else None  # (S, H)
        return gx, gw, gb  # autograd casts each to its input's dtype


def batched_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`x[s] @ w[s].T + b[s]` for every s: x (S, L, C), w (S, H, C), b (S, H) -> (S, L, H)."""
    return _BatchedLinear.apply(x, w, b)
