"""Per-task input sizes downstream of training: a task at 24x16 (HxW) beside one at the base 16x16.

The supernet on chunks of two sizes, extraction (a timm ViT built at the task's size, a MultiTaskViT
resampling per input), a short training run, task-model files and their manifests, ONNX export on a
streamed set, the HTTP server, latency, extension, distillation students, timm init and SimMIM masks.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from helpers import make_image_folder
from ufo.arch import SearchSpace
from ufo.checkpoint import read_manifest
from ufo.config import parse_config
from ufo.data.decode import decode
from ufo.deploy.onnx_export import OnnxTaskModel, export_task, read_metadata
from ufo.deploy.server import create_app, load_served
from ufo.errors import ConfigError
from ufo.evaluation.predict import make_predict
from ufo.evaluation.protocol import evaluate_predict
from ufo.model import UFOModel
from ufo.nn import SuperViT, extract
from ufo.nn.extract import MultiTaskViT
from ufo.taskmodel import extract_task_model, load_task_data, load_task_model, load_trained, save_task_model
from ufo.tasks import task_class

TALL, SQ = (24, 16), (16, 16)
SPACE = SearchSpace(
    tasks=["tall", "sq"],
    depth=[2],
    embed_dim=[32],
    num_heads=[4],
    mlp_ratio=[2.0],
    head_dim=8,
    img_size=16,
    patch_size=4,
    task_img_size={"tall": TALL},
)
ARCH = SPACE.largest().model_copy(update={"paths": {"tall": ["mix", "task"], "sq": ["shared", "mix"]}})


def _supernet() -> SuperViT:
    torch.manual_seed(0)
    model = SuperViT(SPACE).eval()
    with torch.no_grad():  # non-trivial routes and mix weights
        for blk in model.blocks:
            blk.mlp.router_logits.normal_()
            blk.mlp.mix_logits.normal_()
    model.set_arch(ARCH)
    return model


def _x(n: int, hw: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(n, 3, *hw, generator=torch.Generator().manual_seed(seed))


# ----- the supernet and extraction -----


def test_supernet_on_chunks_of_two_sizes_equals_each_chunk_alone():
    model = _supernet()
    xt, xs = _x(3, TALL, 1), _x(2, SQ, 2)
    with torch.no_grad():
        both = model([xt, xs], torch.tensor([0, 0, 0, 1, 1]))
        alone = torch.cat([model(xt, "tall"), model(xs, "sq")])
    assert both.shape == (5, 32)
    assert (both - alone).abs().max().item() <= 1e-6
    assert model.pos_embed_at(SPACE.grid("tall"), 32).shape == (1, 6 * 4 + 1, 32)


def test_single_task_extraction_is_a_timm_vit_at_the_task_size():
    model = _supernet()
    sub = extract(model, ARCH, "tall")
    assert isinstance(sub, VisionTransformer)
    assert tuple(sub.patch_embed.img_size) == TALL and tuple(sub.patch_embed.grid_size) == (6, 4)
    assert sub.pos_embed.shape == (1, 25, 32)
    assert sum(p.numel() for p in sub.parameters()) == SPACE.num_params(ARCH, "tall")
    x = _x(4, TALL, 3)
    with torch.no_grad():
        assert (sub(x) - model(x, "tall")).abs().max().item() <= 1e-5
        assert torch.equal(sub.pos_embed, model.pos_embed_at((6, 4), 32))


def test_multi_task_extraction_equals_the_supernet_at_both_sizes():
    model = _supernet()
    sub = extract(model, ARCH, ["tall", "sq"])
    assert isinstance(sub, MultiTaskViT) and sub.pos_embed.shape == (1, 17, 32)  # the base grid
    with torch.no_grad():
        for task, hw in (("tall", TALL), ("sq", SQ)):
            x = _x(3, hw, 4)
            assert (sub(x, task) - model(x, task)).abs().max().item() <= 1e-5


# ----- a trained run with two sizes -----

CFG = {
    "name": "task-sizes",
    "seed": 0,
    "model": {
        "img_size": 16,
        "patch_size": 4,
        "head_dim": 8,
        "depth": [1, 2],
        "embed_dim": [24, 32],
        "num_heads": [2, 4],
        "mlp_ratio": [2.0],
        "drop_path_rate": 0.0,
    },
    "tasks": {
        "tall": {
            "kind": "classification",
            "img_size": [24, 16],
            "data": {"reader": "image_folder", "cache": "stream", "test_fraction": 0.25},
        },
        "sq": {
            "kind": "retrieval",
            "data": {"recipe": "digits", "test_fraction": 0.4},
            "options": {"embedding_dim": 16, "k": 4},
        },
    },
    "train": {
        "steps": 6,
        "batch_size": 24,
        "log_every": 3,
        "ckpt_every": 100,
        "warmup_steps": 1,
        "threads": 2,
        "workers": 0,
        "paths": None,
    },
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from ufo.train.loop import Trainer

    root = tmp_path_factory.mktemp("sizes")
    folder = make_image_folder(root / "imgs", classes=4, per_class=10)
    cfg = json.loads(json.dumps(CFG))
    cfg["tasks"]["tall"]["data"]["path"] = str(folder)
    Trainer(parse_config(cfg), root / "run", show_progress=False).fit()
    return root / "run"


@pytest.fixture(scope="module")
def trained(run):
    model, cfg, _ = load_trained(run)
    return model, cfg, load_task_data(cfg, cfg.task_names)


def test_single_task_file_records_its_size_and_exports_on_a_streamed_set(trained, tmp_path):
    model, cfg, data = trained
    assert not data["tall"].train.in_memory and not data["tall"].eval["test"].in_memory  # streamed
    tm = extract_task_model(model, None, "tall", cfg, data)
    assert tm.info.preprocessing.input_size() == TALL and tuple(tm.backbone.patch_embed.img_size) == TALL
    save_task_model(tmp_path / "tall.safetensors", tm)
    pre = read_manifest(tmp_path / "tall.safetensors")["preprocessing"]
    assert pre == {"img_size": [24, 16], "in_chans": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
    loaded = load_task_model(tmp_path / "tall.safetensors")
    x = _x(5, TALL, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x, "tall"), tm(x, "tall"))
        assert (tm(x, "tall") - model(x, "tall")).abs().max().item() <= 1e-5

    r = export_task(loaded, "tall", tmp_path / "tall.onnx", "static", cfg, data["tall"], calib_size=16)
    assert r["parity_inputs"] == "test images" and r["parity_n"] == len(data["tall"].eval["test"]) == 10
    assert r["parity_max_abs_diff"] <= 1e-4 and 0 <= r["metrics_fp32"]["top1"] <= 1 and "metrics_int8" in r
    meta = read_metadata(r["fp32"])
    assert json.loads(meta["input_size"]) == [3, 24, 16]
    om = OnnxTaskModel(r["fp32"])
    assert om.preprocessing.input_size() == TALL
    with torch.no_grad():
        assert np.abs(om(x) - tm(x, "tall").numpy()).max() <= 1e-4
    torch_metrics = evaluate_predict(make_predict(tm, "tall", cfg), "tall", tm.info.heads["tall"], cfg, data["tall"])
    assert r["metrics_fp32"]["top1"] == pytest.approx(torch_metrics["top1"])


def test_preprocessing_reads_old_int_sizes_and_writes_height_width():
    from ufo.taskmodel import Preprocessing

    stats = {"in_chans": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
    old = Preprocessing.model_validate_json(json.dumps({"img_size": 16, **stats}))  # a manifest from before
    assert old.input_size() == old.input_size("any") == (16, 16) and old.model_dump() == {"img_size": 16, **stats}
    tall = Preprocessing(img_size=[24, 16], **stats)
    assert json.loads(tall.model_dump_json())["img_size"] == [24, 16]
    assert Preprocessing(img_size=(16, 16), **stats).model_dump()["img_size"] == 16  # square: one side
    assert tuple(tall.transform()(torch.zeros(2, 3, 7, 9, dtype=torch.uint8)).shape) == (2, 3, 24, 16)


def _image(h: int, w: int, seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_multi_task_file_keeps_per_task_sizes_and_serves_each_task_at_its_size(trained, tmp_path):
    model, cfg, _data = trained
    tm = extract_task_model(model, None, ["tall", "sq"], cfg)
    f = tmp_path / "both.safetensors"
    save_task_model(f, tm)
    pre = read_manifest(f)["preprocessing"]
    assert pre["img_size"] == 16 and pre["task_img_size"] == {"tall": [24, 16]}
    loaded = load_task_model(f)
    assert loaded.info.preprocessing.for_task("tall").input_size() == TALL
    assert loaded.info.preprocessing.for_task("sq").model_dump() == {
        "img_size": 16,
        "in_chans": 3,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }

    with TestClient(create_app(load_served([f]))) as client:
        tasks = {t["name"]: t["preprocessing"] for t in client.get("/v1/tasks").json()["tasks"]}
        assert tasks["tall"]["img_size"] == [24, 16] and tasks["sq"]["img_size"] == 16
        for i, (h, w, mode) in enumerate([(37, 23, "RGB"), (9, 50, "L")]):
            png = _image(h, w, i, mode)
            want = {}
            for task in ("tall", "sq"):
                p = loaded.info.preprocessing.for_task(task)
                u8 = torch.from_numpy(decode(png, p.input_size(), None).copy())
                assert tuple(u8.shape[-2:]) == p.input_size()
                with torch.no_grad():
                    want[task] = loaded(p.transform()(u8)[None], task)[0]
            body = client.post("/v1/tasks/tall:predict", params={"k": 4}, content=png).json()
            probs = torch.softmax(want["tall"].double(), -1)
            top = torch.topk(probs, 4)
            assert [t["index"] for t in body["top_k"]] == top.indices.tolist()
            assert np.allclose([t["probability"] for t in body["top_k"]], top.values.numpy(), atol=1e-5)
            emb = client.post("/v1/tasks/sq:predict", files={"file": ("x.png", png, "image/png")}).json()["embedding"]
            assert len(emb) == 16 and np.allclose(emb, want["sq"].numpy(), atol=1e-5)

    served = load_served([f], backend="onnx", workdir=tmp_path / "onnx")  # each task exported at its size
    for task, hw in (("tall", TALL), ("sq", SQ)):
        assert served[task].preprocessing.input_size() == hw
        x = _x(3, hw, 9)
        with torch.no_grad():
            assert np.abs(served[task].run(x) - loaded(x, task).numpy()).max() <= 1e-4


def test_latency_is_measured_at_the_task_size(tmp_path):
    from ufo.search.latency import make_runner, measure

    sub = extract(_supernet(), ARCH, "tall")
    with pytest.raises(AssertionError, match="Input height"):  # a fixed-size timm ViT refuses the base size
        sub(_x(1, SQ, 0))
    for backend in ("torch-cpu", "ort-cpu"):
        lat = measure(SPACE, ARCH, "tall", backend, batch=2, threads=1, repeats=3, warmup=1)
        assert lat.n == 3 and 0 < lat.q1_ms <= lat.median_ms <= lat.q3_ms
    run, _ = make_runner(SPACE, ARCH, "tall", "torch-cpu", 2, 1, tmp_path)
    assert run().shape == (2, 32)


# ----- extension, distillation students, timm init, SimMIM -----


def test_a_new_task_may_have_its_own_size(trained):
    from ufo.config import TaskConfig
    from ufo.train.extend import add_task, probe_outputs

    model, cfg, _ = trained
    tc = TaskConfig.model_validate({"kind": "classification", "img_size": [16, 24], "data": {"recipe": "digits"}})
    new, new_cfg, _arch = add_task(model, cfg, model.arch, "wide", tc, 10, "task")
    assert new_cfg.input_size("wide") == (16, 24) and new.space.input_size("wide") == (16, 24)
    before, after = probe_outputs(model, ["tall", "sq"]), probe_outputs(new, ["tall", "sq"])
    assert all(torch.equal(before[t], after[t]) for t in before)
    out = probe_outputs(new, ["wide"])["wide"]
    assert out.shape == (8, 10) and torch.isfinite(out).all()


def test_a_timm_cnn_student_takes_height_and_width():
    from ufo.train.distill import DeployError, create_backbone

    backbone, spec = create_backbone("test_efficientnet", {"channel_multiplier": 0.25}, 3, TALL)
    with torch.no_grad():
        assert backbone.eval()(_x(2, TALL, 0)).shape == (2, spec.num_features)
    with pytest.raises(DeployError, match="does not run on 3x24x16"):
        create_backbone("test_vit3", {}, 3, TALL)


def test_timm_init_resamples_the_position_grid_to_a_non_square_base():
    from ufo.train.init import init_from_timm

    torch.manual_seed(0)
    kw = dict(patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=0)
    space = SPACE.model_copy(update={"img_size": (24, 16), "task_img_size": {}})
    # a square 16x16 timm ViT (4x4 grid) into a 24x16 base (6x4 grid)
    ref = VisionTransformer(img_size=16, **kw).eval()
    model = SuperViT(space)
    report = init_from_timm(model, ref.state_dict())
    pos = {r.name: r for r in report.resized}["pos_embed"]
    assert (pos.from_shape, pos.to_shape) == ([1, 17, 32], [1, 25, 32]) and "grid 4x4 -> 6x4" in pos.how
    want = resample_abs_pos_embed(ref.pos_embed, [6, 4], [4, 4], num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, want)
    # a timm ViT built at the base size itself (not square): mapped as it is, same features
    ref = VisionTransformer(img_size=(24, 16), **kw).eval()
    model = SuperViT(space).eval()
    report = init_from_timm(model, ref.state_dict())
    assert "pos_embed" not in {r.name for r in report.resized} and torch.equal(model.pos_embed, ref.pos_embed)
    model.set_arch(space.largest().model_copy(update={"paths": {t: ["shared"] * 2 for t in space.tasks}}))
    x = _x(2, (24, 16), 6)
    with torch.no_grad():
        assert (model.forward_features(x, 0) - ref.forward_features(x)).abs().max().item() <= 1e-5


def test_simmim_masks_each_size_on_its_own_grid():
    from ufo.train.mim import SimMIM, masked_l1, patchify, random_mask

    mask = random_mask(3, (24, 16), 4, 8, 0.5)
    assert mask.shape == (3, 24) and (mask.sum(1) == 3 * 4).all()  # ceil(0.5 * 3x2) mask patches of 2x2
    blocks = mask.view(3, 3, 2, 2, 2)  # (B, rows, 2, cols, 2) blocks are all-or-nothing
    assert (blocks.all(2).all(3) == blocks.any(2).any(3)).all()

    heads = {t: task_class("classification")(t, {}, 5, 32) for t in SPACE.tasks}
    ufo = UFOModel(SPACE, heads)
    ufo.set_arch(SPACE.largest().model_copy(update={"paths": {t: ["shared"] * 2 for t in SPACE.tasks}}))
    mim = SimMIM(ufo, 8, 0.5).eval()
    xs = [_x(2, SQ, 7), _x(3, TALL, 8)]
    masks = mim.random_mask(xs)
    assert [tuple(m.shape) for m in masks] == [(2, 16), (3, 24)]
    with torch.no_grad():
        loss = mim(xs, masks)
        preds = [mim.predict(x, m) for x, m in zip(xs, masks)]
    err = sum(((p - patchify(x, 4)).abs() * m.unsqueeze(-1)).sum() for p, x, m in zip(preds, xs, masks))
    count = sum(m.sum() * 48 for m in masks)
    assert torch.isclose(loss, err / count)
    assert torch.isclose(mim(xs[:1], masks[:1]), masked_l1(preds[0], patchify(xs[0], 4), masks[0]))
    with pytest.raises(ConfigError, match="does not divide tasks.tall.img_size 24x16"):
        SimMIM(ufo, 16, 0.5)


def test_mim_pretraining_runs_on_two_sizes(tmp_path):
    from ufo.train.loop import Trainer

    cfg = {
        "name": "mim-sizes",
        "seed": 0,
        "model": {**CFG["model"], "depth": [2], "embed_dim": [32], "num_heads": [4]},
        "tasks": {
            "tall": {"kind": "classification", "img_size": [24, 16], "data": {"recipe": "digits"}},
            "sq": {"kind": "classification", "data": {"recipe": "digits"}},
        },
        "train": {
            "steps": 2,
            "batch_size": 16,
            "log_every": 1,
            "ckpt_every": 100,
            "warmup_steps": 1,
            "threads": 2,
            "workers": 0,
            "stage": "pretrain_mim",
        },
    }
    tr = Trainer(parse_config(cfg), tmp_path / "mim", show_progress=False)
    assert tr.module.mask_patch_size == 8
    tr.fit()
    log = (tmp_path / "mim" / "metrics.csv").read_text().splitlines()
    rows = [dict(zip(log[0].split(","), r.split(","))) for r in log[1:]]
    assert [r["step"] for r in rows] == ["1", "2"] and all(0 < float(r["loss"]) < 10 for r in rows)
    assert read_manifest(tmp_path / "mim" / "model.safetensors")["kind"] == "ufo_model"
