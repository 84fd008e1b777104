import json
import os

import pytest
import torch

from helpers import TASKS, tiny_space
from ufo.checkpoint import (
    MANIFEST_KEY,
    load_checkpoint,
    load_extracted,
    load_supernet,
    read_manifest,
    save_checkpoint,
    save_extracted,
    save_supernet,
)
from ufo.errors import CheckpointError, StorageError
from ufo.nn import SuperViT, extract


def _equal_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_supernet_round_trip(tmp_path):
    space = tiny_space()
    model = SuperViT(space)
    path = tmp_path / "super.safetensors"
    save_supernet(path, model, extra={"config": {"seed": 3}})
    loaded = load_supernet(path, space)
    assert _equal_state(model, loaded)
    manifest = read_manifest(path)
    assert manifest["tasks"] == TASKS and manifest["config"] == {"seed": 3}
    assert manifest["routes"] == model.routes() and len(manifest["router"]["cls"]) == 3
    assert manifest["ufo_version"] and manifest["torch_version"] == torch.__version__
    x = torch.randn(2, 3, 16, 16)
    model.eval(), loaded.eval()
    assert torch.equal(model(x, "faces"), loaded(x, "faces"))


@pytest.mark.parametrize("tasks", [["cls"], TASKS])
def test_extracted_round_trip(tmp_path, tasks):
    space = tiny_space()
    model = SuperViT(space).eval()
    sub = extract(model, space.sample(2), tasks)
    save_extracted(tmp_path / "sub.safetensors", sub, space)
    back = load_extracted(tmp_path / "sub.safetensors")
    assert _equal_state(sub, back) and back.ufo_arch == sub.ufo_arch
    x = torch.randn(2, 3, 16, 16)
    args = () if len(tasks) == 1 else (tasks[-1],)
    with torch.no_grad():
        assert torch.equal(sub(x, *args), back(x, *args))
    assert read_manifest(tmp_path / "sub.safetensors")["num_params"] == space.num_params(sub.ufo_arch, tasks)


def test_no_pickle_in_the_file(tmp_path):
    save_supernet(tmp_path / "m.safetensors", SuperViT(tiny_space()))
    raw = (tmp_path / "m.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert MANIFEST_KEY in header["__metadata__"]
    assert b"\x80\x04" not in raw[:16]  # no pickle protocol marker where torch.save would put one


def test_wrong_space_or_tasks_is_named(tmp_path):
    path = tmp_path / "m.safetensors"
    save_supernet(path, SuperViT(tiny_space()))
    with pytest.raises(CheckpointError, match=r"tasks \(checkpoint \['cls', 'faces', 'signs'\] vs model \['cls'\]\)"):
        load_supernet(path, tiny_space(tasks=["cls"]))
    with pytest.raises(CheckpointError, match="embed_dim"):
        load_supernet(path, tiny_space(embed_dim=[16, 32, 48]))


def test_shape_mismatch_lists_tensors(tmp_path):
    from ufo.checkpoint import load_state_checked

    small, big = SuperViT(tiny_space(tasks=["cls"])), SuperViT(tiny_space())
    tensors = big.state_dict()
    with pytest.raises(
        CheckpointError, match=r"unexpected: .*experts\.faces.*router_logits: checkpoint \(3, 3\) vs model \(1, 3\)"
    ):
        load_state_checked(small, tensors, "big.safetensors")


def test_corrupt_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "m.safetensors"
    save_supernet(good, SuperViT(tiny_space()))
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        load_supernet(trunc)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_supernet(junk)
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="no UFO manifest"):
        load_supernet(foreign)
    with pytest.raises(CheckpointError, match="not found"):
        load_supernet(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="not a supernet"):
        sub = extract(SuperViT(tiny_space()), tiny_space().sample(0), "cls")
        save_extracted(tmp_path / "sub.safetensors", sub, tiny_space())
        load_supernet(tmp_path / "sub.safetensors")


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)}, {"kind": "test", "step": 1})
    import ufo.checkpoint as ck

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(StorageError, match=r"cannot write .*ckpt\.safetensors: No space left"):
        save_checkpoint(path, {"w": torch.zeros(3)}, {"kind": "test", "step": 2})
    tensors, manifest = load_checkpoint(path)
    assert manifest["step"] == 1 and torch.equal(tensors["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temp file left behind
    assert os.stat(path).st_size > 0
