"""One-for-All benchmark: subnets inherited from the two-level supernet against the same archs
trained alone, learned routes against fixed ones, and the training cost of elasticity, on CPU.

The suite is `configs/suite.yaml` over ../shared/data, restricted to `--tasks` (default `alnum`
classification and `faces` verification, the cheapest pair); the global batch is the sum of the
tasks' `batch:` shares. Every stage is the library's (`ufo.train`), chained with
`init: {kind: run}` as UFO does (routing and slimming start from a trained All-in-One model):

0. All in One (`train.stage: all_in_one`, every path shared, `--aio-steps` steps);
1. task supernet (`train.stage: task_supernet`, RoutingStage, `--steps` steps) from (0):
   Gumbel routing of each (task, block)'s FFN path from a low temperature (`--tau-start` 1.0 ->
   `--tau-end` 0.1) with an expert cost (`--expert-cost` 0.05) so that `mix` is not free; routes
   frozen at the end;
2. chip supernet (`train.stage: chip_supernet`, ChipStage, `--chip-steps` steps) from (1): the
   sandwich rule with N=2 random subnets (4 forward/backward passes a step) and in-place
   distillation from the largest subnet, on (1)'s routes;
3. inherited vs standalone: for the smallest, a middle (middle depth and width, `random:SEED`)
   and the largest arch (each with (1)'s routes), every task's primary metric with the weights
   inherited from (2) (set the arch, re-estimate the heads' BatchNorm statistics on training
   images, evaluate; no fine-tuning), against the same arch trained alone by the All-in-One
   Trainer (`train.arch` = that arch's JSON, same tasks) for as many optimiser steps as the
   inherited weights got in (0) + (1) + (2), evaluated the same way. Target per (arch, task):
   inherited >= standalone - 0.01. A few extra random subnets are evaluated (inherited only)
   to draw the metric-vs-parameters curve;
4. routing: (0) + (1) with learned routes against All-in-One training with every path shared
   (`train.paths: shared`) and every path the task's own (`train.paths: task`) for as many
   steps: each task's metric and parameters (`SearchSpace.num_params` of the largest arch with
   that task's routes, i.e. the model `ufo extract` gives for it);
5. cost of elasticity: time per chip-supernet step (sandwich N=2) against a plain All-in-One
   step of the largest arch on the same routes, timed in alternating rounds; reported as a
   ratio (no target).

Everything above is repeated for `--seeds` seeds (default 2): each seed has its own train/test
split (`seed` drives the splits), initialisation, routes, supernet and standalone runs, and the
target is judged on the mean over seeds (the per-seed deltas are reported beside it). One seed is
not enough at this scale: ORL's test split is 100 images and Alphadigits' 351, so one seed's
metric moves by one to two points between runs, the size of the tolerance itself.

Defaults: 400 All-in-One steps, 400 task-supernet steps, 2000 chip-supernet steps (the sandwich
stage needs the most: at 800/800/1200, 2 of 6 pairs were within a point, at 400/400/2000 3 of 6),
standalone runs of 2800 steps (3 archs), 800 steps each for the all-shared and all-task runs,
20 timing rounds (first seed only): about 11 minutes per seed on a quiet 2-core machine (a plain
step of the largest arch ~30 ms at batch 36, a chip-supernet step ~2.6x that). `--quick` (one
seed, 4 steps per run) checks the script end to end in under a minute. Run it alone.

Writes bench/results/oneforall.{json,md} and oneforall.png (per task: metric against parameters,
inherited subnets as a line, standalone runs and the routing variants as points).
Run from the repository root: `.venv/bin/python bench/oneforall.py [--quick] [--steps N] [--tasks a,b]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import RESULTS_DIR, compare, load_average, target, time_interleaved, write_results
from ufo.arch import Arch, SearchSpace
from ufo.config import Config, InitConfig, load_config, parse_config
from ufo.data.build import build_all
from ufo.evaluation.protocol import evaluate_tasks, recalibrate_bn
from ufo.model import arch_from_spec, load_model
from ufo.tasks import TaskData, task_class
from ufo.train.loop import Trainer

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "configs" / "suite.yaml"
DEFAULT_TASKS = ["alnum", "faces"]
TOLERANCE = 0.01  # inherited may trail standalone by at most one point


# ----- configs -----


def suite_config(tasks: list[str], steps: int, extra: list[str]) -> Config:
    """The suite restricted to `tasks`, global batch = the sum of their `batch:` shares."""
    base = load_config(SUITE, extra).model_dump(mode="json")
    unknown = [t for t in tasks if t not in base["tasks"]]
    if unknown:
        raise SystemExit(f"--tasks: unknown task(s) {unknown}; the suite's tasks are {list(base['tasks'])}")
    base["tasks"] = {t: base["tasks"][t] for t in tasks}
    shares = [base["tasks"][t].get("batch") for t in tasks]
    if all(shares):
        base["train"]["batch_size"] = sum(shares)
    base["train"].update(steps=steps, log_every=25, ckpt_every=steps)
    base["name"] = f"suite-{'-'.join(tasks)}"
    return parse_config(base, f"{SUITE} (tasks {tasks})")


def with_train(cfg: Config, **kw: Any) -> Config:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=kw)})


def with_init_run(cfg: Config, path: Path) -> Config:
    return cfg.model_copy(update={"init": InitConfig(kind="run", path=str(path))})


def uniform_path(arch: Arch) -> str | None:
    """The one path every task takes in every block of `arch`, or None when they differ."""
    ps = {p for r in arch.paths.values() for p in r}
    return ps.pop() if len(ps) == 1 else None


def fixed_arch_trainer(
    cfg: Config, arch: Arch, out: Path, data: dict[str, TaskData], arch_file: Path, show_progress: bool = True
) -> Trainer:
    """An All-in-One Trainer of exactly `arch` (widths and routes): `train.arch` is its JSON file.

    `train.paths` gives one path to every task and block; when `arch`'s routes differ per task or
    block (frozen task-supernet routes), the trainer is set to `arch` after construction (nothing
    has been trained yet, and the model file's manifest takes `trainer.arch`)."""
    arch.save(arch_file)
    path = uniform_path(arch)
    tr = Trainer(
        with_train(cfg, stage="all_in_one", arch=str(arch_file), paths=path or "shared"),
        out,
        data=data,
        show_progress=show_progress,
    )
    if path is None:
        tr.stage.arch = arch  # what the trainer trains and ships (`Trainer.arch` reads it)
        for m in {id(tr.model): tr.model, id(tr.eval_model()): tr.eval_model()}.values():
            m.set_arch(arch)
    assert tr.arch == arch, (tr.arch, arch)
    return tr


# ----- helpers -----


def primary(cfg: Config, metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {n: metrics[n][task_class(cfg.tasks[n].kind).primary] for n in cfg.task_names}


def params(space: SearchSpace, arch: Arch) -> dict[str, int]:
    return {t: space.num_params(arch, t) for t in space.tasks}


def fit_and_eval(name: str, tr: Trainer) -> dict[str, Any]:
    cfg = tr.cfg
    print(
        f"\n== {name}: tasks {cfg.task_names}, {cfg.train.steps} steps, stage {cfg.train.stage}, init {cfg.init.kind}"
    )
    t0 = time.perf_counter()
    summary = tr.fit()
    train_s = time.perf_counter() - t0
    model = tr.eval_model()
    recalibrate_bn(model, tr.data, cfg)  # the same protocol as the inherited subnets
    metrics = evaluate_tasks(model, tr.data, cfg)
    p = primary(cfg, metrics)
    print(
        f"   {train_s:.0f} s, {summary['images_per_s']:.0f} images/s: "
        + ", ".join(f"{n} {v:.4f}" for n, v in p.items())
    )
    return {
        "primary": p,
        "metrics": metrics,
        "train_s": round(train_s, 1),
        "images_per_s": summary["images_per_s"],
        "arch": tr.arch.model_dump(),
        "params": params(tr.model.space, tr.arch),
    }


def middle_arch(space: SearchSpace, routes: dict[str, list[str]], tries: int = 500) -> tuple[str, Arch]:
    """A `random:SEED` subnet with the middle depth and width whose all-task parameter count is
    nearest the geometric mean of the smallest's and the largest's."""
    d, e = space.depth[len(space.depth) // 2], space.embed_dim[len(space.embed_dim) // 2]
    goal = np.sqrt(space.num_params(space.smallest(routes)) * space.num_params(space.largest(routes)))
    best = None
    for seed in range(tries):
        a = arch_from_spec(f"random:{seed}", space, routes)
        if a.depth == d and a.embed_dim == e:
            gap = abs(np.log(space.num_params(a) / goal))
            if best is None or gap < best[0]:
                best = (gap, seed, a)
    if best is None:
        raise SystemExit(f"no random:SEED in {tries} tries has depth {d} and width {e}")
    return f"random:{best[1]}", best[2]


def extra_archs(space: SearchSpace, routes: dict[str, list[str]], n: int, taken: list[Arch]) -> list[tuple[str, Arch]]:
    """`n` more distinct random subnets (seeds 1000, 1001, ...), for the inherited curve."""
    out: list[tuple[str, Arch]] = []
    seed = 1000
    while len(out) < n and seed < 2000:
        a = arch_from_spec(f"random:{seed}", space, routes)
        if a not in taken and all(a != b for _, b in out):
            out.append((f"random:{seed}", a))
        seed += 1
    return out


# ----- sections -----


def throughput(
    chip_cfg: Config, plain_cfg: Config, data: dict[str, TaskData], out: Path, arch: Arch, rounds: int
) -> dict[str, Any]:
    """ms per chip-supernet step (sandwich) vs a plain All-in-One step of the largest arch."""
    chip = Trainer(chip_cfg, out / "tp-chip", data=data, show_progress=False)
    plain = fixed_arch_trainer(plain_cfg, arch, out / "tp-plain", data, out / "tp-arch.json", show_progress=False)
    assert chip.arch == arch, (chip.arch, arch)

    def stepper(tr: Trainer):
        def f() -> None:
            tr.train_step()
            tr.step += 1  # fit() does this: new subnets, new batch, the LR schedule moves on

        return f

    times = time_interleaved({"chip": stepper(chip), "plain": stepper(plain)}, repeats=rounds, warmup=3)
    c = compare(times, "chip", "plain")  # ratio = chip step time / plain step time
    batch = chip_cfg.train.batch_size
    passes = 2 + chip_cfg.chip_supernet.num_random
    return {
        "batch": batch,
        "sandwich_passes": passes,
        "chip_images_per_s": batch / (c["chip_ms"]["median"] / 1e3),
        "plain_images_per_s": batch / (c["plain_ms"]["median"] / 1e3),
        "chip_step_over_plain_step": c["ratio"],
        "chip_throughput_over_plain": 1 / c["ratio"],
        "step_ms": c,
    }


def plot(results: dict[str, Any], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    inh, alone = results["inherited"], results["standalone"]
    for ax, t in zip(axes[0], tasks):
        pts = sorted((v["params"][t], v["primary"][t], k) for k, v in inh.items())
        ax.plot(
            [p for p, _, _ in pts], [m for _, m, _ in pts], "o-", color="#4c72b0", label="inherited (chip supernet)"
        )
        xs = [alone[k]["params"][t] for k in alone]
        ax.plot(
            xs,
            [alone[k]["primary"][t] for k in alone],
            "s",
            color="#dd8452",
            ms=8,
            label="standalone (same arch, trained alone)",
        )
        for k in alone:
            ax.annotate(
                k,
                (alone[k]["params"][t], alone[k]["primary"][t]),
                fontsize=7,
                xytext=(4, -10),
                textcoords="offset points",
            )
        for (name, v), mk in zip(results["routing"].items(), ("^", "v", "D")):
            ax.plot(
                [v["params"][t]],
                [v["primary"][t]],
                mk,
                color="#55a868",
                alpha=0.8,
                ms=6,
                label=f"largest arch, routes {name} (stages 0+1 length)",
            )
        ax.set_xscale("log")
        ax.margins(x=0.12)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e3:.0f}k"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v / 1e3:.0f}k" if str(int(v))[0] in "25" else ""))
        ax.set_xlabel(f"parameters of {t}'s extracted model (log scale)")
        ax.set_ylabel(results["primary_metric"][t])
        ax.set_title(f"{t} ({results['kinds'][t]})")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    n = len(results["seeds"])
    fig.suptitle(
        "One for All: subnets inherited from the supernet vs the same archs trained alone"
        + (f" (mean of {n} seeds)" if n > 1 else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_seed(
    cfg: Config,
    seed: int,
    out: Path,
    st: dict[str, Any],
    ts_settings: dict[str, float],
    n_extra: int,
    rounds: int | None,
) -> dict[str, Any]:
    """Every stage and comparison for one seed (its own data split, initialisation and subnets).
    The cost of elasticity is timed when `rounds` is given (the first seed only)."""
    cfg = cfg.model_copy(update={"seed": seed})
    tasks = cfg.task_names
    data = build_all(cfg)
    space = cfg.space()
    res: dict[str, Any] = {"seed": seed, "train_images": {n: len(data[n].train) for n in tasks}}
    train_s: dict[str, float] = {}
    aio_steps, steps, chip_steps, alone_steps = (
        st["all_in_one"],
        st["task_supernet"],
        st["chip_supernet"],
        st["standalone"],
    )
    # 0. All in One, every path shared: the trained start that UFO routes on top of
    aio_cfg = with_train(cfg, stage="all_in_one", paths="shared", steps=aio_steps, ckpt_every=aio_steps)
    aio = fit_and_eval(f"seed {seed}: All in One (every path shared)", Trainer(aio_cfg, out / "aio", data=data))
    train_s["all_in_one"] = aio["train_s"]
    res["all_in_one"] = {"primary": aio["primary"], "params": aio["params"]}

    # 1. task supernet (learned routes) from (0)
    ts_cfg = with_init_run(with_train(cfg, stage="task_supernet", paths=None, warmup_steps=0), out / "aio")
    ts_cfg = ts_cfg.model_copy(update={"task_supernet": ts_cfg.task_supernet.model_copy(update=ts_settings)})
    ts = fit_and_eval(f"seed {seed}: task supernet (learned routes), from (0)", Trainer(ts_cfg, out / "ts", data=data))
    train_s["task_supernet"] = ts["train_s"]
    routes = ts["arch"]["paths"]
    res["routes"] = routes
    res["task_supernet"] = ts_cfg.task_supernet.model_dump()

    # 4. routing comparison: fixed paths, as many steps as (0) + (1)
    routing = {"learned": ts}
    for path in ("shared", "task"):
        tr = Trainer(
            with_train(cfg, stage="all_in_one", paths=path, steps=aio_steps + steps, ckpt_every=aio_steps + steps),
            out / f"all-{path}",
            data=data,
        )
        routing[f"all_{path}"] = fit_and_eval(f"seed {seed}: All in One, every path {path}", tr)
        train_s[f"all_{path}"] = routing[f"all_{path}"]["train_s"]
    res["routing"] = {k: {"primary": v["primary"], "params": v["params"]} for k, v in routing.items()}

    # 2. chip supernet from the task supernet
    chip_cfg = with_init_run(
        with_train(cfg, stage="chip_supernet", steps=chip_steps, ckpt_every=chip_steps, arch=None, paths=None),
        out / "ts",
    )
    chip_cfg = chip_cfg.model_copy(
        update={"chip_supernet": chip_cfg.chip_supernet.model_copy(update={"num_random": 2, "distill": True})}
    )
    print(
        f"\n== seed {seed}: chip supernet, {chip_steps} steps from the task supernet, sandwich N=2, "
        "in-place distillation"
    )
    t0 = time.perf_counter()
    chip_summary = Trainer(chip_cfg, out / "chip", data=data).fit()
    train_s["chip_supernet"] = round(time.perf_counter() - t0, 1)
    res["chip_images_per_s"] = chip_summary["images_per_s"]

    # 3. inherited subnets (no fine-tuning)
    model, mcfg, manifest = load_model(out / "chip" / "model.safetensors")
    assert manifest["routes"] == {t: list(routes[t]) for t in tasks}, (manifest["routes"], routes)
    mid_spec, mid = middle_arch(space, routes)
    res["middle_spec"] = mid_spec
    archs = {
        "smallest": arch_from_spec("smallest", space, routes),
        "middle": mid,
        "largest": arch_from_spec("largest", space, routes),
    }
    curve = dict(archs) | dict(extra_archs(space, routes, n_extra, list(archs.values())))
    inherited: dict[str, Any] = {}
    for name, arch in curve.items():
        model.set_arch(arch)
        recalibrate_bn(model, data, mcfg)  # the heads' BN statistics of this subnet, not a blend
        m = evaluate_tasks(model, data, mcfg)
        inherited[name] = {
            "primary": primary(mcfg, m),
            "metrics": m,
            "params": params(space, arch),
            "arch": arch.model_dump(),
            "compared": name in archs,
        }
        print(f"   inherited {name}: " + ", ".join(f"{t} {v:.4f}" for t, v in inherited[name]["primary"].items()))
    res["inherited"] = inherited

    # 3. the same archs trained alone
    standalone: dict[str, Any] = {}
    for name, arch in archs.items():
        tr = fixed_arch_trainer(
            with_train(cfg, steps=alone_steps, ckpt_every=alone_steps),
            arch,
            out / f"alone-{name}",
            data,
            out / f"arch-{name}.json",
        )
        standalone[name] = fit_and_eval(f"seed {seed}: standalone {name}", tr)
        train_s[f"standalone_{name}"] = standalone[name]["train_s"]
    res["standalone"] = {
        k: {"primary": v["primary"], "metrics": v["metrics"], "params": v["params"], "images_per_s": v["images_per_s"]}
        for k, v in standalone.items()
    }

    # 5. cost of elasticity
    if rounds:
        print(f"\n== cost of elasticity: {rounds} interleaved rounds")
        res["elasticity"] = throughput(chip_cfg, cfg, data, out, archs["largest"], rounds)
    res["train_s"] = train_s
    return res


def mean_over_seeds(runs: list[dict[str, Any]], section: str) -> dict[str, Any]:
    """Per entry of `section` (an arch or a routing variant): each task's primary metric and
    parameter count averaged over the seeds (the routes, hence the parameters, may differ)."""
    out: dict[str, Any] = {}
    for name in runs[0][section]:
        rows = [r[section][name] for r in runs]
        tasks = rows[0]["primary"]
        out[name] = {
            "primary": {t: float(np.mean([r["primary"][t] for r in rows])) for t in tasks},
            "params": {t: round(np.mean([r["params"][t] for r in rows])) for t in tasks},
            "per_seed": {t: [r["primary"][t] for r in rows] for t in tasks},
        }
        if "compared" in rows[0]:
            out[name]["compared"] = rows[0]["compared"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps per run, to check the script")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="task-supernet steps (400); the all-shared and all-task runs get --aio-steps + --steps",
    )
    p.add_argument("--aio-steps", type=int, default=None, help="All-in-One steps before the task supernet (400)")
    p.add_argument("--chip-steps", type=int, default=None, help="chip-supernet steps (2000)")
    p.add_argument("--tau-start", type=float, default=1.0, help="task supernet: first Gumbel temperature")
    p.add_argument("--tau-end", type=float, default=0.1, help="task supernet: last Gumbel temperature")
    p.add_argument("--expert-cost", type=float, default=0.05, help="task supernet: weight of the expert cost")
    p.add_argument(
        "--standalone-steps",
        type=int,
        default=None,
        help="steps of each standalone run (default: --steps + --chip-steps, what the inherited weights got)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="repeat everything for seeds 0..N-1 (own split, init and subnets) and compare the means (2)",
    )
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated suite tasks")
    p.add_argument("--extra-subnets", type=int, default=None, help="extra random subnets on the inherited curve (4)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds of the elasticity cost (20)")
    p.add_argument("--set", action="append", default=[], help="extra config override, e.g. train.lr=2e-3")
    args = p.parse_args()
    steps = args.steps or (4 if args.quick else 400)
    aio_steps = args.aio_steps or (4 if args.quick else 400)
    chip_steps = args.chip_steps or (4 if args.quick else 2000)
    alone_steps = args.standalone_steps or aio_steps + steps + chip_steps
    n_seeds = args.seeds or (1 if args.quick else 2)
    ts_settings = {
        "tau_start": args.tau_start,
        "tau_end": min(args.tau_end, args.tau_start),
        "expert_cost": args.expert_cost,
    }
    n_extra = args.extra_subnets if args.extra_subnets is not None else (1 if args.quick else 4)
    rounds = args.rounds or (3 if args.quick else 20)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    t_start = time.perf_counter()
    load_before = load_average()

    cfg = suite_config(tasks, steps, args.set)
    kinds = {n: cfg.tasks[n].kind for n in tasks}
    st = {
        "all_in_one": aio_steps,
        "task_supernet": steps,
        "chip_supernet": chip_steps,
        "standalone": alone_steps,
        "all_shared": aio_steps + steps,
        "all_task": aio_steps + steps,
    }
    results: dict[str, Any] = {
        "quick": args.quick,
        "tasks": tasks,
        "kinds": kinds,
        "seeds": list(range(n_seeds)),
        "primary_metric": {n: task_class(kinds[n]).primary for n in tasks},
        "steps": st,
        "batch_size": cfg.train.batch_size,
        "model": {k: v for k, v in cfg.model.model_dump().items() if k not in ("mean", "std", "paths")},
        "chip_supernet": cfg.chip_supernet.model_dump(),
    }
    runs = []
    for seed in range(n_seeds):
        with tempfile.TemporaryDirectory(prefix=f"ufo-oneforall-{seed}-") as tmp:
            runs.append(run_seed(cfg, seed, Path(tmp), st, ts_settings, n_extra, rounds if seed == 0 else None))
    results["per_seed"] = runs
    results["elasticity"] = runs[0]["elasticity"]
    results["routes"] = {f"seed {r['seed']}": r["routes"] for r in runs}
    inherited = results["inherited"] = mean_over_seeds(runs, "inherited")
    standalone = results["standalone"] = mean_over_seeds(runs, "standalone")
    routing = results["routing"] = mean_over_seeds(runs, "routing")
    archs = list(standalone)

    pairs = {
        f"{a}/{t}": {
            "inherited": inherited[a]["primary"][t],
            "standalone": standalone[a]["primary"][t],
            "delta": inherited[a]["primary"][t] - standalone[a]["primary"][t],
            "delta_per_seed": [i - s for i, s in zip(inherited[a]["per_seed"][t], standalone[a]["per_seed"][t])],
        }
        for a in archs
        for t in tasks
    }
    met = sum(v["delta"] >= -TOLERANCE for v in pairs.values())
    results["inherited_vs_standalone"] = pairs
    results["pairs_meeting_target"] = f"{met}/{len(pairs)}"
    results["routing_metric_delta_vs_all_shared"] = {
        t: routing["learned"]["primary"][t] - routing["all_shared"]["primary"][t] for t in tasks
    }
    results["load_average"] = {"before": load_before, "after": load_average()}
    results["wall_s"] = round(time.perf_counter() - t_start, 1)

    mean = f"mean of {n_seeds} seeds, " if n_seeds > 1 else ""
    targets = [
        target(f"inherited - standalone, {a} {t} ({mean}{results['primary_metric'][t]})", v["delta"], ">=", -TOLERANCE)
        for k, v in pairs.items()
        for a, t in [k.split("/", 1)]
    ]
    targets.append(target("(arch, task) pairs with inherited >= standalone - 0.01", met, ">=", len(pairs)))
    png = RESULTS_DIR / "oneforall.png"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot(results, tasks, png)
    results["plot"] = png.name
    cmd = ".venv/bin/python bench/oneforall.py" + (" --quick" if args.quick else "")
    if args.steps or args.aio_steps or args.chip_steps or args.standalone_steps:
        cmd += f" --aio-steps {aio_steps} --steps {steps} --chip-steps {chip_steps} --standalone-steps {alone_steps}"
    if (args.tau_start, args.tau_end, args.expert_cost) != (1.0, 0.1, 0.05):
        cmd += f" --tau-start {args.tau_start} --tau-end {args.tau_end} --expert-cost {args.expert_cost}"
    if args.seeds:
        cmd += f" --seeds {n_seeds}"
    if tasks != DEFAULT_TASKS:
        cmd += f" --tasks {','.join(tasks)}"
    jpath, mpath = write_results("oneforall", results, targets, command=cmd)
    _prepend_tables(mpath, results, archs, tasks)
    for t in targets:
        print(f"{'met ' if t['met'] else 'MISS'}  {t['name']}: {t['value']:.4g} {t['op']} {t['target']:.4g}")
    print(f"wrote {jpath}, {mpath} and {png} in {results['wall_s']:.0f} s")


def _prepend_tables(path: Path, results: dict[str, Any], compared: list[str], tasks: list[str]) -> None:
    """The three comparisons as people read them, before the targets and the flat results."""
    pm = results["primary_metric"]
    n = len(results["seeds"])
    lines = [
        f"## Inherited vs standalone (primary metric, test split, mean of {n} seed{'s' * (n > 1)})",
        "",
        "Each seed has its own data split, initialisation, supernet and standalone runs.",
        "",
        "| arch | task | metric | params | inherited | standalone | delta | delta per seed | within 0.01 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in compared:
        for t in tasks:
            v = results["inherited_vs_standalone"][f"{a}/{t}"]
            per = ", ".join(f"{d:+.3f}" for d in v["delta_per_seed"])
            lines.append(
                f"| {a} | {t} | {pm[t]} | {results['inherited'][a]['params'][t]:,} | {v['inherited']:.4f} | "
                f"{v['standalone']:.4f} | {v['delta']:+.4f} | {per} | "
                f"{'yes' if v['delta'] >= -TOLERANCE else '**no**'} |"
            )
    lines += [
        "",
        f"Pairs meeting the target: {results['pairs_meeting_target']}.",
        "",
        f"## Routing (largest arch, All in One + task supernet vs fixed routes, same steps; mean of {n} seeds)",
        "",
        "| task | metric | " + " | ".join(f"{k} metric | {k} params" for k in results["routing"]) + " |",
        "|---|---|" + "---|---|" * len(results["routing"]),
    ]
    for t in tasks:
        cells = [f"{v['primary'][t]:.4f} | {v['params'][t]:,}" for v in results["routing"].values()]
        lines.append(f"| {t} | {pm[t]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Learned routes (S shared, T task, M mix): "
        + "; ".join(
            f"{seed}: " + ", ".join(f"{t} {' '.join(p[0].upper() for p in r)}" for t, r in routes.items())
            for seed, routes in results["routes"].items()
        )
        + ".",
    ]
    e = results["elasticity"]
    lines += [
        "",
        "## Cost of elasticity",
        "",
        f"A chip-supernet step ({e['sandwich_passes']} sandwich passes) takes {e['chip_step_over_plain_step']:.2f}x "
        f"a plain step of the largest arch (batch {e['batch']}): {e['chip_images_per_s']:.0f} vs "
        f"{e['plain_images_per_s']:.0f} images/s.",
        "",
        f"![metric vs parameters]({results['plot']})",
        "",
    ]
    text = path.read_text()
    head, sep, rest = text.partition("## Targets")
    path.write_text(head + "\n".join(lines) + "\n" + sep + rest)


if __name__ == "__main__":
    main()
