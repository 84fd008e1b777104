"""`ufo distill`: a task's subnet into a small timm model (thin layer over `ufo.train.distill`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ufo.choices import Amp, Device, device_value
from ufo.cli.common import console, friendly


def register(app: typer.Typer) -> None:
    """Add distill to `app`."""
    app.command()(friendly(distill))


def distill(
    run_dir: Path = typer.Argument(..., help="a trained run folder (or its model.safetensors): the teacher"),
    task: str = typer.Option(..., "--task", "-t", help="the task to distil"),
    student: str = typer.Option(
        ...,
        help="timm model name, built with pretrained=False (e.g. test_efficientnet, "
        "test_resnet, mobilenetv3_small_050)",
    ),
    student_kwargs: str = typer.Option(
        "{}", help="JSON of extra timm.create_model arguments, e.g. '{\"channel_multiplier\": 0.5}'"
    ),
    out: Path = typer.Option(..., help="output folder: model.safetensors (task model), distill.json, logs"),
    arch: str | None = typer.Option(
        None, help="teacher subnet: ARCH.json, largest, smallest, random:SEED (default: the run's arch)"
    ),
    steps: int = typer.Option(600, help="training steps"),
    batch_size: int = typer.Option(64, help="batch size"),
    lr: float = typer.Option(2e-3, help="peak learning rate (AdamW, warm-up + cosine)"),
    temperature: float = typer.Option(4.0, help="KL temperature (classification)"),
    embedding_dim: int | None = typer.Option(
        None, help="identity tasks: student embedding size (default: the teacher's; else a learned projection)"
    ),
    no_teacher: bool = typer.Option(False, "--no-teacher", help="train the same student on the labels alone"),
    compare: bool = typer.Option(
        False,
        "--compare",
        help="also train the student without the teacher (into OUT/no_teacher) and report the gain",
    ),
    threads: int | None = typer.Option(None, help="torch intra-op threads"),
    device: Device = typer.Option(Device.auto, help="where it trains (auto: the GPU when there is one)"),
    amp: Amp = typer.Option(Amp.none, help="bf16: bf16 autocast of the forward and loss"),
    resume: bool = typer.Option(False, help="continue from OUT's latest checkpoint"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="datasets folder (default ../shared/data)"),
) -> None:
    """Distil TASK's subnet of a trained run into a small timm model (KL + labels for
    classification; embedding + relational + metric loss for identity tasks). The result is a task
    model that `ufo export` and `ufo serve` take as it is."""
    from ufo.errors import UFOError
    from ufo.train.distill import DistillConfig, distill_and_compare
    from ufo.train.distill import distill as run

    try:
        kwargs = json.loads(student_kwargs)
    except json.JSONDecodeError as e:
        raise UFOError(f"--student-kwargs {student_kwargs!r}: not JSON ({e})") from None
    if not isinstance(kwargs, dict):
        raise UFOError(f"--student-kwargs {student_kwargs!r}: expected a JSON object")
    if compare and no_teacher:
        raise UFOError("--compare already trains the no-teacher baseline; drop --no-teacher")
    cfg = DistillConfig(
        student=student,
        student_kwargs=kwargs,
        teacher=not no_teacher,
        arch=arch,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        temperature=temperature,
        embedding_dim=embedding_dim,
        threads=threads,
        device=device_value(device),
        amp=amp.value,
    )
    dr = None if data_dir is None else str(data_dir)
    r = (
        distill_and_compare(run_dir, task, out, cfg, dr, resume)
        if compare
        else run(run_dir, task, out, cfg, dr, resume)
    )
    p = r["primary"]
    t, s = r["teacher"], r["student"]
    console.print(
        f"wrote {s['file']}: {student} student for {task} ({'with' if r['with_teacher'] else 'without'} "
        f"the teacher), {s['params']:,} parameters"
    )
    console.print(
        f"teacher {p} {t['metrics'][p]:.4f} ({t['params']:,} params); student {p} "
        f"{s['metrics'][p]:.4f} = {100 * r['share_of_teacher']:.1f}% of the teacher at "
        f"{r['compression']:.1f}x fewer parameters"
    )
    if "no_teacher" in r:
        console.print(
            f"without the teacher: {p} {r['no_teacher']['metrics'][p]:.4f}; gain from distillation {r['gain']:+.4f}"
        )
