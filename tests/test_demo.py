"""`ufo demo` end to end on the built-in data, shortened: every `ufo run` stage, then the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from ufo.demo import demo_config_path
from ufo.run import STAGE_NAMES
from ufo.taskmodel import load_task_model

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
SHORT = [
    "train.steps=10",
    "train.threads=1",
    "pipeline.baselines.steps=5",
    "pipeline.task_supernet.steps=5",
    "pipeline.chip_supernet.steps=5",
    "pipeline.chip_supernet.eval_subnets=2",
    "pipeline.predictors.metric_samples=10",
    "pipeline.predictors.latency_samples=10",
    "pipeline.search.trials=100",
    "pipeline.search.top_k=1",
    "pipeline.export.latency_repeats=5",
    "tasks.mnist_retrieval.data.test_fraction=0.2",
]  # half the retrieval evaluation


def test_packaged_demo_config_is_the_repository_one():
    assert demo_config_path().read_text() == (ROOT / "configs" / "demo.yaml").read_text()
    cfg = yaml.safe_load(demo_config_path().read_text())
    assert {t["kind"] for t in cfg["tasks"].values()} == {"classification", "retrieval"}
    assert {t["data"]["recipe"] for t in cfg["tasks"].values()} <= {"digits", "mnist5k"}  # ships with pip packages


def test_demo_short_run_end_to_end(tmp_path):
    out = tmp_path / "demo"
    args = [str(BIN / "ufo"), "demo", "--out", str(out)]
    for s in SHORT:
        args += ["--set", s]
    env = {**os.environ, "COLUMNS": "200"}  # the final table on one line per task
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "report:" in res.stdout and (out / "report" / "index.html").is_file()
    rows = [
        line
        for line in res.stdout.splitlines()
        if line.lstrip("│| ").startswith(("digits ", "mnist ", "mnist_retrieval "))
    ]
    assert len(rows) == 3 and "chosen subnet" in res.stdout and "All in One" in res.stdout, res.stdout[-3000:]
    assert all((out / s / "done.json").is_file() for s in STAGE_NAMES)
    aio = json.loads((out / "all_in_one" / "metrics.json").read_text())
    assert set(aio["primary"]) == {"digits", "mnist", "mnist_retrieval"} and set(aio["baselines"]) == set(
        aio["primary"]
    )
    ext = json.loads((out / "extract" / "extract.json").read_text())
    assert set(ext) == {"digits", "mnist", "mnist_retrieval"}
    assert ext["digits"]["backbone_params"] <= 40000  # the demo's budgets
    assert ext["mnist_retrieval"]["mflops"] * 1e6 <= 2_000_000
    # max_latency_fraction 0.5: timed with every measurement, so the chosen subnet is judged against
    # the budget timed beside it (budget_ms), not the one timed when the search started
    found = json.loads((out / "search" / "mnist" / "search.json").read_text())
    assert found["budget"]["max_latency_fraction"] == 0.5 and found["budget"]["max_latency_ms"] > 0
    chosen = next(c for c in found["candidates"] if c["arch"] == found["arch"])
    assert chosen["meets_budget"] and found["measured_latency_ms"] <= chosen["budget_ms"]
    stage = json.loads((out / "search" / "search.json").read_text())["mnist"]  # what the report reads
    assert stage["budget_ms"] == chosen["budget_ms"]
    report = (out / "report" / "report.md").read_text()
    assert f"latency_ms <= {chosen['budget_ms']:.3g} (timed beside the chosen subnet)" in report
    for name, row in ext.items():
        assert row["parity"] <= 1e-5 and 0.0 <= row["primary"] <= 1.0
        tm = load_task_model(out / row["file"])  # what `ufo export` and `ufo serve` take
        y = tm(torch.zeros(2, 3, 16, 16), name)
        assert y.shape[0] == 2 and torch.isfinite(y).all()
    exp = json.loads((out / "export" / "export.json").read_text())
    assert all((out / e["int8"]).is_file() for e in exp.values())  # the demo exports static INT8


def test_full_suite_needs_its_data(tmp_path):
    from typer.testing import CliRunner

    from ufo.cli import app

    res = CliRunner().invoke(
        app,
        ["demo", "--suite", "full", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "r")],
        env={"COLUMNS": "300"},
    )
    assert res.exit_code == 2 and "--suite full needs the datasets folder" in res.output
    res = CliRunner().invoke(app, ["demo", "--suite", "tiny", "--out", str(tmp_path / "r")], env={"COLUMNS": "300"})
    assert res.exit_code == 2 and "'tiny' is not one of 'builtin', 'full'" in res.output
    assert not (tmp_path / "r").exists()
