"""A tiny `ufo run` config and a run folder shared by the pipeline, report and demo tests.

`tiny_run(base)` runs the whole pipeline once into base/tiny-run; a second call finds every stage
done and returns at once (the pipeline skips valid stages), so several test modules share one run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

TINY_RUN = {
    "name": "tiny-run",
    "seed": 0,
    "model": {
        "img_size": 16,
        "patch_size": 4,
        "head_dim": 8,
        "depth": [1, 2],
        "embed_dim": [16, 24],
        "num_heads": [1, 2],
        "mlp_ratio": [1.0, 2.0],
        "drop_path_rate": 0.0,
    },
    "tasks": {
        "digits": {"kind": "classification", "data": {"recipe": "digits"}},
        "mnist": {
            "kind": "retrieval",
            "data": {"recipe": "mnist5k", "max_train": 300},
            "options": {"embedding_dim": 16, "k": 4},
        },
    },
    "train": {
        "steps": 8,
        "batch_size": 16,
        "log_every": 2,
        "ckpt_every": 4,
        "warmup_steps": 2,
        "threads": 1,
        "eval_batch_size": 512,
    },
    "task_supernet": {"tau_start": 1.0, "expert_cost": 0.1},
    "chip_supernet": {"num_random": 1},
    "pipeline": {
        "baselines": {"enabled": True, "steps": 4},
        "task_supernet": {"steps": 6},
        "chip_supernet": {"steps": 6, "eval_subnets": 4},
        "predictors": {"metric_samples": 10, "latency_samples": 10},
        "search": {
            "budgets": {"digits": {"max_params": 12000}, "mnist": {"max_flops": 400000}},
            "trials": 300,
            "top_k": 3,
        },
        "export": {"int8": "dynamic", "latency_repeats": 5},
    },
}


def tiny_config(path: Path, **pipeline) -> Path:
    """Write the tiny config (with `pipeline` keys replaced) to `path`."""
    d = copy.deepcopy(TINY_RUN)
    d["pipeline"].update(pipeline)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def tiny_run(base: Path, until: str | None = None) -> Path:
    """base/tiny-run after `ufo run` of the tiny config (through `until`, default every stage)."""
    from rich.console import Console

    from ufo.config import load_config
    from ufo.run import run_pipeline

    base.mkdir(parents=True, exist_ok=True)
    cfg = load_config(tiny_config(base / "tiny.yaml"))
    run_pipeline(cfg, base / "tiny-run", until=until, console=Console(quiet=True))
    return base / "tiny-run"
