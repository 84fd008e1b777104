"""Where a result came from: library versions, the machine and the source commit.

A training run writes `provenance()` to RUN/provenance.json when it starts (the report shows it
for every stage), and its first lines in RUN/train.log say the same.
"""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def versions() -> dict[str, str]:
    """ufo, torch, timm and Python versions."""
    import timm
    import torch

    import ufo

    return {
        "ufo": ufo.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, macOS sysctl), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def hardware() -> dict[str, Any]:
    """CPU model, logical cores, memory (GiB), GPUs (names; empty without CUDA) and the OS."""
    import psutil
    import torch

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus,
        "os": platform.platform(),
    }


def git_commit(where: Path | None = None) -> str | None:
    """The commit of the git checkout holding `where` (default: the ufo sources), with `-dirty`
    when tracked files have changed since; None outside a checkout or without git."""
    import ufo

    where = where or Path(ufo.__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def provenance(seed: int | None = None) -> dict[str, Any]:
    """Versions, hardware, git commit, the seed and the time (UTC), as one JSON-ready dict."""
    out: dict[str, Any] = {
        "versions": versions(),
        "hardware": hardware(),
        "git_commit": git_commit(),
        "time": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
    }
    if seed is not None:
        out["seed"] = seed
    return out


def summary_line(p: dict[str, Any]) -> str:
    """One line of `provenance()` for a log."""
    v, h = p["versions"], p["hardware"]
    gpu = ", ".join(h["gpus"]) or "no GPU"
    return (
        " ".join(f"{k} {x}" for k, x in v.items())
        + f"; {h['cpu']} ({h['cores']} cores), {gpu}"
        + (f"; git {p['git_commit']}" if p.get("git_commit") else "")
    )
