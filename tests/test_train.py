"""Training: exact resume after SIGKILL, torchrun DDP against one process, NaN handling, CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import train_one_and_two_processes
from ufo.checkpoint import load_checkpoint, read_manifest
from ufo.config import parse_config
from ufo.errors import ConfigError, DataError

BIN = Path(sys.executable).parent
TINY = {
    "name": "tiny",
    "seed": 3,
    "model": {
        "img_size": 16,
        "patch_size": 4,
        "head_dim": 8,
        "depth": [2],
        "embed_dim": [24],
        "num_heads": [2],
        "mlp_ratio": [2.0],
        "drop_path_rate": 0.1,
    },
    "tasks": {
        "digits": {"kind": "classification", "data": {"recipe": "digits"}, "augment": {"crop_padding": 1}},
        "mnist": {
            "kind": "retrieval",
            "data": {"recipe": "mnist5k", "max_train": 600},
            "options": {"embedding_dim": 16, "k": 4},
        },
    },
    "train": {"steps": 24, "batch_size": 32, "log_every": 2, "ckpt_every": 4, "warmup_steps": 4, "threads": 1},
}


def _write(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def _ufo(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ufo"), *args], capture_output=True, text=True, **kw)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[0]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    cfg = _write(tmp_path, TINY)
    full = _ufo("train", str(cfg), "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [str(BIN / "ufo"), "train", str(cfg), "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = run / "checkpoints" / "latest.safetensors"
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "no checkpoint was written before the kill"
    killed_at = read_manifest(ckpt)["step"]
    assert killed_at < 24 and not (run / "model.safetensors").exists()

    resumed = _ufo("train", str(cfg), "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(tmp_path / "full" / "model.safetensors"), _weights(run / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed run differs by {worst} (killed at step {killed_at})"
    with open(run / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == list(range(2, 25, 2)), "the log must have each step once after a resume"
    # validation (train.eval_every: at every checkpoint) ran, each step once, and left the run exact
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert list(history) == [str(s) for s in range(4, 25, 4)]
    log = (run / "train.log").read_text()
    assert log.count("INFO start tiny") == 2 and f"at step {killed_at}" in log and "step 24 final evaluation" in log


def test_resume_with_another_config_is_refused(tmp_path):
    cfg = _write(tmp_path, {**TINY, "train": {**TINY["train"], "steps": 4}})
    assert _ufo("train", str(cfg), "--out", str(tmp_path / "r")).returncode == 0
    other = _write(tmp_path, {**TINY, "seed": 4, "train": {**TINY["train"], "steps": 8}}, "other.yaml")
    res = _ufo("train", str(other), "--out", str(tmp_path / "r"), "--resume")
    assert res.returncode == 2 and "another config" in res.stderr and "seed" in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "ddp+ckpt", "fsdp", "fsdp+round_robin", "fsdp+router"])
def test_torchrun_two_processes_match_one(tmp_path, parallel):
    cfg = dict(TINY)
    cfg["model"] = {**TINY["model"], "drop_path_rate": 0.0}
    cfg["tasks"] = {
        "digits": {"kind": "classification", "data": {"recipe": "digits"}, "batch": 16},
        "mnist": {"kind": "classification", "data": {"recipe": "mnist5k", "max_train": 800}, "batch": 16},
    }
    # ddp: the hetero shares give both ranks rows of both tasks on fixed routes, so DDP runs with
    # a static graph (ufo.train.distributed.wrap); ddp+ckpt adds per-block activation checkpointing.
    # fsdp (each expert its own unit, and those of tasks a step lacks are skipped) on the shared
    # path, where no expert is used, with one task per step on the task path, and with the router
    # drawing the paths (+router: training computes both experts of a present task).
    mode, _, variant = parallel.partition("+")
    cfg["train"] = {
        **TINY["train"],
        "steps": 12,
        "log_every": 1,
        "ckpt_every": 6,
        "parallel": mode,
        "grad_checkpointing": variant == "ckpt",
        **({"sampler": "round_robin", "paths": "task"} if variant == "round_robin" else {}),
        **({"paths": None} if variant == "router" else {}),
    }
    path = _write(tmp_path, cfg)
    runs = train_one_and_two_processes(path, tmp_path)  # in one process `parallel` has no effect
    l1, l2 = ([float(r["loss"]) for r in log] for log in runs)
    assert len(l1) == len(l2) == 12
    # Same global batch split over 2 ranks: equal up to float summation order.
    assert max(abs(a - b) for a, b in zip(l1, l2)) <= 1e-4, (l1, l2)
    # Rank 0 wrote plain (unsharded) weights and training state, close to the one-process run's.
    w1, _ = load_checkpoint(tmp_path / "one" / "model.safetensors")
    w2, _ = load_checkpoint(tmp_path / "two" / "model.safetensors")
    assert w1.keys() == w2.keys()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= 1e-3
    s1, m1 = load_checkpoint(tmp_path / "one" / "checkpoints" / "latest.safetensors")
    s2, m2 = load_checkpoint(tmp_path / "two" / "checkpoints" / "latest.safetensors")
    assert m2["step"] == 12
    model_keys = lambda s: {k for k in s if k.startswith("model.")}
    assert model_keys(s1) == model_keys(s2)
    # FSDP steps the weights one process steps, no more
    assert set(s1) == set(s2)
    assert m1["optimizer"]["param_groups"] == m2["optimizer"]["param_groups"]
    # validation under torchrun: rank 0 alone scores (a gathered copy under FSDP) and writes
    h1, h2 = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "two"))
    assert list(h1["history"]) == list(h2["history"]) == ["6", "12"]
    assert h2["primary"] == pytest.approx(h1["primary"], abs=0.05)
    log = (tmp_path / "two" / "train.log").read_text()
    assert "world size 2" in log and log.count("step 6 validation") == 1 and log.count("step 12/12 loss=") == 1


def _torchrun(*args: str) -> None:
    two = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_skips_the_experts_a_step_does_not_use(tmp_path):
    """FSDP with each expert its own unit: tasks drawn per row (proportional) leave
    some out of a step (their experts are neither gathered nor reduced nor stepped: fsdp_run.py
    checks on every rank that their shards stay bitwise, with no gradient and no AdamW step, weight
    decay on) and some on one rank only (the other runs their experts on zero rows). "few" has its
    own input size, so a rank without its rows runs an empty chunk of that size (without it the
    ranks' passes through the blocks differ and FSDP hangs). The ranks' rows of a task are uneven,
    so each rank weights its task means by its rows (Stage.share): the losses and weights equal
    DDP's and one process's, and a run stopped halfway resumes exactly. With the router drawing the
    paths, the experts of absent tasks are skipped too (fsdp_run.py checks them in every step)."""
    cfg = dict(TINY)
    cfg["model"] = {**TINY["model"], "drop_path_rate": 0.0}
    cfg["tasks"] = {
        "digits": {"kind": "classification", "data": {"recipe": "digits"}},
        "mnist": {"kind": "classification", "data": {"recipe": "mnist5k", "max_train": 800}},
        "few": {"kind": "classification", "data": {"recipe": "mnist5k", "max_train": 60}, "img_size": 12},
    }
    train = {"steps": 8, "batch_size": 8, "log_every": 1, "ckpt_every": 4, "sampler": "proportional", "paths": "task"}
    cfg["train"] = {**TINY["train"], **train}
    script = Path(__file__).parent / "fsdp_run.py"
    for parallel in ("ddp", "fsdp"):
        _torchrun(
            str(script),
            str(_write(tmp_path, {**cfg, "train": {**cfg["train"], "parallel": parallel}}, parallel + ".yaml")),
            str(tmp_path / parallel),
        )
    fsdp = str(tmp_path / "fsdp.yaml")
    one = _ufo("train", fsdp, "--out", str(tmp_path / "one"))  # train.parallel has no effect in one process
    assert one.returncode == 0, one.stderr[-3000:]
    _torchrun(str(script), fsdp, str(tmp_path / "resumed"), "--stop", "4")
    routed = _write(tmp_path, {**cfg, "train": {**cfg["train"], "parallel": "fsdp", "paths": None}}, "routed.yaml")
    _torchrun(str(script), str(routed), str(tmp_path / "routed"))
    _torchrun(str(script), fsdp, str(tmp_path / "resumed"), "--resume")

    routed_seen = [json.loads((tmp_path / "routed" / f"tasks{r}.json").read_text()) for r in (0, 1)]
    assert any(set(s["global"]) != {"digits", "mnist", "few"} for s in routed_seen[0])  # some expert was skipped
    seen = [json.loads((tmp_path / "fsdp" / f"tasks{r}.json").read_text()) for r in (0, 1)]
    first = next(i for i, s in enumerate(seen[0]) if "few" in s["global"])
    assert any("few" not in s["global"] for s in seen[0][first + 1 :])  # left out after its first step
    assert any(set(s["local"]) != set(s["global"]) for r in seen for s in r)  # a task on one rank only
    assert any("few" in s["global"] and "few" not in s["local"] for r in seen for s in r)  # a size on one rank
    ddp, resumed, single = _losses(tmp_path / "ddp"), _losses(tmp_path / "resumed"), _losses(tmp_path / "one")
    losses = _losses(tmp_path / "fsdp")
    assert len(losses) == 8 and max(abs(a - b) for a, b in zip(losses, ddp)) <= 1e-5, (losses, ddp)
    assert max(abs(a - b) for a, b in zip(losses, single)) <= 1e-5, (losses, single)
    assert max(abs(a - b) for a, b in zip(losses, resumed)) <= 1e-6, (losses, resumed)
    w = _weights(tmp_path / "fsdp" / "model.safetensors")
    for other, tol in ((tmp_path / "ddp", 1e-5), (tmp_path / "one", 1e-5), (tmp_path / "resumed", 1e-6)):
        w2 = _weights(other / "model.safetensors")
        assert w.keys() == w2.keys() and max(float((w[k] - w2[k]).abs().max()) for k in w) <= tol, other
    # FSDP kept optimiser state for exactly the weights DDP stepped
    s1, s2 = (load_checkpoint(tmp_path / r / "checkpoints" / "latest.safetensors")[0] for r in ("ddp", "fsdp"))
    assert set(s1) == set(s2)


def test_config_errors_name_the_field(tmp_path):
    bad = {**TINY, "tasks": {"x": {"kind": "segmentation", "data": {"recipe": "digits"}}}}
    with pytest.raises(ConfigError, match="tasks.x.kind.*segmentation.*classification"):
        parse_config(bad)
    with pytest.raises(ConfigError, match="train.lr"):
        parse_config({**TINY, "train": {"lr": -1}})
    with pytest.raises(ConfigError, match="exactly one of `recipe`"):
        parse_config({**TINY, "tasks": {"x": {"kind": "classification", "data": {}}}})
    with pytest.raises(ConfigError, match="x.yaml: unknown top-level section 'trian'; did you mean 'train'"):
        parse_config({**TINY, "trian": {"steps": 3}}, "x.yaml")
    with pytest.raises(ConfigError, match="unknown top-level section 'zzz'; the sections are name, seed, "):
        parse_config({**TINY, "zzz": {}})
    res = _ufo("train", str(_write(tmp_path, bad)), "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "segmentation" in res.stderr and "Traceback" not in res.stderr


def test_task_the_data_cannot_serve_fails_before_training(tmp_path):
    from ufo.train.loop import Trainer

    cfg = parse_config(
        {
            **TINY,
            "tasks": {
                "f": {"kind": "verification", "data": {"reader": "image_folder", "path": str(tmp_path / "nope")}}
            },
        }
    )
    with pytest.raises(DataError, match="nope.*does not exist"):
        Trainer(cfg, tmp_path / "r")


def test_nan_loss_skips_the_step_names_the_task_and_stops(tmp_path, monkeypatch):
    from ufo.train.engine import TrainingError
    from ufo.train.loop import Trainer

    cfg = parse_config({**TINY, "train": {**TINY["train"], "steps": 10, "ckpt_every": 2, "max_bad_steps": 2}})
    tr = Trainer(cfg, tmp_path / "r", show_progress=False)
    head = tr.model.heads["mnist"]
    monkeypatch.setattr(head, "loss", lambda f, y: f.sum() * float("nan"))
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="non-finite loss in task.*mnist"):
        assert tr.train_step() == {"skipped": 1.0}
    assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
    with pytest.raises(TrainingError, match="mnist.*2 in a row"):
        tr.train_step()


def test_resume_accepts_a_checkpoint_from_before_a_new_config_section(tmp_path):
    """A section added to Config later (here: `mim`, at its defaults) does not block --resume."""
    from ufo.checkpoint import load_checkpoint, save_checkpoint

    path = _write(tmp_path, {**TINY, "train": {**TINY["train"], "steps": 8, "ckpt_every": 4}})
    assert _ufo("train", str(path), "--out", str(tmp_path / "r"), "--set", "train.steps=4").returncode == 0
    ckpt = tmp_path / "r" / "checkpoints" / "latest.safetensors"
    tensors, manifest = load_checkpoint(ckpt)
    del manifest["config"]["mim"]  # as written by a version without that section
    save_checkpoint(ckpt, tensors, manifest)
    res = _ufo("train", str(path), "--out", str(tmp_path / "r"), "--resume", "--set", "train.steps=4")
    assert res.returncode == 0, res.stderr


def _losses(run: Path) -> list[float]:
    with open(run / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_grad_checkpointing_keeps_the_losses_and_resume(tmp_path):
    """Per-block activation checkpointing replays drop path, so the run is the same to 1e-6, and a
    checkpointed run stopped halfway resumes to the same losses and weights."""
    from ufo.data.build import build_all
    from ufo.train.loop import Trainer

    base = parse_config({**TINY, "train": {**TINY["train"], "steps": 6, "log_every": 1, "ckpt_every": 3}})
    data = build_all(base)
    on = base.model_copy(update={"train": base.train.model_copy(update={"grad_checkpointing": True})})
    Trainer(base, tmp_path / "off", data, show_progress=False).fit()
    tr = Trainer(on, tmp_path / "on", data, show_progress=False)
    assert tr.model.backbone.grad_checkpointing
    tr.fit()
    off_l, on_l = _losses(tmp_path / "off"), _losses(tmp_path / "on")
    assert len(off_l) == 6 and max(abs(a - b) for a, b in zip(off_l, on_l)) <= 1e-6, (off_l, on_l)

    half = Trainer(on, tmp_path / "resumed", data, show_progress=False)
    half.t = half.t.model_copy(update={"steps": 3})  # stop at the step-3 checkpoint; the config stays the same
    half.fit()
    Trainer(on, tmp_path / "resumed", data, show_progress=False).fit(resume=True)
    assert max(abs(a - b) for a, b in zip(on_l, _losses(tmp_path / "resumed"))) <= 1e-6
    a, b = _weights(tmp_path / "on" / "model.safetensors"), _weights(tmp_path / "resumed" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_compiled_blocks_train_as_eager_and_keep_the_checkpoint_format(tmp_path):
    """train.compile: each block compiled in place (one graph each, the layout read before), so
    the losses are eager's up to kernel fusion, and the model and checkpoint keys are unchanged."""
    from ufo.data.build import build_all
    from ufo.train.loop import Trainer

    train = {**TINY["train"], "steps": 4, "log_every": 1, "ckpt_every": 2}
    base = parse_config({**TINY, "model": {**TINY["model"], "drop_path_rate": 0.0}, "train": train})
    data = build_all(base)
    on = base.model_copy(update={"train": base.train.model_copy(update={"compile": True})})
    Trainer(base, tmp_path / "eager", data, show_progress=False).fit()
    torch._dynamo.reset()
    try:
        tr = Trainer(on, tmp_path / "compiled", data, show_progress=False)
        assert all(blk._compiled_call_impl is not None for blk in tr.model.backbone.blocks)
        tr.fit()
    finally:
        torch._dynamo.reset()
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == 4 and max(abs(a - b) for a, b in zip(eager, compiled)) <= 1e-4, (eager, compiled)
    a, b = _weights(tmp_path / "eager" / "model.safetensors"), _weights(tmp_path / "compiled" / "model.safetensors")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-3
    ckpt = [load_checkpoint(tmp_path / r / "checkpoints" / "latest.safetensors")[0] for r in ("eager", "compiled")]
    assert ckpt[0].keys() == ckpt[1].keys()
    chip = parse_config({**TINY, "train": {**train, "stage": "chip_supernet", "compile": True}})
    with pytest.raises(ConfigError, match="train.compile is not supported by train.stage chip_supernet"):
        Trainer(chip, tmp_path / "chip", data, show_progress=False)


def test_ddp_static_graph_only_when_every_step_uses_the_same_parameters(tmp_path):
    """`steps_alike` (DDP static graph, no unused-parameter search) needs fixed routes and every
    task on every rank: each hetero share at least the world size, in rows or, for a P x K task
    (mnist: retrieval, k 4), in identity groups (ranks take whole groups)."""
    from ufo.data.build import build_all
    from ufo.train.loop import Trainer

    def trainer(train: dict, tasks: dict | None = None) -> Trainer:
        raw = {**TINY, "train": {**TINY["train"], **train}}
        if tasks:
            raw["tasks"] = {n: {**tc, **tasks.get(n, {})} for n, tc in TINY["tasks"].items()}
        cfg = parse_config(raw)
        return Trainer(cfg, tmp_path / "r", build_all(cfg), show_progress=False)

    tr = trainer({}, {"digits": {"batch": 16}, "mnist": {"batch": 16}})
    for world, alike in [(1, True), (2, True), (4, True), (5, False)]:  # mnist: 16 rows, 4 groups
        tr.world = world
        assert tr.steps_alike() is alike
    tr = trainer({"paths": None}, {"digits": {"batch": 16}, "mnist": {"batch": 16}})
    assert not tr.steps_alike()  # the router picks the paths
    tr = trainer({"sampler": "round_robin"})
    assert not tr.steps_alike()  # one task per step


def test_torchrun_with_more_ranks_than_gpus_is_refused_naming_the_counts(monkeypatch):
    """A GPU run needs one GPU per local rank: a clear error, not CUDA's 'invalid device ordinal'."""
    from ufo.train import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"train.device: cuda: torchrun started local rank 1, but .* 1 GPU"):
        distributed.setup("cuda")
