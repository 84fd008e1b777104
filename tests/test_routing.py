"""Task supernet (path routing): straight-through router gradients, per-task experts, the
temperature schedule and exact resume, frozen routes used by extraction, the expert cost, and
init from an All-in-One run."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from timm.models.vision_transformer import VisionTransformer

from helpers import tiny_space, train_one_and_two_processes
from ufo.arch import PATHS
from ufo.checkpoint import load_checkpoint, read_manifest
from ufo.config import TaskSupernetConfig, parse_config
from ufo.data.build import build_all
from ufo.errors import CheckpointError, ConfigError
from ufo.model import load_model
from ufo.nn.extract import extract, resolve_arch
from ufo.nn.moe import MIX, SHARED, TASK
from ufo.nn.vit import SuperViT
from ufo.train.init import apply_init, init_from_run
from ufo.train.loop import Trainer
from ufo.train.routing import expected_extra, expert_weights, temperature

BIN = Path(sys.executable).parent
MODEL = {
    "img_size": 16,
    "patch_size": 4,
    "head_dim": 8,
    "depth": [2],
    "embed_dim": [24],
    "num_heads": [2],
    "mlp_ratio": [2.0],
    "drop_path_rate": 0.0,
}
TASKS = {
    "digits": {"kind": "classification", "data": {"recipe": "digits"}},
    "mnist": {
        "kind": "retrieval",
        "data": {"recipe": "mnist5k", "max_train": 600},
        "options": {"embedding_dim": 16, "k": 4},
    },
}
TRAIN = {
    "stage": "task_supernet",
    "steps": 6,
    "batch_size": 16,
    "log_every": 1,
    "ckpt_every": 3,
    "warmup_steps": 1,
    "threads": 1,
}


def _cfg(train: dict | None = None, **extra) -> dict:
    return {"name": "routing", "seed": 5, "model": MODEL, "tasks": TASKS, "train": {**TRAIN, **(train or {})}, **extra}


@pytest.fixture(scope="module")
def data():
    return build_all(parse_config(_cfg()))


def _space(depth: int = 2):
    return tiny_space(depth=[depth], embed_dim=[24], num_heads=[2], mlp_ratio=[2.0])


def _routed(space) -> SuperViT:
    """A SuperViT in training mode whose every path is left to the router."""
    vit = SuperViT(space).train()
    vit.set_arch(space.largest().model_copy(update={"paths": {}}))
    vit.set_temperature(1.0)
    return vit


def _nonzero(g: torch.Tensor | None) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


# ----- gradients -----


def test_training_takes_one_hard_path_per_task_and_block():
    space = _space(depth=1)
    vit = _routed(space)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        vit.blocks[0].mlp.mix_logits.normal_()
        fixed = {}
        for p in PATHS:
            vit.set_arch(space.largest().model_copy(update={"paths": {t: [p] for t in space.tasks}}))
            fixed[p] = vit(x, 1)
        vit.set_arch(space.largest().model_copy(update={"paths": {}}))
        seen = set()
        for seed in range(30):
            torch.manual_seed(seed)
            out = vit(x, 1)
            match = [p for p in PATHS if torch.allclose(out, fixed[p], atol=1e-5)]
            assert len(match) == 1, "a training forward must equal exactly one path's output"
            seen.add(match[0])
    assert seen == set(PATHS)


def test_router_gets_straight_through_gradients_and_experts_only_their_task():
    space = _space()
    vit = _routed(space)
    x = torch.randn(4, 3, 16, 16)
    patterns = set()
    for seed in range(20):
        torch.manual_seed(seed)
        vit.zero_grad(set_to_none=True)
        (vit(x, 0) * torch.randn(4, 24)).sum().backward()
        for blk in vit.blocks:
            ffn = blk.mlp
            g = ffn.router_logits.grad
            # the hard choice is straight-through: every logit of the task's row gets a gradient
            assert (g[0] != 0).all() and (g[1:] == 0).all()
            assert ffn.experts["faces"].fc1.weight.grad is None and ffn.experts["signs"].fc1.weight.grad is None
            s, e = _nonzero(ffn.shared.fc1.weight.grad), _nonzero(ffn.experts["cls"].fc1.weight.grad)
            mix = _nonzero(ffn.mix_logits.grad)
            assert (s, e, mix) in {(True, False, False), (False, True, False), (True, True, True)}
            patterns.add((s, e))
    assert patterns == {(True, False), (False, True), (True, True)}  # shared, task and mix all drawn

    # a mixed batch: a task's loss reaches the shared expert but never another task's expert
    ids = torch.tensor([0, 1, 0, 1])
    for seed in range(10):
        torch.manual_seed(seed)
        vit.zero_grad(set_to_none=True)
        feats = vit(x, ids)
        (feats[ids == 0] * torch.randn(2, 24)).sum().backward()
        for blk in vit.blocks:
            g = blk.mlp.experts["faces"].fc1.weight.grad
            assert g is None or not _nonzero(g)
            assert blk.mlp.experts["signs"].fc1.weight.grad is None
            assert (blk.mlp.router_logits.grad[1:] == 0).all()
    vit.zero_grad(set_to_none=True)
    (vit(x, ids) * torch.randn(4, 24)).sum().backward()  # (a plain sum of LayerNorm outputs has no gradient)
    for blk in vit.blocks:
        rows = blk.mlp.router_logits.grad.abs().sum(1)
        assert rows[0] > 0 and rows[1] > 0 and rows[2] == 0


# ----- temperature -----


@pytest.mark.parametrize("anneal", ["exponential", "linear"])
def test_temperature_schedule(anneal):
    cfg = TaskSupernetConfig(tau_start=5.0, tau_end=0.1, anneal=anneal)
    taus = [temperature(s, 50, cfg) for s in range(50)]
    assert taus[0] == 5.0 and math.isclose(taus[-1], 0.1, rel_tol=1e-12)
    assert all(a > b for a, b in zip(taus, taus[1:]))
    mid = temperature(1, 3, cfg)
    assert math.isclose(mid, math.sqrt(5.0 * 0.1) if anneal == "exponential" else 2.55)
    assert temperature(80, 50, cfg) == taus[-1]  # held at tau_end past the last step
    assert temperature(0, 1, cfg) == 5.0
    flat = TaskSupernetConfig(tau_start=1.0, tau_end=1.0, anneal=anneal)
    assert {temperature(s, 10, flat) for s in range(10)} == {1.0}


def test_task_supernet_config_errors_name_the_field(data):
    with pytest.raises(ConfigError, match="task_supernet.*tau_end.*must not exceed tau_start"):
        parse_config(_cfg(task_supernet={"tau_start": 0.5, "tau_end": 2.0}))
    with pytest.raises(ConfigError, match="task_supernet.anneal"):
        parse_config(_cfg(task_supernet={"anneal": "cosine"}))
    with pytest.raises(ConfigError, match="task_supernet.tau_star"):
        parse_config(_cfg(task_supernet={"tau_star": 1.0}))
    with pytest.raises(ConfigError, match="init: kind 'run' needs `path`"):
        parse_config(_cfg(init={"kind": "run"}))
    with pytest.raises(ConfigError, match="model.paths.*leaves out.*mix"):
        Trainer(parse_config(_cfg(model={**MODEL, "paths": ["shared", "task"]})), "unused", data, show_progress=False)


def test_scheduled_temperature_and_exact_resume(tmp_path, data):
    cfg = parse_config(_cfg(task_supernet={"tau_start": 4.0, "tau_end": 0.5}))
    full = Trainer(cfg, tmp_path / "full", data, show_progress=False)
    taus = []
    step = full.train_step

    def record():
        row = step()
        taus.append(full.model.backbone.blocks[1].mlp.tau)
        return row

    full.train_step = record
    full.fit()
    want = [temperature(s, 6, cfg.task_supernet) for s in range(6)]
    assert taus == want and taus[0] == 4.0 and math.isclose(taus[-1], 0.5)
    with open(tmp_path / "full" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["tau"]) for r in rows] == pytest.approx(want)
    for r in rows:  # route counts per task add up to the depth
        for t in TASKS:
            assert sum(float(r[f"routes/{t}/{p}"]) for p in PATHS) == 2
        assert float(r["loss/cost"]) > 0

    cut = Trainer(cfg, tmp_path / "cut", data, show_progress=False)
    step2 = cut.train_step

    def dies_after_the_checkpoint():
        if cut.step == 4:  # the step-3 checkpoint is at tau(3); the resume redoes tau(3) and tau(4)
            raise KeyboardInterrupt
        return step2()

    cut.train_step = dies_after_the_checkpoint
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    Trainer(cfg, tmp_path / "cut", data, show_progress=False).fit(resume=True)
    for f in ("model.safetensors", "checkpoints/latest.safetensors"):
        a, b = load_checkpoint(tmp_path / "full" / f)[0], load_checkpoint(tmp_path / "cut" / f)[0]
        assert a.keys() == b.keys()
        assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6, f
    assert (
        json.loads((tmp_path / "full" / "routes.json").read_text())["routes"]
        == json.loads((tmp_path / "cut" / "routes.json").read_text())["routes"]
    )


# ----- frozen routes -----


def test_frozen_routes_reach_the_manifest_eval_and_extraction(tmp_path, data):
    cfg = parse_config(_cfg({"steps": 2, "ckpt_every": 2}, task_supernet={"router_lr_scale": 1.0}))
    tr = Trainer(cfg, tmp_path / "run", data, show_progress=False)
    d, m = tr.model.tasks.index("digits"), tr.model.tasks.index("mnist")
    with torch.no_grad():  # routes two steps cannot undo: digits takes its expert, then a mix
        b0, b1 = (blk.mlp for blk in tr.model.backbone.blocks)
        b0.router_logits[d] = torch.tensor([0.0, 8.0, 0.0])
        b1.router_logits[d] = torch.tensor([0.0, 0.0, 8.0])
        b1.mix_logits[d] = torch.tensor([0.4, -0.3])
        b0.router_logits[m] = torch.tensor([8.0, 0.0, 0.0])
        b1.router_logits[m] = torch.tensor([0.0, 8.0, 0.0])
    tr.fit()
    want = {"digits": ["task", "mix"], "mnist": ["shared", "task"]}
    manifest = read_manifest(tmp_path / "run" / "model.safetensors")
    assert manifest["routes"] == want and manifest["arch"]["paths"] == want
    report = json.loads((tmp_path / "run" / "routes.json").read_text())
    assert report["routes"] == want
    assert report["counts"]["digits"] == {"shared": 0, "task": 1, "mix": 1}
    assert report["params"]["digits"] == tr.model.space.num_params(tr.arch, "digits")
    assert (tmp_path / "run" / "routing_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model, _, _ = load_model(tmp_path / "run" / "model.safetensors")  # what `ufo eval` and `ufo extract` load
    assert model.arch.paths == want
    vit = model.backbone
    assert resolve_arch(vit, None, ["digits"]).paths == {"digits": ["task", "mix"]}
    assert vit.blocks[0].mlp.fixed[d] == TASK and vit.blocks[1].mlp.fixed[d] == MIX
    sub = extract(vit, None, "digits")
    assert isinstance(sub, VisionTransformer)
    expert = vit.blocks[0].mlp.experts["digits"]
    for fc in ("fc1", "fc2"):  # block 0's FFN is digits' own expert, not the shared one
        assert torch.equal(getattr(sub.blocks[0].mlp, fc).weight, getattr(expert, fc).weight)
        assert torch.equal(getattr(sub.blocks[0].mlp, fc).bias, getattr(expert, fc).bias)
    assert not torch.equal(sub.blocks[0].mlp.fc1.weight, vit.blocks[0].mlp.shared.fc1.weight)
    assert sub.blocks[1].mlp.fc1.out_features == 2 * 48  # the mix folded into one wider FFN
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert (sub(x) - vit(x, "digits")).abs().max().item() <= 1e-5
    assert sum(p.numel() for p in sub.parameters()) == model.space.num_params(model.arch, "digits")


# ----- expert cost -----


def test_expert_cost_formula_and_gradient_sign():
    space = _space(depth=3)
    vit = SuperViT(space)
    with torch.no_grad():
        for blk in vit.blocks:
            blk.mlp.router_logits.normal_()
    arch = space.largest()
    weights = expert_weights(space, arch)
    shared = arch.model_copy(update={"paths": {t: ["shared"] * 3 for t in space.tasks}})
    base = space.num_params(shared)
    for i, w in enumerate(weights):  # F_i / P0, as num_params counts one more expert
        own = shared.model_copy(
            update={"paths": {**shared.paths, "cls": ["task" if j == i else "shared" for j in range(3)]}}
        )
        assert math.isclose(w, (space.num_params(own) - base) / base)
    cost = expected_extra(vit, weights)
    want = sum(w * (1 - blk.mlp.router_logits.softmax(-1)[:, SHARED]).sum() for w, blk in zip(weights, vit.blocks))
    assert torch.isclose(cost, want)
    cost.backward()
    for blk in vit.blocks:
        g = blk.mlp.router_logits.grad
        assert (g[:, SHARED] < 0).all() and (g[:, TASK] > 0).all() and (g[:, MIX] > 0).all()


def test_expert_cost_pushes_routes_to_shared(tmp_path, data):
    def p_shared(cost: float) -> tuple[float, int]:
        cfg = parse_config(
            _cfg(
                {"steps": 12, "ckpt_every": 12, "lr": 2e-3},
                task_supernet={"expert_cost": cost, "router_lr_scale": 100.0},
            )
        )
        Trainer(cfg, tmp_path / f"c{cost}", data, show_progress=False).fit()
        r = json.loads((tmp_path / f"c{cost}" / "routes.json").read_text())
        probs = [p[SHARED] for t in r["probs"].values() for p in t]
        return sum(probs) / len(probs), sum(c["shared"] for c in r["counts"].values())

    free, paid = p_shared(0.0), p_shared(50.0)
    assert paid[0] > free[0] + 0.1, (free, paid)
    assert paid[1] == 4 and paid[1] >= free[1]  # every (task, block) of the paid run routes to shared


# ----- init from an All-in-One run -----


def _aio(tmp_path: Path, data, paths: str | None = "shared") -> Path:
    cfg = parse_config(_cfg({"stage": "all_in_one", "steps": 2, "ckpt_every": 2, "paths": paths}))
    Trainer(cfg, tmp_path / f"aio-{paths}", data, show_progress=False).fit()
    return tmp_path / f"aio-{paths}"


def test_init_from_an_all_in_one_run(tmp_path, data):
    src = _aio(tmp_path, data)
    weights, _ = load_checkpoint(src / "model.safetensors")
    cfg = parse_config(_cfg({"steps": 2}, init={"kind": "run", "path": str(src)}))
    tr = Trainer(cfg, tmp_path / "ts", data, show_progress=False)
    report = apply_init(tr.model, cfg, tr.out)
    st = tr.model.state_dict()
    for k, v in weights.items():
        if ".mlp.experts." not in k:
            assert torch.equal(st[k], v), k  # backbone, router logits and heads as trained
    for i in range(2):  # All-in-One with paths: shared never trained the experts: they copy the shared one
        for t in TASKS:
            for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
                ours = st[f"backbone.blocks.{i}.mlp.experts.{t}.{name}"]
                assert torch.equal(ours, weights[f"backbone.blocks.{i}.mlp.shared.{name}"])
                assert not torch.equal(ours, weights[f"backbone.blocks.{i}.mlp.experts.{t}.{name}"])
    assert report.kind == "run" and report.uninitialised == [] and "copies of the shared" in report.summary()
    assert json.loads((tr.out / "init_report.json").read_text())["kind"] == "run"

    # a source whose experts were trained keeps them
    src_task = _aio(tmp_path, data, "task")
    w_task, _ = load_checkpoint(src_task / "model.safetensors")
    init_from_run(tr.model, src_task / "model.safetensors")
    st = tr.model.state_dict()
    assert all(torch.equal(st[k], v) for k, v in w_task.items())


def test_init_from_run_refuses_another_model(tmp_path, data):
    src = _aio(tmp_path, data)
    other_tasks = {"digits": TASKS["digits"], "more": {"kind": "classification", "data": {"recipe": "digits"}}}
    tr = Trainer(parse_config(_cfg({"stage": "all_in_one"}, tasks=other_tasks)), tmp_path / "x", show_progress=False)
    with pytest.raises(CheckpointError, match=r"tasks \['digits', 'mnist'\].*\['digits', 'more'\]"):
        init_from_run(tr.model, src)
    wide = Trainer(
        parse_config(_cfg(model={**MODEL, "embed_dim": [16, 24]})), tmp_path / "y", data, show_progress=False
    )
    with pytest.raises(CheckpointError, match="search space.*embed_dim"):
        init_from_run(wide.model, src)
    with pytest.raises(CheckpointError, match="not a trained model"):
        init_from_run(wide.model, src / "checkpoints" / "latest.safetensors")
    with pytest.raises(CheckpointError, match="init.path.*not found"):
        init_from_run(wide.model, tmp_path / "nothing")


# ----- the command line -----


def test_cli_trains_a_task_supernet(tmp_path):
    cfg = tmp_path / "ts.yaml"
    cfg.write_text(yaml.safe_dump(_cfg({"steps": 2, "ckpt_every": 2})))
    res = subprocess.run(
        [str(BIN / "ufo"), "train", str(cfg), "--out", str(tmp_path / "run")], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert "routes (frozen" in res.stderr and "digits" in res.stderr
    routes = json.loads((tmp_path / "run" / "routes.json").read_text())["routes"]
    assert read_manifest(tmp_path / "run" / "model.safetensors")["arch"]["paths"] == routes
    assert (tmp_path / "run" / "routing_map.png").exists()


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    tasks = {
        "digits": {"kind": "classification", "data": {"recipe": "digits"}, "batch": 16},
        "mnist": {"kind": "classification", "data": {"recipe": "mnist5k", "max_train": 800}, "batch": 16},
    }
    cfg = _cfg({"steps": 6, "ckpt_every": 6, "batch_size": 32}, tasks=tasks, task_supernet={"expert_cost": 1.0})
    path = tmp_path / "ts.yaml"
    path.write_text(yaml.safe_dump(cfg))
    l1, l2 = train_one_and_two_processes(path, tmp_path)
    assert len(l1) == len(l2) == 6
    for key in ("loss", "loss/cost"):  # every rank draws the same Gumbel noise (same seed), so the same paths
        assert max(abs(float(a[key]) - float(b[key])) for a, b in zip(l1, l2)) <= 1e-4, key
    assert (
        json.loads((tmp_path / "one" / "routes.json").read_text())["routes"]
        == json.loads((tmp_path / "two" / "routes.json").read_text())["routes"]
    )
