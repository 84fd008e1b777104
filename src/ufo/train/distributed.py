"""torch.distributed plumbing for `torchrun`: gloo on CPU, NCCL on GPU, DDP or FSDP.

Single-process runs go through the same calls, which then do nothing.
"""

from __future__ import annotations

import logging
import os
import warnings
import zlib
from datetime import timedelta

import torch
import torch.distributed as tdist
from rich.console import Console
from torch import nn

_console = Console(stderr=True)
_log = logging.getLogger("ufo.train")  # RUN/train.log while a run is on (ufo.train.logs.run_log)


def setup(kind: str = "auto", timeout_min: float | None = None) -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun: NCCL when this
    rank trains on a GPU (`kind`, as `train.device`), gloo on the CPU. `timeout_min` bounds how long
    a collective waits (rank 0 validates while the others wait at a barrier)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not tdist.is_initialized():
        on_gpu = kind == "cuda" or (kind == "auto" and torch.cuda.is_available())
        if on_gpu:
            local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local >= gpus:
                from ufo.errors import ConfigError

                raise ConfigError(
                    f"train.device: {kind}: torchrun started local rank {local}, but this machine has {gpus} "
                    f"GPU(s); start at most {gpus} process(es) per node (--nproc-per-node), or set "
                    "train.device: cpu"
                )
            torch.cuda.set_device(local)
        timeout = None if timeout_min is None else timedelta(minutes=timeout_min)
        tdist.init_process_group("nccl" if on_gpu else "gloo", timeout=timeout)
    return (tdist.get_rank(), tdist.get_world_size()) if tdist.is_initialized() else (0, 1)


def device(kind: str = "auto") -> torch.device:
    """This rank's device for `train.device` (auto: its GPU when CUDA is available, else the CPU)."""
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from ufo.errors import ConfigError

        raise ConfigError("train.device: 'cuda' was asked for but torch sees no CUDA device; use auto or cpu")
    return torch.device("cuda", torch.cuda.current_device())


def wrap(module: nn.Module, world: int, static: bool = False) -> nn.Module:
    """DDP when distributed.

    `static`: every step uses the same parameters on every rank (fixed routes, every task in
    every rank's batch; see `Trainer.steps_alike`). DDP then runs with `static_graph=True` and
    without `find_unused_parameters`: parameters no step ever uses (the experts off a fixed route,
    blocks beyond the arch's depth, MIM's unused task heads) are found once, in the first step,
    instead of by a walk of the autograd graph in every step, and buckets are rebuilt for the
    observed order. No zero-valued terms are added, so weight decay leaves unused weights alone
    exactly as on one process. Otherwise (routes left to the router, a task missing from some
    rank's batch) the used set changes from step to step and DDP must look for unused parameters.
    """
    if world <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    if static:
        return DDP(module, static_graph=True)
    return DDP(module, find_unused_parameters=True)


def mean_across_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalars averaged over the ranks that have them (for logging the global loss), as Python floats.

    Ranks may log different keys: a task with rows on some ranks only has a `loss/TASK` there. One
    small all-reduce compares the key sets (a CRC of the sorted names, as max and -min); when they
    agree, as in most steps, one all-reduce sums the values. Otherwise the names are gathered and
    each key is averaged over the ranks that have it."""
    if not tdist.is_initialized():
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    device = next(iter(values.values())).device if values else torch.device("cpu")
    sig = float(zlib.crc32("\0".join(keys).encode()))
    check = torch.tensor([sig, -sig], dtype=torch.float64, device=device)
    tdist.all_reduce(check, op=tdist.ReduceOp.MAX)
    if check[0] == -check[1]:  # the same keys on every rank
        buf = torch.stack([values[k].float() for k in keys])
        tdist.all_reduce(buf)
        return {k: float(v) for k, v in zip(keys, buf / tdist.get_world_size(), strict=True)}
    gathered: list[list[str] | None] = [None] * tdist.get_world_size()
    tdist.all_gather_object(gathered, keys)
    names = sorted({k for ks in gathered for k in ks or []})
    pairs = [[values[k].float(), torch.ones((), device=device)] if k in values else None for k in names]
    zero = torch.zeros(2, device=device)
    sums = torch.stack([torch.stack(p) if p is not None else zero for p in pairs])
    tdist.all_reduce(sums)
    return {k: float(s / n) for k, (s, n) in zip(names, sums, strict=True)}


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def is_main() -> bool:
    return not tdist.is_initialized() or tdist.get_rank() == 0


def info(msg: str) -> None:
    """Print on rank 0 and add it to the run log."""
    if is_main():
        _console.print(msg)
        _log.info(msg)


def warn(msg: str) -> None:
    """A RuntimeWarning on rank 0, printed and added to the run log."""
    if is_main():
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        _console.print(f"[yellow]warning:[/] {msg}")
        _log.warning(msg)


def cleanup() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
