"""keep_freed_memory: a freed large block is reused without page faults (glibc, Linux)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from ufo.config import parse_config
from ufo.train.loop import Trainer

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt"
)

# A "step" allocates and fills 4 tensors of 64 MiB (over glibc's 32 MiB mmap ceiling, so by default
# each is mmapped and unmapped) and frees them; prints the minor page faults of the 5th step. Kept,
# the heap settles within a few steps (where a block lands depends on small allocations between
# them: a freed block one alignment pad too small for the next is left for a later one).
CHILD = """
import json, resource, sys, torch
from ufo.train.host_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(16 * 2**20).fill_(1.0) for _ in range(4)]  # 4 x 64 MiB of float32
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults = [step() for _ in range(5)]
print(json.dumps({"kept": kept, "faults": faults[-1]}))
"""


def fifth_step_faults(mode: str) -> dict[str, int | bool]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_is_reused_without_page_faults() -> None:
    default, kept = fifth_step_faults("default"), fifth_step_faults("keep")
    pages = 4 * 64 * 2**20 // 4096
    assert default["kept"] is False and kept["kept"] is True
    # by default every page of every block faults again each step; kept, the heap holds them
    assert default["faults"] > pages // 2, default
    assert kept["faults"] < pages // 20, kept


def test_training_on_cpu_keeps_freed_memory_unless_switched_off(tmp_path, monkeypatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr("ufo.train.engine.keep_freed_memory", lambda: calls.append(True) or True)
    for keep in (True, False):
        cfg = parse_config(
            {
                "name": "tiny",
                "model": {"img_size": 8, "patch_size": 4, "head_dim": 8, "depth": [1], "embed_dim": [16]},
                "tasks": {"digits": {"kind": "classification", "data": {"recipe": "digits"}}},
                "train": {"steps": 1, "batch_size": 8, "device": "cpu", "keep_freed_memory": keep},
            }
        )
        Trainer(cfg, tmp_path / str(keep), show_progress=False).fit()
    assert calls == [True]
