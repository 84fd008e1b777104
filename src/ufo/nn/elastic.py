"""Elastic building blocks that use the first-k slice of their largest weights.

Each layer holds its active width explicitly (`set_active`) and `extract()` returns a stock
torch module holding copies of the active slice, as Once-for-All's dynamic layers do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ufo.arch import as_hw

if TYPE_CHECKING:
    from timm.layers import PatchEmbed

    from ufo.nn.stem import ConvStemEmbed


def bias_of(layer: nn.Conv2d | nn.Linear) -> torch.Tensor:
    """The bias of a layer built with one (torch types every bias as optional)."""
    assert layer.bias is not None, f"{type(layer).__name__} built without a bias"
    return layer.bias


class ElasticLinear(nn.Linear):
    """Linear layer whose active input and output widths are the first `in_k`, `out_k` features."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.active_in, self.active_out = in_features, out_features

    def set_active(self, in_features: int | None = None, out_features: int | None = None) -> None:
        self.active_in = self.in_features if in_features is None else in_features
        self.active_out = self.out_features if out_features is None else out_features
        if not (0 < self.active_in <= self.in_features and 0 < self.active_out <= self.out_features):
            raise ValueError(
                f"active size ({self.active_in}, {self.active_out}) exceeds the layer "
                f"({self.in_features}, {self.out_features})"
            )

    def active_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.weight[: self.active_out, : self.active_in]
        b = None if self.bias is None else self.bias[: self.active_out]
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.active_weight())

    def extract(self) -> nn.Linear:
        w, b = self.active_weight()
        out = nn.Linear(self.active_in, self.active_out, bias=b is not None)
        out.weight.data.copy_(w)
        if b is not None:
            out.bias.data.copy_(b)
        return out


class ElasticLayerNorm(nn.LayerNorm):
    """LayerNorm over the first `k` features. Slicing changes what is normalised over; extraction
    therefore builds `nn.LayerNorm(k)` with the sliced affine weights."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)
        self.active_dim = dim

    def set_active(self, dim: int | None = None) -> None:
        self.active_dim = self.normalized_shape[0] if dim is None else dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.active_dim
        return F.layer_norm(x, (k,), self.weight[:k], self.bias[:k], self.eps)

    def extract(self) -> nn.LayerNorm:
        k = self.active_dim
        out = nn.LayerNorm(k, eps=self.eps)
        out.weight.data.copy_(self.weight[:k])
        out.bias.data.copy_(self.bias[:k])
        return out


class ElasticPatchEmbed(nn.Module):
    """Conv patch embedding elastic in its output width (the embedding dimension)."""

    def __init__(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size, self.patch_size = as_hw(img_size), patch_size
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.active_dim = embed_dim

    def set_active(self, dim: int) -> None:
        self.active_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.active_dim
        x = F.conv2d(x, self.proj.weight[:k], bias_of(self.proj)[:k], stride=self.patch_size)  # (B, k, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, N, k)

    def extract_into(self, embed: PatchEmbed | ConvStemEmbed) -> None:
        """Copy the active slice into an extracted model's timm `PatchEmbed` (its `proj`)."""
        k = self.active_dim
        embed.proj.weight.data.copy_(self.proj.weight[:k])
        bias_of(embed.proj).data.copy_(bias_of(self.proj)[:k])
