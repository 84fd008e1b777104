"""Chip supernet: sandwich step, importance re-ordering, distillation losses, exact resume, CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import train_one_and_two_processes
from ufo.checkpoint import load_checkpoint
from ufo.config import parse_config
from ufo.errors import CheckpointError, ConfigError
from ufo.model import build_model, save_model
from ufo.train.distill_losses import cosine_embedding, distill_terms, kl_logits, relational
from ufo.train.loop import Trainer
from ufo.train.slimming import chip_routes, freeze_routes, reorder_by_importance

BIN = Path(sys.executable).parent
TINY = {
    "name": "tiny-chip",
    "seed": 5,
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
        "digits": {"kind": "classification", "data": {"recipe": "digits"}},
        "mnist": {
            "kind": "retrieval",
            "data": {"recipe": "mnist5k", "max_train": 300},
            "options": {"embedding_dim": 16, "k": 4},
        },
    },
    "train": {
        "stage": "chip_supernet",
        "steps": 6,
        "batch_size": 16,
        "log_every": 1,
        "ckpt_every": 3,
        "warmup_steps": 2,
        "threads": 1,
    },
    "chip_supernet": {"num_random": 1},
}


def _cfg(**chip):
    d = json.loads(json.dumps(TINY))
    d["chip_supernet"].update(chip)
    return parse_config(d)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory) -> Trainer:
    return Trainer(_cfg(), tmp_path_factory.mktemp("chip"), show_progress=False)


def _grads(model) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _nz(g: torch.Tensor | None) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


# ----- the sandwich step -----


def test_sandwich_archs_are_deterministic_and_routed(trainer):
    a, b = trainer.stage.sandwich(7), trainer.stage.sandwich(7)
    assert [k for k, _ in a] == ["largest", "smallest", "random"]
    assert [x.model_dump() for _, x in a] == [x.model_dump() for _, x in b]
    s = trainer.model.space
    assert a[0][1].depth == s.max_depth and a[1][1].depth == s.depth[0]
    assert all(set(p) == {"shared"} for _, x in a for p in x.paths.values())  # train.paths: shared
    draws = {trainer.stage.sandwich(k)[2][1].model_dump_json() for k in range(20)}
    assert len(draws) > 1, "random subnets should differ between steps"


def test_smallest_alone_leaves_the_larger_slices_without_gradient(trainer):
    m = trainer.model
    x, ids, y = trainer.batch()
    m.zero_grad(set_to_none=True)
    s = m.space
    assert trainer.stage.accumulate(x, ids, y, [("smallest", s.smallest(trainer.stage.routes))]) is not None
    g = _grads(m)
    # depth 1: block 1 unused; 1 head of 2, 16 of 24 channels, 16 of 48 hidden units in block 0
    assert not any(_nz(v) for n, v in g.items() if n.startswith("backbone.blocks.1."))
    qkv = g["backbone.blocks.0.attn.qkv.weight"].view(3, 2, 8, 24)
    assert _nz(qkv[:, 0, :, :16]) and not _nz(qkv[:, 1]) and not _nz(qkv[:, :, :, 16:])
    fc1 = g["backbone.blocks.0.mlp.shared.fc1.weight"]
    assert _nz(fc1[:16, :16]) and not _nz(fc1[16:]) and not _nz(fc1[:, 16:])
    assert not any(_nz(v) for n, v in g.items() if ".experts." in n)  # every route is shared
    m.zero_grad(set_to_none=True)


def test_sandwich_gradients_cover_every_sampled_subnet(trainer):
    m = trainer.model
    x, ids, y = trainer.batch()
    m.zero_grad(set_to_none=True)
    logged = trainer.stage.accumulate(x, ids, y, trainer.stage.sandwich(0))
    assert logged is not None
    for k in (
        "loss/largest",
        "loss/smallest",
        "loss/random",
        "distill/kl",
        "distill/cos",
        "distill/rel",
        "loss/digits",
        "loss/mnist",
        "loss",
    ):
        assert k in logged and torch.isfinite(torch.as_tensor(logged[k])), k
    assert float(logged["distill/kl"]) > 0 and float(logged["distill/cos"]) > 0
    g = _grads(m)
    assert _nz(g["backbone.blocks.1.attn.qkv.weight"])  # the largest's second block
    qkv = g["backbone.blocks.0.attn.qkv.weight"].view(3, 2, 8, 24)
    assert _nz(qkv[:, 1, :, 16:])  # the largest-only slice
    assert _nz(g["backbone.blocks.0.mlp.shared.fc1.weight"][24:])
    for n, p in m.named_parameters():
        if (
            p.requires_grad
            and ".experts." not in n
            and "router" not in n
            and "mix_logits" not in n
            and "margin" not in n
            and not n.endswith("bn.bias")
        ):
            assert g[n] is not None and torch.isfinite(g[n]).all(), f"{n} got no gradient"
    m.zero_grad(set_to_none=True)


def test_train_step_updates_the_regions_each_subnet_uses(tmp_path):
    tr = Trainer(_cfg(num_random=0, reorder=False), tmp_path, show_progress=False)
    tr.t = tr.t.model_copy(update={"weight_decay": 0.0})
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    row = tr.train_step()
    assert "skipped" not in row and row["loss/largest"] > 0
    after = dict(tr.model.named_parameters())
    changed = lambda n, sl=slice(None): not torch.equal(before[n][sl], after[n].detach()[sl])
    assert changed("backbone.blocks.1.mlp.shared.fc2.weight")  # largest only
    assert changed("backbone.blocks.0.attn.proj.weight", (slice(0, 16), slice(0, 8)))  # both
    assert not changed("backbone.blocks.0.mlp.experts.digits.fc1.weight")  # not on any route
    assert tr.model.arch == tr.arch  # back at the largest subnet after the step


# ----- importance re-ordering -----


def test_reorder_keeps_the_largest_function_and_sorts_importance(trainer):
    m = trainer.model
    m.set_arch(trainer.arch)
    m.eval()
    with torch.no_grad():  # make importances distinct and unsorted
        for blk in m.backbone.blocks:
            blk.attn.proj.weight.mul_(torch.rand(blk.attn.proj.weight.shape[1]) * 3)
            for e in [blk.mlp.shared, *blk.mlp.experts.values()]:
                e.fc2.weight.mul_(torch.rand(e.fc2.weight.shape[1]) * 3)
    x = torch.randn(5, 3, 16, 16)
    arch = m.space.largest()  # every task on mix: shared and task experts both in use
    m.set_arch(arch)
    ref = {t: m(x, t) for t in m.tasks}
    orders = reorder_by_importance(m.backbone)
    assert any(o != sorted(o) for o in orders.values())
    for t in m.tasks:
        torch.testing.assert_close(m(x, t), ref[t], atol=1e-5, rtol=1e-5)
    for blk in m.backbone.blocks:
        h = blk.attn.proj.weight.view(24, 2, 8).abs().sum((0, 2))
        assert (h[:-1] >= h[1:]).all()
        for e in [blk.mlp.shared, *blk.mlp.experts.values()]:
            u = e.fc2.weight.abs().sum(0)
            assert (u[:-1] >= u[1:]).all()
    m.set_arch(trainer.arch)
    m.train()


# ----- BatchNorm recalibration of inherited subnets -----


def test_recalibrate_bn_gives_the_subnets_own_statistics(trainer):
    from ufo.data.transforms import build_transform
    from ufo.evaluation.protocol import recalibrate_bn

    m, cfg = trainer.model, trainer.cfg
    small = m.space.smallest(trainer.stage.routes)
    m.set_arch(small)
    bn = m.heads["mnist"].bn
    with torch.no_grad():
        bn.running_mean.fill_(5.0)  # stale statistics, as a blend over the sandwich's subnets leaves
        bn.running_var.fill_(9.0)
    momentum = bn.momentum
    m.eval()
    assert recalibrate_bn(m, trainer.data, cfg, max_images=64) == 1  # digits has no BN, mnist one
    images = trainer.data["mnist"].train.images
    idx = torch.linspace(0, len(images) - 1, 64).round().long().unique()
    tf = build_transform(cfg.model.img_size, cfg.model.mean, cfg.model.std, train=False, in_chans=cfg.model.in_chans)
    assert bn.momentum == momentum and not m.training and not bn.training  # settings put back
    with torch.no_grad():
        z = m.heads["mnist"].neck(m.backbone(tf(images[idx]), "mnist"))
    torch.testing.assert_close(bn.running_mean, z.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bn.running_var, z.var(0, unbiased=True), atol=1e-5, rtol=1e-4)
    m.set_arch(trainer.arch)
    m.train()


# ----- distillation losses -----


def test_distill_losses_zero_at_the_teacher_positive_elsewhere():
    t = torch.randn(6, 10)
    e = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    assert kl_logits(t.clone(), t, 2.0).abs() < 1e-6
    assert cosine_embedding(e.clone(), e).abs() < 1e-6
    assert relational(e.clone(), e).abs() < 1e-6
    s, se = torch.randn(6, 10), torch.randn(6, 16)
    assert kl_logits(s, t) > 0 and cosine_embedding(se, e) > 0 and relational(se, e) > 0
    assert set(distill_terms("logits", s, t)) == {"kl"} and set(distill_terms("embedding", se, e)) == {"cos", "rel"}
    with pytest.raises(ValueError, match="output"):
        distill_terms("boxes", s, t)


def test_distill_gradients():
    B, C, T = 4, 7, 2.0
    s = torch.randn(B, C, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, C, dtype=torch.float64, requires_grad=True)
    kl_logits(s, t, T).backward()
    expected = T * ((s / T).softmax(-1) - (t / T).softmax(-1)) / B  # d/ds of T^2 KL(t || s) / B
    torch.testing.assert_close(s.grad, expected.detach())
    assert t.grad is None  # the teacher is detached
    se = torch.randn(B, 5, dtype=torch.float64, requires_grad=True)
    te = torch.randn(B, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: cosine_embedding(a, te).double(), (se,))
    assert torch.autograd.gradcheck(lambda a: relational(a, te).double(), (se,))


# ----- runs -----


def test_bad_chip_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="chip_supernet.tasks"):
        Trainer(_cfg(tasks=["faces"]), tmp_path, show_progress=False)
    d = json.loads(json.dumps(TINY))
    d["chip_supernet"]["temperatur"] = 2.0
    with pytest.raises(ConfigError, match="temperatur"):
        parse_config(d)


def test_train_arch_is_refused_and_resume_checks_the_routes(tmp_path):
    d = json.loads(json.dumps(TINY))
    d["train"]["arch"] = "smallest"
    with pytest.raises(ConfigError, match="train.arch"):
        Trainer(_cfg_from(d), tmp_path, show_progress=False)
    tr = Trainer(_cfg(), tmp_path, show_progress=False)
    tr.train_step()
    tr.step = 1
    tr.save()
    other = Trainer(_cfg(), tmp_path, show_progress=False)
    other.stage.arch = other.model.space.largest({t: ["task", "task"] for t in other.model.tasks})
    with pytest.raises(CheckpointError, match="routes"):
        other.resume()
    assert Trainer(_cfg(), tmp_path, show_progress=False).resume()


def test_one_task_restricts_the_batches(tmp_path):
    tr = Trainer(_cfg(tasks=["digits"]), tmp_path, show_progress=False)
    _, ids, _ = tr.batch()
    assert ids.unique().tolist() == [0] and len(ids) == 16
    row = tr.train_step()
    assert "loss/digits" in row and "loss/mnist" not in row and "distill/cos" not in row


def test_routes_come_from_a_task_supernet_run_else_train_paths(tmp_path):
    cfg = _cfg()
    space = cfg.space()
    assert chip_routes(cfg, space) == {t: ["shared", "shared"] for t in space.tasks}
    d = json.loads(json.dumps(TINY))
    d["train"]["stage"] = "task_supernet"
    src_cfg = parse_config(d)
    model = build_model(src_cfg, {"digits": 10, "mnist": 10})
    with torch.no_grad():  # routers that pick task in block 0 and mix in block 1 for every task
        model.backbone.blocks[0].mlp.router_logits.copy_(torch.tensor([[0.0, 1.0, 0.0]] * 2))
        model.backbone.blocks[1].mlp.router_logits.copy_(torch.tensor([[0.0, 0.0, 1.0]] * 2))
    save_model(tmp_path / "model.safetensors", model, src_cfg, model.space.largest(model.backbone.routes()))
    d = json.loads(json.dumps(TINY))
    d["init"] = {"kind": "run", "path": str(tmp_path)}
    routes = chip_routes(parse_config(d), space)
    assert routes == {t: ["task", "mix"] for t in space.tasks}
    d["train"]["paths"] = None
    with pytest.raises(ConfigError, match="train.paths"):
        chip_routes(_cfg_from(d | {"init": {"kind": "scratch"}}), space)
    freeze_routes(model.backbone, {t: ["shared", "task"] for t in space.tasks})
    assert model.backbone.routes() == {t: ["shared", "task"] for t in space.tasks}


def _cfg_from(d: dict):
    return parse_config(json.loads(json.dumps(d)))


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_cli_run_resumes_exactly_and_evaluates_the_smallest(tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY))
    full = subprocess.run(
        [str(BIN / "ufo"), "train", str(cfg_file), "--out", str(tmp_path / "full")], capture_output=True, text=True
    )
    assert full.returncode == 0, full.stderr

    cfg = parse_config(json.loads(json.dumps(TINY)))
    half = Trainer(cfg, tmp_path / "half", show_progress=False)
    step = half.train_step

    def stop_after_3() -> dict[str, float]:
        if half.step == 3:
            raise _Stop
        return step()

    half.train_step = stop_after_3
    with pytest.raises(_Stop):
        half.fit()
    assert not (tmp_path / "half" / "model.safetensors").exists()
    Trainer(cfg, tmp_path / "half", show_progress=False).fit(resume=True)
    a = load_checkpoint(tmp_path / "full" / "model.safetensors")[0]
    b = load_checkpoint(tmp_path / "half" / "model.safetensors")[0]
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed run differs by {worst}"

    with open(tmp_path / "full" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    for k in ("loss/largest", "loss/smallest", "loss/random", "distill/kl", "distill/cos", "distill/rel"):
        assert all(r.get(k) not in (None, "") for r in rows), f"metrics.csv lacks {k}"

    ev = subprocess.run(
        [str(BIN / "ufo"), "eval", str(tmp_path / "full"), "--arch", "smallest"], capture_output=True, text=True
    )
    assert ev.returncode == 0, ev.stderr
    res = json.loads((tmp_path / "full" / "eval-smallest.json").read_text())
    assert res["arch"]["depth"] == 1 and set(res["metrics"]) == {"digits", "mnist"}
    assert all(set(p) == {"shared"} for p in res["arch"]["paths"].values())

    ev = subprocess.run(
        [str(BIN / "ufo"), "eval", str(tmp_path / "full"), "--arch", "smallest", "--arch", "largest", "--random", "2"],
        capture_output=True,
        text=True,
    )
    assert ev.returncode == 0, ev.stderr
    rows = json.loads((tmp_path / "full" / "eval-subnets.json").read_text())["subnets"]
    assert [r["name"] for r in rows][:2] == ["smallest", "largest"] and len(rows) == 4
    assert len({json.dumps(r["arch"], sort_keys=True) for r in rows}) == 4  # distinct subnets
    assert rows[0]["params"]["digits"] < rows[1]["params"]["digits"]
    assert rows[0]["metrics"]["digits"]["top1"] == res["metrics"]["digits"]["top1"]  # same as the single eval
    assert (tmp_path / "full" / "eval-subnets.png").stat().st_size > 0


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    d = json.loads(json.dumps(TINY))
    d["tasks"] = {  # per-sample losses only: the relational term depends on how the batch is split
        "digits": {"kind": "classification", "data": {"recipe": "digits"}, "batch": 8},
        "mnist": {"kind": "classification", "data": {"recipe": "mnist5k", "max_train": 300}, "batch": 8},
    }
    d["train"].update(steps=4, ckpt_every=4)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(d))
    runs = train_one_and_two_processes(path, tmp_path)
    l1, l2 = ([float(r["loss"]) for r in log] for log in runs)
    assert len(l1) == len(l2) == 4
    assert max(abs(a - b) for a, b in zip(l1, l2)) <= 1e-4, (l1, l2)
    w1 = load_checkpoint(tmp_path / "one" / "model.safetensors")[0]
    w2 = load_checkpoint(tmp_path / "two" / "model.safetensors")[0]
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= 1e-3
