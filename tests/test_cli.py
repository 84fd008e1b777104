"""The `ufo` command line itself: --version, shell completion, the choices typer checks (equal to
the library's lists), the old spellings of renamed options, the hint for a `ufo run` folder given
as a model, and the one-line message naming the extra when an optional package is missing."""

from __future__ import annotations

import sys
from typing import get_args

import click
import pytest
import typer
from typer.testing import CliRunner

from ufo import choices
from ufo.cli import app
from ufo.optional import EXTRAS, MissingExtra, require

WIDE = {"COLUMNS": "300"}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env=WIDE)


def command(*path: str) -> click.Command:
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def test_version_flag_prints_the_version_line():
    flag, cmd = invoke("--version"), invoke("version")
    assert flag.exit_code == 0 and cmd.exit_code == 0
    assert flag.output == cmd.output and flag.output.startswith("ufo ") and " torch " in flag.output


def test_shell_completion_is_on():
    res = invoke("--help")
    assert res.exit_code == 0 and "--install-completion" in res.output and "--version" in res.output


def test_choices_equal_the_library_lists():
    from ufo.data.readers import OnError
    from ufo.demo import SUITES
    from ufo.deploy.onnx_export import Int8Mode
    from ufo.deploy.server import Backend
    from ufo.run import STAGE_NAMES
    from ufo.search.latency import BACKENDS
    from ufo.train.extend import MODES

    def values(enum) -> tuple[str, ...]:
        return tuple(m.value for m in enum)

    assert values(choices.LatencyBackend) == BACKENDS
    assert values(choices.Stage) == STAGE_NAMES
    assert values(choices.ExtendTrain) == MODES
    assert values(choices.Suite) == SUITES
    assert values(choices.Int8) == get_args(Int8Mode)
    assert values(choices.ServeBackend) == get_args(Backend)
    assert values(choices.OnError) == get_args(OnError)


@pytest.mark.parametrize(
    "args, option, bad, allowed",
    [
        (["export", "m.safetensors", "--out", "m.onnx"], "--int8", "fast", "'dynamic', 'static'"),
        (["export", "m.safetensors", "--out", "m.onnx"], "--format", "tflite", "'onnx'"),
        (["serve", "m.safetensors"], "--backend", "tensorrt", "'torch', 'onnx'"),
        (["latency", "run", "-t", "a", "--out", "l.json"], "--backend", "tpu", "'torch-cpu', 'ort-cpu', 'cuda'"),
        (["search", "run", "-t", "a", "--out", "s"], "--backend", "gpu", "'torch-cpu', 'ort-cpu', 'cuda'"),
        (["predictor", "fit", "run"], "--backend", "gpu", "'torch-cpu', 'ort-cpu', 'cuda'"),
        (["run", "c.yaml", "--out", "r"], "--from", "training", "'all_in_one', 'task_supernet'"),
        (["run", "c.yaml", "--out", "r"], "--until", "deploy", "'all_in_one', 'task_supernet'"),
        (["demo"], "--from", "x", "'all_in_one'"),
        (["demo"], "--suite", "tiny", "'builtin', 'full'"),
        (["extend", "run", "--task-config", "t.yaml", "--out", "e"], "--train", "experts", "'head', 'head+expert'"),
        (["data", "pack", "src", "out"], "--on-error", "ignore", "'raise', 'skip'"),
    ],
)
def test_a_value_outside_the_choices_is_refused_before_running(args, option, bad, allowed):
    res = CliRunner().invoke(app, [*args, option, bad], env=WIDE)
    assert res.exit_code == 2, res.output
    assert f"Invalid value for '{option}'" in res.output and f"'{bad}' is not one of {allowed}" in res.output


@pytest.mark.parametrize(
    "path, new, old",
    [
        (("latency",), "--samples", "--n"),
        (("latency",), "--batch-size", "--batch"),
        (("search",), "--batch-size", "--batch"),
        (("data", "pack"), "--max-count", "--maxcount"),
        (("data", "pack"), "--max-size-mb", "--maxsize-mb"),
    ],
)
def test_renamed_options_keep_their_old_spelling(path, new, old):
    params = {p.name: p.opts for p in command(*path).params}
    assert any(opts[0] == new and old in opts for opts in params.values()), params


def test_predictor_fit_names_samples_as_search_does():
    fit = {o for p in command("predictor", "fit").params for o in p.opts}
    search = {o for p in command("search").params for o in p.opts}
    assert {"--metric-samples", "--latency-samples"} <= fit & search and "--samples" in fit


# ----- a `ufo run` folder given where a model is expected


@pytest.fixture
def pipeline_run(tmp_path):
    """The layout `ufo run` leaves: stage folders, the chip supernet's model and extracted task models."""
    run = tmp_path / "run"
    for stage in ("all_in_one", "task_supernet", "chip_supernet", "extract"):
        (run / stage).mkdir(parents=True)
    (run / "chip_supernet" / "model.safetensors").write_bytes(b"")
    for task in ("digits", "mnist"):
        (run / "extract" / f"{task}.safetensors").write_bytes(b"")
    return run


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{run}"],
        ["export", "{run}", "--out", "{run}/x.onnx"],
        ["eval", "{run}"],
        ["latency", "{run}", "-t", "digits", "--out", "{run}/l.json"],
        ["serve", "{run}"],
    ],
)
def test_a_pipeline_folder_given_as_a_model_says_where_the_models_are(pipeline_run, args):
    res = invoke(*(a.format(run=pipeline_run) for a in args))
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert f"{pipeline_run} is a `ufo run` folder, not a model" in out
    assert f"its task models are {pipeline_run / 'extract'}/<task>.safetensors (digits, mnist)" in out
    assert f"its trained supernet is {pipeline_run / 'chip_supernet'}" in out


def test_no_hint_for_a_train_folder_or_a_missing_one(tmp_path):
    run = tmp_path / "run"  # a `ufo train` folder whose model is gone, with `ufo report` / `ufo search` output
    for sub in ("report", "search", "predictors"):
        (run / sub).mkdir(parents=True)
    for path in (run, tmp_path / "nothing"):
        res = invoke("inspect", str(path))
        assert res.exit_code == 2 and "checkpoint not found" in res.output and "ufo run" not in res.output


# ----- optional packages


@pytest.mark.parametrize(
    "module, extra",
    [("optuna", "search"), ("onnx", "export"), ("fastapi", "serve"), ("onnxruntime.quantization", "export")],
)
def test_require_names_the_extra_of_a_missing_package(monkeypatch, module, extra):
    for loaded in [m for m in sys.modules if m == module.split(".")[0] or m.startswith(module.split(".")[0] + ".")]:
        monkeypatch.delitem(sys.modules, loaded)  # a submodule imported by an earlier test would still import
    monkeypatch.setitem(sys.modules, module.split(".")[0], None)  # what an uninstalled package looks like
    with pytest.raises(MissingExtra, match=rf"pip install 'ufo-vision\[{extra}\]'"):
        require(module)


def test_a_missing_core_package_is_not_blamed_on_an_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ModuleNotFoundError):
        require("torchvision")


def test_extras_match_pyproject():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    groups = pyproject["optional-dependencies"]
    for extra, (_, modules) in EXTRAS.items():
        names = {req.split(">")[0].split("=")[0].split("[")[0].replace("-", "_") for req in groups[extra]}
        assert names == set(modules), extra
        assert not names & {d.split(">")[0].replace("-", "_") for d in pyproject["dependencies"]}
    assert groups["all"] == ["ufo-vision[serve,export,search]"]


def test_serve_without_the_serve_extra_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.delitem(sys.modules, "ufo.deploy.server", raising=False)  # imported again, without fastapi
    res = invoke("serve", str(tmp_path / "m.safetensors"))
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert (
        "ufo serve needs the optional package 'fastapi', which is not installed: pip install "
        "'ufo-vision[serve]'" in " ".join(res.output.split())
    )


def test_search_without_the_search_extra_is_one_line(monkeypatch, tmp_path):
    # the search asks for optuna first thing (ufo.optional.require), before it reads the run
    monkeypatch.setitem(sys.modules, "optuna", None)
    res = invoke("search", str(tmp_path), "-t", "a", "--out", str(tmp_path / "s"), "--max-params", "1e6")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "pip install 'ufo-vision[search]'" in res.output


def test_export_without_the_export_extra_is_one_line(monkeypatch, tmp_path):
    from ufo.deploy.onnx_export import read_metadata

    (tmp_path / "m.onnx").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(MissingExtra, match=r"ONNX export needs the optional package 'onnx'.*ufo-vision\[export\]"):
        read_metadata(tmp_path / "m.onnx")


def test_the_pipeline_checks_its_extras_before_training(monkeypatch, tmp_path):
    from ufo.demo import demo_config
    from ufo.run import run_pipeline

    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(MissingExtra, match=r"ufo-vision\[search\]"):
        run_pipeline(demo_config(), tmp_path / "run")
    assert not (tmp_path / "run" / "all_in_one").exists()


# ----- --device and --amp


def test_device_and_amp_choices_equal_the_recipe_fields():
    from ufo.config import TrainConfig
    from ufo.train.tune import TuneRecipe

    for model in (TrainConfig, TuneRecipe):
        assert tuple(m.value for m in choices.Device) == get_args(model.model_fields["device"].annotation)
        assert tuple(m.value for m in choices.Amp) == get_args(model.model_fields["amp"].annotation)


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "{run}"],
        ["distill", "{run}", "-t", "a", "--student", "resnet10t", "--out", "{run}/d"],
        ["extend", "{run}", "--task-config", "{run}/t.yaml", "--out", "{run}/e"],
        ["search", "{run}", "-t", "a", "--out", "{run}/s", "--max-params", "1e6"],
        ["predictor", "fit", "{run}", "-t", "a", "--metric"],
    ],
)
def test_device_cuda_without_cuda_is_one_line_naming_the_option(monkeypatch, tmp_path, args):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = invoke(*(a.format(run=tmp_path) for a in args), "--device", "cuda")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "--device cuda: CUDA is not available" in " ".join(res.output.split())


def test_eval_on_a_chosen_device_writes_the_metrics_of_the_library_call(tmp_path_factory, tmp_path):
    import json
    import shutil

    from test_deploy import make_run
    from ufo.evaluation.run import evaluate_run

    run = tmp_path / "run"  # a copy: eval writes beside the model, and the session's run is shared
    shutil.copytree(make_run(tmp_path_factory), run)
    res = invoke("eval", str(run), "--task", "digits", "--device", "cpu")
    assert res.exit_code == 0, res.output
    got = json.loads((run / "eval.json").read_text())["metrics"]
    assert list(got) == ["digits"] and 0 <= got["digits"]["top1"] <= 1
    assert json.loads(evaluate_run(run, tasks=["digits"], device="cpu").json_path.read_text())["metrics"] == got
