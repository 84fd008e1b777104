"""Multi-head self-attention elastic in embedding width and number of heads.

head_dim is fixed, so slicing heads keeps the attention scale exact. q, k and v are sliced through
a structured view of the fused qkv weight, `(3, H, head_dim, C)[:, :h, :, :c]`, and the bias the
same way, so the active slice is exactly a smaller timm `Attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn


class ElasticAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.active_dim, self.active_heads = dim, num_heads

    def set_active(self, dim: int, num_heads: int) -> None:
        if not (0 < dim <= self.dim and 0 < num_heads <= self.num_heads):
            raise ValueError(f"active ({dim}, {num_heads} heads) exceeds ({self.dim}, {self.num_heads} heads)")
        self.active_dim, self.active_heads = dim, num_heads

    def active_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(qkv weight, qkv bias, proj weight, proj bias) of the active slice."""
        c, h, H, hd = self.active_dim, self.active_heads, self.num_heads, self.head_dim
        inner = h * hd
        w_qkv = self.qkv.weight.view(3, H, hd, self.dim)[:, :h, :, :c].reshape(3 * inner, c)
        b_qkv = None if self.qkv.bias is None else self.qkv.bias.view(3, H, hd)[:, :h].reshape(3 * inner)
        return w_qkv, b_qkv, self.proj.weight[:c, :inner], self.proj.bias[:c]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        h, hd = self.active_heads, self.head_dim
        w_qkv, b_qkv, w_proj, b_proj = self.active_weights()
        qkv = F.linear(x, w_qkv, b_qkv).reshape(B, N, 3, h, hd).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # scale = hd ** -0.5
        x = x.transpose(1, 2).reshape(B, N, h * hd)
        return F.linear(x, w_proj, b_proj)

    def extract(self) -> Attention:
        """A timm `Attention` holding copies of the active slice."""
        w_qkv, b_qkv, w_proj, b_proj = self.active_weights()
        out = Attention(self.active_dim, self.active_heads, attn_head_dim=self.head_dim, qkv_bias=b_qkv is not None)
        with torch.no_grad():
            out.qkv.weight.copy_(w_qkv)
            if b_qkv is not None:
                out.qkv.bias.copy_(b_qkv)
            out.proj.weight.copy_(w_proj)
            out.proj.bias.copy_(b_proj)
        return out
