"""GPU smoke test: every stage runs briefly on CUDA with bf16 autocast, on a tiny config.

Stages, each through the `ufo` CLI (the path a user takes), each in its own folder:
all-in-one training (per-block activation checkpointing on), evaluation on the GPU, the task
supernet, the chip supernet, subnet evaluation on the GPU (BatchNorm re-estimation), MIM
pre-training, search with the `cuda` latency backend (metrics on the GPU), distillation and
extension in fp32 and in bf16 (extension also with task norms, `head+expert+norms`), and
`torchrun` with one process per GPU. A stage passes when its command exits 0 and
the losses it logged are finite. Prints a table and writes bench/results/gpu_smoke.json.

Without a CUDA device it prints "skipped: no CUDA device", writes nothing and exits 0.

    python bench/gpu_smoke.py
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

BIN = Path(sys.executable).parent
GPU = {"device": "cuda", "amp": "bf16", "threads": 2}
BF16 = ["--device", "cuda", "--amp", "bf16"]  # distill and extend: the same as GPU, from their command line
TINY = {
    "name": "gpu-smoke",
    "seed": 0,
    "model": {
        "img_size": 16,
        "patch_size": 4,
        "head_dim": 8,
        "depth": [1, 2],
        "embed_dim": [16, 24],
        "num_heads": [1, 2],
        "mlp_ratio": [1.0, 2.0],
        "drop_path_rate": 0.1,
    },
    "tasks": {
        "digits": {"kind": "classification", "data": {"recipe": "digits"}, "batch": 16},
        "mnist": {
            "kind": "retrieval",
            "data": {"recipe": "mnist5k", "max_train": 600},
            "batch": 16,
            "options": {"embedding_dim": 16, "k": 4},
        },
    },
    "train": {"steps": 6, "batch_size": 32, "log_every": 1, "ckpt_every": 3, "warmup_steps": 2, **GPU},
}


def _config(root: Path, name: str, train: dict[str, Any] | None = None, **top: Any) -> Path:
    cfg = {**TINY, **top, "train": {**TINY["train"], **(train or {})}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[bool, float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return res.returncode == 0, time.perf_counter() - t0, res.stderr[-1500:]


def _finite_losses(run: Path) -> tuple[bool, float | None]:
    """(every logged loss is finite, the last logged loss) from a run's metrics.csv."""
    if not (run / "metrics.csv").exists():
        return False, None
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    values = [float(v) for r in rows for k, v in r.items() if k.startswith("loss") and v not in ("", None)]
    last = float(rows[-1]["loss"]) if rows and rows[-1].get("loss") else None
    return bool(values) and all(math.isfinite(v) for v in values), last


def stages(root: Path) -> list[tuple[str, list[str], Path | None, dict[str, str] | None]]:
    """(name, command, run folder whose metrics.csv must be finite, extra environment)."""
    ufo = str(BIN / "ufo")
    aio = _config(root, "aio", {"grad_checkpointing": True})
    task = _config(
        root,
        "task",
        {"stage": "task_supernet", "paths": None, "grad_checkpointing": True},
        init={"kind": "run", "path": str(root / "aio")},
    )
    chip = _config(
        root,
        "chip",
        {"stage": "chip_supernet", "grad_checkpointing": True},
        init={"kind": "run", "path": str(root / "task")},
    )
    mim = _config(root, "mim", {"stage": "pretrain_mim", "grad_checkpointing": True})
    new_task = root / "new_task.yaml"
    new_task.write_text(yaml.safe_dump({"digits2": {"kind": "classification", "data": {"recipe": "digits"}}}))
    short = ["--steps", "4", "--batch-size", "16"]
    distill = [ufo, "distill", str(root / "aio"), "-t", "digits", "--student", "resnet10t", *short]
    extend = [ufo, "extend", str(root / "aio"), "--task-config", str(new_task), *short]
    return [
        (
            "train all_in_one (bf16, grad ckpt)",
            [ufo, "train", str(aio), "--out", str(root / "aio")],
            root / "aio",
            None,
        ),
        ("eval (cuda)", [ufo, "eval", str(root / "aio"), "--device", "cuda"], None, None),
        ("train task_supernet", [ufo, "train", str(task), "--out", str(root / "task")], root / "task", None),
        ("train chip_supernet", [ufo, "train", str(chip), "--out", str(root / "chip")], root / "chip", None),
        (
            "eval subnets (cuda)",
            [ufo, "eval", str(root / "chip"), "--arch", "smallest", "--arch", "largest", "--device", "cuda"],
            None,
            None,
        ),
        ("train pretrain_mim", [ufo, "train", str(mim), "--out", str(root / "mim")], root / "mim", None),
        (
            "search (cuda latency)",
            [
                ufo,
                "search",
                str(root / "chip"),
                "-t",
                "digits",
                "--out",
                str(root / "search"),
                "--backend",
                "cuda",
                "--max-latency-ms",
                "1000",
                "--trials",
                "50",
                "--top-k",
                "2",
                "--metric-samples",
                "4",
                "--latency-samples",
                "10",  # the latency predictor's 5-fold cross-validation needs 10
                "--device",
                "cuda",
            ],
            None,
            None,
        ),
        ("distill", [*distill, "--out", str(root / "distill")], root / "distill", None),
        ("extend", [*extend, "--out", str(root / "extend")], root / "extend", None),
        ("distill (bf16)", [*distill, "--out", str(root / "distill-bf16"), *BF16], root / "distill-bf16", None),
        (
            "extend head+expert+norms (bf16)",
            [*extend, "--out", str(root / "extend-norms"), "--train", "head+expert+norms", *BF16],
            root / "extend-norms",
            None,
        ),
        (
            "torchrun 1 GPU",
            [
                str(BIN / "torchrun"),
                "--standalone",
                "--nproc-per-node",
                "1",
                "-m",
                "ufo.cli",
                "train",
                str(aio),
                "--out",
                str(root / "torchrun"),
            ],
            root / "torchrun",
            {"OMP_NUM_THREADS": "1"},
        ),
    ]


def main() -> int:
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import target, write_results

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ufo-gpu-smoke-") as tmp:
        for name, cmd, run, env in stages(Path(tmp)):
            ok, seconds, err = _run(cmd, env)
            finite, last = _finite_losses(run) if (ok and run is not None) else (ok, None)
            rows.append(
                {
                    "stage": name,
                    "ok": ok and finite,
                    "seconds": round(seconds, 2),
                    "last_loss": last,
                    **({} if ok and finite else {"error": err if not ok else "non-finite or missing losses"}),
                }
            )
            print(f"{name:<36} {'ok' if rows[-1]['ok'] else 'FAIL':<5} {seconds:7.1f} s  loss={last}", flush=True)
    passed = sum(r["ok"] for r in rows)
    results = {"device": torch.cuda.get_device_name(0), "stages": rows, "passed": passed, "total": len(rows)}
    write_results("gpu_smoke", results, [target("stages passed", passed, "==", len(rows))])
    for r in rows:
        if not r["ok"]:
            print(f"\n--- {r['stage']} ---\n{r['error']}")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
