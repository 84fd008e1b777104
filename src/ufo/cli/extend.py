"""`ufo extend`: add a task to a trained run with few labels (thin layer over `ufo.train.extend`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ufo.choices import Amp, Device, ExtendTrain, device_value
from ufo.cli.common import console, friendly


def register(app: typer.Typer) -> None:
    """Add extend to `app`."""
    app.command()(friendly(extend))


def extend(
    run_dir: Path = typer.Argument(..., help="a trained run folder"),
    task_config: Path = typer.Option(
        ..., "--task-config", help="YAML with the one new task: NAME: {kind: ..., data: ..., options: ...}"
    ),
    out: Path = typer.Option(..., help="the extended run folder (model.safetensors, config.yaml, extend.json)"),
    fraction: float = typer.Option(1.0, help="share of the new task's training labels (deterministic subset)"),
    train: ExtendTrain = typer.Option(
        ExtendTrain.head_expert, help="what trains (all changes the other tasks; the rest leave them exact)"
    ),
    steps: int = typer.Option(300, help="training steps"),
    batch_size: int = typer.Option(64, help="batch size"),
    lr: float = typer.Option(2e-3, help="peak learning rate (AdamW, warm-up + cosine)"),
    seed: int = typer.Option(0, help="seed of the subset, the new head and the batches"),
    threads: int | None = typer.Option(None, help="torch intra-op threads"),
    device: Device = typer.Option(Device.auto, help="where it trains (auto: the GPU when there is one)"),
    amp: Amp = typer.Option(Amp.none, help="bf16: bf16 autocast of the forward and loss"),
    resume: bool = typer.Option(False, help="continue from OUT's latest checkpoint"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="datasets folder (default ../shared/data)"),
) -> None:
    """Add a new task to RUN_DIR: its own expert (from the shared one), router row and head, trained
    on FRACTION of its labels; every other task's outputs stay bitwise equal (except with --train all)."""
    from ufo.train.extend import ExtendConfig
    from ufo.train.extend import extend as run

    cfg = ExtendConfig(
        train=train.value,
        fraction=fraction,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        threads=threads,
        device=device_value(device),
        amp=amp.value,
    )
    r = run(run_dir, task_config, out, cfg, None if data_dir is None else str(data_dir), resume)
    p = r["primary"]
    same = [t for t, u in r["others_unchanged"].items() if u]
    changed = [t for t, u in r["others_unchanged"].items() if not u]
    console.print(
        f"wrote {out}: task {r['task']} ({r['kind']}) added, {r['train']} trained "
        f"({r['trainable_params']:,} parameters) on {r['train_samples']} of {r['full_train_samples']} "
        f"training samples; {p} {r['metrics'][p]:.4f}"
    )
    console.print(f"other tasks bitwise unchanged: {same or 'none'}" + (f"; changed: {changed}" if changed else ""))
