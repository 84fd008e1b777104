"""Convolutional stem ("Early convolutions help transformers see better", Xiao et al. 2021).

`model.stem: conv` replaces the ViT's single p x p patch convolution with log2(p) 3x3 stride-2
convolutions (GroupNorm + ReLU), then a 1x1 projection to the embedding width. The tokens are the
same grid as the patch stem's, so nothing downstream changes; small ViTs trained from scratch on
small data learn much faster with it. Only the 1x1 projection is elastic (first-k output
channels); the convolutions before it are the same in every subnet.

GroupNorm rather than BatchNorm: a token's value depends on its image alone, whatever else is in
the batch (mixed-task batches, one task per rank or per step, `ufo extend` training one task).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch import nn

from ufo.arch import SearchSpace, as_hw
from ufo.nn.elastic import ElasticPatchEmbed, bias_of


def stem_groups(channels: int) -> int:
    """GroupNorm groups for a stem layer: 8 where they divide the channels, else fewer."""
    return math.gcd(channels, 8)


def conv_stem_layers(in_chans: int, channels: Sequence[int]) -> nn.Sequential:
    """3x3 stride-2 conv -> GroupNorm -> ReLU for each width in `channels` (no conv bias: the norm has one)."""
    layers: list[nn.Module] = []
    c_in = in_chans
    for c in channels:
        layers += [
            nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(stem_groups(c), c),
            nn.ReLU(inplace=True),
        ]
        c_in = c
    return nn.Sequential(*layers)


class ConvStemEmbed(nn.Module):
    """The stem of an extracted model: stock torch layers, timm's PatchEmbed interface
    (`num_patches`, `grid_size`, `proj`; (B, C, H, W) -> (B, N, embed_dim))."""

    def __init__(
        self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int, channels: Sequence[int]
    ) -> None:
        super().__init__()
        if 2 ** len(channels) != patch_size:
            raise ValueError(
                f"a conv stem of {len(channels)} stride-2 layers has stride {2 ** len(channels)}, "
                f"not the patch size {patch_size}"
            )
        self.img_size, self.patch_size = as_hw(img_size), (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.stem = conv_stem_layers(in_chans, channels)
        self.proj = nn.Conv2d(channels[-1], embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)  # (B, N, embed_dim)


class ElasticConvStem(ConvStemEmbed):
    """ConvStemEmbed whose 1x1 projection emits the first `active_dim` channels."""

    def __init__(
        self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int, channels: Sequence[int]
    ) -> None:
        super().__init__(img_size, patch_size, in_chans, embed_dim, channels)
        for m in self.stem:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.active_dim = embed_dim

    def set_active(self, dim: int) -> None:
        self.active_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.active_dim
        x = F.conv2d(self.stem(x), self.proj.weight[:k], bias_of(self.proj)[:k])  # (B, k, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, N, k)

    @torch.no_grad()
    def extract_into(self, embed: PatchEmbed | ConvStemEmbed) -> None:
        """Copy the stem and the active projection slice into an extracted model's ConvStemEmbed."""
        if not isinstance(embed, ConvStemEmbed):
            raise TypeError(f"a conv stem extracts into a ConvStemEmbed, not a {type(embed).__name__}")
        k = self.active_dim
        embed.stem.load_state_dict(self.stem.state_dict())
        embed.proj.weight.copy_(self.proj.weight[:k])
        bias_of(embed.proj).copy_(bias_of(self.proj)[:k])


def elastic_embed(space: SearchSpace) -> ElasticPatchEmbed | ElasticConvStem:
    """The supernet's token embedding for `space.stem`, at the largest width."""
    E = space.max_embed_dim
    if space.stem == "conv":
        return ElasticConvStem(space.img_size, space.patch_size, space.in_chans, E, space.stem_channels)
    return ElasticPatchEmbed(space.img_size, space.patch_size, space.in_chans, E)


def static_embed(
    space: SearchSpace, embed_dim: int, img_size: tuple[int, int] | None = None, dynamic: bool = False
) -> PatchEmbed | ConvStemEmbed:
    """An extracted model's token embedding for `space.stem` at `embed_dim` (uninitialised), for
    `img_size` (default: the space's base size); `dynamic` lets a patch stem take any size."""
    size = as_hw(space.img_size if img_size is None else img_size)
    if space.stem == "conv":
        return ConvStemEmbed(size, space.patch_size, space.in_chans, embed_dim, space.stem_channels)
    if dynamic:
        return PatchEmbed(size, space.patch_size, space.in_chans, embed_dim, strict_img_size=False)
    return PatchEmbed(size, space.patch_size, space.in_chans, embed_dim)
