"""Distillation into timm students: the loss terms (KL gradient and temperature, projection,
relational), a distilled student saved as a task model, loaded, exported to ONNX and served, exact
resume, and the `ufo distill` command."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from test_deploy import make_run
from ufo.checkpoint import read_manifest
from ufo.cli import app
from ufo.taskmodel import DeployError, TaskModel, load_task_model, task_model_from_run
from ufo.tasks import task_class
from ufo.train.distill import DistillConfig, StudentModel, create_backbone, distill, distill_terms
from ufo.train.distill_losses import kl_logits, relational

STUDENT = dict(
    student="test_efficientnet",
    student_kwargs={"channel_multiplier": 0.25},
    batch_size=24,
    warmup_steps=1,
    log_every=2,
    threads=1,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory)


# ----- losses -----


def test_kl_gradient_matches_the_closed_form_and_scales_with_temperature():
    s = torch.randn(5, 7, requires_grad=True)
    t = torch.randn(5, 7, requires_grad=True)
    for T in (1.0, 4.0):
        s.grad = None
        loss = kl_logits(s, t, T)
        loss.backward()
        # d/ds [T^2 KL(softmax(t/T) || softmax(s/T))] / B = T (softmax(s/T) - softmax(t/T)) / B
        expected = T * (F.softmax(s / T, -1) - F.softmax(t / T, -1)) / s.shape[0]
        assert torch.allclose(s.grad, expected.detach(), atol=1e-6)
        assert t.grad is None  # the teacher side is detached
    assert kl_logits(t.detach(), t.detach(), 3.0).abs() < 1e-6
    # a higher temperature softens the targets: the loss of the same logits changes
    assert not torch.isclose(kl_logits(s, t, 1.0), kl_logits(s, t, 4.0))


def _student(kind: str, emb: int | None, teacher_dim: int | None) -> StudentModel:
    backbone, spec = create_backbone("test_efficientnet", {"channel_multiplier": 0.25}, 3, 16)
    opts = {"embedding_dim": emb, "k": 2} if emb else {}
    head = task_class(kind)("t", opts, 5, spec.num_features)
    return StudentModel(backbone, head, teacher_dim)


def test_identity_terms_use_a_learned_projection_and_the_relational_loss():
    student = _student("retrieval", 8, 16)
    assert student.proj is not None and student.proj.weight.shape == (16, 8)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(4).repeat_interleave(2)
    teacher = lambda x, task: F.normalize(torch.randn(len(x), 16), dim=-1)
    cfg = DistillConfig(embed_weight=1.0, rel_weight=1.0)
    terms = distill_terms(student, teacher, x, y, cfg)
    assert set(terms) == {"label", "embed", "rel"} and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert student.proj.weight.grad is not None and student.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in student.backbone.parameters() if p.requires_grad)
    # without the teacher only the task's own loss remains, and no projection is needed at equal sizes
    assert set(distill_terms(student, None, x, y, cfg)) == {"label"}
    assert _student("retrieval", 16, 16).proj is None
    # the relational loss compares similarity structure: zero for a rescaled copy, positive otherwise
    e = torch.randn(6, 16)
    assert relational(3 * e, e) < 1e-10 and relational(torch.randn(6, 16), e) > 0


def test_classification_terms_are_label_plus_kl():
    student = _student("classification", None, None)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    logits = torch.randn(4, 5)
    terms = distill_terms(student, lambda x, task: logits, x, y, DistillConfig(temperature=2.0, kl_weight=0.5))
    assert set(terms) == {"label", "kl"}
    with torch.no_grad():
        own = student.head(student.backbone(x))
    assert torch.isclose(terms["kl"], 0.5 * kl_logits(own, logits, 2.0), atol=1e-6)


def test_a_student_that_cannot_run_at_the_input_size_is_a_clear_error():
    with pytest.raises(DeployError, match="not a timm model"):
        create_backbone("no_such_model_xyz", {}, 3, 16)
    with pytest.raises(DeployError, match="does not run on 3x16x16"):
        create_backbone("test_vit3", {}, 3, 16)


# ----- end to end -----


def test_distilled_student_is_a_task_model_that_loads_exports_and_serves(run, tmp_path):
    out = tmp_path / "student"
    r = distill(run, "digits", out, DistillConfig(steps=4, **STUDENT), show_progress=False)
    f = out / "model.safetensors"
    m = read_manifest(f)
    assert m["kind"] == "task_model" and m["backbone"]["name"] == "test_efficientnet"
    assert m["backbone"]["distilled_from"]["task"] == "digits" and m["num_params"] == r["student"]["params"]
    tm = load_task_model(f)
    assert isinstance(tm, TaskModel) and not hasattr(tm.backbone, "ufo_arch")
    teacher = task_model_from_run(run, ["digits"], with_data=False)
    assert r["teacher"]["params"] == teacher.num_params() and r["compression"] == pytest.approx(
        teacher.num_params() / tm.num_params()
    )
    assert tm.info.heads["digits"].class_names and r["student"]["metrics"]["top1"] >= 0
    x = torch.randn(3, 3, 16, 16)
    assert tm(x, "digits").shape == (3, 10)

    from ufo.deploy.onnx_export import OnnxTaskModel, export_onnx

    onnx_path = export_onnx(tm, "digits", tmp_path / "student.onnx")
    om = OnnxTaskModel(onnx_path)
    with torch.no_grad():
        ref = tm(x, "digits").numpy()
    assert abs(om(x) - ref).max() < 1e-4

    from ufo.deploy.server import load_served

    served = load_served([f])
    assert list(served) == ["digits"] and served["digits"].head.output == "logits"


def test_verification_student_gets_a_threshold_and_a_projection(run, tmp_path):
    r = distill(run, "faces", tmp_path / "s", DistillConfig(steps=3, embedding_dim=8, **STUDENT), show_progress=False)
    tm = load_task_model(tmp_path / "s" / "model.safetensors")
    h = tm.info.heads["faces"]
    assert h.embedding_dim == 8 and h.threshold is not None  # the projection to 16 is training-only
    assert "proj.weight" not in dict(tm.named_parameters())
    out = tm(torch.randn(2, 3, 16, 16), "faces")
    assert out.shape == (2, 8) and torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert {"acc_10fold", "threshold"} <= set(r["student"]["metrics"])


def test_resume_continues_exactly(run, tmp_path, monkeypatch):
    cfg = DistillConfig(steps=6, ckpt_every=3, **STUDENT)
    distill(run, "digits", tmp_path / "a", cfg, show_progress=False)

    import ufo.train.distill as mod

    real, calls = mod.distill_terms, {"n": 0}

    def crash_after_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "distill_terms", crash_after_4)
    with pytest.raises(KeyboardInterrupt):
        distill(run, "digits", tmp_path / "b", cfg, show_progress=False)
    monkeypatch.setattr(mod, "distill_terms", real)
    distill(run, "digits", tmp_path / "b", cfg, resume=True, show_progress=False)
    a = load_task_model(tmp_path / "a" / "model.safetensors").state_dict()
    b = load_task_model(tmp_path / "b" / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="another recipe"):
        distill(run, "digits", tmp_path / "b", cfg.model_copy(update={"lr": 1e-4}), resume=True, show_progress=False)


def test_cli_distill_with_the_no_teacher_comparison(run, tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(
        app,
        [
            "distill",
            str(run),
            "--task",
            "digits",
            "--student",
            "test_efficientnet",
            "--student-kwargs",
            '{"channel_multiplier": 0.25}',
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "16",
            "--compare",
            "--threads",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "fewer parameters" in res.output and "without the teacher" in res.output
    report = json.loads((out / "distill.json").read_text())
    assert report["with_teacher"] and "gain" in report and (out / "no_teacher" / "model.safetensors").exists()
    assert not json.loads((out / "no_teacher" / "distill.json").read_text())["with_teacher"]
    bad = CliRunner().invoke(
        app,
        [
            "distill",
            str(run),
            "--task",
            "nope",
            "--student",
            "test_efficientnet",
            "--out",
            str(out / "x"),
            "--steps",
            "1",
        ],
    )
    assert bad.exit_code == 2 and "nope" in bad.output


def test_cli_distill_takes_device_and_amp(run, tmp_path):
    out = tmp_path / "bf16"
    args = ["distill", str(run), "--task", "digits", "--student", "test_efficientnet"]
    args += ["--student-kwargs", '{"channel_multiplier": 0.25}', "--out", str(out), "--steps", "2"]
    res = CliRunner().invoke(app, [*args, "--batch-size", "16", "--threads", "1", "--device", "cpu", "--amp", "bf16"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "distill.json").read_text())
    assert report["recipe"]["device"] == "cpu" and report["recipe"]["amp"] == "bf16"
    assert report["steps"] == 2 and all(v == v for v in report["student"]["metrics"].values())
