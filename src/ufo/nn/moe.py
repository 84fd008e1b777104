"""TaskFFN: a shared FFN expert, one expert per task, and a router over {shared, task, mix}.

In training an unfixed route is drawn with Gumbel-Softmax (straight-through hard choice) at the
temperature the trainer sets; in eval it is the argmax of the router logits. A route fixed by the
arch overrides both. Each task's expert only ever sees that task's rows of the batch, and in eval
only the chosen path is computed.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from ufo.arch import PATHS
from ufo.nn.mlp import ElasticMlp, fold_mix

SHARED, TASK, MIX = 0, 1, 2
Segment = tuple[int, int, int]  # (task index, first row, end row) of a task-sorted batch


class TaskFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, tasks: Sequence[str], router_init_std: float = 1e-3) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.shared = ElasticMlp(dim, hidden)
        self.experts = nn.ModuleDict({t: ElasticMlp(dim, hidden) for t in self.tasks})
        # Small random logits: routers initialised to exact ties make argmax arbitrary.
        self.router_logits = nn.Parameter(torch.randn(len(self.tasks), len(PATHS)) * router_init_std)
        self.mix_logits = nn.Parameter(torch.zeros(len(self.tasks), 2))  # softmax -> (w_shared, w_task)
        self.tau = 1.0
        self.fixed: list[int | None] = [None] * len(self.tasks)

    def set_active(self, dim: int, hidden: int, paths: Sequence[str | None]) -> None:
        """Active widths, and per task a fixed path name or None to let the router decide."""
        self.shared.set_active(dim, hidden)
        for e in self.experts.values():
            e.set_active(dim, hidden)
        self.fixed = [None if p is None else PATHS.index(p) for p in paths]

    def mix_weights(self, t: int) -> torch.Tensor:
        return self.mix_logits[t].softmax(-1)

    def chosen_path(self, t: int) -> int:
        """The path task t takes in eval: the fixed one, else the router's argmax."""
        fixed = self.fixed[t]
        return int(self.router_logits[t].argmax()) if fixed is None else fixed

    def forward(self, x: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
        """x: (B, N, C) sorted by task; segments say which rows belong to which task."""
        if len(segments) == 1:
            return self._forward_task(x, segments[0][0])
        if all(self.fixed[t] == SHARED for t, _, _ in segments):
            return self.shared(x)  # every task on the shared path: one FFN call for the whole batch
        # split (not x[s:e]): its backward is one concatenation, not a zero-filled buffer per slice
        parts = x.split([e - s for _, s, e in segments])
        return torch.cat([self._forward_task(p, t) for p, (t, _, _) in zip(parts, segments)], 0)

    def _forward_task(self, x: torch.Tensor, t: int) -> torch.Tensor:
        expert = self.experts[self.tasks[t]]
        if self.fixed[t] is None and self.training:
            g = F.gumbel_softmax(self.router_logits[t], tau=self.tau, hard=True)
            s, e = self.shared(x), expert(x)
            w = self.mix_weights(t)
            return g[SHARED] * s + g[TASK] * e + g[MIX] * (w[0] * s + w[1] * e)
        path = self.chosen_path(t)
        if path == SHARED:
            return self.shared(x)
        if path == TASK:
            return expert(x)
        w = self.mix_weights(t)
        return w[0] * self.shared(x) + w[1] * expert(x)

    # ----- extraction -----
    def extract_single(self, t: int) -> Mlp:
        """Task t's chosen path as one timm `Mlp` (a mix is folded into a wider one)."""
        path, expert = self.chosen_path(t), self.experts[self.tasks[t]]
        if path == SHARED:
            return self.shared.extract()
        if path == TASK:
            return expert.extract()
        w = self.mix_weights(t).detach()
        return fold_mix(self.shared, expert, float(w[0]), float(w[1]))
