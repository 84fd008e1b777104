"""`ufo demo` end to end on the built-in data, shortened: train, evaluate, extract, save."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from ufo.deploy.package import load_task_model

BIN = Path(sys.executable).parent


def test_demo_short_run_end_to_end(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run([str(BIN / "ufo"), "demo", "--out", str(out), "--set", "train.steps=20",
                          "--set", "train.ckpt_every=10"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "All in One" in res.stdout and "ufo serve" in res.stdout
    result = json.loads((out / "demo.json").read_text())
    assert set(result["tasks"]) == {"digits", "mnist", "mnist_retrieval"}
    assert {r["kind"] for r in result["tasks"].values()} == {"classification", "retrieval"}
    for name, row in result["tasks"].items():
        assert row["parity"] <= 1e-5
        assert 0.0 <= row["metrics"][{"classification": "top1", "retrieval": "recall@1"}[row["kind"]]] <= 1.0
        tm = load_task_model(row["file"])  # what `ufo export` and `ufo serve` take
        assert tm.num_params() == row["params"]
        y = tm(torch.zeros(2, 3, 16, 16), name)
        assert y.shape[0] == 2 and torch.isfinite(y).all()
    assert (out / "model.safetensors").exists() and (out / "metrics.csv").exists()
