"""Stage bookkeeping of `ufo run`: each stage folder's `done.json` and the fingerprint that
decides whether a finished stage is still valid.

A stage's fingerprint hashes what it was asked to do (its config section, as JSON with sorted
keys) together with the `done.json` of every stage it reads from. A re-run skips a stage whose
`done.json` carries today's fingerprint and whose listed outputs all exist; redoing an upstream
stage rewrites its `done.json` (new finish time, new output sizes), so everything downstream
becomes stale and runs again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from ufo.checkpoint import atomic_write_text
from ufo.errors import UFOError

DONE = "done.json"


class PipelineError(UFOError):
    """A `ufo run` stage that cannot run: a missing upstream stage, an unknown stage name."""


class StageRecord(BaseModel):
    """What `done.json` holds."""

    stage: str
    fingerprint: str
    inputs: dict[str, str]  # "config": section hash, and upstream stage -> its done.json hash
    outputs: list[str]  # paths relative to the run folder
    seconds: float
    finished: str
    summary: dict[str, Any] = Field(default_factory=dict)


def digest(obj: Any) -> str:
    """sha256 (first 16 hex digits) of `obj` as canonical JSON."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def inputs_of(run_dir: Path, section: Any, upstream: list[str]) -> dict[str, str]:
    """The fingerprint's parts: the config section's hash and each upstream stage's done.json hash."""
    parts = {"config": digest(section)}
    for up in upstream:
        done = run_dir / up / DONE
        if not done.is_file():
            raise PipelineError(
                f"stage {up!r} has not finished in {run_dir} (no {done}); run the stages before it first"
            )
        parts[up] = file_digest(done)
    return parts


def read_record(stage_dir: Path) -> StageRecord | None:
    """The stage's record, or None when it has not finished (or the file is unreadable)."""
    f = stage_dir / DONE
    if not f.is_file():
        return None
    try:
        return StageRecord.model_validate_json(f.read_text())
    except ValueError:
        return None


def is_valid(run_dir: Path, stage: str, fingerprint: str) -> bool:
    """True when `stage` finished with this fingerprint and every output it listed is still there."""
    rec = read_record(run_dir / stage)
    return rec is not None and rec.fingerprint == fingerprint and all((run_dir / o).exists() for o in rec.outputs)


def write_record(
    run_dir: Path,
    stage: str,
    inputs: dict[str, str],
    outputs: list[Path],
    seconds: float,
    summary: dict[str, Any] | None = None,
) -> StageRecord:
    """Write `RUN_DIR/<stage>/done.json` atomically (last, after every output)."""
    missing = [str(o) for o in outputs if not o.exists()]
    if missing:
        raise PipelineError(f"stage {stage!r} finished without writing {missing}")
    rel = [str(Path(o).resolve().relative_to(run_dir.resolve())) for o in outputs]
    rec = StageRecord(
        stage=stage,
        fingerprint=digest(inputs),
        inputs=inputs,
        outputs=sorted(rel),
        seconds=round(seconds, 1),
        finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        summary=summary or {},
    )
    atomic_write_text(run_dir / stage / DONE, rec.model_dump_json(indent=2))
    return rec
