"""The FFN expert: timm's `Mlp` (fc1, GELU, fc2), elastic in input and hidden width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from ufo.nn.elastic import ElasticLinear, bias_of


class ElasticMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = ElasticLinear(dim, hidden)
        self.fc2 = ElasticLinear(hidden, dim)

    def set_active(self, dim: int, hidden: int) -> None:
        self.fc1.set_active(dim, hidden)
        self.fc2.set_active(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))

    def extract(self) -> Mlp:
        out = Mlp(self.fc1.active_in, self.fc1.active_out)
        out.fc1, out.fc2 = self.fc1.extract(), self.fc2.extract()
        return out


def ffn_weight(layer: ElasticLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The active weight and bias of an FFN layer (an ElasticMlp's layers always have a bias)."""
    w, b = layer.active_weight()
    assert b is not None, "an ElasticMlp layer has a bias"
    return w, b


def fold_mix(shared: ElasticMlp, expert: ElasticMlp, w_shared: float, w_expert: float) -> Mlp:
    """One timm `Mlp` equal to `w_shared * shared(x) + w_expert * expert(x)`.

    The two hidden layers are stacked side by side and the output rows are scaled by the mix
    weights, so the extracted model stays a plain ViT block with a wider FFN.
    """
    (w1s, b1s), (w2s, b2s) = ffn_weight(shared.fc1), ffn_weight(shared.fc2)
    (w1e, b1e), (w2e, b2e) = ffn_weight(expert.fc1), ffn_weight(expert.fc2)
    out = Mlp(w1s.shape[1], w1s.shape[0] + w1e.shape[0])
    with torch.no_grad():
        out.fc1.weight.copy_(torch.cat([w1s, w1e], 0))
        bias_of(out.fc1).copy_(torch.cat([b1s, b1e], 0))
        out.fc2.weight.copy_(torch.cat([w_shared * w2s, w_expert * w2e], 1))
        bias_of(out.fc2).copy_(w_shared * b2s + w_expert * b2e)
    return out
