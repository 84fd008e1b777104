"""Initialisation from timm ViT weights and from SimMIM pre-training; the MIM stage itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from helpers import tiny_space
from ufo.checkpoint import load_checkpoint
from ufo.config import parse_config
from ufo.errors import CheckpointError, ConfigError, UFOError
from ufo.model import UFOModel
from ufo.nn.vit import SuperViT
from ufo.tasks import task_class
from ufo.train.init import apply_init, init_from_mim, init_from_timm
from ufo.train.loop import Trainer
from ufo.train.mim import SimMIM, masked_l1, patchify, random_mask

BIN = Path(sys.executable).parent
SPACE = tiny_space(depth=[2], embed_dim=[24], num_heads=[3], mlp_ratio=[2.0])  # img 16, patch 4, head_dim 8
MODEL = {
    "img_size": 16,
    "patch_size": 4,
    "head_dim": 8,
    "depth": [2],
    "embed_dim": [24],
    "num_heads": [3],
    "mlp_ratio": [2.0],
    "drop_path_rate": 0.1,
}
TRAIN = {"steps": 4, "batch_size": 16, "log_every": 1, "ckpt_every": 2, "warmup_steps": 1, "threads": 1}


def _timm(perturb: bool = True, **kw) -> VisionTransformer:
    """A random timm ViT (no download); weights perturbed so that zeros and ones are not trivially right."""
    args = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=5)
    vit = VisionTransformer(**{**args, **kw}).eval()
    if perturb:
        with torch.no_grad():
            for p in vit.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return vit


def _with_paths(space, path: str):
    a = space.largest()
    return a.model_copy(update={"paths": {t: [path] * a.depth for t in space.tasks}})


def _cfg(stage: str = "all_in_one", tasks: dict | None = None, **extra) -> dict:
    tasks = tasks or {"digits": {"kind": "classification", "data": {"recipe": "digits"}}}
    return {"name": "init", "seed": 2, "model": MODEL, "tasks": tasks, "train": {**TRAIN, "stage": stage}, **extra}


# ----- timm -----


@pytest.mark.parametrize("init_values", [None, 0.1])  # 0.1: layer scale, folded into proj and fc2
def test_timm_weights_give_identical_features(init_values):
    ref = _timm(init_values=init_values)
    model = SuperViT(SPACE).eval()
    report = init_from_timm(model, ref.state_dict())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = ref.forward_features(x)
        for path in ("shared", "task", "mix"):  # every task expert starts as a copy of timm's MLP
            model.set_arch(_with_paths(SPACE, path))
            for task in range(len(SPACE.tasks)):
                assert (model.forward_features(x, task) - want).abs().max().item() <= 1e-5
        assert (model(x, 0) - ref.forward_head(want, pre_logits=True)).abs().max().item() <= 1e-5
    assert report.resized == []
    assert report.unused_source == ["head.weight", "head.bias"]
    assert sorted(report.uninitialised) == sorted(
        f"blocks.{i}.mlp.{k}" for i in range(2) for k in ("router_logits", "mix_logits")
    )
    assert ("blocks.1.mlp.fc2.weight", "blocks.1.mlp.experts.signs.fc2.weight") in report.mapped


def test_resized_and_unmapped_tensors_are_listed():
    # timm: 24 px images, 8 px patches (3x3 grid), 2 heads of 16, width 32, depth 3; ours: 4x4 grid,
    # 3 heads of 8, width 24, depth 4
    ref = _timm(img_size=24, patch_size=8, embed_dim=32, num_heads=2, depth=3)
    space = tiny_space(depth=[4], embed_dim=[24], num_heads=[3], mlp_ratio=[2.0])
    model = SuperViT(space)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_from_timm(model, ref.state_dict(), num_heads=2)
    resized = {r.name: (tuple(r.from_shape), tuple(r.to_shape), r.how) for r in report.resized}
    assert resized["patch_embed.proj.weight"][:2] == ((32, 3, 8, 8), (24, 3, 4, 4))
    assert "resample_patch_embed" in resized["patch_embed.proj.weight"][2]
    assert resized["pos_embed"][:2] == ((1, 10, 32), (1, 17, 24))
    assert "resample_abs_pos_embed" in resized["pos_embed"][2]
    assert resized["blocks.0.attn.qkv.weight"][:2] == ((96, 32), (72, 24))
    assert "heads 2x16 -> 3x8" in resized["blocks.0.attn.qkv.weight"][2]
    assert resized["blocks.2.mlp.shared.fc1.weight"][:2] == ((64, 32), (48, 24))
    assert {"head.weight", "head.bias"} <= set(report.unused_source)
    assert not any(k.startswith("blocks.3.") for k in report.unused_source)  # timm has 3 blocks, all used
    assert {k for k in report.uninitialised if k.startswith("blocks.3.")} == {
        k for k in fresh if k.startswith("blocks.3.")
    }
    sd, st = ref.state_dict(), model.state_dict()
    assert torch.equal(st["norm.weight"], sd["norm.weight"][:24])  # first-k slice
    assert torch.equal(st["blocks.3.attn.qkv.weight"], fresh["blocks.3.attn.qkv.weight"])  # left alone
    # qkv through the structured view: our head h, dims :8 are timm's head h (h < 2), dims :8
    q_ours = st["blocks.0.attn.qkv.weight"].view(3, 3, 8, 24)
    q_timm = sd["blocks.0.attn.qkv.weight"].view(3, 2, 16, 32)
    assert torch.equal(q_ours[:, :2], q_timm[:, :, :8, :24])
    assert torch.equal(q_ours[:, 2], fresh["blocks.0.attn.qkv.weight"].view(3, 3, 8, 24)[:, 2])
    assert "resized" in report.summary() and "head.weight" in report.summary()


def test_narrower_timm_model_fills_the_leading_slice():
    ref = _timm(embed_dim=16, num_heads=2, in_chans=3)  # 2 heads of 8, width 16
    model = SuperViT(tiny_space(depth=[2], embed_dim=[24], num_heads=[3], mlp_ratio=[2.0], in_chans=1))
    fresh = model.state_dict()["cls_token"].clone()
    report = init_from_timm(model, ref.state_dict())
    st = model.state_dict()
    assert torch.equal(st["cls_token"][..., :16], ref.cls_token.data)
    assert torch.equal(st["cls_token"][..., 16:], fresh[..., 16:])
    how = {r.name: r.how for r in report.resized}["patch_embed.proj.weight"]
    assert "in_chans 3 -> 1" in how
    assert torch.allclose(st["patch_embed.proj.weight"][:16], ref.patch_embed.proj.weight.sum(1, keepdim=True))


def test_timm_init_from_files_through_the_trainer(tmp_path):
    ref = _timm()
    sd = ref.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "vit.safetensors"))
    torch.save(sd, tmp_path / "vit.pth")
    torch.save({"model": sd, "epoch": 3}, tmp_path / "wrapped.pt")
    for name in ("vit.safetensors", "vit.pth", "wrapped.pt"):
        cfg = parse_config(_cfg(init={"kind": "timm", "path": str(tmp_path / name)}))
        tr = Trainer(cfg, tmp_path / name.replace(".", "_"), show_progress=False)
        report = apply_init(tr.model, cfg, tr.out)
        st = tr.model.state_dict()
        assert torch.equal(st["backbone.blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])
        assert torch.equal(st["backbone.blocks.0.mlp.experts.digits.fc1.bias"], sd["blocks.0.mlp.fc1.bias"])
        assert any(k.startswith("heads.digits.") for k in report.uninitialised)
        saved = json.loads((tr.out / "init_report.json").read_text())
        assert saved["kind"] == "timm" and sorted(saved["unused_source"]) == ["head.bias", "head.weight"]


def test_trainer_applies_init_only_when_not_resuming(tmp_path, monkeypatch):
    from ufo.train import loop

    torch.save(_timm().state_dict(), tmp_path / "vit.pth")
    cfg = parse_config(_cfg(init={"kind": "timm", "path": str(tmp_path / "vit.pth")}, train={**TRAIN, "steps": 2}))
    loop.Trainer(cfg, tmp_path / "r", show_progress=False).fit()
    assert json.loads((tmp_path / "r" / "init_report.json").read_text())["kind"] == "timm"
    monkeypatch.setattr(loop, "apply_init", lambda *a: pytest.fail("init applied on resume"))
    loop.Trainer(cfg, tmp_path / "r", show_progress=False).fit(resume=True)


def test_bad_sources_give_clear_errors(tmp_path, monkeypatch):
    model = SuperViT(SPACE)
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pth.*cannot read"):
        init_from_timm(model, bad)
    with pytest.raises(CheckpointError, match="garbage.safetensors.*cannot read"):
        (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 16)
        init_from_timm(model, tmp_path / "garbage.safetensors")
    with pytest.raises(CheckpointError, match="file not found.*nope.pth"):
        init_from_timm(model, tmp_path / "nope.pth")
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="resnet.pth does not look like a timm VisionTransformer"):
        init_from_timm(model, tmp_path / "resnet.pth")
    with pytest.raises(ConfigError, match="init.timm_model.*'no_such_vit'"):
        init_from_timm(model, timm_model="no_such_vit")

    def offline(*a, **kw):
        raise OSError("network is unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UFOError, match="(?s)vit_tiny_patch16_224.*internet.*init.path"):
        init_from_timm(model, timm_model="vit_tiny_patch16_224")
    with pytest.raises(ConfigError, match="init: kind 'timm' needs exactly one of"):
        parse_config(_cfg(init={"kind": "timm"}))
    with pytest.raises(ConfigError, match="mim.mask_patch_size: 6"):
        parse_config(_cfg(mim={"mask_patch_size": 6}))


# ----- MIM -----


def _simmim(**kw) -> SimMIM:
    heads = {t: task_class("classification")(t, {}, 5, SPACE.max_embed_dim) for t in SPACE.tasks}
    ufo = UFOModel(SPACE, heads)
    ufo.set_arch(_with_paths(SPACE, "shared"))
    return SimMIM(ufo, kw.get("mask_patch_size", 8), kw.get("mask_ratio", 0.6)).eval()


def test_masks_cover_whole_mask_patches():
    mask = random_mask(5, 16, 4, 8, 0.6)
    assert mask.shape == (5, 16) and mask.dtype == torch.bool
    assert (mask.sum(1) == 3 * 4).all()  # ceil(0.6 * 4) = 3 mask patches of 2x2 model patches each
    grid = mask.view(5, 2, 2, 2, 2)  # (B, gh, 2, gw, 2) blocks are all-or-nothing
    assert (grid.all(2).all(3) == grid.any(2).any(3)).all()


def test_mim_loss_is_on_masked_pixels_only():
    mim = _simmim()
    x = torch.randn(4, 3, 16, 16)
    mask = mim.random_mask(4)
    target = patchify(x, 4)
    pred = torch.randn_like(target)
    loss = masked_l1(pred, target, mask)
    assert torch.isclose(loss, (pred - target).abs()[mask].mean())
    changed = target.clone()
    changed[~mask] += 10.0
    assert masked_l1(pred, changed, mask) == loss
    changed[mask] += 1.0
    assert masked_l1(pred, changed, mask) != loss
    # the encoder never sees the masked pixels: changing them leaves every prediction unchanged
    pix = mask.view(4, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)  # (B, 1, H, W)
    with torch.no_grad():
        assert torch.equal(mim.predict(x, mask), mim.predict(torch.where(pix, x + 5.0, x), mask))


def test_forward_features_mask_keeps_behaviour_and_state():
    vit = _simmim().backbone
    assert "mask_token" not in "".join(vit.state_dict())
    x, ids = torch.randn(4, 3, 16, 16), torch.tensor([2, 0, 1, 0])
    none = torch.zeros(4, 16, dtype=torch.bool)
    token = torch.randn(SPACE.max_embed_dim)
    with torch.no_grad():
        assert torch.equal(vit.forward_features(x, ids), vit.forward_features(x, ids, none, token))
        mask = random_mask(4, 16, 4, 8, 0.5)
        mixed = vit.forward_features(x, ids, mask, token)  # rows are regrouped by task, masks with them
        for i in range(4):
            assert torch.allclose(
                mixed[i], vit.forward_features(x[i : i + 1], int(ids[i]), mask[i : i + 1], token)[0], atol=1e-6
            )
    with pytest.raises(ValueError, match="mask_token"):
        vit.forward_features(x, 0, mask)


def test_mim_run_initialises_an_all_in_one_trainer(tmp_path):
    cfg = tmp_path / "mim.yaml"
    # with an EMA, the shipped weights (model.safetensors) are the EMA's; its training checkpoint
    # holds both, and an init from it takes the EMA's too
    mim_train = {**TRAIN, "stage": "pretrain_mim", "ema_decay": 0.5}
    cfg.write_text(yaml.safe_dump(_cfg("pretrain_mim", mim={"mask_ratio": 0.5}, train=mim_train)))
    res = subprocess.run(
        [str(BIN / "ufo"), "train", str(cfg), "--out", str(tmp_path / "mim")], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    mim_w, manifest = load_checkpoint(tmp_path / "mim" / "model.safetensors")
    assert manifest["kind"] == "ufo_model" and manifest["config"]["train"]["stage"] == "pretrain_mim"

    # another task list: MIM weights are task-independent
    tasks = {
        "a": {"kind": "classification", "data": {"recipe": "digits"}},
        "b": {"kind": "retrieval", "data": {"recipe": "digits"}, "options": {"embedding_dim": 8}},
    }
    aio = parse_config(_cfg(tasks=tasks, init={"kind": "mim", "path": str(tmp_path / "mim")}))
    tr = Trainer(aio, tmp_path / "aio", show_progress=False)
    report = apply_init(tr.model, aio, tr.out)
    st = tr.model.backbone.state_dict()
    trained = [k for k in st if ".experts." not in k and not k.endswith(("router_logits", "mix_logits"))]
    for k in trained:
        assert torch.equal(st[k], mim_w["backbone." + k]), k
    for k in st:
        if ".experts." in k:
            assert torch.equal(st[k], st[k.replace(".experts.a.", ".shared.").replace(".experts.b.", ".shared.")])
    assert {f"backbone.{k}" for k in trained} <= {o for _, o in report.mapped}
    assert any(k.startswith("backbone.blocks.0.mlp.experts.digits") for k in report.unused_source)
    # the MIM run's training checkpoint works too
    tr.model.backbone.blocks[0].attn.qkv.weight.data.zero_()
    report2 = init_from_mim(tr.model, tmp_path / "mim" / "checkpoints" / "latest.safetensors")
    assert len(report2.mapped) == len(report.mapped)
    st = tr.model.backbone.state_dict()
    assert all(torch.equal(st[k], mim_w["backbone." + k]) for k in trained)  # the EMA's, not the raw weights
    tr.fit()  # an all_in_one run is no MIM run
    assert json.loads((tmp_path / "aio" / "init_report.json").read_text())["kind"] == "mim"
    with pytest.raises(CheckpointError, match="'all_in_one' run, not the model or training checkpoint of a MIM"):
        init_from_mim(tr.model, tmp_path / "aio")


def test_mim_resume_is_exact(tmp_path):
    cfg = parse_config(_cfg("pretrain_mim", train={**TRAIN, "stage": "pretrain_mim", "steps": 6, "ckpt_every": 3}))
    Trainer(cfg, tmp_path / "full", show_progress=False).fit()

    cut = Trainer(cfg, tmp_path / "cut", show_progress=False)
    step = cut.train_step

    def dies_after_the_checkpoint():
        if cut.step == 4:  # one step past the step-3 checkpoint, which the resume rolls back
            raise KeyboardInterrupt
        return step()

    cut.train_step = dies_after_the_checkpoint
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    Trainer(cfg, tmp_path / "cut", show_progress=False).fit(resume=True)
    for f in ("model.safetensors", "checkpoints/latest.safetensors"):
        a, b = load_checkpoint(tmp_path / "full" / f)[0], load_checkpoint(tmp_path / "cut" / f)[0]
        assert a.keys() == b.keys()
        assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6, f
    assert "model.mask_token" in a and "model.pixel_head.weight" in a
