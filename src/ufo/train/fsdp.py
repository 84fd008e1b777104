"""FSDP (torch's `fully_shard`, FSDP2) for models too large to replicate on every GPU.

Each transformer block is one sharding unit and the train-step module is the root unit, so a
block's weights are gathered only while it runs. Elastic layers slice their weights inside the
block's forward, when the full weights are present, so slicing needs no change.

FSDP reduce-scatters the gradients of the parameters that got one. A rank whose batch has no row
of some task would skip that task's expert and head while the other ranks reduce them, and the
collectives would no longer match; so every unit adds `0 * w[0]` for each of its weights to its
output, which gives every weight a (zero) gradient on every rank without changing any value.
One consequence differs from DDP: an optimiser steps weights with a zero gradient, so AdamW's
decoupled weight decay also shrinks the experts and heads a step did not use (by lr * wd).

Checkpoints stay in the plain format: the full model and optimiser states are gathered to CPU
(collectively) and the optimiser state is keyed by parameter index as `torch.optim` does, so a
run saved under FSDP resumes under DDP or on one process, and the other way round.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn


def _touch_hook(skip: frozenset[str] = frozenset()):
    """A forward hook adding `0 * w[0]` for each weight of the module (names in `skip` excepted).
    The weights are looked up when it runs: fully_shard swaps the module's parameters."""

    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        zero = sum(p.reshape(-1)[0] for n, p in module.named_parameters() if n not in skip) * 0.0
        if isinstance(out, dict):  # the train step returns {task: loss}
            first = next(iter(out))
            return {**out, first: out[first] + zero}
        return out + zero

    return hook


def shard(root: nn.Module, units: Iterable[nn.Module], device_type: str) -> None:
    """fully_shard each unit, then the root over the parameters the units do not hold."""
    import torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (tdist.get_world_size(),))
    units = list(units)
    in_units = {id(p) for u in units for p in u.parameters()}
    skip = frozenset(n for n, p in root.named_parameters() if id(p) in in_units)
    for u in units:
        u.register_forward_hook(_touch_hook())
        fully_shard(u, mesh=mesh)
    root.register_forward_hook(_touch_hook(skip))
    fully_shard(root, mesh=mesh)


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
    """Load an index-keyed full optimiser state into the optimiser of a sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        root, optimizer, optimizer_by_name(sd, names), options=StateDictOptions(full_state_dict=True)
    )
