"""Interop: timm builds extracted ViTs (`ufo_vit`) and reads their preprocessing, task models save as
Hugging Face-style folders, `ufo.load` opens every kind of model file, and `TaskModel.predict`
answers as the server does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

import ufo
from helpers import tiny_space
from test_deploy import make_run
from ufo.arch import Arch
from ufo.checkpoint import save_supernet
from ufo.cli import app
from ufo.data.decode import decode
from ufo.deploy.hf import CONFIG, WEIGHTS, save_pretrained
from ufo.deploy.predict import read_output
from ufo.errors import CheckpointError, UFOError
from ufo.nn import SuperViT, extract
from ufo.nn.timm_vit import vit_kwargs
from ufo.taskmodel import DeployError, extract_task_model, load_task_data, load_trained, save_task_model


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(run):
    model, cfg, _ = load_trained(run)
    return model, cfg, load_task_data(cfg, ["digits", "faces"])


@pytest.fixture(scope="module")
def digits(trained):
    model, cfg, data = trained
    return extract_task_model(model, None, "digits", cfg, data)


@pytest.fixture(scope="module")
def multi(trained):
    model, cfg, data = trained
    return extract_task_model(model, None, ["digits", "mnist_ret", "faces"], cfg, data)


def _images(n: int = 5, seed: int = 0) -> list[np.ndarray]:
    """uint8 HxWx3 images of varied sizes (the model resizes them to 16x16)."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (int(rng.integers(12, 40)), int(rng.integers(12, 40)), 3), dtype=np.uint8)
        for _ in range(n)
    ]


def _input(tm, task: str, arr: np.ndarray) -> torch.Tensor:
    """The model input of one image, by the library's own steps: decode (resize), then the eval transform."""
    pre = tm.info.preprocessing.for_task(task)
    u8 = torch.from_numpy(np.array(decode(Image.fromarray(arr)._repr_png_(), pre.input_size(), None)))
    return pre.transform()(u8)[None]


# ----- timm.create_model("ufo_vit") -----


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_timm_builds_an_extracted_vit_with_per_block_heads_and_widths(stem):
    space = tiny_space(task_img_size={"signs": (16, 24)}, stem=stem)
    model = SuperViT(space).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.mlp.mix_logits.normal_()
    arch = Arch(
        depth=3,
        embed_dim=24,
        num_heads=[1, 3, 2],
        mlp_ratio=[2.0, 1.0, 1.5],
        paths={"signs": ["mix", "shared", "task"]},
    )
    sub = extract(model, arch, "signs")
    kwargs = vit_kwargs(space, sub.ufo_arch, "signs")
    assert kwargs["img_size"] == [16, 24] and kwargs["mlp_hidden_dim"] == [96, 24, 36]
    built = timm.create_model("ufo_vit", **json.loads(json.dumps(kwargs)))  # JSON-ready kwargs
    assert isinstance(built, VisionTransformer)
    assert list(built.state_dict()) == list(sub.state_dict())
    built.load_state_dict(sub.state_dict())
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        assert (built.eval()(x) - sub(x)).abs().max().item() <= 1e-5
    assert built.pretrained_cfg["input_size"] == (3, 16, 24)
    assert timm.data.resolve_model_data_config(built)["input_size"] == (3, 16, 24)


def test_timm_vit_takes_per_block_ratios_and_rejects_wrong_lengths():
    m = timm.create_model(
        "ufo_vit",
        img_size=16,
        patch_size=4,
        embed_dim=16,
        depth=2,
        num_heads=[1, 2],
        head_dim=8,
        mlp_ratio=[1.0, 2.0],
        num_classes=3,
    )
    assert [b.attn.num_heads for b in m.blocks] == [1, 2] and [b.mlp.fc1.out_features for b in m.blocks] == [16, 32]
    assert m(torch.randn(1, 3, 16, 16)).shape == (1, 3) and torch.isfinite(m.pos_embed).all()
    with pytest.raises(ValueError, match="num_heads has 3 values for depth 2"):
        timm.create_model("ufo_vit", depth=2, num_heads=[1, 2, 3])


# ----- pretrained_cfg: timm sees the real preprocessing -----


def test_resolve_model_data_config_gives_the_task_models_preprocessing(digits, multi, tmp_path):
    save_task_model(tmp_path / "d.safetensors", digits)
    loaded = ufo.load(tmp_path / "d.safetensors")
    for module in (digits, digits.backbone, loaded, loaded.backbone):
        cfg = timm.data.resolve_model_data_config(module)
        assert cfg["input_size"] == (3, 16, 16) and cfg["mean"] == (0.5,) * 3 and cfg["std"] == (0.5,) * 3
        assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0 and cfg["crop_mode"] == "squash"
    assert digits.pretrained_cfg["num_classes"] == 10 and digits.backbone.pretrained_cfg["num_classes"] == 0
    assert multi.pretrained_cfg["num_classes"] == 0 and not multi.pretrained_cfg["fixed_input_size"]
    # timm's own eval transform gives the library's model input
    arr = _images(1)[0]
    timm_x = timm.data.create_transform(**timm.data.resolve_model_data_config(digits))(Image.fromarray(arr))
    torch.testing.assert_close(timm_x[None], _input(digits, "digits", arr), atol=1e-5, rtol=0)


# ----- Hugging Face-style folders and ufo.load -----


def test_save_pretrained_then_load_gives_the_same_outputs(multi, tmp_path):
    folder = save_pretrained(multi, tmp_path / "multi")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG, WEIGHTS]
    cfg = json.loads((folder / CONFIG).read_text())
    assert "architecture" not in cfg  # several tasks: not a timm model
    u = cfg["ufo"]
    assert u["tasks"] == ["digits", "mnist_ret", "faces"] and u["ufo_version"] == ufo.__version__
    assert u["heads"]["faces"]["threshold"] is not None and u["preprocessing"]["img_size"] == 16
    assert u["arch"] == multi.info.arch.model_dump(mode="json") and "space" in u
    loaded = ufo.load(folder)
    assert not loaded.training
    shown = CliRunner().invoke(app, ["inspect", str(folder)], env={"COLUMNS": "300"})  # the folder, as given
    assert shown.exit_code == 0 and "task_model" in shown.output and "mnist_ret" in shown.output
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        for t in multi.tasks:
            assert torch.equal(loaded(x, t), multi(x, t))


def test_a_one_task_folder_is_a_timm_local_dir_model(digits, tmp_path):
    folder = digits.save_pretrained(tmp_path / "digits")
    cfg = json.loads((folder / CONFIG).read_text())
    assert cfg["architecture"] == "ufo_vit" and cfg["num_classes"] == 10
    assert cfg["label_names"] == list("0123456789") and cfg["model_args"]["num_heads"] == digits.info.arch.num_heads
    m = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x), digits(x, "digits"), atol=1e-5, rtol=0)
    assert timm.data.resolve_model_data_config(m)["input_size"] == (3, 16, 16)


def test_ufo_load_opens_a_run_folder_and_a_task_model_file(run, trained, tmp_path):
    model, cfg, _ = trained
    tm = ufo.load(run)
    assert tm.tasks == cfg.task_names and not tm.training
    x = torch.randn(2, 3, 16, 16)
    model.set_arch(tm.info.arch)
    with torch.no_grad():
        assert (tm(x, "digits") - model.eval()(x, "digits")).abs().max() <= 1e-5
    save_task_model(tmp_path / "tm.safetensors", tm)
    again = ufo.load(tmp_path / "tm.safetensors")
    with torch.no_grad():
        assert torch.equal(again(x, "faces"), tm(x, "faces"))


def test_cli_extract_writes_a_folder_that_serve_and_load_take(run, trained, tmp_path):
    from ufo.deploy.server import load_served

    cli = CliRunner()
    out = tmp_path / "digits-hf"
    res = cli.invoke(app, ["extract", str(run), "--task", "digits", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / CONFIG).is_file() and (out / WEIGHTS).is_file()
    assert list(load_served([out])) == ["digits"] and ufo.load(out).tasks == ["digits"]
    res = cli.invoke(app, ["extract", str(run), "-t", "digits", "--format", "hf", "--out", str(tmp_path / "x.st")])
    assert res.exit_code == 0 and (tmp_path / "x.st" / CONFIG).is_file()
    sup = tmp_path / "supernet.safetensors"
    save_supernet(sup, trained[0].backbone)
    res = cli.invoke(app, ["extract", str(sup), "-t", "digits", "--format", "hf", "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and "needs a trained run" in res.output


# ----- predict -----


def test_predict_on_pil_paths_and_arrays_matches_the_forward(digits, tmp_path):
    arrs = _images(5)
    paths = []
    for i, a in enumerate(arrs):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    x = torch.cat([_input(digits, "digits", a) for a in arrs])
    with torch.no_grad():
        logits = digits(x, "digits")
    want = [str(int(i)) for i in logits.argmax(1)]  # class names are "0".."9"
    for images in (arrs, [Image.fromarray(a) for a in arrs], paths, [str(p) for p in paths]):
        preds = digits.predict(images, k=3, batch_size=2)
        assert [p.top_k[0][0] for p in preds] == want and all(len(p.top_k) == 3 for p in preds)
    one = digits.predict(paths[0])
    p = torch.softmax(logits[0].double(), -1)
    assert one.indices[0] == int(p.argmax()) and one.top_k[0][1] == pytest.approx(float(p.max()))
    gray = digits.predict(arrs[0][..., :1])  # one channel, lifted to the model's three
    assert gray.output == "logits"


def test_predict_takes_uint8_tensors_and_rgba_as_the_arrays_they_hold(digits):
    arrs = _images(3)
    want = digits.predict(arrs, k=3)

    def same(got, ref) -> None:  # labels equal, probabilities to float error (batch shapes differ)
        for g, r in zip(got, ref, strict=True):
            assert [label for label, _ in g.top_k] == [label for label, _ in r.top_k]
            assert [p for _, p in g.top_k] == pytest.approx([p for _, p in r.top_k], abs=1e-6)

    chw = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrs]
    same(digits.predict(chw, k=3), want)  # a list of (C, H, W) tensors
    batch = digits.predict(torch.stack([chw[0], chw[0]]), k=3)  # one (N, C, H, W) tensor: a prediction per image
    assert isinstance(batch, list)
    same(batch, [want[0], want[0]])
    same([digits.predict(chw[0], k=3)], want[:1])  # one tensor: one prediction
    rgba = [np.concatenate([a, np.full(a.shape[:2] + (1,), 7, np.uint8)], axis=2) for a in arrs]
    same(digits.predict(rgba, k=3), want)  # alpha dropped
    same(digits.predict([Image.fromarray(a, "RGBA") for a in rgba], k=3), want)
    with pytest.raises(DeployError, match=r"image 0: expected a uint8 tensor .*normalises its inputs itself"):
        digits.predict(chw[0].float() / 255)


def test_predict_embeddings_and_thresholds(multi):
    arrs = _images(3)
    emb = multi.predict(arrs, task="mnist_ret")
    with torch.no_grad():
        want = multi(torch.cat([_input(multi, "mnist_ret", a) for a in arrs]), "mnist_ret").numpy()
    np.testing.assert_allclose(np.stack([e.embedding for e in emb]), want, atol=1e-6)
    assert all(abs(np.linalg.norm(e.embedding) - 1) < 1e-5 and e.threshold is None for e in emb)
    face = multi.predict(arrs[0], task="faces")
    assert face.output == "embedding" and face.threshold is not None
    assert face.threshold == multi.info.heads["faces"].threshold


def test_server_and_predict_read_outputs_the_same_way(digits):
    head = digits.info.heads["digits"]
    pred = read_output("digits", np.array([0.0, 2.0, 1.0] + [-5.0] * 7, np.float32), head, k=2)
    assert pred.indices == [1, 2] and [label for label, _ in pred.top_k] == ["1", "2"]
    assert sum(p for _, p in pred.top_k) < 1


# ----- errors: one line, naming the task, file or field -----


def test_errors_are_one_clear_line(digits, multi, tmp_path):
    cases = [
        (DeployError, "unknown task 'nope'; this model serves", lambda: multi.predict(_images(1), task="nope")),
        (DeployError, "serves several tasks .*name one with task=", lambda: multi.predict(_images(1))),
        (DeployError, "image 1: expected a uint8 array", lambda: digits.predict([_images(1)[0], np.zeros((4, 4, 2))])),
        (DeployError, "image 0: expected a PIL image", lambda: digits.predict([3])),
        (DeployError, r"image 0 \(.*missing.png\) cannot be read", lambda: digits.predict(tmp_path / "missing.png")),
        (CheckpointError, "has no config.json and no model.safetensors", lambda: ufo.load(tmp_path)),
    ]
    for kind, msg, call in cases:
        _one_line(kind, msg, call)
    (tmp_path / "pipeline" / "chip_supernet").mkdir(parents=True)
    _one_line(CheckpointError, r"pipeline is a `ufo run` folder, not a model", lambda: ufo.load(tmp_path / "pipeline"))
    other = save_pretrained(digits, tmp_path / "a")
    save_pretrained(multi, tmp_path / "b")
    (tmp_path / "b" / CONFIG).write_bytes((other / CONFIG).read_bytes())  # config.json of another save
    _one_line(CheckpointError, r"config.json: ufo.weights_sha256 does not match", lambda: ufo.load(tmp_path / "b"))
    (tmp_path / "b" / CONFIG).write_text("{")
    _one_line(CheckpointError, r"b/config.json is not valid JSON", lambda: ufo.load(tmp_path / "b"))


def _one_line(kind: type, msg: str, call) -> None:
    with pytest.raises(UFOError) as e:
        call()
    assert isinstance(e.value, kind) and "\n" not in str(e.value), str(e.value)
    assert e.match(msg)
