"""TaskFFN: a shared FFN expert, one expert per task, and a router over {shared, task, mix}.

In training an unfixed route is drawn with Gumbel-Softmax (straight-through hard choice) at the
temperature the trainer sets; in eval it is the argmax of the router logits. A route fixed by the
arch overrides both. Each task's expert only ever sees that task's rows of the batch, and in eval
only the chosen path is computed.

With `batched` set, a mixed batch runs the experts of all its tasks as two batched matmuls
(`torch.baddbmm`): the task segments are stacked (zero-padded to the longest when uneven) and the tasks' active weight
slices are stacked alongside, so there is no per-task Python loop of FFN calls and the forward
traces into one graph under torch.compile (the default loop over segments traces into one graph
too, as segments are Python ints). Each task's output is then `cs * shared + ce * expert`
with per-task coefficients from its route (Gumbel draw, fixed path or mix weights). Experts that
are not plain `ElasticMlp`s (a wrapped one, say) fall back to the per-task loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from ufo.arch import PATHS
from ufo.nn.batched_linear import batched_linear
from ufo.nn.mlp import ElasticMlp, ffn_weight, fold_mix

SHARED, TASK, MIX = 0, 1, 2
Segment = tuple[int, int, int]  # (task index, first row, end row) of a task-sorted batch
Coef = torch.Tensor | float | None


class Expert(Protocol):
    """What TaskFFN needs of an expert: an ElasticMlp, or a module wrapping one (`ufo extend`'s)."""

    def set_active(self, dim: int, hidden: int) -> None: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def _is_one(c: Coef) -> bool:
    return isinstance(c, float) and c == 1.0


def _gather(x: torch.Tensor, segments: Sequence[Segment], which: list[int]) -> torch.Tensor:
    """The rows of segments `which`, concatenated in order."""
    return torch.cat([x[segments[i][1] : segments[i][2]] for i in which])


def _scatter(y: torch.Tensor, segments: Sequence[Segment], which: list[int], sizes: list[int]) -> torch.Tensor:
    """Rows of segments `which` placed back into a full batch; the other segments' rows are zero
    (their coefficient for this path is None, so they are never read)."""
    parts, it = [], iter(y.split([sizes[i] for i in which]))
    for i, n in enumerate(sizes):
        parts.append(next(it) if i in which else y.new_zeros(n, *y.shape[1:]))
    return torch.cat(parts)


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
        # True runs a mixed batch's experts as batched matmuls over stacked weight slices (the
        # trainer sets it from train.batched_experts). Off for a bare module: eval batches are
        # one task each, and stacking copies the experts' weights (kept for backward in training).
        self.batched = False

    def set_active(self, dim: int, hidden: int, paths: Sequence[str | None]) -> None:
        """Active widths, and per task a fixed path name or None to let the router decide."""
        self.shared.set_active(dim, hidden)
        for e in self.experts.values():
            cast(Expert, e).set_active(dim, hidden)
        self.fixed = [None if p is None else PATHS.index(p) for p in paths]

    def mix_weights(self, t: int) -> torch.Tensor:
        return self.mix_logits[t].softmax(-1)

    def chosen_path(self, t: int, paths: Sequence[int] | None = None) -> int:
        """The path task t takes in eval: `paths[t]` when given (read before a compiled region, see
        `SuperViT.eval_paths`), else the fixed one, else the router's argmax."""
        if paths is not None:
            return paths[t]
        fixed = self.fixed[t]
        return int(self.router_logits[t].argmax()) if fixed is None else fixed

    def forward(self, x: torch.Tensor, segments: Sequence[Segment], paths: Sequence[int] | None = None) -> torch.Tensor:
        """x: (B, N, C) sorted by task; segments say which rows belong to which task; `paths`: each
        task's path in eval, when read beforehand (else the fixed path or the router's argmax)."""
        if len(segments) == 1:
            return self._forward_task(x, segments[0][0], paths)
        if all(self.fixed[t] == SHARED for t, _, _ in segments):
            return self.shared(x)  # every task on the shared path: one FFN call for the whole batch
        if not self.batched or not all(isinstance(self.experts[self.tasks[t]], ElasticMlp) for t, _, _ in segments):
            return self._forward_loop(x, segments, paths)
        coef = [self._coefficients(t, paths) for t, _, _ in segments]
        sizes = [e - s for _, s, e in segments]
        s_out = e_out = None
        on_shared = [i for i, (c, _) in enumerate(coef) if c is not None]
        on_expert = [i for i, (_, c) in enumerate(coef) if c is not None]
        if on_shared:
            s_out = (
                self.shared(x)
                if len(on_shared) == len(segments)
                else _scatter(self.shared(_gather(x, segments, on_shared)), segments, on_shared, sizes)
            )
        if on_expert:
            e_out = self._experts(x, segments, on_expert)
            if len(on_expert) < len(segments):
                e_out = _scatter(e_out, segments, on_expert, sizes)
        if s_out is None and all(_is_one(ce) for _, ce in coef):
            assert e_out is not None  # every coefficient is 1.0, so every segment ran its expert
            return e_out  # every task on its own expert: no per-segment combination
        parts = []
        s_parts = None if s_out is None else s_out.split(sizes)
        e_parts = None if e_out is None else e_out.split(sizes)
        for i, (cs, ce) in enumerate(coef):
            terms = []
            if cs is not None:
                assert s_parts is not None  # cs is set, so segment i is in on_shared
                terms.append(s_parts[i] if _is_one(cs) else cs * s_parts[i])
            if ce is not None:
                assert e_parts is not None  # ce is set, so segment i is in on_expert
                terms.append(e_parts[i] if _is_one(ce) else ce * e_parts[i])
            parts.append(terms[0] if len(terms) == 1 else terms[0] + terms[1])
        return torch.cat(parts, 0)

    def _coefficients(self, t: int, paths: Sequence[int] | None = None) -> tuple[Coef, Coef]:
        """Task t's output as `cs * shared(x) + ce * expert(x)`; None marks a path not computed.
        A Gumbel route is drawn here, once per task in segment order (as the loop draws them)."""
        if self.fixed[t] is None and self.training:
            g = F.gumbel_softmax(self.router_logits[t], tau=self.tau, hard=True)
            w = self.mix_weights(t)
            return g[SHARED] + g[MIX] * w[0], g[TASK] + g[MIX] * w[1]
        path = self.chosen_path(t, paths)
        if path == SHARED:
            return 1.0, None
        if path == TASK:
            return None, 1.0
        w = self.mix_weights(t)
        return w[0], w[1]

    def _experts(self, x: torch.Tensor, segments: Sequence[Segment], which: list[int]) -> torch.Tensor:
        """The experts of segments `which` as two batched matmuls: the segments are stacked
        (zero-padded to the longest) and each expert's active weight slice is stacked alongside.
        Returns those segments' rows in order, (sum of their rows, N, C)."""
        tasks = [segments[i][0] for i in which]
        sizes = [segments[i][2] - segments[i][1] for i in which]
        rows = x if len(which) == len(segments) else _gather(x, segments, which)
        _, N, C = rows.shape
        L = max(sizes)
        if all(n == L for n in sizes):
            xb = rows.reshape(len(which), L * N, C)
        else:  # pad every segment to L rows by gathering from the rows plus one zero row
            idx = [
                r
                for i, n in enumerate(sizes)
                for r in [sum(sizes[:i]) + j for j in range(n)] + [rows.shape[0]] * (L - n)
            ]
            padded = torch.cat([rows, rows.new_zeros(1, N, C)])
            xb = padded[torch.tensor(idx, device=x.device)].reshape(len(which), L * N, C)
        experts = [cast(ElasticMlp, self.experts[self.tasks[t]]) for t in tasks]  # forward checked they are
        fc1 = [ffn_weight(e.fc1) for e in experts]
        fc2 = [ffn_weight(e.fc2) for e in experts]
        w1, b1 = torch.stack([w for w, _ in fc1]), torch.stack([b for _, b in fc1])  # (S, h, C), (S, h)
        w2, b2 = torch.stack([w for w, _ in fc2]), torch.stack([b for _, b in fc2])  # (S, C, h), (S, C)
        h = F.gelu(batched_linear(xb, w1, b1))  # (S, L*N, h)
        out = batched_linear(h, w2, b2).reshape(len(which) * L, N, C)
        if all(n == L for n in sizes):
            return out
        keep = [i * L + j for i, n in enumerate(sizes) for j in range(n)]
        return out[torch.tensor(keep, device=x.device)]

    def _forward_loop(
        self, x: torch.Tensor, segments: Sequence[Segment], paths: Sequence[int] | None = None
    ) -> torch.Tensor:
        """One task at a time: for experts that are not plain ElasticMlps (e.g. a wrapped one)."""
        # split (not x[s:e]): its backward is one concatenation, not a zero-filled buffer per slice
        parts = x.split([e - s for _, s, e in segments])
        return torch.cat([self._forward_task(p, t, paths) for p, (t, _, _) in zip(parts, segments)], 0)

    def _forward_task(self, x: torch.Tensor, t: int, paths: Sequence[int] | None = None) -> torch.Tensor:
        expert = self.experts[self.tasks[t]]
        if self.fixed[t] is None and self.training:
            g = F.gumbel_softmax(self.router_logits[t], tau=self.tau, hard=True)
            s, e = self.shared(x), expert(x)
            w = self.mix_weights(t)
            return g[SHARED] * s + g[TASK] * e + g[MIX] * (w[0] * s + w[1] * e)
        path = self.chosen_path(t, paths)
        if path == SHARED:
            return self.shared(x)
        if path == TASK:
            return expert(x)
        w = self.mix_weights(t)
        return w[0] * self.shared(x) + w[1] * expert(x)

    # ----- extraction -----
    def extract_single(self, t: int) -> Mlp:
        """Task t's chosen path as one timm `Mlp` (a mix is folded into a wider one)."""
        # extraction reads plain experts (`ufo extend` folds its wrappers away before it saves)
        path, expert = self.chosen_path(t), cast(ElasticMlp, self.experts[self.tasks[t]])
        if path == SHARED:
            return self.shared.extract()
        if path == TASK:
            return expert.extract()
        w = self.mix_weights(t).detach()
        return fold_mix(self.shared, expert, float(w[0]), float(w[1]))
