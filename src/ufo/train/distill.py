"""Distil one task's subnet into a small timm model (`ufo distill`).

The teacher is the task's path through a trained run, extracted as a plain ViT task model
(`task_model_from_run`: same outputs as the supernet at that arch). The student is any timm model,
built with `pretrained=False, num_classes=0` (pooled features) plus a fresh head of the task's own
kind (`task_class(kind)`), so it trains with the task's own loss: cross-entropy with label smoothing
for classification, the margin / metric loss for identity tasks. On top of that:

- classification: KL(teacher || student) of the logits at temperature T (times T^2);
- identity tasks: the student's embedding learns the teacher's: a cosine (or MSE, on unit vectors)
  loss after a learned projection when the student's embedding size differs (the projection is
  dropped after training), plus a relational loss on the batch's pairwise similarities.

With `teacher=False` the same student, recipe and steps train on the labels alone: the baseline
the distillation has to beat. The result is a `task_model` file whose backbone is the timm model
(`TimmBackbone` in its info), so `ufo export` and `ufo serve` take it directly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ufo.arch import ImageSize, as_hw
from ufo.checkpoint import atomic_write_text
from ufo.config import Config
from ufo.data.build import build_task_data
from ufo.evaluation.protocol import evaluate_model
from ufo.runlock import locks
from ufo.taskmodel import (
    DeployError,
    TaskModel,
    TaskModelInfo,
    TimmBackbone,
    calibrate_threshold,
    load_trained,
    save_task_model,
    slice_head,
    task_model_from_run,
)
from ufo.tasks import TaskData, task_class
from ufo.tasks.base import EmbeddingTask, Task
from ufo.train import distributed as dist
from ufo.train.distill_losses import cosine_embedding, kl_logits, relational
from ufo.train.optim import build_optimizer
from ufo.train.tune import TuneLoop, TuneRecipe


class DistillConfig(TuneRecipe):
    """The distillation recipe (the same for the run without a teacher); longer, with a longer
    warm-up and looser clipping than TuneRecipe's defaults."""

    student: str = "mobilenetv3_small_050"
    student_kwargs: dict[str, Any] = Field(default_factory=dict)  # extra timm.create_model arguments
    teacher: bool = True  # False: the same student on the labels alone (the baseline)
    arch: str | None = None  # the teacher subnet: largest | smallest | random:SEED | ARCH.json (default: the run's)
    steps: int = Field(600, gt=0)
    warmup_steps: int = Field(30, ge=0)
    grad_clip: float | None = Field(5.0, gt=0)
    ckpt_every: int = Field(200, gt=0)
    temperature: float = Field(4.0, gt=0)  # softens both logit distributions in the KL term
    label_weight: float = Field(1.0, ge=0)  # the task's own loss (CE, margin or metric loss), times its loss_weight
    kl_weight: float = Field(1.0, ge=0)
    embed_loss: Literal["cosine", "mse"] = "cosine"
    embed_weight: float = Field(5.0, ge=0)
    rel_weight: float = Field(20.0, ge=0)
    embedding_dim: int | None = Field(None, gt=0)  # identity tasks: student embedding size (default: teacher's)


class StudentModel(nn.Module):
    """timm feature extractor + the task's head (+ a projection to the teacher's embedding size)."""

    def __init__(self, backbone: nn.Module, head: Task, teacher_dim: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({head.name: head})
        self.task = head.name
        dim = head.neck.out_features if isinstance(head, EmbeddingTask) else None
        self.proj = nn.Linear(dim, teacher_dim, bias=False) if dim and teacher_dim and dim != teacher_dim else None

    @property
    def head(self) -> Task:
        return cast(Task, self.heads[self.task])

    def forward(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        return self.head(self.backbone(x))


def create_backbone(
    name: str, kwargs: dict[str, Any], in_chans: int, img_size: ImageSize
) -> tuple[nn.Module, TimmBackbone]:
    """A timm feature extractor with random weights, checked to run at the task's input size
    (one side, or (height, width))."""
    import timm

    if name not in timm.list_models():
        raise DeployError(f"--student {name!r}: not a timm model name (see timm.list_models())")
    h, w = as_hw(img_size)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, in_chans, h, w))
    except Exception as e:
        raise DeployError(
            f"student {name!r} (kwargs {kwargs}) does not run on {in_chans}x{h}x{w} (CxHxW) "
            f"inputs: {type(e).__name__}: {e}"
        ) from None
    if out.ndim != 2:
        raise DeployError(
            f"student {name!r} gives features of shape {tuple(out.shape)} with num_classes=0; "
            "expected pooled (B, features)"
        )
    return model.train(), TimmBackbone(name=name, kwargs=kwargs, num_features=int(out.shape[1]))


def distill_terms(
    student: StudentModel, teacher: TaskModel | None, x: torch.Tensor, y: torch.Tensor, cfg: DistillConfig
) -> dict[str, torch.Tensor]:
    """The weighted loss terms of one batch: the task's own loss, plus the teacher's terms."""
    head = student.head
    feats = student.backbone(x)
    out = {"label": cfg.label_weight * head.loss(feats, y)}
    if teacher is None:
        return out
    with torch.no_grad():
        t = teacher(x, student.task)
    if head.output == "logits":
        out["kl"] = cfg.kl_weight * kl_logits(head(feats), t, cfg.temperature)
        return out
    emb = cast(EmbeddingTask, head).embed(feats)
    proj = emb if student.proj is None else student.proj(emb)
    if cfg.embed_loss == "cosine":
        out["embed"] = cfg.embed_weight * cosine_embedding(proj, t)
    else:
        out["embed"] = cfg.embed_weight * F.mse_loss(F.normalize(proj.float(), dim=-1), t.float())
    out["rel"] = cfg.rel_weight * relational(emb, t)
    return out


def package_student(
    student: StudentModel, spec: TimmBackbone, teacher: TaskModel, cfg: Config, data: TaskData | None
) -> TaskModel:
    """The trained student as a task model (timm backbone + plain head), thresholds/classes from `data`."""
    task = student.task
    head, info = slice_head(student.head, spec.num_features)
    tinfo = teacher.info
    tm_info = TaskModelInfo(
        tasks=[task],
        arch=tinfo.arch,
        space=tinfo.space,
        heads={task: info},
        preprocessing=tinfo.preprocessing,
        config=tinfo.config,
        source=tinfo.source,
        backbone=spec,
    )
    tm = TaskModel(student.backbone, {task: head}, tm_info).eval()
    if data is not None:
        if info.output == "logits":
            info.class_names = list(data.train.class_names)
        if info.kind == "verification":
            calibrate_threshold(tm, task, student.head, cfg, data)
    return tm


@locks("out")
def distill(
    run_dir: str | Path,
    task: str,
    out: str | Path,
    cfg: DistillConfig | None = None,
    data_root: str | None = None,
    resume: bool = False,
    show_progress: bool = True,
    data: TaskData | None = None,
) -> dict[str, Any]:
    """Distil `task` of the trained run into `cfg.student`; writes OUT/model.safetensors (task model),
    OUT/distill.json (the report) and training logs. Returns the report."""
    cfg = cfg or DistillConfig()
    out = Path(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, run_cfg, _ = load_trained(run_dir)
    if task not in model.tasks:
        raise DeployError(f"--task {task!r}: the run {run_dir} has tasks {model.tasks}")
    if data_root is not None:
        run_cfg.data_root = data_root
    del model
    teacher = task_model_from_run(run_dir, [task], cfg.arch, with_data=False, data_root=data_root)
    for p in teacher.parameters():
        p.requires_grad_(False)
    tcfg = run_cfg.only(task)
    tcfg = tcfg.model_copy(
        update={"train": cfg.train_config().model_copy(update={"eval_batch_size": run_cfg.train.eval_batch_size})}
    )
    data = data if data is not None else build_task_data(task, run_cfg.tasks[task], run_cfg)
    tc = run_cfg.tasks[task]
    m = run_cfg.model

    torch.manual_seed(cfg.seed)  # same initial student with and without the teacher
    size = run_cfg.input_size(task)  # the task's own input size: the teacher's, and the student's
    backbone, spec = create_backbone(cfg.student, cfg.student_kwargs, m.in_chans, size)
    options = dict(tc.options)
    t_info = teacher.info.heads[task]
    if t_info.output == "embedding" and cfg.embedding_dim is not None:
        options["embedding_dim"] = cfg.embedding_dim
    head = task_class(tc.kind)(task, options, len(data.train.class_names), spec.num_features)
    student = StudentModel(backbone, head, t_info.embedding_dim if t_info.output == "embedding" else None)
    dev = dist.device(cfg.device)  # student and teacher train on the GPU when there is one
    student.to(dev)
    teacher.to(dev)
    optimizer = build_optimizer(student, tcfg)
    recipe = {"run": str(Path(run_dir).resolve()), "task": task, **cfg.model_dump(mode="json")}
    t_used = teacher if cfg.teacher else None
    # the task's loss_weight balanced its loss against the others' in the run (margin losses are ~10x
    # cross-entropy); it balances it against the distillation terms here in the same way
    terms_cfg = cfg.model_copy(update={"label_weight": cfg.label_weight * tc.loss_weight})
    loop = TuneLoop(
        student,
        optimizer,
        lambda x, y: distill_terms(student, t_used, x, y, terms_cfg),
        tcfg,
        task,
        data,
        out,
        recipe,
        loss_names=["label"] + ((["kl"] if t_info.output == "logits" else ["embed", "rel"]) if cfg.teacher else []),
        seed=cfg.seed,
        k=int(getattr(head.opts, "k", 4)),
        show_progress=show_progress,
    )
    t0 = time.perf_counter()
    what = f"distill {task} -> {cfg.student}" + ("" if cfg.teacher else " (no teacher)")
    summary = loop.fit(resume, description=what)
    student.cpu()
    teacher.cpu()
    train_s = time.perf_counter() - t0

    tm = package_student(student, spec, teacher, tcfg, data)
    primary = task_class(tc.kind).primary
    t_metrics = evaluate_model(teacher, task, tcfg, data, protocol=head)
    s_metrics = evaluate_model(tm, task, tcfg, data, protocol=head)
    report = {
        "task": task,
        "kind": tc.kind,
        "primary": primary,
        "with_teacher": cfg.teacher,
        "teacher": {
            "source": str(run_dir),
            "arch": teacher.info.arch.model_dump(),
            "params": teacher.num_params(),
            "metrics": t_metrics,
        },
        "student": {
            "name": cfg.student,
            "kwargs": cfg.student_kwargs,
            "params": tm.num_params(),
            "file": str(out / "model.safetensors"),
            "metrics": s_metrics,
        },
        "compression": teacher.num_params() / tm.num_params(),
        "share_of_teacher": s_metrics[primary] / t_metrics[primary] if t_metrics[primary] else float("nan"),
        "steps": summary["steps"],
        "train_seconds": train_s,
        "recipe": cfg.model_dump(mode="json"),
    }
    assert tm.info.backbone is not None  # package_student gives the timm backbone's spec
    tm.info.backbone.distilled_from = {
        "source": str(run_dir),
        "task": task,
        "teacher_params": teacher.num_params(),
        "teacher_" + primary: t_metrics[primary],
        "with_teacher": cfg.teacher,
    }
    save_task_model(out / "model.safetensors", tm)
    atomic_write_text(out / "distill.json", json.dumps(report, indent=2))
    return report


@locks("out")
def distill_and_compare(
    run_dir: str | Path,
    task: str,
    out: str | Path,
    cfg: DistillConfig | None = None,
    data_root: str | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """`distill` with the teacher into OUT, then the same student without it into OUT/no_teacher;
    the report gains `no_teacher` (its metrics) and `gain` (primary metric, distilled - baseline)."""
    cfg = cfg or DistillConfig()
    out = Path(out)
    _, run_cfg, _ = load_trained(run_dir)
    if data_root is not None:
        run_cfg.data_root = data_root
    data = build_task_data(task, run_cfg.tasks[task], run_cfg) if task in run_cfg.tasks else None
    report = distill(
        run_dir, task, out, cfg.model_copy(update={"teacher": True}), data_root, resume, show_progress, data
    )
    base = distill(
        run_dir,
        task,
        out / "no_teacher",
        cfg.model_copy(update={"teacher": False}),
        data_root,
        resume,
        show_progress,
        data,
    )
    p = report["primary"]
    report["no_teacher"] = {
        "params": base["student"]["params"],
        "metrics": base["student"]["metrics"],
        "file": base["student"]["file"],
        "share_of_teacher": base["share_of_teacher"],
    }
    report["gain"] = report["student"]["metrics"][p] - base["student"]["metrics"][p]
    atomic_write_text(out / "distill.json", json.dumps(report, indent=2))
    return report


__all__ = [
    "DistillConfig",
    "StudentModel",
    "create_backbone",
    "distill",
    "distill_and_compare",
    "distill_terms",
    "package_student",
]
