"""Webdataset shards: write_shards -> read_webdataset round trips (bytes, labels, identities,
pairs, pixels), random-access indexing, corrupt shards, foreign tars and `ufo data pack`."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_layouts import make_lfw, make_market
from typer.testing import CliRunner

from helpers import make_image_folder
from ufo.cli import app
from ufo.config import parse_config
from ufo.data.build import build_task_data
from ufo.data.layouts import read_lfw, read_market1501
from ufo.data.readers import read_image_folder
from ufo.data.shards import read_webdataset, write_shards
from ufo.data.store import TarStore
from ufo.errors import DataError


@pytest.fixture
def market(tmp_path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_market1501(make_market(tmp_path / "m"), lazy=True)


def test_file_set_round_trip_keeps_bytes_metadata_and_pixels(market, tmp_path):
    index = write_shards(market, tmp_path / "shards", maxcount=7)
    assert [s["samples"] for s in index["shards"]] == [7, 7, 5] and index["num_samples"] == 19
    assert [s["file"] for s in index["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert index["counts"] == market.counts().tolist() and index["class_names"] == market.class_names
    back = read_webdataset(tmp_path / "shards", lazy=True)
    assert isinstance(back.store, TarStore) and not back.in_memory and len(back) == 19
    assert back.labels.tolist() == market.labels.tolist() and back.class_names == market.class_names
    assert back.identities.tolist() == market.identities.tolist() and back.cameras.tolist() == market.cameras.tolist()
    assert back.split == market.split and back.name == "market1501"
    for i in range(len(back)):  # the JPEG bytes themselves, never re-encoded
        assert back.store.raw(i) == Path(market.store.path(i)).read_bytes()
    assert back.origin[8].endswith("shard-000001.tar:000000008.jpg")
    assert torch.equal(back.to_memory().images, market.to_memory().images)
    eager = read_webdataset(tmp_path / "shards", image_size=(16, 8))
    assert torch.equal(eager.images, market.to_memory((16, 8)).images)
    sub = back.subset([18, 0])  # random access across shards
    assert torch.equal(sub.to_memory().images, market.subset([18, 0]).to_memory().images)


def test_in_memory_set_is_written_as_png_and_reads_back_exactly(tmp_path):
    ds = read_image_folder(make_image_folder(tmp_path / "imgs", classes=3, per_class=4), image_size=(12, 20))
    index = write_shards(ds, tmp_path / "s", maxcount=100)
    with tarfile.open(tmp_path / "s" / index["shards"][0]["file"]) as tf:
        names = tf.getnames()
        meta = json.load(tf.extractfile("000000005.json"))
    assert names[:2] == ["000000000.json", "000000000.png"] and len(names) == 24
    assert meta == {
        "label": 1,
        "class_name": "c1",
        "identity": None,
        "camera": None,
        "split": None,
        "origin": ds.origin[5],
    }
    back = read_webdataset(tmp_path / "s")
    assert torch.equal(back.images, ds.images) and back.labels.tolist() == ds.labels.tolist()
    assert back.identities is None and back.split is None and back.class_names == ["c0", "c1", "c2"]
    with pytest.raises(DataError, match="already holds shards"):
        write_shards(ds, tmp_path / "s")
    assert write_shards(ds.subset([0, 1]), tmp_path / "s", overwrite=True)["num_samples"] == 2
    assert len(read_webdataset(tmp_path / "s", lazy=True)) == 2


def test_lfw_pairs_survive_packing_and_reach_the_verification_task(tmp_path):
    root = make_lfw(tmp_path / "l")
    ds = read_lfw(root, lazy=True)
    write_shards(ds, tmp_path / "s", maxcount=4)
    back = read_webdataset(tmp_path / "s", lazy=True)
    assert np.array_equal(back.pairs, ds.pairs) and back.split == ds.split
    assert back.identities.tolist() == ds.identities.tolist()
    cfg = parse_config(
        {
            "seed": 0,
            "model": {
                "img_size": 16,
                "patch_size": 4,
                "head_dim": 8,
                "depth": [1],
                "embed_dim": [16],
                "num_heads": [2],
                "mlp_ratio": [2.0],
            },
            "tasks": {
                "f": {
                    "kind": "verification",
                    "options": {"k": 2},
                    "data": {"reader": "webdataset", "path": str(tmp_path / "s"), "cache": "stream"},
                }
            },
        }
    )
    d = build_task_data("f", cfg.tasks["f"], cfg)
    assert not d.eval["test"].in_memory and len(d.eval["test"].pairs) == 20 and len(d.train) == 7


def test_skipped_source_image_drops_its_pairs(tmp_path):
    root = make_lfw(tmp_path / "l")
    ds = read_lfw(root, lazy=True)
    (root / "lfw" / "Bo_Chen" / "Bo_Chen_0002.jpg").unlink()
    with pytest.raises(DataError, match=r"cannot read image .*Bo_Chen_0002\.jpg"):
        write_shards(ds, tmp_path / "s")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image"):
        index = write_shards(ds, tmp_path / "s", on_error="skip", overwrite=True)
    names = [Path(o).name for o in ds.origin]
    kept = [i for i, n in enumerate(names) if n != "Bo_Chen_0002.jpg"]
    want = [(names[a], names[b]) for a, b, _, _ in ds.pairs if "Bo_Chen_0002.jpg" not in (names[a], names[b])]
    assert index["num_samples"] == 14 and len(index["pairs"]) == len(want) == 15  # 5 pairs named Bo_Chen_0002
    back = read_webdataset(tmp_path / "s", lazy=True)
    assert [(names[kept[a]], names[kept[b]]) for a, b, _, _ in back.pairs] == want


def test_corrupt_or_truncated_shard_is_named(market, tmp_path):
    out = tmp_path / "s"
    write_shards(market, out, maxcount=7)
    shard = out / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"webdataset shard .*shard-000001\.tar is corrupt or truncated"):
        read_webdataset(out, lazy=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        at = tf.getmembers()[4].offset  # the third sample's first header
    shard.write_bytes(data[:at] + b"x" * 512 + data[at + 512 :])  # tarfile alone would stop there silently
    with pytest.raises(DataError, match=r"shard-000001\.tar is corrupt or truncated: no valid tar header"):
        read_webdataset(out, lazy=True)
    shard.write_bytes(b"garbage" * 100)
    with pytest.raises(DataError, match=r"shard-000001\.tar is corrupt or truncated"):
        read_webdataset(out, lazy=True)
    shard.unlink()
    with pytest.raises(DataError, match=r"shard-000001\.tar listed in .*index\.json does not exist"):
        read_webdataset(out, lazy=True)


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def test_foreign_shards_without_index_use_cls_members(market, tmp_path):
    jpg = [Path(market.store.path(i)).read_bytes() for i in range(3)]
    out = tmp_path / "foreign"
    out.mkdir()
    _tar(out / "a.tar", {"x/s1.jpg": jpg[0], "x/s1.cls": b"7\n", "x/s2.jpg": jpg[1], "x/s2.cls": b"3"})
    _tar(out / "b.tar", {"s3.jpeg": jpg[2], "s3.json": b'{"label": 7, "identity": 4}'})
    ds = read_webdataset(out, lazy=True)
    assert ds.class_names == ["3", "7"] and ds.labels.tolist() == [1, 0, 1]
    assert ds.identities.tolist() == [-1, -1, 4] and ds.origin[2].endswith("b.tar:s3.jpeg")
    assert ds.store.raw(2) == jpg[2]
    _tar(out / "c.tar", {"s4.jpg": jpg[0]})
    with pytest.raises(DataError, match=r"c\.tar: sample 's4' has no label"):
        read_webdataset(out)
    with pytest.warns(UserWarning, match=r"skipped 1 sample"):
        assert len(read_webdataset(out, on_error="skip", lazy=True)) == 3
    (out / "c.tar").unlink()
    (out / "a.tar").rename(out / "a.tar.gz")
    (out / "b.tar").unlink()
    with pytest.raises(DataError, match="only compressed a.tar.gz"):
        read_webdataset(out)


def test_cli_data_pack_writes_shards_a_config_can_read(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=3)
    runner = CliRunner()
    r = runner.invoke(app, ["data", "pack", str(folder), str(tmp_path / "s"), "--maxcount", "4"])
    assert r.exit_code == 0, r.output
    assert "wrote 2 shard(s) with 6 images (2 classes)" in " ".join(r.output.split())
    back = read_webdataset(tmp_path / "s", lazy=True)
    src = read_image_folder(folder, lazy=True)
    assert back.labels.tolist() == src.labels.tolist() and back.store.raw(5) == Path(src.store.path(5)).read_bytes()
    r = runner.invoke(app, ["data", "pack", str(folder), str(tmp_path / "s")])
    assert r.exit_code == 2 and "already holds shards" in " ".join(r.output.split())
    r = runner.invoke(app, ["data", "pack", str(folder), str(tmp_path / "t"), "--reader", "nope"])
    assert r.exit_code == 2 and "--reader 'nope'" in " ".join(r.output.split())
