"""Core benchmark: what the supernet's elastic code costs against plain timm, on CPU.

Three targets, each a ratio of two models timed in alternating rounds of the same run:
1. an extracted single-task subnet vs a timm `VisionTransformer` of the same shape (eval);
2. SuperViT forward+backward at the largest arch vs the same timm ViT (train, batch 64);
3. SuperViT eval for one task vs the subnet extracted for that arch and task.

A target's value is the median of the per-round ratios (see `_common.compare`): other processes
on the shared CPU slow both sides of a round alike, so pairing cancels most of their effect.

Run from the repository root: `.venv/bin/python bench/core.py [--quick]`.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import ufo
import ufo.nn
from _common import compare, load_average, progress, target, time_interleaved, write_results

TASKS = ["cls", "faces", "signs"]
SHAPE = dict(embed_dim=192, depth=6, num_heads=3, head_dim=64, mlp_ratio=4.0, img_size=32, patch_size=4, in_chans=3)


@dataclass(frozen=True)
class Plan:
    """Rounds per measurement: small batches are cheap and noisy, so they get more rounds."""

    b1: int
    b32: int
    train: int
    warmup: int


FULL = Plan(b1=200, b32=150, train=30, warmup=3)
QUICK = Plan(b1=10, b32=4, train=3, warmup=1)


def make_space() -> ufo.SearchSpace:
    return ufo.SearchSpace(
        tasks=TASKS,
        depth=[4, 5, 6],
        embed_dim=[128, 160, 192],
        num_heads=[2, 3],
        mlp_ratio=[2.0, 3.0, 4.0],
        head_dim=64,
        img_size=32,
        patch_size=4,
    )


def with_paths(space: ufo.SearchSpace, arch: ufo.Arch, path: str) -> ufo.Arch:
    """`arch` with every task fixed to `path` in every block."""
    return arch.model_copy(update={"paths": {t: [path] * arch.depth for t in space.tasks}})


def mid_arch(space: ufo.SearchSpace) -> tuple[int, ufo.Arch]:
    """The first sampled arch of middle depth and width whose "cls" route uses all three paths."""
    for seed in range(1000):
        a = space.sample(seed)
        if (
            a.depth == space.depth[1]
            and a.embed_dim == space.embed_dim[1]
            and set(a.paths["cls"]) == {"shared", "task", "mix"}
        ):
            return seed, a
    raise RuntimeError("no mid-size arch with mixed paths in the first 1000 seeds")


def timm_vit() -> VisionTransformer:
    """The reference timm ViT of the DESIGN shape (embed 192, depth 6, 3 heads of 64)."""
    return VisionTransformer(
        img_size=32,
        patch_size=4,
        num_classes=0,
        embed_dim=192,
        depth=6,
        num_heads=3,
        mlp_ratio=4,
        qkv_bias=True,
        global_pool="token",
    )


def eval_fn(model: nn.Module, x: torch.Tensor, *task: Any) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(x, *task)

    return run


def train_fn(model: nn.Module, x: torch.Tensor, *task: Any) -> Callable[[], None]:
    """One forward+backward with a scalar loss, then zeroed gradients (as a training step would)."""

    def run() -> None:
        loss = model(x, *task).float().pow(2).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def describe(arch: ufo.Arch, task: str) -> dict[str, Any]:
    return {
        "depth": arch.depth,
        "embed_dim": arch.embed_dim,
        "num_heads": arch.num_heads,
        "mlp_ratio": arch.mlp_ratio,
        "paths": list(arch.paths[task]),
    }


def run(plan: Plan, quick: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    space = make_space()
    supernet = ufo.nn.SuperViT(space)
    shared = with_paths(space, space.largest(), "shared")
    seed, mid = mid_arch(space)

    sub = ufo.nn.extract(supernet, shared, "cls")  # eval mode, timm VisionTransformer
    vit = timm_vit().eval()
    vit.load_state_dict(sub.state_dict())  # identical weights: no data-dependent timing difference
    x1, x32, x64 = (torch.randn(b, 3, 32, 32) for b in (1, 32, 64))
    g = torch.Generator().manual_seed(0)
    mixed_ids = (torch.arange(64) % len(TASKS))[torch.randperm(64, generator=g)]

    eval_models = {}
    for name, arch in (("largest_shared", shared), ("mid", mid)):
        m = copy.deepcopy(supernet).eval()
        m.set_arch(arch)
        eval_models[name] = (arch, m, sub if name == "largest_shared" else ufo.nn.extract(supernet, arch, "cls"))
    train_single = copy.deepcopy(supernet).train()
    train_single.set_arch(shared)
    train_mixed = copy.deepcopy(supernet).train()
    train_mixed.set_arch(with_paths(space, space.largest(), "task"))
    vit_train = copy.deepcopy(vit).train()

    jobs: list[tuple[str, str, int, dict[str, Callable[[], None]]]] = [
        ("extract_vs_timm", "batch1", plan.b1, {"extracted": eval_fn(sub, x1), "timm": eval_fn(vit, x1)}),
        ("extract_vs_timm", "batch32", plan.b32, {"extracted": eval_fn(sub, x32), "timm": eval_fn(vit, x32)}),
        (
            "train_vs_timm",
            "batch64",
            plan.train,
            {
                "supernet": train_fn(train_single, x64, "cls"),
                "supernet_mixed": train_fn(train_mixed, x64, mixed_ids),
                "timm": train_fn(vit_train, x64),
            },
        ),
    ]
    for name, (_arch, m, ex) in eval_models.items():
        for b, x, n in (("batch1", x1, plan.b1), ("batch32", x32, plan.b32)):
            jobs.append(
                (
                    "supernet_vs_extracted",
                    f"{name}.{b}",
                    n,
                    {"supernet": eval_fn(m, x, "cls"), "extracted": eval_fn(ex, x)},
                )
            )

    times: dict[tuple[str, str], dict[str, list[float]]] = {}
    load_before = load_average()
    with progress() as bar:
        for group, key, n, fns in jobs:
            task = bar.add_task(f"{group} {key}", total=n)
            times[group, key] = time_interleaved(fns, n, plan.warmup, lambda: bar.advance(task))

    # set_arch is paid once per arch switch, not per call; measure it for completeness.
    t0 = time.perf_counter()
    for _ in range(100):
        train_mixed.set_arch(mid)
    set_arch_ms = (time.perf_counter() - t0) * 10

    results: dict[str, Any] = {
        "quick": quick,
        "load_average": {"before": load_before, "after": load_average()},
        "plan": {
            "rounds_batch1": plan.b1,
            "rounds_batch32": plan.b32,
            "rounds_train": plan.train,
            "warmup": plan.warmup,
        },
        "shape": SHAPE,
        "archs": {"largest_shared": describe(shared, "cls"), "mid": {"seed": seed, **describe(mid, "cls")}},
        "extract_vs_timm": {
            b: compare(times["extract_vs_timm", b], "extracted", "timm") for b in ("batch1", "batch32")
        },
        "train_vs_timm": {
            "batch64": compare(times["train_vs_timm", "batch64"], "supernet", "timm"),
            "batch64_mixed": compare(times["train_vs_timm", "batch64"], "supernet_mixed", "timm"),
            "batch64_mixed_vs_single": compare(times["train_vs_timm", "batch64"], "supernet_mixed", "supernet"),
        },
        "supernet_vs_extracted": {
            name: {
                b: compare(times["supernet_vs_extracted", f"{name}.{b}"], "supernet", "extracted")
                for b in ("batch1", "batch32")
            }
            for name in eval_models
        },
        "set_arch_ms": set_arch_ms,
    }
    r = results
    worst_eval = max(r["supernet_vs_extracted"][a]["batch32"]["ratio"] for a in eval_models)
    targets = [
        target("extracted / timm eval latency, batch 32", r["extract_vs_timm"]["batch32"]["ratio"], "<=", 1.02),
        target("supernet / timm fwd+bwd, batch 64", r["train_vs_timm"]["batch64"]["ratio"], "<=", 1.15),
        target("supernet / extracted eval latency, batch 32 (worst arch)", worst_eval, "<=", 1.10),
    ]
    return results, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few rounds only: a smoke run that still writes results")
    args = parser.parse_args()
    results, targets = run(QUICK if args.quick else FULL, args.quick)
    command = ".venv/bin/python bench/core.py" + (" --quick" if args.quick else "")
    jpath, mpath = write_results("core", results, targets, command)
    for t in targets:
        print(f"{'met ' if t['met'] else 'MISS'}  {t['name']}: {t['value']:.3f} {t['op']} {t['target']}")
    print(f"wrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
