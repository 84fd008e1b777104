"""Distillation and new-task extension benchmark, on the real suite (`configs/suite.yaml`, ../shared/data).

0. An All-in-One run of the suite restricted to `--base-tasks` (default `faces` verification,
   `chars` retrieval, `tracks` reid and `alnum` classification; every path shared, `--aio-steps`
   steps). The `--held-out` task (default `signs`, GTSRB classification) is left out of it. Note
   that `tracks` re-identifies the physical signs of GTSRB's training images, so the base has seen
   the held-out task's images, though never its class labels: the extension measures how well
   new labels are learnt on top of the shared features, as the UFO report's new-task setting does.
1. Distillation (`ufo.train.distill.distill_and_compare`): for each of `--distill-tasks` (default
   `alnum` classification and `tracks` reid, both base tasks), two timm students
   (`STUDENTS`, pretrained=False) learn from the task's subnet of (0) at the run's arch, and the same
   students train without the teacher (same recipe and steps). Reported: teacher and student
   params, compression, student metric as a share of the teacher's, gain over no teacher.
   Targets: per task, some student at >= 10x fewer parameters reaches >= 95% of the teacher's
   metric; per (task, student), distillation beats no teacher.
2. Extension (`ufo.train.extend.extend`): the held-out task is added to (0) at fraction 0.1 and
   1.0 (`head+expert`), and at 0.1 with the other modes (`head`, `head+expert+norms`, `all`) for
   comparison; against the same task trained alone from scratch (the All-in-One Trainer, the same
   ViT, `--only`) on the same 10% subset for as many steps. The base tasks are re-evaluated on
   every extended run (exact modes). Targets: extension at 10% >= 90% of full-data extension; it
   beats from-scratch at 10%; the base tasks' outputs bitwise equal and metrics equal.

Defaults take about 15 minutes on a quiet 2-core machine. `--quick` (a few steps per run) checks
the script end to end. Run it alone: `flock /tmp/ufo-cpu.lock .venv/bin/python bench/distill_extend.py`.
Writes bench/results/distill_extend.{json,md} and distill_extend.png.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from _common import RESULTS_DIR, load_average, target, write_results
from ufo.config import Config, load_config, parse_config
from ufo.data.build import build_task_data
from ufo.data.sampler import pk_capacity
from ufo.evaluation.protocol import evaluate_tasks
from ufo.model import load_model
from ufo.tasks import task_class
from ufo.train.distill import DistillConfig, distill_and_compare
from ufo.train.extend import ExtendConfig, extend, fraction_subset
from ufo.train.loop import Trainer

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "configs" / "suite.yaml"
# (label, timm name, timm kwargs, distill overrides): two small CNNs that run at 32x32
STUDENTS: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("effnet-0.5", "test_efficientnet", {"channel_multiplier": 0.5}, {"embedding_dim": 64}),
    ("resnet-tiny", "test_resnet", {"channels": [8, 16, 24, 32]}, {}),
]
EXT_MODES = [("head+expert", 0.1), ("head+expert", 1.0), ("head", 0.1), ("head+expert+norms", 0.1), ("all", 0.1)]


def suite_config(tasks: list[str], steps: int, extra: list[str]) -> Config:
    """The suite restricted to `tasks`, global batch = the sum of their `batch:` shares."""
    base = load_config(SUITE, extra).model_dump(mode="json")
    unknown = [t for t in tasks if t not in base["tasks"]]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; the suite's tasks are {list(base['tasks'])}")
    base["tasks"] = {t: base["tasks"][t] for t in tasks}
    base["train"]["batch_size"] = sum(base["tasks"][t].get("batch") or 20 for t in tasks)
    base["train"].update(steps=steps, log_every=25, ckpt_every=steps, paths="shared")
    base["name"] = f"suite-{'-'.join(tasks)}"
    return parse_config(base, f"{SUITE} (tasks {tasks})")


def primary_of(kind: str) -> str:
    return task_class(kind).primary


def run_distillation(run: Path, tasks: list[str], work: Path, steps: int, batch: int, threads: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task in tasks:
        out[task] = {}
        for label, name, kwargs, over in STUDENTS:
            cfg = DistillConfig(
                student=name,
                student_kwargs=kwargs,
                steps=steps,
                batch_size=batch,
                threads=threads,
                ckpt_every=steps,
                log_every=25,
                **over,
            )
            print(f"\n== distill {task} -> {label} ({name} {kwargs}), {steps} steps")
            r = distill_and_compare(run, task, work / f"distill-{task}-{label}", cfg, show_progress=True)
            p = r["primary"]
            out[task][label] = {
                "student": name,
                "kwargs": kwargs,
                "primary": p,
                "teacher_params": r["teacher"]["params"],
                "student_params": r["student"]["params"],
                "params_ratio": r["student"]["params"] / r["teacher"]["params"],
                "compression": r["compression"],
                "teacher_metric": r["teacher"]["metrics"][p],
                "student_metric": r["student"]["metrics"][p],
                "no_teacher_metric": r["no_teacher"]["metrics"][p],
                "share_of_teacher": r["share_of_teacher"],
                "no_teacher_share": r["no_teacher"]["share_of_teacher"],
                "gain": r["gain"],
                "train_seconds": r["train_seconds"],
            }
            print({k: v for k, v in out[task][label].items() if k not in ("kwargs",)})
    return out


def run_extension(
    run: Path,
    held: str,
    suite: Config,
    base_tasks: list[str],
    base_metrics: dict[str, dict[str, float]],
    work: Path,
    steps: int,
    batch: int,
    threads: int,
) -> dict[str, Any]:
    tc = suite.tasks[held]
    data = build_task_data(held, tc, suite)
    p = primary_of(tc.kind)
    out: dict[str, Any] = {
        "task": held,
        "kind": tc.kind,
        "primary": p,
        "full_train_samples": len(data.train),
        "runs": {},
    }
    for mode, frac in EXT_MODES:
        key = f"{mode}@{frac:g}"
        print(f"\n== extend +{held}: {key}, {steps} steps")
        r = extend(
            run,
            {held: tc.model_dump(mode="json")},
            work / f"extend-{mode}-{frac:g}",
            ExtendConfig(
                train=mode,
                fraction=frac,
                steps=steps,
                batch_size=batch,
                threads=threads,
                ckpt_every=steps,
                log_every=25,
            ),
            data=data,
        )
        model, cfg, _ = load_model(work / f"extend-{mode}-{frac:g}" / "model.safetensors")
        base_data = {t: build_task_data(t, cfg.tasks[t], cfg) for t in base_tasks}
        after = evaluate_tasks(model, base_data, cfg, base_tasks)
        out["runs"][key] = {
            "train": mode,
            "fraction": frac,
            "train_samples": r["train_samples"],
            "metric": r["metrics"][p],
            "trainable_params": r["trainable_params"],
            "others_bitwise_unchanged": all(r["others_unchanged"].values()),
            "others_metrics_equal": all(after[t] == base_metrics[t] for t in base_tasks),
            "others_metrics": {t: after[t][primary_of(cfg.tasks[t].kind)] for t in base_tasks},
            "train_seconds": r["train_seconds"],
        }
        print(out["runs"][key])
    # the same task alone, from scratch, on the same 10% subset, for as many steps
    sub = fraction_subset(data, 0.1, 0, task_class(tc.kind).uses_groups)
    if sub.groups is not None:  # as the extension's loop does: P x K cannot exceed the subset's identities
        batch = min(batch, pk_capacity(sub.groups.numpy(), int(tc.options.get("k", 4))))
    alone = suite.only(held)
    alone = alone.model_copy(
        update={
            "train": alone.train.model_copy(
                update={"steps": steps, "batch_size": batch, "ckpt_every": steps, "log_every": 25, "threads": threads}
            )
        }
    )
    print(f"\n== {held} alone from scratch on 10% ({len(sub.train)} samples), {steps} steps")
    t0 = time.perf_counter()
    tr = Trainer(alone, work / "scratch-0.1", data={held: sub})
    tr.fit()
    m = evaluate_tasks(tr.eval_model(), {held: data}, alone, [held])[held]
    out["scratch@0.1"] = {
        "metric": m[p],
        "train_samples": len(sub.train),
        "batch": batch,
        "train_seconds": time.perf_counter() - t0,
        "params": sum(q.numel() for q in tr.model.parameters()),
    }
    print(out["scratch@0.1"])
    return out


def plot(distill: dict[str, Any], ext: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(distill)
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(5 * (len(tasks) + 1), 4))
    for ax, task in zip(axes, tasks):
        rows = distill[task]
        first = next(iter(rows.values()))
        ax.scatter(
            [first["teacher_params"]], [first["teacher_metric"]], marker="*", s=160, c="k", label="teacher (ViT)"
        )
        for i, (label, r) in enumerate(rows.items()):
            c = f"C{i}"
            ax.scatter([r["student_params"]], [r["student_metric"]], c=c, marker="o", label=f"{label} distilled")
            ax.scatter([r["student_params"]], [r["no_teacher_metric"]], c=c, marker="x", label=f"{label} no teacher")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(first["primary"])
        ax.set_title(f"distillation: {task}")
        ax.legend(fontsize=7)
    ax = axes[-1]
    labels = list(ext["runs"]) + ["scratch@0.1"]
    vals = [ext["runs"][k]["metric"] for k in ext["runs"]] + [ext["scratch@0.1"]["metric"]]
    ax.barh(range(len(vals)), vals, color=["C0"] * len(ext["runs"]) + ["C3"])
    ax.set_yticks(range(len(vals)), labels, fontsize=8)
    ax.set_xlabel(ext["primary"])
    ax.set_title(f"extension: +{ext['task']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps per run, to check the script")
    p.add_argument("--base-tasks", default="faces,chars,tracks,alnum", help="suite tasks of the All-in-One run")
    p.add_argument("--distill-tasks", default="alnum,tracks", help="base tasks distilled into the students")
    p.add_argument("--held-out", default="signs", help="suite task added afterwards with ufo extend")
    p.add_argument("--aio-steps", type=int, default=None, help="All-in-One steps (2400)")
    p.add_argument("--distill-steps", type=int, default=None, help="steps per student run (700)")
    p.add_argument("--extend-steps", type=int, default=None, help="steps per extension and scratch run (400)")
    p.add_argument("--batch", type=int, default=64, help="batch of the student, extension and scratch runs")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--set", action="append", default=[], help="extra suite config override")
    args = p.parse_args()
    aio = args.aio_steps or (6 if args.quick else 2400)
    dsteps = args.distill_steps or (4 if args.quick else 700)
    esteps = args.extend_steps or (4 if args.quick else 400)
    torch.set_num_threads(args.threads)
    base_tasks = [t.strip() for t in args.base_tasks.split(",") if t.strip()]
    distill_tasks = [t.strip() for t in args.distill_tasks.split(",") if t.strip()]
    if not set(distill_tasks) <= set(base_tasks):
        raise SystemExit(f"--distill-tasks {distill_tasks}: every one must be among --base-tasks {base_tasks}")
    t_start, load_before = time.perf_counter(), load_average()
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="ufo-distill-extend-")
    work = args.work or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)

    cfg = suite_config(base_tasks, aio, args.set + [f"train.threads={args.threads}"])
    full_suite = load_config(SUITE, args.set)
    if args.held_out in base_tasks or args.held_out not in full_suite.tasks:
        raise SystemExit(f"--held-out {args.held_out!r}: must be a suite task outside --base-tasks")
    run = work / "base"
    print(f"== All in One on {base_tasks} ({aio} steps, batch {cfg.train.batch_size}); {args.held_out} held out")
    t0 = time.perf_counter()
    tr = Trainer(cfg, run)
    tr.fit()
    base_metrics = evaluate_tasks(tr.eval_model(), tr.data, cfg)
    aio_s = time.perf_counter() - t0
    results: dict[str, Any] = {
        "quick": args.quick,
        "base_tasks": base_tasks,
        "distill_tasks": distill_tasks,
        "held_out": args.held_out,
        "steps": {"all_in_one": aio, "distill": dsteps, "extend": esteps, "scratch": esteps},
        "batch": {"all_in_one": cfg.train.batch_size, "student": args.batch, "extend": args.batch},
        "base_run": {
            "metrics": {t: base_metrics[t][primary_of(cfg.tasks[t].kind)] for t in base_tasks},
            "train_seconds": aio_s,
        },
    }
    print(results["base_run"])
    results["distill"] = run_distillation(run, distill_tasks, work, dsteps, args.batch, args.threads)
    ext = run_extension(
        run, args.held_out, full_suite, base_tasks, base_metrics, work, esteps, args.batch, args.threads
    )
    results["extend"] = ext
    results["seconds"] = time.perf_counter() - t_start
    results["load_average"] = {"before": load_before, "after": load_average()}

    targets = []
    for task, rows in results["distill"].items():
        ok = [r["share_of_teacher"] for r in rows.values() if r["compression"] >= 10]
        targets.append(
            target(
                f"{task}: best student share of teacher metric at >= 10x fewer params",
                max(ok) if ok else 0.0,
                ">=",
                0.95,
            )
        )
        for label, r in rows.items():
            targets.append(target(f"{task}/{label}: gain of distillation over no teacher", r["gain"], ">", 0.0))
    e10, e100 = ext["runs"]["head+expert@0.1"]["metric"], ext["runs"]["head+expert@1"]["metric"]
    targets.append(target(f"+{args.held_out}: extension at 10% / at 100%", e10 / e100 if e100 else 0.0, ">=", 0.9))
    targets.append(
        target(f"+{args.held_out}: extension at 10% - scratch at 10%", e10 - ext["scratch@0.1"]["metric"], ">", 0.0)
    )
    exact = [k for k, r in ext["runs"].items() if not k.startswith("all@")]
    same = all(ext["runs"][k]["others_bitwise_unchanged"] and ext["runs"][k]["others_metrics_equal"] for k in exact)
    targets.append(target("base tasks bitwise unchanged and metrics equal (exact modes)", float(same), "==", 1.0))
    name = "distill_extend_quick" if args.quick else "distill_extend"
    write_results(name, results, targets)
    plot(results["distill"], ext, RESULTS_DIR / f"{name}.png")
    print(f"\nwrote {RESULTS_DIR / name}.json/.md/.png in {results['seconds']:.0f} s")
    for t in targets:
        print(("met   " if t["met"] else "MISSED"), t["name"], f"{t['value']:.4f} {t['op']} {t['target']}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
