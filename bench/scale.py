"""Scale benchmark: many tasks, a mixed batch, torch.compile and activation checkpointing.

Targets, each a ratio measured in one run (candidates alternate round by round, see
`_common.time_interleaved`; a value is the median of the per-round ratios):
1. SuperViT with 20 tasks, a mixed batch of one image per task, every route fixed to the task
   expert: forward+backward against a timm `VisionTransformer` of the same shape and batch.
   The experts run as training runs them by default (`train.batched_experts`: two batched
   matmuls per block, `TaskFFN.batched`); the per-task loop is timed in the same rounds
   (`loop_vs_timm`, `batched_vs_loop`).
2. The same step under `torch.compile` against eager (same model, after warm-up), and the number
   of graphs `torch._dynamo.explain` finds in the mixed-task forward (batched experts; also with
   the loop, `graphs_loop`, and in eval with every path left to the routers, `graphs_eval_routed`). The batch layout is
   computed eagerly (`SuperViT.layout`) and passed in, as a training loop would.
3. Peak memory of a ViT-B-shape forward+backward at batch 8 with `set_grad_checkpointing(True)`
   against without. On CPU torch keeps no allocator statistics, so each side runs in a fresh
   subprocess: model and batch are built first, the kernel's peak-RSS mark is reset
   (/proc/self/clear_refs) and the resident size read (VmRSS), then one step runs; the peak
   resident size after it (VmHWM) minus that baseline is the step's peak memory: activations,
   gradients and temporaries, not weights. The children run with MALLOC_MMAP_THRESHOLD_=65536 so
   that freed tensors leave the resident set instead of staying cached in glibc's heap.
   On CUDA, torch.cuda.max_memory_allocated minus the allocation before the step.
With CUDA, the ratios are measured again on the GPU, plus bf16 autocast images/s against timm.

The CPU timings run with glibc's malloc keeping freed memory (`ufo.train.host_memory`), as CPU
training does by default (`train.keep_freed_memory`): all candidates share the process and the
setting. The minor page faults and kernel seconds of each timed step are recorded beside the
timings (`cpu.mixed_vs_timm.rusage`); with the default malloc the supernet step took ~200k faults
and 3-4.5 s of kernel time (session 13), which is what the setting removes.

Run from the repository root: `.venv/bin/python bench/scale.py [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import ufo
import ufo.nn
from _common import compare, load_average, progress, quantiles, target, time_interleaved, write_results
from ufo.train.host_memory import keep_freed_memory


@dataclass(frozen=True)
class Shape:
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int
    patch_size: int
    tasks: int
    batch: int  # the mixed batch: `tasks` rows, one per task
    mem_batch: int  # the checkpointing comparison
    head_dim: int = 64
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class Plan:
    rounds: int
    warmup: int
    gpu_rounds: int


VIT_B = Shape(embed_dim=768, depth=12, num_heads=12, img_size=224, patch_size=16, tasks=20, batch=20, mem_batch=8)
QUICK_SHAPE = Shape(embed_dim=192, depth=4, num_heads=3, img_size=64, patch_size=8, tasks=20, batch=20, mem_batch=8)
# Two warm-up rounds: the kept heap grows to the step's peak over the first two steps.
FULL, QUICK = Plan(rounds=4, warmup=2, gpu_rounds=20), Plan(rounds=3, warmup=1, gpu_rounds=5)


def make_space(shape: Shape, tasks: int) -> ufo.SearchSpace:
    return ufo.SearchSpace(
        tasks=[f"t{i:02d}" for i in range(tasks)],
        depth=[shape.depth],
        embed_dim=[shape.embed_dim],
        num_heads=[shape.num_heads],
        mlp_ratio=[shape.mlp_ratio],
        head_dim=shape.head_dim,
        img_size=shape.img_size,
        patch_size=shape.patch_size,
    )


def supernet_arch(space: ufo.SearchSpace, path: str) -> ufo.Arch:
    """The space's only arch, every task fixed to `path` in every block."""
    arch = space.largest()
    return arch.model_copy(update={"paths": {t: [path] * arch.depth for t in space.tasks}})


def supernet(shape: Shape, tasks: int, path: str) -> ufo.nn.SuperViT:
    """The SuperViT of `shape` at its only arch, every task fixed to `path` in every block."""
    model = ufo.nn.SuperViT(make_space(shape, tasks)).train()
    model.set_arch(supernet_arch(model.space, path))
    return model


def timm_vit(shape: Shape) -> VisionTransformer:
    return VisionTransformer(
        img_size=shape.img_size,
        patch_size=shape.patch_size,
        num_classes=0,
        embed_dim=shape.embed_dim,
        depth=shape.depth,
        num_heads=shape.num_heads,
        mlp_ratio=shape.mlp_ratio,
        qkv_bias=True,
        global_pool="token",
    ).train()


def step_fn(
    model: nn.Module,
    x: torch.Tensor,
    ids: torch.Tensor | None = None,
    batched: bool | None = None,
    layout_of: ufo.nn.SuperViT | None = None,
    sync: bool = False,
) -> Callable[[], None]:
    """One forward+backward with a scalar loss, then gradients set to None (as a training step).
    With `layout_of`, the batch layout is computed eagerly by that SuperViT and passed as the task."""

    def run() -> None:
        if batched is not None:
            cast(ufo.nn.SuperViT, layout_of or model).set_batched_experts(batched)
        task = () if ids is None else ((layout_of.layout(ids, x.shape[0]) if layout_of else ids),)
        loss = model(x, *task).float().pow(2).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if sync:
            torch.cuda.synchronize()

    return run


def with_rusage(fn: Callable[[], None], log: list[dict[str, float]]) -> Callable[[], None]:
    """`fn`, appending each call's minor page faults and kernel (system) seconds to `log`."""

    def run() -> None:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        fn()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        log.append({"minor_faults": r1.ru_minflt - r0.ru_minflt, "system_s": r1.ru_stime - r0.ru_stime})

    return run


def rusage_summary(log: list[dict[str, float]], timed: int) -> dict[str, Any]:
    """Per-step medians over the last `timed` calls (the timed rounds, after the warm-up)."""
    rows = log[-timed:]
    return {k: quantiles([r[k] for r in rows])["median"] for k in rows[0]} | {"steps": len(rows)}


def mixed_batch(shape: Shape, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape.batch, 3, shape.img_size, shape.img_size, generator=g)
    ids = torch.randperm(shape.tasks, generator=g)[: shape.batch] % shape.tasks  # one row per task, shuffled
    return x.to(device), ids.to(device)


def graph_count(model: ufo.nn.SuperViT, x: torch.Tensor, ids: torch.Tensor) -> dict[str, Any]:
    torch._dynamo.reset()
    e = torch._dynamo.explain(model)(x, model.layout(ids, x.shape[0]))
    torch._dynamo.reset()
    return {
        "graphs": e.graph_count,
        "breaks": e.graph_break_count,
        "break_reasons": [str(b.reason).splitlines()[0] for b in e.break_reasons],
    }


# ----- peak memory of one step, in a fresh process -----
def _status_bytes(field: str) -> int:
    """A size from /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(shape: Shape, checkpointing: bool, device: str) -> dict[str, Any]:
    """Peak memory of one ViT-B-shape fwd+bwd (single task, shared path) at batch `mem_batch`."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = supernet(shape, 1, "shared").to(device)
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(shape.mem_batch, 3, shape.img_size, shape.img_size, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(x, 0).pow(2).mean().backward()
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base, "method": "torch.cuda.max_memory_allocated"}
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    model(x, 0).pow(2).mean().backward()
    step_s = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")
    return {
        "peak_bytes": peak - base,
        "rss_before": base,
        "peak_rss": peak,
        "step_s": step_s,
        "method": "VmHWM after the step - VmRSS before it, peak reset by /proc/self/clear_refs (fresh process)",
    }


def measure_memory(shape: Shape, device: str) -> dict[str, Any]:
    out = {}
    for ckpt in (False, True):
        cmd = [sys.executable, __file__, "--memory-child", json.dumps(asdict(shape)), str(int(ckpt)), device]
        # glibc would keep freed blocks in its heap (RSS then shows allocator caching, not use);
        # a low mmap threshold returns every large block to the OS when torch frees it.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        out["checkpointing" if ckpt else "plain"] = json.loads(res.stdout.strip().splitlines()[-1])
    out["ratio"] = out["checkpointing"]["peak_bytes"] / out["plain"]["peak_bytes"]
    return out


# ----- the measurements -----
def run_cpu(shape: Shape, plan: Plan) -> dict[str, Any]:
    torch.manual_seed(0)
    model = supernet(shape, shape.tasks, "task")
    vit = timm_vit(shape)
    x, ids = mixed_batch(shape)
    out: dict[str, Any] = {}
    # One round of three. In session 12 the batched path's stacked weights (GBs at 20 tasks) made
    # glibc trim and re-fault the heap, which slowed the loop timed after it (1.77x); with freed
    # memory kept (keep_freed_memory, trimming off) the three share the heap without faults.
    usage: dict[str, list[dict[str, float]]] = {"supernet": [], "supernet_loop": [], "timm": []}
    with progress() as bar:
        t = bar.add_task("mixed fwd+bwd vs timm", total=plan.rounds)
        times = time_interleaved(
            {
                "supernet": with_rusage(step_fn(model, x, ids, batched=True), usage["supernet"]),
                "supernet_loop": with_rusage(step_fn(model, x, ids, batched=False), usage["supernet_loop"]),
                "timm": with_rusage(step_fn(vit, x), usage["timm"]),
            },
            plan.rounds,
            plan.warmup,
            lambda: bar.advance(t),
        )
    out["mixed_vs_timm"] = compare(times, "supernet", "timm")
    out["mixed_vs_timm"]["rusage"] = {k: rusage_summary(v, plan.rounds) for k, v in usage.items()}
    out["loop_vs_timm"] = compare(times, "supernet_loop", "timm")
    out["batched_vs_loop"] = compare(times, "supernet", "supernet_loop")

    model.set_batched_experts(False)
    out["graphs_loop"] = graph_count(model, x, ids)
    model.set_batched_experts(True)  # the training default from here on
    out["graphs"] = graph_count(model, x, ids)
    # eval with every path left to the routers: layout() reads their argmax (Layout.paths)
    model.eval().set_arch(model.space.largest().model_copy(update={"paths": {}}))
    with torch.no_grad():
        out["graphs_eval_routed"] = graph_count(model, x, ids)
    model.train().set_arch(supernet_arch(model.space, "task"))
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    step_fn(compiled, x, ids, layout_of=model)()
    out["compile_s"] = time.perf_counter() - t0
    with progress() as bar:
        t = bar.add_task("compiled vs eager", total=plan.rounds)
        times = time_interleaved(
            {"compiled": step_fn(compiled, x, ids, layout_of=model), "eager": step_fn(model, x, ids, layout_of=model)},
            plan.rounds,
            plan.warmup,
            lambda: bar.advance(t),
        )
    out["compiled_vs_eager"] = compare(times, "compiled", "eager")
    torch._dynamo.reset()
    del compiled, model
    out["memory"] = measure_memory(shape, "cpu")
    return out


def run_cuda(shape: Shape, plan: Plan) -> dict[str, Any]:
    torch.manual_seed(0)
    model = supernet(shape, shape.tasks, "task").cuda()
    vit = timm_vit(shape).cuda()
    x, ids = mixed_batch(shape, "cuda")
    out: dict[str, Any] = {"device": torch.cuda.get_device_name()}
    times = time_interleaved(
        {
            "supernet": step_fn(model, x, ids, batched=True, sync=True),
            "supernet_loop": step_fn(model, x, ids, batched=False, sync=True),
            "timm": step_fn(vit, x, sync=True),
        },
        plan.gpu_rounds,
        3,
    )
    out["mixed_vs_timm"] = compare(times, "supernet", "timm")
    out["loop_vs_timm"] = compare(times, "supernet_loop", "timm")
    model.set_batched_experts(True)
    compiled = torch.compile(model)
    step_fn(compiled, x, ids, layout_of=model, sync=True)()
    times = time_interleaved(
        {
            "compiled": step_fn(compiled, x, ids, layout_of=model, sync=True),
            "eager": step_fn(model, x, ids, layout_of=model, sync=True),
        },
        plan.gpu_rounds,
        3,
    )
    out["compiled_vs_eager"] = compare(times, "compiled", "eager")

    def bf16(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                fn()

        return run

    times = time_interleaved(
        {
            "supernet": bf16(step_fn(model, x, ids, layout_of=model, sync=True)),
            "timm": bf16(step_fn(vit, x, sync=True)),
        },
        plan.gpu_rounds,
        3,
    )
    out["bf16_images_per_s"] = {k: shape.batch / (quantiles(v)["median"] / 1e3) for k, v in times.items()}
    out["bf16_vs_timm"] = compare(times, "supernet", "timm")
    torch._dynamo.reset()
    del compiled, model
    out["memory"] = measure_memory(shape, "cuda")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small shape and few rounds: a smoke run")
    parser.add_argument("--memory-child", nargs=3, metavar=("SHAPE", "CKPT", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        shape_json, ckpt, device = args.memory_child
        print(json.dumps(memory_child(Shape(**json.loads(shape_json)), ckpt == "1", device)))
        return
    torch.set_num_threads(2)
    freed_memory = "kept" if keep_freed_memory() else "system default (not glibc)"
    shape, plan = (QUICK_SHAPE, QUICK) if args.quick else (VIT_B, FULL)
    load_before = load_average()
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "quick": args.quick,
        "shape": asdict(shape),
        "plan": asdict(plan),
        "freed_memory": freed_memory,
        "cpu": run_cpu(shape, plan),
    }
    if torch.cuda.is_available():
        results["cuda"] = run_cuda(shape, plan)
    results["load_average"] = {"before": load_before, "after": load_average()}
    results["wall_s"] = time.perf_counter() - t0
    cpu = results["cpu"]
    targets = [
        target(f"CPU: {shape.tasks} tasks mixed fwd+bwd / timm ViT", cpu["mixed_vs_timm"]["ratio"], "<=", 1.15),
        target("CPU: compiled / eager mixed-task step", cpu["compiled_vs_eager"]["ratio"], "<=", 1.0),
        target("CPU: graphs in the compiled mixed-task forward", cpu["graphs"]["graphs"], "<=", 1),
        target(
            f"CPU: peak memory with / without checkpointing, batch {shape.mem_batch}", cpu["memory"]["ratio"], "<=", 0.6
        ),
    ]
    if "cuda" in results:
        g = results["cuda"]
        targets += [
            target(f"CUDA: {shape.tasks} tasks mixed fwd+bwd / timm ViT", g["mixed_vs_timm"]["ratio"], "<=", 1.15),
            target("CUDA: compiled / eager mixed-task step", g["compiled_vs_eager"]["ratio"], "<=", 1.0),
            target(
                f"CUDA: peak memory with / without checkpointing, batch {shape.mem_batch}",
                g["memory"]["ratio"],
                "<=",
                0.6,
            ),
        ]
    command = ".venv/bin/python bench/scale.py" + (" --quick" if args.quick else "")
    jpath, mpath = write_results("scale-quick" if args.quick else "scale", results, targets, command)
    for t in targets:
        print(f"{'met ' if t['met'] else 'MISS'}  {t['name']}: {t['value']:.3f} {t['op']} {t['target']}")
    print(f"wrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
