"""Deployment: task models equal the trained model at their arch, ONNX export parity and metadata,
INT8 (dynamic and static) with metrics, and the `ufo extract` / `ufo export` commands."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from ufo.checkpoint import read_manifest, save_supernet
from ufo.cli import app
from ufo.config import parse_config
from ufo.deploy.onnx_export import (
    OnnxTaskModel,
    calibration_inputs,
    check_parity,
    export_task,
    quantize,
    sample_inputs,
)
from ufo.evaluation.protocol import evaluate_predict
from ufo.model import arch_from_spec
from ufo.taskmodel import (
    DeployError,
    extract_task_model,
    load_task_data,
    load_task_model,
    load_trained,
    save_task_model,
)

# A tiny run with one task of each output kind, plus a verification task for thresholds. The space
# has two choices per dimension, so "smallest" and random archs really differ from the largest.
TINY = {
    "name": "deploy-tiny",
    "seed": 0,
    "model": {
        "img_size": 16,
        "patch_size": 4,
        "head_dim": 8,
        "depth": [1, 2],
        "embed_dim": [16, 24],
        "num_heads": [1, 2],
        "mlp_ratio": [1.0, 2.0],
        "drop_path_rate": 0.0,
    },
    "tasks": {
        "digits": {"kind": "classification", "data": {"recipe": "digits", "test_fraction": 0.25}},
        "mnist_ret": {
            "kind": "retrieval",
            "data": {"recipe": "mnist5k", "test_fraction": 0.4, "max_train": 600},
            "options": {"embedding_dim": 16, "k": 4},
        },
        "faces": {
            "kind": "verification",
            "data": {"recipe": "digits", "test_fraction": 0.3},
            "options": {"embedding_dim": 16, "k": 4, "num_pairs": 600},
        },
    },
    "train": {
        "steps": 16,
        "batch_size": 48,
        "log_every": 8,
        "ckpt_every": 100,
        "warmup_steps": 2,
        "threads": 2,
        "paths": None,
    },
}


def make_run(tmp_path_factory) -> Path:
    """Train the tiny run once per test session (shared by test_deploy and test_server)."""
    run = tmp_path_factory.getbasetemp() / "deploy-run"
    if not (run / "model.safetensors").exists():
        from ufo.train.loop import Trainer

        Trainer(parse_config(TINY), run, show_progress=False).fit()
    return run


@pytest.fixture(scope="session")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory)


@pytest.fixture(scope="session")
def trained(run):
    return load_trained(run)


@pytest.fixture(scope="session")
def data(trained):
    _, cfg, _ = trained
    return load_task_data(cfg, cfg.task_names)


@pytest.fixture(scope="session")
def task_model(trained, data):
    model, cfg, _ = trained
    return extract_task_model(model, None, ["digits", "mnist_ret", "faces"], cfg, data)


def _images(data, task: str, n: int = 6) -> torch.Tensor:
    from ufo.taskmodel import Preprocessing

    cfg = parse_config(TINY)
    return Preprocessing.from_config(cfg).transform()(data[task].eval["test"].images[:n])


@pytest.mark.parametrize("spec", ["smallest", "random:1", None])
def test_task_model_equals_trained_model_at_its_arch(trained, data, spec):
    model, cfg, _ = trained
    arch = None if spec is None else arch_from_spec(spec, model.space, model.backbone.routes())
    tm = extract_task_model(model, arch, ["digits", "mnist_ret"], cfg)
    model.set_arch(tm.info.arch)
    for task in ("digits", "mnist_ret"):
        x = _images(data, task)
        with torch.no_grad():
            diff = (tm(x, task) - model(x, task)).abs().max().item()
        assert diff <= 1e-5, f"{task} at {spec}: {diff}"
    backbone_params = sum(p.numel() for p in tm.backbone.parameters())
    assert backbone_params == model.space.num_params(tm.info.arch, ["digits", "mnist_ret"])
    single = extract_task_model(model, arch, "digits", cfg)
    assert isinstance(single.backbone, VisionTransformer)
    with torch.no_grad():
        x = _images(data, "digits")
        assert (single(x, "digits") - model(x, "digits")).abs().max() <= 1e-5
    assert tm.info.heads["digits"].class_names is None and tm.info.heads["digits"].threshold is None


def test_task_model_from_run_at_a_subnet_has_that_subnets_bn_statistics(run, data):
    from ufo.evaluation.protocol import recalibrate_bn
    from ufo.taskmodel import task_model_from_run

    model, cfg, _ = load_trained(run)  # a fresh copy: recalibration changes the heads' buffers
    arch = arch_from_spec("smallest", model.space, model.backbone.routes())
    stale = model.heads["mnist_ret"].bn.running_mean.clone()
    tm = task_model_from_run(run, ["mnist_ret"], "smallest")
    model.set_arch(arch)
    recalibrate_bn(model, data, cfg, ["mnist_ret"])
    assert not torch.allclose(model.heads["mnist_ret"].bn.running_mean, stale)  # the subnet's own statistics
    x = _images(data, "mnist_ret")
    with torch.no_grad():
        assert (tm(x, "mnist_ret") - model.eval()(x, "mnist_ret")).abs().max() <= 1e-5
    plain = task_model_from_run(run, ["mnist_ret"], "smallest", recalibrate_bn=False)
    torch.testing.assert_close(plain.heads["mnist_ret"].bn.running_mean, stale)


def test_save_load_roundtrip_and_manifest(task_model, data, tmp_path):
    path = tmp_path / "tm.safetensors"
    save_task_model(path, task_model)
    m = read_manifest(path)
    assert m["kind"] == "task_model" and m["tasks"] == ["digits", "mnist_ret", "faces"]
    assert m["heads"]["digits"]["output"] == "logits" and m["heads"]["digits"]["class_names"] == list("0123456789")
    assert m["heads"]["mnist_ret"]["output"] == "embedding" and m["heads"]["mnist_ret"]["threshold"] is None
    faces = m["heads"]["faces"]
    assert faces["kind"] == "verification" and -1 <= faces["threshold"] <= 1 and "acc_10fold" in faces["calibration"]
    assert m["preprocessing"] == {"img_size": 16, "in_chans": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert m["num_params"] == task_model.num_params() and m["arch"]["paths"].keys() == {"digits", "mnist_ret", "faces"}
    loaded = load_task_model(path)
    for task in task_model.tasks:
        x = _images(data, "digits" if task != "mnist_ret" else task)
        with torch.no_grad():
            assert torch.equal(loaded(x, task), task_model(x, task))
    with pytest.raises(DeployError, match="unknown task 'nope'"):
        loaded(x, "nope")


def test_cli_extract_from_a_run_and_from_a_bare_supernet(run, trained, tmp_path):
    cli = CliRunner()
    out = tmp_path / "faces.safetensors"
    res = cli.invoke(app, ["extract", str(run), "--task", "faces", "--arch", "smallest", "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = read_manifest(out)
    assert m["kind"] == "task_model" and m["arch"]["depth"] == 1 and m["heads"]["faces"]["threshold"] is not None
    model, _, _ = trained
    sup = tmp_path / "supernet.safetensors"
    save_supernet(sup, model.backbone)
    res = cli.invoke(app, ["extract", str(sup), "--task", "digits", "--out", str(tmp_path / "vit.safetensors")])
    assert res.exit_code == 0, res.output
    assert read_manifest(tmp_path / "vit.safetensors")["kind"] == "vit"
    res = cli.invoke(app, ["extract", str(run), "--task", "nope", "--out", str(tmp_path / "x.safetensors")])
    assert res.exit_code == 2 and "unknown task 'nope'" in res.output


@pytest.fixture(scope="session")
def digits_onnx(task_model, trained, data, tmp_path_factory):
    """The digits path exported once (fp32), with its export report."""
    _, cfg, _ = trained
    out = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    return out, export_task(task_model, "digits", out, cfg=cfg, data=data["digits"])


@pytest.mark.parametrize("task", ["digits", "mnist_ret"])
def test_onnx_export_parity_dynamic_batch_and_metadata(task_model, trained, data, digits_onnx, task, tmp_path):
    _, cfg, _ = trained
    if task == "digits":
        out, report = digits_onnx
    else:
        out = tmp_path / f"{task}.onnx"
        report = export_task(task_model, task, out, cfg=cfg, data=data[task])
    assert report["parity_max_abs_diff"] <= 1e-4 and report["parity_inputs"] == "test images"
    proto = onnx.load(str(out))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["task"] == task and meta["output_kind"] == task_model.info.heads[task].output
    assert json.loads(meta["arch"]) == task_model.info.arch.model_dump()
    assert json.loads(meta["input_size"]) == [3, 16, 16]
    assert json.loads(meta["mean"]) == [0.5] * 3 and json.loads(meta["std"]) == [0.5] * 3
    om = OnnxTaskModel(out)
    for b in (1, 5):
        x = _images(data, task, b)
        with torch.no_grad():
            assert np.abs(om(x) - task_model(x, task).numpy()).max() <= 1e-4
        assert om(x).shape[0] == b
    key = task_model.info.heads[task].primary
    assert 0 <= report["metrics_fp32"][key] <= 1


def test_int8_dynamic_and_static_report_metrics(task_model, trained, data, digits_onnx, tmp_path):
    _, cfg, _ = trained
    fp32, report = digits_onnx
    head = task_model.info.heads["digits"]
    calib = calibration_inputs(task_model.info.preprocessing, data["digits"], n=64)
    for mode in ("dynamic", "static"):
        out = quantize(fp32, tmp_path / f"digits-{mode}.onnx", mode, calib)
        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "QuantizeLinear", "DequantizeLinear"}, ops
        om = OnnxTaskModel(out)
        assert (
            om.meta["int8"] == mode and om.meta["task"] == "digits" and om(_images(data, "digits", 3)).shape == (3, 10)
        )
        after = evaluate_predict(om.predict_fn(), "digits", head, cfg, data["digits"])
        print(f"digits INT8 {mode}: top1 fp32 {report['metrics_fp32']['top1']:.4f} -> int8 {after['top1']:.4f}")
        assert 0 <= after["top1"] <= 1
    with pytest.raises(DeployError, match="calibration images"):
        quantize(fp32, tmp_path / "x.onnx", "static", None)


def test_parity_failure_is_an_error_with_the_difference(task_model, digits_onnx, tmp_path, monkeypatch):
    fp32, _ = digits_onnx
    om = OnnxTaskModel(fp32)
    x = sample_inputs(task_model.info.preprocessing, None, n=8)  # seeded random images
    assert check_parity(task_model, "digits", om, x) <= 1e-4
    save_task_model(tmp_path / "tm.safetensors", task_model)
    tm2 = load_task_model(tmp_path / "tm.safetensors")
    with torch.no_grad():
        tm2.heads["digits"].fc.bias.add_(0.01)
    with pytest.raises(DeployError, match=r"differs from torch by 0\.01"):
        check_parity(tm2, "digits", om, x)
    # The command fails (exit 2, the difference in the message); the export itself is reused.
    monkeypatch.setattr("ufo.deploy.onnx_export.export_onnx", lambda tm, task, out, opset=18: shutil.copy(fp32, out))
    monkeypatch.setattr("ufo.deploy.onnx_export.max_abs_diff", lambda *a, **k: 0.5)
    res = CliRunner().invoke(
        app, ["export", str(tmp_path / "tm.safetensors"), "--task", "digits", "--out", str(tmp_path / "e.onnx")]
    )
    assert res.exit_code == 2 and "differs from torch by 0.5" in res.output.replace("\n", " ")


def test_cli_export_from_a_run_with_static_int8(run, tmp_path):
    res = CliRunner().invoke(
        app,
        [
            "export",
            str(run),
            "--task",
            "digits",
            "--arch",
            "smallest",
            "--int8",
            "static",
            "--calib-size",
            "32",
            "--out",
            str(tmp_path / "d.onnx"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "top1: fp32" in res.output and "int8" in res.output and "max abs diff" in res.output
    assert re.search(r"batch 1, 1 thread: \d+\.\d+ ms \(fp32 \d+\.\d+ ms\)", " ".join(res.output.split()))
    assert (tmp_path / "d.onnx").exists() and (tmp_path / "d.fp32.onnx").exists()
    res = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "choose one with --task" in res.output
