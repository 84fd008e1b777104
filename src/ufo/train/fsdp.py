"""FSDP (torch's `fully_shard`, FSDP2) for models too large to replicate on every GPU.

Each transformer block is one sharding unit and the train-step module is the root unit, so a
block's weights are gathered only while it runs. Elastic layers slice their weights inside the
block's forward, when the full weights are present, so slicing needs no change.

FSDP reduce-scatters the gradients of the parameters that got one, and every rank must take part
in the same collectives in the same order. A rank whose batch has no row of some task would skip
that task's expert and head while the other ranks reduce them, and the collectives would no
longer match. Two ways keep the ranks in step:

- Per-expert units (`shard_experts`): which experts a step uses follows from its tasks. A fixed
  route uses the task's expert or not; a route the router draws in training computes the shared
  and the task expert for every row of the task (the straight-through Gumbel gradient needs both),
  so the experts of the tasks present are used whatever the draw. Each task expert of each block
  (`blk.mlp.experts[task]`) is a unit of its own, inside its block's. The sampler is global and
  seeded, so every rank knows the tasks of the step's global batch (`MixedLoader.step_tasks`,
  handed to `StepTasks.set`); every TaskFFN then runs the segments of exactly those tasks, in task
  order, on every rank. A task with no row on this rank gets an empty segment: its expert runs on
  zero rows, so its all-gather and reduce-scatter match the other ranks' and its gradient here is
  zero. The expert of a task that no row of the global batch uses runs on no rank: FSDP neither
  gathers nor reduces it, its gradient stays None and AdamW leaves it alone, as under DDP. The
  same holds for the rest of each block (its shared expert, routers and mix weights run on zero
  rows where needed), so the blocks add nothing to their output. The root adds `0 * w[0]` (as
  below) for its weights except the heads of tasks absent from the global batch: those get no
  gradient, and a head whose task has rows on some other rank only gets a zero one here. Tasks of
  different input sizes run in one pass each, and the loader gives every rank every size of the
  global batch (`MixedLoader(every_size=True)`), so the ranks gather the blocks equally often.
- Otherwise (`TaskFFN.batched`, which reads the experts' weights without calling them): every
  unit adds `0 * w[0]` for each of its weights to its output, which gives every weight a (zero)
  gradient on every rank without changing any value. One consequence differs from DDP: an
  optimiser steps weights with a zero gradient, so AdamW moves the experts and heads a step did
  not use (their momentum, and the decoupled weight decay by lr * wd).

Checkpoints stay in the plain format: the full model and optimiser states are gathered to CPU
(collectively) and the optimiser state is keyed by parameter index as `torch.optim` does, so a
run saved under FSDP resumes under DDP or on one process, and the other way round.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from ufo.nn.moe import Segment
from ufo.nn.vit import SuperBlock


def _touch_hook(skip: Callable[[str], bool] = lambda name: False):
    """A forward hook adding `0 * w[0]` for each weight of the module (those whose names `skip`
    accepts excepted). The weights are looked up when it runs: fully_shard swaps the module's
    parameters."""

    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        zero = sum(p.reshape(-1)[0] for n, p in module.named_parameters() if not skip(n)) * 0.0
        if isinstance(out, dict):  # the train step returns {task: loss}
            first = next(iter(out))
            return {**out, first: out[first] + zero}
        return out + zero

    return hook


def _mesh(device_type: str) -> Any:
    import torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (tdist.get_world_size(),))


def shard(root: nn.Module, units: Iterable[nn.Module], device_type: str) -> None:
    """fully_shard each unit, then the root over the parameters the units do not hold; every
    weight is reduced on every step (see the module docstring)."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(device_type)
    units = list(units)
    in_units = {id(p) for u in units for p in u.parameters()}
    skip = frozenset(n for n, p in root.named_parameters() if id(p) in in_units)
    for u in units:
        u.register_forward_hook(_touch_hook())
        fully_shard(u, mesh=mesh)
    root.register_forward_hook(_touch_hook(skip.__contains__))
    fully_shard(root, mesh=mesh)


class StepTasks:
    """The tasks of the step's global batch, as indices into `tasks`, for `shard_experts`'s hooks.
    Set before each step's forward; every task until the first `set`.

    Tasks of different input sizes run through the blocks in separate passes (one chunk per size;
    the loader gives every rank every size of the global batch, empty where it has no rows). With
    `tokens` (each task's token count) a pass joins only the tasks of its own token count, so an
    expert runs in one pass per step, not in every pass."""

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = list(tasks)
        self.present = frozenset(range(len(self.tasks)))
        self.by_tokens: dict[int, frozenset[int]] = {}

    def set(self, names: Iterable[str], tokens: Mapping[str, int] | None = None) -> None:
        self.present = frozenset(self.tasks.index(n) for n in names)
        by: dict[int, set[int]] = {}
        if tokens is not None:
            for t in self.present:
                by.setdefault(tokens[self.tasks[t]], set()).add(t)
        self.by_tokens = {n: frozenset(ts) for n, ts in by.items()}

    def at(self, tokens: int) -> frozenset[int]:
        """The tasks a pass over inputs of `tokens` tokens joins (all present ones without `tokens`)."""
        return self.by_tokens.get(tokens, self.present) if self.by_tokens else self.present


def joined(segments: Sequence[Segment], present: Iterable[int]) -> tuple[Segment, ...]:
    """`segments` (task-sorted) plus an empty segment, at its place in task order, for each task of
    `present` without rows here: the same tasks in the same order on every rank."""
    have = {t for t, _, _ in segments}
    empty = [(t, max((e for u, _, e in segments if u < t), default=0)) for t in set(present) - have]
    return tuple(sorted([*segments, *((t, at, at) for t, at in empty)]))


def shard_experts(root: nn.Module, blocks: Sequence[SuperBlock], heads: nn.ModuleDict, device_type: str) -> StepTasks:
    """fully_shard each task expert of each block, then each block, then the root
    (which holds `heads`, the task heads); returns the StepTasks to set before each step (see the
    module docstring)."""
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh(device_type)
    step = StepTasks(blocks[0].mlp.tasks)
    # An expert's output is a view (F.linear of a 3-D input); TaskFFN only ever reads it out of place
    warnings.filterwarnings("ignore", r"FSDP2-wrapped module \(FSDPElasticMlp\) returned a view tensor")

    def join(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x, segments, *paths = args
        return (x, joined(segments, step.at(x.shape[1])), *paths)

    for blk in blocks:
        for expert in blk.mlp.experts.values():
            fully_shard(expert, mesh=mesh)
        blk.mlp.register_forward_pre_hook(join)
        fully_shard(blk, mesh=mesh)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    task_of = {id(p): i for i, t in enumerate(step.tasks) for p in heads[t].parameters()}
    ids = {n: id(p) for n, p in root.named_parameters()}  # before fully_shard swaps the parameters

    def skip(name: str) -> bool:
        p = ids[name]
        return p in in_blocks or (p in task_of and task_of[p] not in step.present)

    root.register_forward_hook(_touch_hook(skip))
    fully_shard(root, mesh=mesh)
    return step


def param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimiser parameter, in the optimiser's index order."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_by_name(sd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An index-keyed optimiser state dict re-keyed by parameter name (what FSDP's API takes)."""
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": {names[i]: s for i, s in sd["state"].items()}, "param_groups": groups}


def optimizer_by_index(sd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    if "param_groups" not in sd:  # ranks other than 0 get an empty state with cpu_offload
        return sd
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]
    return {"state": {index[n]: s for n, s in sd["state"].items()}, "param_groups": groups}


def full_state(
    root: nn.Module, optimizer: torch.optim.Optimizer | None = None, names: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(model state, index-keyed optimiser state or None), gathered to CPU on rank 0 (the other
    ranks get empty dicts), with the root's own prefix (`model.`) removed. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = cast(dict[str, torch.Tensor], get_model_state_dict(root, options=opts))
    model_sd = {k.removeprefix("model."): v for k, v in full.items()}
    if optimizer is None:
        return model_sd, None
    assert names is not None
    return model_sd, optimizer_by_index(
        cast(dict[str, Any], get_optimizer_state_dict(root, optimizer, options=opts)), names
    )


def load_optimizer(root: nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any], names: list[str]) -> None:
    """Load an index-keyed full optimiser state into the optimiser of a sharded model. Weights that
    were never stepped (no task used them yet, under fixed routes or DDP) have no state to load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_optimizer_state_dict(root, optimizer, optimizer_by_name(sd, names), options=opts)
