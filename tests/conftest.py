"""Shared test fixtures. `shared_data` points at ../shared/data: tests that need it skip with a
reason when it is absent, and fail instead when CI=true (CI must run them).

The suite is a CPU suite: its exactness checks (bitwise resume, one process against torchrun) hold
for CPU kernels and gloo. On a machine with a GPU it still runs on the CPU (CUDA hidden, for this
process and the subprocesses it starts) unless UFO_TEST_CUDA=1; bench/gpu_smoke.py covers CUDA."""

from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("UFO_TEST_CUDA") != "1":  # before torch first looks for a GPU
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def require_shared_data(sub: str = "") -> Path:
    """Path to ../shared/data[/sub]; skip (or fail under CI=true) when it is missing."""
    path = SHARED_DATA / sub if sub else SHARED_DATA
    if not path.exists():
        msg = f"{path} is absent: the real-data tests need ../shared/data beside the repo"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " (CI=true, so this is an error)")
        pytest.skip(msg)
    return path


@pytest.fixture
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
