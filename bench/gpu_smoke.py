"""GPU smoke test: every stage runs briefly on CUDA with bf16 autocast, on a tiny config.

Stages, each through the `ufo` CLI (the path a user takes), each in its own folder:
all-in-one training (per-block activation checkpointing on), evaluation on the GPU, the task
supernet, the chip supernet, subnet evaluation on the GPU (BatchNorm re-estimation), MIM
pre-training, search with the `cuda` latency backend (metrics on the GPU), distillation and
extension in fp32 and in bf16 (extension also with task norms, `head+expert+norms`), a run of
every other kind of input and option at once (verification and reid heads, a streamed image
folder at its own input size with random erasing on the GPU, an EMA, compiled blocks), a run
stopped at its checkpoint and resumed, and `torchrun` with one process per GPU: DDP, and with two
GPUs or more also FSDP over 2 processes. A stage passes when its command exits 0 and the losses it
logged are finite. Prints a table and writes bench/results/gpu_smoke.json.

Without a CUDA device it prints "skipped: no CUDA device", writes nothing and exits 0.
`--cpu` runs the same stages on the CPU (cuda and bf16 replaced by cpu and fp32, 2 processes
where the GPU stages use 2 GPUs) to check the script itself; it writes no results.

    python bench/gpu_smoke.py [--cpu]
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
CPU_DRY_RUN = "--cpu" in sys.argv[1:]  # the stages on the CPU: checks the script, not CUDA
GPU = {"device": "cuda", "amp": "bf16", "threads": 2} if not CPU_DRY_RUN else {"device": "cpu", "threads": 2}
# distill and extend: the same as GPU, from their command line
BF16 = ["--device", "cuda", "--amp", "bf16"] if not CPU_DRY_RUN else ["--device", "cpu"]
DEV = "cpu" if CPU_DRY_RUN else "cuda"  # ufo eval / search --device
BACKEND = "torch-cpu" if CPU_DRY_RUN else "cuda"  # the search's latency backend
# the rest of the options a run can take, at once: identity heads, a streamed folder at another size
# with random erasing (applied on the GPU), an EMA and compiled blocks
WIDE_TASKS = {
    "digits": {"kind": "classification", "data": {"recipe": "digits"}, "batch": 8},
    "faces": {"kind": "verification", "data": {"recipe": "digits"}, "batch": 8, "options": {"embedding_dim": 16}},
    "ids": {"kind": "reid", "data": {"recipe": "digits"}, "batch": 8, "options": {"embedding_dim": 16, "k": 4}},
}
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
    # every task in every step, each on its expert: the batched expert matmuls (batched_linear)
    mixed = _config(root, "mixed", {"sampler": "round_robin", "paths": "task", "batched_experts": True})
    folder = _image_folder(root / "folder")
    streamed = {
        "kind": "classification",
        "img_size": 12,
        "batch": 8,
        "data": {"reader": "image_folder", "path": str(folder), "cache": "stream"},
        "augment": {"random_erasing": 0.5, "hflip": True, "rotation": 10.0},
    }
    wide = _config(root, "wide", {"ema_decay": 0.9, "compile": True}, tasks={**WIDE_TASKS, "folder": streamed})
    resume = _config(root, "resume", {"ema_decay": 0.9})
    gpus = 2 if CPU_DRY_RUN else torch.cuda.device_count()
    fsdp = _config(root, "fsdp", {"parallel": "fsdp", "sampler": "proportional", "paths": "task"})
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
        (
            "train mixed batches (bf16, batched task experts)",
            [ufo, "train", str(mixed), "--out", str(root / "mixed")],
            root / "mixed",
            None,
        ),
        ("eval (cuda)", [ufo, "eval", str(root / "aio"), "--device", DEV], None, None),
        ("train task_supernet", [ufo, "train", str(task), "--out", str(root / "task")], root / "task", None),
        ("train chip_supernet", [ufo, "train", str(chip), "--out", str(root / "chip")], root / "chip", None),
        (
            "eval subnets (cuda)",
            [ufo, "eval", str(root / "chip"), "--arch", "smallest", "--arch", "largest", "--device", DEV],
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
                BACKEND,
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
                DEV,
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
            "train verification, reid, streamed folder at 12 px, EMA, compiled",
            [ufo, "train", str(wide), "--out", str(root / "wide")],
            root / "wide",
            None,
        ),
        (
            "train stopped at step 3 (EMA)",
            [sys.executable, "-c", STOP_AT_3, str(resume), str(root / "resume")],
            None,
            None,
        ),
        (
            "resume to step 6",
            [ufo, "train", str(resume), "--out", str(root / "resume"), "--resume"],
            root / "resume",
            None,
        ),
        ("torchrun ddp, 1 GPU", _torchrun(1, aio, root / "torchrun"), root / "torchrun", {"OMP_NUM_THREADS": "1"}),
        *(
            [
                ("torchrun ddp, 2 GPUs", _torchrun(2, aio, root / "ddp2"), root / "ddp2", {"OMP_NUM_THREADS": "1"}),
                ("torchrun fsdp, 2 GPUs", _torchrun(2, fsdp, root / "fsdp2"), root / "fsdp2", {"OMP_NUM_THREADS": "1"}),
            ]
            if gpus >= 2
            else []
        ),
    ]


STOP_AT_3 = """
import sys, yaml
from pathlib import Path
from ufo.config import parse_config
from ufo.train.loop import Trainer
tr = Trainer(parse_config(yaml.safe_load(Path(sys.argv[1]).read_text())), sys.argv[2], show_progress=False)
tr.t = tr.t.model_copy(update={"steps": 3})  # the run's config stays the one to resume
tr.fit()
"""


def _torchrun(procs: int, config: Path, out: Path) -> list[str]:
    cli = ["-m", "ufo.cli", "train", str(config), "--out", str(out)]
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(procs), *cli]


def _image_folder(root: Path, classes: int = 4, per_class: int = 12) -> Path:
    """root/c<k>/<i>.png: digits at 16 px, so that the streamed task reads real files."""
    from PIL import Image

    from ufo.data import load_recipe

    digits = load_recipe("digits")
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
        rows = (digits.labels == k).nonzero().flatten()[:per_class]
        for i, r in enumerate(rows.tolist()):
            img = (
                digits.images[r, 0].numpy()
                if digits.images.shape[1] == 1
                else digits.images[r].permute(1, 2, 0).numpy()
            )
            Image.fromarray(img).resize((16, 16)).convert("RGB").save(root / f"c{k}" / f"{i}.png")
    return root


def main() -> int:
    if not torch.cuda.is_available() and not CPU_DRY_RUN:
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
    if CPU_DRY_RUN:
        print(f"CPU dry run: {passed}/{len(rows)} stages passed (no results written)")
    else:
        results = {"device": torch.cuda.get_device_name(0), "stages": rows, "passed": passed, "total": len(rows)}
        write_results("gpu_smoke", results, [target("stages passed", passed, "==", len(rows))])
    for r in rows:
        if not r["ok"]:
            print(f"\n--- {r['stage']} ---\n{r['error']}")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
