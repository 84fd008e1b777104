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

# Allocates, fills and frees a 64 MiB tensor (over glibc's 32 MiB mmap ceiling, so by default it
# is mmapped and unmapped each time), twice; prints the minor page faults of the second round.
CHILD = """
import json, resource, sys, torch
from ufo.train.host_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 2**20)  # 64 MiB of float32
    t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(json.dumps({"kept": kept, "faults": faults()}))
"""


def second_round_faults(mode: str) -> dict[str, int | bool]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_is_reused_without_page_faults() -> None:
    default, kept = second_round_faults("default"), second_round_faults("keep")
    pages = 64 * 2**20 // 4096
    assert default["kept"] is False and kept["kept"] is True
    # by default every page of the block faults again; kept, the heap already holds them
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
