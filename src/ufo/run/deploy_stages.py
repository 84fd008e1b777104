"""The stages of `ufo run` after training: GP-NAS predictors, search, extraction and export.

- predictors: per task, the accuracy predictor (inherited subnets of the chip supernet
  evaluated) and the latency predictor (subnets timed on the task's backend),
  `ufo.search.pipeline.fit_predictors`;
- search: per task, the subnet that maximises the predicted metric under the task's budget,
  re-measured, with its Pareto front (`ufo.search.pipeline.search_task`);
- extract: the chosen subnet of every task cut out of the chip supernet as a task model
  (plain timm backbone + head, the file `ufo export` and `ufo serve` take), checked against the
  supernet to 1e-5 and evaluated;
- export: each task model to ONNX (optionally INT8) with parity, size and batch-1 latency.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ufo.arch import Arch
from ufo.errors import UFOError
from ufo.flags import int8_flag
from ufo.run.context import RunContext
from ufo.run.state import PipelineError

PARITY_TOL = 1e-5


def _search_api():
    from ufo.search import pipeline

    return pipeline


def predictors(ctx: RunContext) -> tuple[list[Path], dict[str, Any]]:
    """Fit each task's accuracy predictor, and its latency predictor where its budget has a latency."""
    api = _search_api()
    out, p = ctx.dir("predictors"), ctx.pipe
    results: dict[str, Any] = {}
    for t in ctx.tasks:
        b = p.search.budget(t)
        latency = b.max_latency_ms is not None or b.max_latency_fraction is not None
        results[t] = api.fit_predictors(
            ctx.dir("chip_supernet"),
            t,
            backend=b.backend,
            metric_samples=p.predictors.metric_samples,
            latency_samples=p.predictors.latency_samples,
            seed=ctx.cfg.seed,
            out_dir=out,
            console=ctx.console,
            latency=latency,
            data_root=ctx.cfg.data_root,
            device=ctx.cfg.train.device,  # subnet metrics where the run trained
        )
    files = [ctx.write_json(out / "predictors.json", results)]
    return files, {
        t: {k: (r.get(k) or {}).get("cv_kendall_tau") for k in ("metric", "latency")} for t, r in results.items()
    }


def search(ctx: RunContext) -> tuple[list[Path], dict[str, Any]]:
    """Each task's best subnet under its budget, with the Pareto front plotted. A relative latency
    budget (`max_latency_fraction`) goes to the search as it is: it is timed on this machine with
    every measurement of candidates, so a change in load between timings cannot make it infeasible."""
    api = _search_api()
    out, p = ctx.dir("search"), ctx.pipe
    results: dict[str, Any] = {}
    for t in ctx.tasks:
        b = p.search.budget(t)
        limits = {k: v for k, v in b.model_dump().items() if v is not None and k != "backend"}
        if not limits:  # no limit: the largest subnet's size binds nothing, the best predicted metric wins
            from ufo.model import load_model

            model, _, _ = load_model(ctx.dir("chip_supernet") / "model.safetensors")
            limits = {"max_params": model.space.num_params(model.space.largest(model.backbone.routes()), t)}
        ctx.console.print(
            f"[bold]search[/]: {t} under " + ", ".join(f"{k} {v:g}" for k, v in limits.items()) + f" ({b.backend})"
        )
        res = api.search_task(
            ctx.dir("chip_supernet"),
            t,
            **limits,
            backend=b.backend,
            out_dir=out / t,
            trials=p.search.trials,
            top_k=p.search.top_k,
            seed=ctx.cfg.seed,
            console=ctx.console,
            metric_samples=p.predictors.metric_samples,
            latency_samples=p.predictors.latency_samples,
            predictor_dir=ctx.dir("predictors"),
            data_root=ctx.cfg.data_root,
            device=ctx.cfg.train.device,
        )
        for w in res.warnings:
            ctx.console.print(f"  [yellow]warning[/]: {w}")
        results[t] = {
            **api.result_summary(res),
            "arch": res.arch.model_dump(),
            "objective": res.objective,
            "png_path": res.png_path,
            "json_path": res.json_path,
            "front_size": len(res.front),
            "candidates": len(res.candidates),
            # the latency budget the chosen subnet was judged against (a relative one is timed beside it)
            "budget_ms": next((c.budget_ms for c in res.candidates if c.arch == res.arch and c.meets_budget), None),
        }
    files = [ctx.write_json(out / "search.json", results)]
    return files, {
        t: {k: r.get(k) for k in ("measured_metric", "measured_latency_ms", "params")} for t, r in results.items()
    }


def chosen_arch(ctx: RunContext, task: str) -> Arch:
    """The subnet the search stage chose for `task`."""
    import json

    f = ctx.dir("search") / "search.json"
    res = json.loads(f.read_text()).get(task)
    if res is None or "arch" not in res:
        raise PipelineError(f"{f}: no chosen arch for task {task!r}; run the search stage again (--from search)")
    return Arch.model_validate(res["arch"])


def extract(ctx: RunContext) -> tuple[list[Path], dict[str, Any]]:
    """Cut each task's chosen subnet out of the chip supernet as a task model, check it, evaluate it."""
    from ufo.evaluation.predict import make_predict
    from ufo.evaluation.protocol import evaluate_predict, recalibrate_bn
    from ufo.model import load_model
    from ufo.taskmodel import extract_task_model, save_task_model

    out = ctx.dir("extract")
    rows: dict[str, Any] = {}
    files = []
    for t in ctx.tasks:
        model, cfg, _ = load_model(ctx.dir("chip_supernet") / "model.safetensors")
        cfg.data_root = ctx.cfg.data_root
        arch = chosen_arch(ctx, t)
        model.set_arch(arch)
        recalibrate_bn(model, {t: ctx.data[t]}, cfg, [t])
        tm = extract_task_model(model, arch, t, cfg, {t: ctx.data[t]}, source=str(ctx.dir("chip_supernet")))
        x = torch.randn(8, cfg.model.in_chans, *cfg.input_size(t), generator=torch.Generator().manual_seed(cfg.seed))
        with torch.no_grad():
            diff = float((tm(x, t) - model(x, t)).abs().max())
        if diff > PARITY_TOL:
            raise UFOError(
                f"task {t!r}: the extracted task model differs from the supernet by {diff:.2e} (> {PARITY_TOL})"
            )
        path, arch_file = out / f"{t}.safetensors", out / f"{t}.arch.json"
        save_task_model(path, tm)
        arch.save(arch_file)  # for `ufo extract RUN/chip_supernet --task T --arch FILE`
        metrics = evaluate_predict(
            make_predict(tm, t, cfg, cfg.train.eval_batch_size), t, tm.info.heads[t], cfg, ctx.data[t]
        )
        rows[t] = {
            "file": str(path.relative_to(ctx.run_dir)),
            "arch_file": str(arch_file.relative_to(ctx.run_dir)),
            "kind": cfg.tasks[t].kind,
            "arch": arch.model_dump(),
            "params": tm.num_params(),
            "backbone_params": model.space.num_params(arch, t),
            "mflops": model.space.flops(arch, t) / 1e6,
            "parity": diff,
            "metrics": metrics,
            "primary": metrics[ctx.primary(t)],
        }
        files += [path, arch_file]
    files.append(ctx.write_json(out / "extract.json", rows))
    return files, {t: r["primary"] for t, r in rows.items()}


def _latency_ms(fn, repeats: int) -> float:
    from ufo.search.latency import time_calls, torch_threads

    with torch_threads(1):
        return time_calls(fn, repeats, max(3, repeats // 10)).median_ms


def export(ctx: RunContext) -> tuple[list[Path], dict[str, Any]]:
    """ONNX (and INT8) of every extracted task model: parity, metrics, size and batch-1 latency
    (1 thread) of torch eager, ONNX Runtime fp32 and INT8."""
    from ufo.deploy.onnx_export import OnnxTaskModel, export_task
    from ufo.taskmodel import load_task_model

    e = ctx.pipe.export
    out = ctx.dir("export")
    rows: dict[str, Any] = {}
    files = []
    for t in ctx.tasks:
        src = ctx.dir("extract") / f"{t}.safetensors"
        tm = load_task_model(src)
        onnx_path = out / f"{t}.onnx"
        ctx.console.print(f"[bold]export[/]: {t} -> {onnx_path}" + (f" (INT8 {e.int8})" if e.int8 else ""))
        r = export_task(tm, t, onnx_path, e.int8, ctx.cfg, ctx.data[t], opset=e.opset)
        fp32 = Path(r["fp32"])
        x = torch.randn(1, ctx.cfg.model.in_chans, *ctx.cfg.input_size(t))
        path_module = tm.for_task(t).eval()

        def eager() -> None:
            with torch.inference_mode():
                path_module(x)

        m32 = OnnxTaskModel(fp32, threads=1)
        lat = {
            "torch": _latency_ms(eager, e.latency_repeats),
            "onnx_fp32": _latency_ms(lambda: m32(x), e.latency_repeats),
        }
        row: dict[str, Any] = {
            "task": t,
            "source": str(src.relative_to(ctx.run_dir)),
            "fp32": str(fp32.relative_to(ctx.run_dir)),
            "fp32_bytes": fp32.stat().st_size,
            "parity_max_abs_diff": r["parity_max_abs_diff"],
            "parity_tol": r["parity_tol"],
            "metrics_fp32": r.get("metrics_fp32"),
            "primary": r.get("primary"),
        }
        files.append(fp32)
        if "int8" in r:
            q = r["int8"]
            m8 = OnnxTaskModel(q["path"], threads=1)
            lat["onnx_int8"] = _latency_ms(lambda: m8(x), e.latency_repeats)
            row.update(
                int8=str(Path(q["path"]).relative_to(ctx.run_dir)),
                int8_bytes=q["size_bytes"],
                int8_max_abs_diff=q["max_abs_diff_vs_torch"],
                metrics_int8=r.get("metrics_int8"),
            )
            files.append(Path(q["path"]))
        row["latency_ms"] = lat
        flag = int8_flag(t, lat["onnx_fp32"], lat.get("onnx_int8"))
        row["warnings"] = [flag] if flag else []
        if flag:
            ctx.console.print(f"  [yellow]warning[/]: {flag}")
        rows[t] = row
    files.append(ctx.write_json(out / "export.json", rows))
    return files, {}
