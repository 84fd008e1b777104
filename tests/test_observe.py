"""Observability of a training run: validation during training (train.eval_every) that leaves the
run unchanged and survives a resume, RUN/metrics.json, val_metrics.csv, TensorBoard's val/
scalars and RUN/train.log, in every trainer; and each task kind's evaluation-figure data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ufo.checkpoint import load_checkpoint
from ufo.config import parse_config
from ufo.data.build import build_all
from ufo.data.recipes import load_recipe
from ufo.tasks import task_class
from ufo.tasks.metrics import confusion, roc_points
from ufo.train.loop import Trainer

TINY = {
    "name": "observe",
    "seed": 4,
    "model": {
        "img_size": 16,
        "patch_size": 4,
        "head_dim": 8,
        "depth": [1, 2],
        "embed_dim": [16, 24],
        "num_heads": [1, 2],
        "mlp_ratio": [1.0, 2.0],
        "drop_path_rate": 0.1,
    },  # drop path draws from the RNG
    "tasks": {
        "digits": {"kind": "classification", "data": {"recipe": "digits"}},
        "mnist": {
            "kind": "retrieval",
            "data": {"recipe": "mnist5k", "max_train": 300},
            "options": {"embedding_dim": 16, "k": 4},
        },
    },
    "train": {
        "steps": 6,
        "batch_size": 16,
        "log_every": 1,
        "ckpt_every": 3,
        "eval_every": 2,
        "warmup_steps": 2,
        "threads": 1,
        "eval_batch_size": 512,
    },
}


def _cfg(**train):
    return parse_config({**TINY, "train": {**TINY["train"], **train}})


@pytest.fixture(scope="module")
def data():
    return build_all(_cfg())


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "model.safetensors")[0]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _csv_steps(path: Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_validation_changes_nothing_and_a_resumed_run_keeps_its_history(tmp_path, data):
    cfg = _cfg()
    Trainer(cfg, tmp_path / "full", data, show_progress=False).fit()
    Trainer(_cfg(eval_every=0), tmp_path / "off", data, show_progress=False).fit()
    # the RNG states are restored after each validation: the same weights as a run without any
    assert _max_diff(_weights(tmp_path / "full"), _weights(tmp_path / "off")) == 0.0
    assert (
        not (tmp_path / "off" / "metrics.json").exists()
        and "validation off" in (tmp_path / "off" / "train.log").read_text()
    )

    cut = Trainer(cfg, tmp_path / "cut", data, show_progress=False)
    step = cut.train_step

    def dies_after_a_validation():
        if cut.step == 4:  # validated at 2 and 4, checkpoint at 3: the resume rolls step 4 back
            raise KeyboardInterrupt
        return step()

    cut.train_step = dies_after_a_validation
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    assert list(json.loads((tmp_path / "cut" / "metrics.json").read_text())["history"]) == ["2", "4"]
    resumed = Trainer(cfg, tmp_path / "cut", data, show_progress=False)
    resumed.fit(resume=True)
    assert _max_diff(_weights(tmp_path / "full"), _weights(tmp_path / "cut")) <= 1e-6

    full, got = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("full", "cut"))
    assert list(got["history"]) == list(full["history"]) == ["2", "4", "6"]
    assert got["final_step"] == 6 and got["eval_every"] == 2
    assert got["primary_metric"] == {"digits": "top1", "mnist": "recall@1"}
    assert got["metrics"] == got["history"]["6"] and resumed.final_metrics == got["metrics"]
    for s in full["history"]:
        for t, m in full["history"][s].items():
            assert got["history"][s][t] == pytest.approx(m, abs=1e-6), (s, t)
    assert got["primary"] == pytest.approx({t: m[got["primary_metric"][t]] for t, m in got["metrics"].items()})

    run = tmp_path / "cut"
    assert _csv_steps(run / "metrics.csv") == [1, 2, 3, 4, 5, 6]  # each step once after the resume
    val = _csv_steps(run / "val_metrics.csv")
    assert sorted(set(val)) == [2, 4, 6] and val == sorted(val)
    assert len(val) == 3 * sum(len(m) for m in full["metrics"].values())

    log = (run / "train.log").read_text()
    for needle in (
        "INFO start observe: stage all_in_one, 6 steps",
        "world size 1, device cpu",
        "seed 4",
        "validation every 2 steps",
        "torch ",
        "fresh start (init: scratch)",
        "step 1/6 loss=",
        "lr=",
        "img/s=",
        "step 2 validation: digits top1=",
        "ERROR stopped: KeyboardInterrupt",
        "resumed from",
        "at step 3",
        "step 6 final evaluation: digits top1=",
        "finished 6 steps",
    ):
        assert needle in log, needle
    assert log.count("INFO start observe") == 2 and log.count("step 4 validation") == 2  # appended, not rewritten
    assert log.index("ERROR stopped") < log.index("resumed from")
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["seed"] == 4 and prov["versions"]["torch"] == torch.__version__ and prov["hardware"]["cores"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "full" / "tb"))
    tb.Reload()
    tags = tb.Tags()["scalars"]
    assert {"val/digits/top1", "val/mnist/recall@1", "loss"} <= set(tags)
    assert [e.step for e in tb.Scalars("val/digits/top1")] == [2, 4, 6]


def test_every_trainer_validates_but_mim(tmp_path, data):
    """The task and chip supernets validate (the chip one at its largest subnet, with an EMA);
    MIM pre-training, whose heads are never trained, does not, and says so in its log."""
    short = dict(steps=2, ckpt_every=2, eval_every=1)
    for stage, extra in [("task_supernet", {}), ("chip_supernet", {"ema_decay": 0.5}), ("pretrain_mim", {})]:
        run = tmp_path / stage
        tr = Trainer(_cfg(stage=stage, **short, **extra), run, data, show_progress=False)
        tr.fit()
        log = (run / "train.log").read_text()
        if stage == "pretrain_mim":
            assert tr.final_metrics is None and "validation off" in log
            assert not (run / "metrics.json").exists() and not (run / "val_metrics.csv").exists()
            continue
        m = json.loads((run / "metrics.json").read_text())
        assert m["stage"] == stage and list(m["history"]) == ["1", "2"], stage
        assert set(m["metrics"]) == {"digits", "mnist"} and "step 1 validation: digits top1=" in log
        if stage == "chip_supernet":  # the final evaluation scores the shipped (EMA) weights at the largest subnet
            assert tr.eval_model().arch == tr.arch


def _oracle(kind: str):
    def predict(s):  # one-hot of the true class: logits for classification, embeddings otherwise
        return torch.nn.functional.one_hot(
            s.labels, 10 if kind == "classification" else int(s.labels.max()) + 1
        ).float()

    return predict


@pytest.mark.parametrize("kind", ["classification", "verification", "reid", "retrieval"])
def test_each_kind_gives_its_evaluation_figure_data(kind):
    """A perfect predictor: a diagonal confusion matrix, a ROC through (0, 1) with the threshold
    there, CMC and Recall@K of 1 at every rank; the metrics are those `evaluate` reports."""
    cls = task_class(kind)
    data = cls.split(load_recipe("digits"), 0.3, 0, True)
    task = cls("t", {}, num_classes=len(data.train.class_names), in_dim=8)
    c = json.loads(json.dumps(task.curves(_oracle(kind), data)))  # JSON-ready: the report caches it
    assert c["metrics"] == pytest.approx(task.evaluate(_oracle(kind), data))
    if kind == "classification":
        m = np.array(c["matrix"])
        assert c["figure"] == "confusion_matrix" and m.shape == (10, 10) and (m == np.diag(np.diag(m))).all()
        assert m.sum() == len(data.eval["test"]) and c["classes"] == data.eval["test"].class_names
    elif kind == "verification":
        assert c["figure"] == "roc" and c["auc"] == 1.0 and c["at_threshold"] == {"fpr": 0.0, "tpr": 1.0}
        assert c["fpr"][0] == 0.0 and c["tpr"][-1] == 1.0 and c["threshold"] == c["metrics"]["threshold"]
    elif kind == "reid":
        assert c["figure"] == "cmc" and c["ranks"] == list(range(1, 21)) and c["cmc"] == [1.0] * 20
    else:
        assert c["figure"] == "recall_at_k" and c["ks"] == list(range(1, 21)) and c["recall"] == [1.0] * 20


def test_confusion_keeps_the_most_confused_classes_and_roc_marks_the_threshold():
    labels = np.repeat(np.arange(40), 3)
    logits = torch.nn.functional.one_hot(torch.as_tensor(labels), 40).float()
    logits[0, 0], logits[0, 7] = 0.0, 1.0  # one error: class 0 taken for 7
    c = confusion(logits, labels, [f"c{i}" for i in range(40)], max_classes=5)
    # the two classes with errors, then the first error-free ones, in class order
    assert c["kept"] == 5 and c["total"] == 40 and c["classes"] == ["c0", "c1", "c2", "c3", "c7"]
    m = np.array(c["matrix"])
    assert m[0, 4] == 1 and m[0, 0] == 2 and m.sum() == 15
    r = roc_points(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 0, 1, 0]), threshold=0.5)
    assert r["at_threshold"] == {"fpr": 0.5, "tpr": 0.5} and r["auc"] == pytest.approx(0.75)
