"""`ufo run`: a tiny config through every stage, skip logic, --from, changed inputs, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from pipeline_helpers import TINY_RUN, tiny_config, tiny_run
from ufo.cli import app
from ufo.config import load_config, parse_config
from ufo.errors import ConfigError
from ufo.run import STAGE_NAMES, PipelineError, run_pipeline
from ufo.run.context import stage_config
from ufo.run.state import inputs_of, read_record


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.getbasetemp() / "tiny-shared")  # shared with test_report


def _records(run_dir: Path) -> dict[str, str]:
    return {s: (run_dir / s / "done.json").read_text() for s in STAGE_NAMES}


def _quiet() -> Console:
    return Console(quiet=True)


def test_every_stage_writes_its_folder_and_done_json(run):
    for s in STAGE_NAMES:
        rec = read_record(run / s)
        assert rec is not None and rec.stage == s, s
        assert rec.outputs and all((run / o).exists() for o in rec.outputs), (s, rec.outputs)
    # chaining: each training stage started from the one before it
    assert load_config(run / "task_supernet" / "config.yaml").init.path.endswith("all_in_one")
    assert load_config(run / "chip_supernet" / "config.yaml").train.stage == "chip_supernet"
    assert (run / "task_supernet" / "routing_map.png").stat().st_size > 1000
    aio = json.loads((run / "all_in_one" / "metrics.json").read_text())
    assert set(aio["baselines"]) == {"digits", "mnist"}  # pipeline.baselines.enabled
    chip = json.loads((run / "chip_supernet" / "metrics.json").read_text())
    assert {"smallest", "largest"} <= set(chip["subnets"])


def test_search_extract_export_meet_the_budgets(run):
    from ufo.taskmodel import load_task_model

    ext = json.loads((run / "extract" / "extract.json").read_text())
    assert ext["digits"]["backbone_params"] <= 12000  # pipeline.search.budgets.digits.max_params
    assert ext["mnist"]["mflops"] * 1e6 <= 400000
    for t, row in ext.items():
        assert row["parity"] <= 1e-5
        tm = load_task_model(run / row["file"])
        assert tm.tasks == [t]
        assert torch.isfinite(tm(torch.zeros(2, 3, 16, 16), t)).all()
    exp = json.loads((run / "export" / "export.json").read_text())
    for row in exp.values():
        assert (run / row["fp32"]).is_file() and (run / row["int8"]).is_file()  # export.int8: dynamic
        assert row["parity_max_abs_diff"] <= row["parity_tol"]
        assert set(row["latency_ms"]) == {"torch", "onnx_fp32", "onnx_int8"}
        assert all(v > 0 for v in row["latency_ms"].values())


def test_rerun_skips_every_valid_stage(run):
    before = _records(run)
    run_pipeline(load_config(run.parent / "tiny.yaml"), run, console=_quiet())
    assert _records(run) == before


def test_changed_section_reruns_that_stage_and_later_ones_only(run, tmp_path):
    before = _records(run)
    cfg = load_config(tiny_config(tmp_path / "c.yaml", export={"int8": "dynamic", "latency_repeats": 6}))
    run_pipeline(cfg, run, console=_quiet())
    after = _records(run)
    assert [s for s in STAGE_NAMES if before[s] != after[s]] == ["export", "report"]
    # --from redoes the named stage and the ones after it, even when nothing changed
    run_pipeline(cfg, run, from_stage="extract", console=_quiet())
    again = _records(run)
    assert [s for s in STAGE_NAMES if again[s] != after[s]] == ["extract", "export", "report"]
    run_pipeline(load_config(run.parent / "tiny.yaml"), run, console=_quiet())  # back to the fixture's state


def test_cli_run_skips_and_prints_the_report(run):
    res = CliRunner().invoke(app, ["run", str(run.parent / "tiny.yaml"), "--out", str(run)], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output[-3000:]
    assert res.output.count("skipped") == len(STAGE_NAMES)
    assert "report/index.html" in res.output


def test_interrupted_training_stage_resumes(tmp_path, monkeypatch):
    from ufo.train.loop import Trainer

    cfg = parse_config(TINY_RUN)
    run_dir = tmp_path / "run"
    tr = Trainer(stage_config(cfg, "all_in_one", run_dir), run_dir / "all_in_one", show_progress=False)
    for _ in range(4):  # "killed" after 4 of 8 steps, with a checkpoint
        tr.train_step()
        tr.step += 1
    tr.save()
    resumed: list[int] = []
    original = Trainer.resume

    def spy(self) -> bool:
        ok = original(self)
        resumed.append(self.step if ok else -1)
        return ok

    monkeypatch.setattr(Trainer, "resume", spy)
    run_pipeline(cfg, run_dir, until="all_in_one", console=_quiet())
    assert resumed[0] == 4  # the All-in-One run went on from step 4 (then the baselines started afresh)
    assert json.loads((run_dir / "all_in_one" / "train_summary.json").read_text())["steps"] == 8
    assert read_record(run_dir / "all_in_one") is not None


def test_training_stages_chain_and_skip_without_search(tmp_path):
    run_dir = tiny_run(tmp_path, until="task_supernet")
    assert [s for s in STAGE_NAMES if (run_dir / s / "done.json").exists()] == ["all_in_one", "task_supernet"]
    before = _records_some(run_dir, ["all_in_one", "task_supernet"])
    tiny_run(tmp_path, until="task_supernet")
    assert _records_some(run_dir, ["all_in_one", "task_supernet"]) == before


def _records_some(run_dir: Path, stages: list[str]) -> dict[str, str]:
    return {s: (run_dir / s / "done.json").read_text() for s in stages}


def test_errors_name_the_stage_or_field(tmp_path):
    cfg = parse_config(TINY_RUN)
    with pytest.raises(PipelineError, match="unknown stage.*all_in_one"):
        run_pipeline(cfg, tmp_path / "r", from_stage="training", console=_quiet())
    with pytest.raises(PipelineError, match="stage 'chip_supernet' has not finished"):
        inputs_of(tmp_path, {}, ["chip_supernet"])
    bad = json.loads(json.dumps(TINY_RUN))
    bad["pipeline"]["search"]["budgets"]["faces"] = {"max_params": 10}
    with pytest.raises(ConfigError, match=r"pipeline.search.budgets: unknown task\(s\) \['faces'\]"):
        parse_config(bad)
    bad["pipeline"]["search"]["budgets"] = {"digits": {"max_latency_ms": 2.0, "max_latency_fraction": 0.5}}
    with pytest.raises(ConfigError, match="max_latency_ms .* or max_latency_fraction .* not both"):
        parse_config(bad)
    res = CliRunner().invoke(app, ["run", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "config file not found" in res.output


def test_relative_latency_budget_goes_to_the_search_as_a_fraction(tmp_path, monkeypatch):
    """A load burst between timing a `max_latency_fraction` budget and the search's own timing once
    made the smallest subnet miss it (a fresh-clone `make demo` failed so). The stage now hands the
    fraction to the search, which times it with every measurement; an absolute budget that no
    subnet meets is still an error."""
    from types import SimpleNamespace

    from ufo.errors import InfeasibleBudget
    from ufo.run import deploy_stages
    from ufo.run.context import RunContext

    budgets = {"digits": {"max_latency_fraction": 0.5}, "mnist": {"max_flops": 400000}}
    cfg = load_config(
        tiny_config(tmp_path / "tiny.yaml", search={**TINY_RUN["pipeline"]["search"], "budgets": budgets})
    )
    asked: list[dict] = []

    def search_task(run_dir, task, **kw):
        limits = {k: kw[k] for k in ("max_latency_ms", "max_latency_fraction", "max_flops") if k in kw}
        asked.append({"task": task, **limits})
        if limits.get("max_flops") == 1:
            raise InfeasibleBudget(f"impossible for {task}", fastest_ms=1.4)
        from ufo.arch import Arch

        return SimpleNamespace(
            arch=Arch(depth=1, embed_dim=16, num_heads=[1], mlp_ratio=[1.0]),
            objective="x",
            png_path=None,
            json_path=None,
            front=[],
            candidates=[],
            warnings=[],
        )

    api = SimpleNamespace(search_task=search_task, result_summary=lambda r: {"measured_metric": 0.5})
    monkeypatch.setattr(deploy_stages, "_search_api", lambda: api)
    ctx = RunContext(cfg=cfg, run_dir=tmp_path / "run", console=_quiet())
    _, summary = deploy_stages.search(ctx)
    assert asked == [{"task": "digits", "max_latency_fraction": 0.5}, {"task": "mnist", "max_flops": 400000}]
    assert set(summary) == {"digits", "mnist"}

    # an absolute budget is what the user asked for: infeasible stays an error
    budgets = {"digits": {"max_params": 12000}, "mnist": {"max_flops": 1}}
    cfg = load_config(tiny_config(tmp_path / "abs.yaml", search={**TINY_RUN["pipeline"]["search"], "budgets": budgets}))
    with pytest.raises(InfeasibleBudget, match="impossible for mnist"):
        deploy_stages.search(RunContext(cfg=cfg, run_dir=tmp_path / "run2", console=_quiet()))
