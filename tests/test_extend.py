"""New-task extension: the other tasks' outputs stay bitwise equal (head, head+expert,
head+expert+norms) and only the chosen parameters change; `all` changes them, as documented; the
norm affines fold exactly; the label subset is deterministic and nested; the extended run is a
valid run for `ufo eval`, `ufo extract` and export; the `ufo extend` command."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from test_deploy import make_run
from ufo.cli import app
from ufo.config import TaskConfig
from ufo.data.build import build_task_data
from ufo.errors import ConfigError
from ufo.model import load_model
from ufo.taskmodel import extract_task_model, load_trained, task_model_from_run
from ufo.train.extend import (
    ExtendConfig,
    ExtendStep,
    add_task,
    extend,
    fraction_subset,
    load_task_config,
    probe_outputs,
)

NEW_CLS = {
    "mnist_cls": {"kind": "classification", "data": {"recipe": "mnist5k", "test_fraction": 0.3, "max_train": 400}}
}
NEW_VER = {
    "faces2": {
        "kind": "verification",
        "data": {"recipe": "digits", "test_fraction": 0.3},
        "options": {"embedding_dim": 16, "k": 4, "num_pairs": 300},
    }
}
EXACT = ["head", "head+expert", "head+expert+norms"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory)


@pytest.fixture(scope="module")
def cls_data(run):
    _, cfg, _ = load_trained(run)
    name, tc = load_task_config(NEW_CLS)
    return build_task_data(name, tc, cfg)


@pytest.fixture(scope="module")
def extended(run, cls_data, tmp_path_factory):
    """The classification task added in every mode (a few steps each): {mode: (out folder, report)}.
    head+expert trains under bf16 autocast: old tasks must stay bitwise unchanged all the same."""
    base = tmp_path_factory.mktemp("extended")
    out = {}
    for mode in [*EXACT, "all"]:
        amp = "bf16" if mode == "head+expert" else "none"
        r = extend(
            run,
            NEW_CLS,
            base / mode,
            ExtendConfig(train=mode, fraction=0.5, steps=3, batch_size=24, threads=1, amp=amp),
            show_progress=False,
            data=cls_data,
        )
        assert r["recipe"]["amp"] == amp and all(v == v for v in r["metrics"].values())
        out[mode] = (base / mode, r)
    return out


def _state(path):
    model, _, _ = load_trained(path)
    return model, model.state_dict()


@pytest.mark.parametrize("mode", EXACT)
def test_old_tasks_are_bitwise_unchanged_and_only_chosen_parameters_change(run, extended, mode):
    folder, report = extended[mode]
    old, old_sd = _state(run)
    new, new_sd = _state(folder)
    assert report["others_unchanged"] == dict.fromkeys(old.tasks, True)
    # the outputs on real-looking inputs, from the files: bitwise equal for every old task
    before, after = probe_outputs(old, old.tasks, seed=7), probe_outputs(new, old.tasks, seed=7)
    assert all(torch.equal(before[t], after[t]) for t in old.tasks)
    T = len(old.tasks)
    for k, v in old_sd.items():
        w = new_sd[k][:T] if k.endswith(("router_logits", "mix_logits")) else new_sd[k]
        assert torch.equal(v, w), k
    changed = {k for k in new_sd if k not in old_sd and not torch.equal(new_sd[k], _init_of(k, old_sd))}
    heads = {k for k in changed if k.startswith("heads.mnist_cls.")}
    experts = {k for k in changed if ".mlp.experts.mnist_cls." in k}
    assert heads and changed == heads | experts
    if mode == "head":
        assert not experts  # the expert stays the shared copy it started as, and is not on the path
        assert new.arch.paths["mnist_cls"] == ["shared"] * new.arch.depth
    else:
        assert experts and new.arch.paths["mnist_cls"] == ["task"] * new.arch.depth
    assert new.backbone.routes()["mnist_cls"][: new.arch.depth] == new.arch.paths["mnist_cls"]


def _init_of(key: str, old_sd: dict) -> torch.Tensor:
    """What an added tensor starts as: an expert copies the shared expert; a head has no counterpart."""
    if ".mlp.experts.mnist_cls." in key:
        return old_sd[key.replace(".experts.mnist_cls.", ".shared.")]
    return torch.full((1,), float("nan"))


def test_all_mode_trains_the_shared_branch_and_changes_the_others(extended):
    _, report = extended["all"]
    assert not any(report["others_unchanged"].values())
    assert report["trainable_params"] > extended["head+expert"][1]["trainable_params"]
    assert (
        extended["head"][1]["trainable_params"]
        < extended["head+expert"][1]["trainable_params"]
        < extended["head+expert+norms"][1]["trainable_params"]
    )


@pytest.mark.parametrize("task_cfg", [NEW_CLS, NEW_VER], ids=["linear-head", "bn-neck-head"])
def test_norm_affines_fold_exactly_into_the_expert_and_the_head(run, task_cfg):
    old, cfg, manifest = load_trained(run)
    from ufo.arch import Arch

    name, tc = load_task_config(task_cfg)
    model, _, _ = add_task(old, cfg, Arch.model_validate(manifest["arch"]), name, tc, 10, "task")
    step = ExtendStep(model, name, norms=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in step.named_parameters():
            if n.endswith(("gain", "shift")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        head = model.heads[name]
        if hasattr(head, "bn"):
            head.bn.running_mean.normal_(generator=g)
            head.bn.running_var.uniform_(0.5, 2.0, generator=g)
    step.eval()
    x = torch.randn(5, 3, 16, 16, generator=g)
    with torch.no_grad():
        before = head(step.features(x))
        after = step.fold()(x, name)
    assert torch.allclose(before, after, atol=1e-5)
    assert not any(n.endswith(("gain", "shift")) for n, _ in model.named_parameters())


def test_fraction_subset_is_deterministic_nested_and_keeps_every_class(cls_data, run):
    a = fraction_subset(cls_data, 0.1, 0, grouped=False)
    b = fraction_subset(cls_data, 0.1, 0, grouped=False)
    c = fraction_subset(cls_data, 0.5, 0, grouped=False)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.train.labels, b.train.labels)
    assert set(a.train.labels.tolist()) == set(cls_data.train.labels.tolist())
    assert len(a.train) < len(c.train) < len(cls_data.train)
    key = lambda s: {(bytes(img.numpy()), int(y)) for img, y in zip(s.images, s.labels)}
    assert key(a.train) <= key(c.train)
    assert fraction_subset(cls_data, 1.0, 0, grouped=False) is cls_data
    assert not torch.equal(fraction_subset(cls_data, 0.1, 1, grouped=False).train.images, a.train.images)
    # identity tasks keep whole identities (at least 2), relabelled, with their groups
    _, cfg, _ = load_trained(run)
    name, tc = load_task_config(NEW_VER)
    ver = build_task_data(name, tc, cfg)
    s = fraction_subset(ver, 0.3, 0, grouped=True)
    ids = np.unique(s.train.labels.numpy())
    assert len(ids) >= 2 and ids.tolist() == list(range(len(ids))) and torch.equal(s.groups, s.train.labels)
    full = Counter(np.bincount(ver.train.labels.numpy()).tolist())
    sub = Counter(np.bincount(s.train.labels.numpy()).tolist())
    assert all(full[c] >= n for c, n in sub.items())  # whole identities: their image counts are the full ones


def test_extended_run_evaluates_extracts_and_keeps_old_extractions(run, extended, tmp_path):
    folder, report = extended["head+expert"]
    model, cfg, manifest = load_model(folder / "model.safetensors")
    assert cfg.task_names[-1] == "mnist_cls" and manifest["extended"]["fraction"] == 0.5
    assert (folder / "config.yaml").exists() and json.loads((folder / "extend.json").read_text())["task"] == "mnist_cls"
    res = CliRunner().invoke(app, ["eval", str(folder), "--task", "mnist_cls"])
    assert res.exit_code == 0, res.output
    assert json.loads((folder / "eval.json").read_text())["metrics"]["mnist_cls"]["top1"] == pytest.approx(
        report["metrics"]["top1"]
    )
    # the new task's extracted model equals the extended supernet; an old task's equals the original's
    tm = task_model_from_run(folder, ["mnist_cls"], with_data=False)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(tm(x, "mnist_cls"), model(x, "mnist_cls"), atol=1e-5)
        old_tm = task_model_from_run(run, ["digits"], with_data=False)
        new_tm = extract_task_model(model, None, ["digits"], cfg)
        assert torch.equal(old_tm(x, "digits"), new_tm(x, "digits"))
    out = tmp_path / "multi.safetensors"
    res = CliRunner().invoke(
        app, ["extract", str(folder), "--task", "digits", "--task", "mnist_cls", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output


def test_cli_extend_and_its_errors(run, tmp_path):
    yml = tmp_path / "new.yaml"
    yml.write_text(yaml.safe_dump(NEW_CLS))
    out = tmp_path / "ext"
    res = CliRunner().invoke(
        app,
        [
            "extend",
            str(run),
            "--task-config",
            str(yml),
            "--fraction",
            "0.1",
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "16",
            "--threads",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "bitwise unchanged" in res.output and (out / "model.safetensors").exists()
    bad = CliRunner().invoke(
        app,
        ["extend", str(run), "--task-config", str(yml), "--out", str(tmp_path / "b"), "--train", "experts"],
        env={"COLUMNS": "300"},
    )
    assert bad.exit_code == 2 and "'experts' is not one of 'head', 'head+expert'" in bad.output
    clash = tmp_path / "clash.yaml"
    clash.write_text(yaml.safe_dump({"digits": NEW_CLS["mnist_cls"]}))
    bad = CliRunner().invoke(app, ["extend", str(run), "--task-config", str(clash), "--out", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "already in the run" in bad.output
    with pytest.raises(ConfigError, match="exactly one task"):
        load_task_config({"a": NEW_CLS["mnist_cls"], "b": NEW_CLS["mnist_cls"]})
    assert isinstance(load_task_config({"tasks": NEW_CLS})[1], TaskConfig)


def test_the_norm_affines_move_to_the_training_device_with_the_model(run, cls_data, tmp_path, monkeypatch):
    """head+expert+norms creates gain/shift after the model is built: they must land on the training
    device with it, and the optimiser must hold them there. The meta device stands in for a GPU
    (the test then stops at the training loop)."""
    import ufo.train.extend as ext

    class Stop(Exception):
        pass

    seen = {}

    def loop(module, optimizer, *args, **kwargs):
        seen["step"] = {n: p.device.type for n, p in module.named_parameters()}
        seen["optimizer"] = {p.device.type for g in optimizer.param_groups for p in g["params"]}
        raise Stop

    monkeypatch.setattr(ext.dist, "device", lambda kind="auto": torch.device("meta"))
    monkeypatch.setattr(ext, "TuneLoop", loop)
    with pytest.raises(Stop):
        extend(
            run,
            NEW_CLS,
            tmp_path / "e",
            ExtendConfig(train="head+expert+norms", steps=1, batch_size=8, threads=1),
            show_progress=False,
            data=cls_data,
        )
    norms = [n for n in seen["step"] if n.endswith(("gain", "shift"))]
    assert len(norms) > 2  # the final norm's and every block's expert norm
    assert set(seen["step"].values()) == {"meta"} and seen["optimizer"] == {"meta"}


def test_cli_extend_takes_device_and_amp(run, tmp_path):
    yml = tmp_path / "new.yaml"
    yml.write_text(yaml.safe_dump(NEW_CLS))
    out = tmp_path / "ext"
    args = ["extend", str(run), "--task-config", str(yml), "--fraction", "0.1", "--out", str(out)]
    args += ["--train", "head+expert+norms", "--steps", "2", "--batch-size", "16", "--threads", "1"]
    res = CliRunner().invoke(app, [*args, "--device", "cpu", "--amp", "bf16"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "extend.json").read_text())
    assert report["recipe"]["device"] == "cpu" and report["recipe"]["amp"] == "bf16"
    assert all(report["others_unchanged"].values()) and all(v == v for v in report["metrics"].values())
