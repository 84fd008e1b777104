"""`fsdp_run.py CONFIG OUT [--stop STEP] [--resume]` under torchrun: trains CONFIG into OUT, up to
STEP (a run to be resumed later), or on from OUT's checkpoint (test_train.py's FSDP test).

With FSDP's per-expert units it checks after every step, on every rank, that each expert of a task
the step's global batch lacks kept its shard bitwise, got no gradient and was not stepped (its
AdamW step count unchanged, no state before its first use), and that the others were stepped; it
writes each step's global and local tasks to OUT/tasks<rank>.json.

A task with rows on one rank only: the other ranks log its loss as 0 and every rank weights its
task means by its share of the rows (`Stage.share`, `Stage.global_terms`), so the logged averages
over the ranks are the global batch's means.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from ufo.config import parse_config
from ufo.train.loop import Trainer


def check_steps(tr: Trainer) -> list[dict[str, list[str]]]:
    seen: list[dict[str, list[str]]] = []
    step_once, batch_once = tr.train_step, tr.batch
    ids: list[torch.Tensor] = []

    def batch():
        b = batch_once()
        ids[:] = [b[1]]
        return b

    def experts() -> dict[str, tuple[str, Any]]:
        return {
            n: (n.split(".mlp.experts.")[1].split(".")[0], p)
            for n, p in tr.step_module.named_parameters()
            if ".mlp.experts." in n
        }

    def steps(p: Any) -> int | None:
        state = tr.engine.optimizer.state.get(p)
        return int(state["step"]) if state else None

    def checked_step() -> dict[str, float]:
        before = {n: (p.to_local().clone(), steps(p)) for n, (_, p) in experts().items()}
        row = step_once()
        used = sorted(tr.loader.step_tasks)
        for n, (task, p) in experts().items():
            old, count = before[n]
            if task in used:
                assert p.grad is not None and steps(p) == (count or 0) + 1, (tr.step, n, used)
            else:
                assert p.grad is None and steps(p) == count, (tr.step, n, used, count, steps(p))
                assert torch.equal(p.to_local(), old), (tr.step, n, used)
        seen.append({"global": used, "local": sorted({tr.model.tasks[i] for i in ids[0].tolist()})})
        return row

    tr.batch, tr.train_step = batch, checked_step  # type: ignore[method-assign]
    return seen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("out")
    ap.add_argument("--stop", type=int)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    tr = Trainer(parse_config(yaml.safe_load(Path(args.config).read_text())), args.out, show_progress=False)
    if args.stop:  # the config (checked on resume) stays the same
        tr.t = tr.t.model_copy(update={"steps": args.stop})
    seen = check_steps(tr) if tr.fsdp else None
    tr.fit(resume=args.resume)
    if seen is not None:
        assert tr.step_tasks is not None, "each expert is its own FSDP unit"
        (tr.out / f"tasks{tr.rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
