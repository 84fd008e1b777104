"""Training checkpoints in the one checkpoint format, complete enough to resume exactly.

Tensors (model, EMA, optimiser moments, torch RNG state) go into the safetensors body under the
prefixes `model.`, `ema.`, `optim.<param>.<key>` and `rng.torch`; everything else (step, sampler
state, optimiser hyperparameters, scheduler position, config) is JSON in the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ufo.checkpoint import load_checkpoint, load_state_checked, save_checkpoint
from ufo.errors import CheckpointError


def optimizer_to_flat(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an (index-keyed) optimiser state dict into tensors and JSON."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, pid, k = name.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    if len(groups) != len(opt.param_groups):
        raise CheckpointError(f"optimiser has {len(opt.param_groups)} parameter groups, the checkpoint {len(groups)}")
    opt.load_state_dict({"state": state, "param_groups": groups})


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to write a checkpoint holding NaN or inf weights."""
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"refusing to save a checkpoint: tensor {k} holds NaN or inf")


def save_train_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    manifest: dict[str, Any],
    ema: nn.Module | None = None,
    sampler_state: dict | None = None,
    scheduler_state: dict | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> None:
    """`model_state`/`optimizer_state` replace the modules' own state dicts when given (FSDP
    gathers them from every rank first)."""
    state = model.state_dict() if model_state is None else model_state
    tensors = {f"model.{k}": v for k, v in state.items()}
    check_finite(tensors)
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_tensors, opt_meta = optimizer_to_flat(optimizer.state_dict() if optimizer_state is None else optimizer_state)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {
        **manifest,
        "kind": "train_state",
        "step": step,
        "optimizer": opt_meta,
        "sampler": sampler_state,
        "scheduler": scheduler_state,
    }
    save_checkpoint(path, tensors, meta)


def load_train_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ema: nn.Module | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load everything saved by `save_train_state`; returns the manifest (step, sampler, ...)."""
    tensors, manifest = load_checkpoint(path)
    if manifest.get("kind") != "train_state":
        raise CheckpointError(f"{path} holds a {manifest.get('kind')!r} checkpoint, not a training state")
    load_state_checked(model, tensors, path, prefix="model.")
    if ema is not None:
        if not any(k.startswith("ema.") for k in tensors):
            raise CheckpointError(f"{path} has no EMA weights but this run uses an EMA (train.ema_decay > 0)")
        load_state_checked(ema, tensors, path, prefix="ema.")
    if optimizer is not None:
        optimizer_from_flat(optimizer, tensors, manifest["optimizer"])
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    return manifest
