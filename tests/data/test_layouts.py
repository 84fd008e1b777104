"""Readers of public layouts (Market-1501, LFW, Stanford Online Products, ImageNet) on tiny
fixtures written in exactly those layouts, and their official splits flowing into TaskData."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ufo.config import parse_config
from ufo.data.build import build_task_data
from ufo.data.layouts import read_imagenet, read_lfw, read_market1501, read_sop
from ufo.errors import DataError
from ufo.tasks import task_class

SIZE = (12, 20)  # (H, W) of every fixture image


def _img(path: Path, seed: int, fmt: str = "JPEG") -> None:
    """A 20x12 image whose colour follows `seed`."""
    rng = np.random.default_rng(seed)
    arr = np.clip(rng.integers(40, 216, 3) + rng.normal(0, 20, (*SIZE, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


# ------------------------------------------------------------------------------ fixture layouts
MARKET_TRAIN = {2: 3, 5: 3, 7: 2}  # person -> images (cameras 1, 2, 3, ...)
MARKET_TEST = (11, 12, 13)


def make_market(root: Path) -> Path:
    """Market-1501: 8 training images of 3 people, one query per test person (camera 1), a gallery
    with each test person on cameras 1 and 2, two 0000 distractors and two -1 junk images."""
    for pid, n in MARKET_TRAIN.items():
        for k in range(n):
            _img(root / "bounding_box_train" / f"{pid:04d}_c{k + 1}s1_{100 * k:06d}_00.jpg", pid)
    for pid in MARKET_TEST:
        _img(root / "query" / f"{pid:04d}_c1s2_000500_00.jpg", pid)
        for cam in (1, 2):
            _img(root / "bounding_box_test" / f"{pid:04d}_c{cam}s3_000{600 + cam}_01.jpg", pid)
    for k in range(2):
        _img(root / "bounding_box_test" / f"0000_c{k + 1}s1_00070{k}_00.jpg", 99)
        _img(root / "bounding_box_test" / f"-1_c{k + 1}s1_00080{k}_00.jpg", 98)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")
    return root


LFW_PEOPLE = {"Ann_Lee": 3, "Bo_Chen": 2, "Cy_Diaz": 2, "Dee_Ek": 1, "Eve_Fox": 3, "Fay_Gu": 2, "Gil_Ho": 2}
LFW_TEST = ("Ann_Lee", "Bo_Chen", "Cy_Diaz", "Dee_Ek")


def _lfw_pair_lines() -> list[str]:
    """10 folds x (1 matched + 1 mismatched) pairs over the test people."""
    matched = [("Ann_Lee", 1, 2), ("Ann_Lee", 1, 3), ("Ann_Lee", 2, 3), ("Bo_Chen", 1, 2), ("Cy_Diaz", 1, 2)] * 2
    people = list(LFW_TEST)
    lines = []
    for k in range(10):
        lines.append("{}\t{}\t{}".format(*matched[k]))
        a, b = people[k % 4], people[(k + 1) % 4]
        lines.append(f"{a}\t{1 + k % LFW_PEOPLE[a]}\t{b}\t{1}")
    return lines


def make_lfw(root: Path, sub: str = "lfw") -> Path:
    """LFW: `root/lfw/PERSON/PERSON_NNNN.jpg` plus `root/pairs.txt` (header '10 1')."""
    for p, (person, n) in enumerate(LFW_PEOPLE.items()):
        for k in range(1, n + 1):
            _img(root / sub / person / f"{person}_{k:04d}.jpg", p)
    (root / "pairs.txt").write_text("10\t1\n" + "\n".join(_lfw_pair_lines()) + "\n")
    return root


SOP_TRAIN = {101: "bicycle", 102: "bicycle", 103: "chair"}  # class_id -> super class folder
SOP_TEST = {201: "chair", 202: "kettle"}


def make_sop(root: Path, test: dict[int, str] = SOP_TEST) -> Path:
    """Stanford Online Products: two images per product, listed in Ebay_train.txt / Ebay_test.txt."""
    supers = {"bicycle": 1, "chair": 2, "kettle": 3}
    n = 0
    for fname, classes in (("Ebay_train.txt", SOP_TRAIN), ("Ebay_test.txt", test)):
        lines = ["image_id class_id super_class_id path"]
        for cid, sup in classes.items():
            for k in range(2):
                n += 1
                rel = f"{sup}_final/{cid}_{k}.JPG"
                _img(root / rel, cid)
                lines.append(f"{n} {cid} {supers[sup]} {rel}")
        (root / fname).write_text("\n".join(lines) + "\n")
    return root


WNIDS = ("n01440764", "n01443537", "n01484850")


def make_imagenet(root: Path, flat_val: bool = False) -> Path:
    """ImageNet: train/<wnid>/ with 2 images each; val/<wnid>/ with one each, or a flat val/ with
    LOC_val_solution.csv beside train/."""
    rows = ["ImageId,PredictionString"]
    for c, w in enumerate(WNIDS):
        for k in range(2):
            _img(root / "train" / w / f"{w}_{k}.JPEG", c)
        vid = f"ILSVRC2012_val_{c + 1:08d}"
        _img(root / "val" / (f"{vid}.JPEG" if flat_val else f"{w}/{vid}.JPEG"), c)
        rows.append(f"{vid},{w} 10 20 30 40 {w} 1 2 3 4")
    if flat_val:
        (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


def make_csv(root: Path, rows: list[tuple[str, str, str]], camera: list[str] | None = None) -> Path:
    """A CSV manifest `path,label,identity,split[,camera]`, one image per (label, identity, split)
    row; an identity or camera may be empty (unknown)."""
    lines = ["path,label,identity,split" + (",camera" if camera else "")]
    for i, (label, ident, split) in enumerate(rows):
        _img(root / "img" / f"{i:02d}.jpg", seed=i)
        lines.append(f"img/{i:02d}.jpg,{label},{ident},{split}" + (f",{camera[i]}" if camera else ""))
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    return root / "m.csv"


def _names(ds) -> list[str]:
    return [Path(o).name for o in ds.origin]


# ------------------------------------------------------------------------------ Market-1501
def test_market1501_ids_cameras_splits_and_the_protocols_junk(tmp_path):
    with pytest.warns(UserWarning, match=r"left out 2 images .*2 junk \(-1\) in bounding_box_test"):
        ds = read_market1501(make_market(tmp_path / "Market-1501-v15.09.15").parent, lazy=True)
    assert not ds.in_memory and len(ds) == 8 + 3 + 6 + 2
    assert ds.split == ["train"] * 8 + ["query"] * 3 + ["gallery"] * 8
    assert ds.identities.tolist() == [2, 2, 2, 5, 5, 5, 7, 7, 11, 12, 13, -1, -1, 11, 11, 12, 12, 13, 13]
    assert ds.cameras.tolist()[:8] == [1, 2, 3, 1, 2, 3, 1, 2] and ds.cameras.tolist()[8:11] == [1, 1, 1]
    assert ds.class_names == ["0000", "0002", "0005", "0007", "0011", "0012", "0013"]
    assert [ds.class_names[i] for i in ds.labels[:8].tolist()] == ["0002"] * 3 + ["0005"] * 3 + ["0007"] * 2
    assert _names(ds)[11] == "0000_c1s1_000700_00.jpg" and not any(n.startswith("-1") for n in _names(ds))


def test_market1501_lazy_and_eager_decode_alike(tmp_path):
    root = make_market(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lazy = read_market1501(root, lazy=True)
        eager = read_market1501(root, image_size=(16, 8))
    assert eager.in_memory and eager.image_shape == (3, 16, 8)
    mem = lazy.to_memory((16, 8))
    assert torch.equal(mem.images, eager.images) and mem.identities.tolist() == eager.identities.tolist()
    assert mem.split == eager.split and mem.origin == eager.origin


@pytest.mark.filterwarnings("ignore:Market-1501 .* left out")
def test_market1501_bad_file_name_raises_or_is_counted(tmp_path):
    root = make_market(tmp_path / "m")
    _img(root / "query" / "0011_cam1_000500.jpg", 1)
    with pytest.raises(DataError, match=r"query/0011_cam1_000500\.jpg: the name is not PPPP_cCsS_FFFFFF_NN\.jpg"):
        read_market1501(root)
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) in Market-1501 .*0011_cam1_000500\.jpg"):
        ds = read_market1501(root, on_error="skip", lazy=True)
    assert ds.split.count("query") == 3
    with pytest.raises(DataError, match="Market-1501 layout not found"):
        read_market1501(tmp_path / "m" / "query")


# ------------------------------------------------------------------------------ LFW
def test_lfw_persons_pairs_and_folds(tmp_path):
    ds = read_lfw(make_lfw(tmp_path / "lfw_home"), lazy=True)
    assert len(ds) == 15 and ds.class_names == sorted(LFW_PEOPLE, key=str)
    assert torch.equal(ds.labels, ds.identities)
    people = [ds.class_names[i] for i in ds.labels.tolist()]
    assert ds.split == ["test" if p in LFW_TEST else "train" for p in people]
    assert ds.pairs.shape == (20, 4)
    assert ds.pairs[:, 3].tolist() == [k // 2 for k in range(20)]  # 10 folds of 2 lines each
    assert ds.pairs[:, 2].tolist() == [1, 0] * 10
    names = _names(ds)
    assert (names[ds.pairs[0, 0]], names[ds.pairs[0, 1]]) == ("Ann_Lee_0001.jpg", "Ann_Lee_0002.jpg")
    assert (names[ds.pairs[1, 0]], names[ds.pairs[1, 1]]) == ("Ann_Lee_0001.jpg", "Bo_Chen_0001.jpg")
    same = ds.pairs[:, 2] == 1
    assert (ds.labels[ds.pairs[same, 0]] == ds.labels[ds.pairs[same, 1]]).all()
    assert (ds.labels[ds.pairs[~same, 0]] != ds.labels[ds.pairs[~same, 1]]).all()
    eager = read_lfw(tmp_path / "lfw_home", image_size=SIZE)
    assert torch.equal(ds.to_memory(SIZE).images, eager.images) and np.array_equal(eager.pairs, ds.pairs)


def test_lfw_single_set_pairs_file_and_no_pairs(tmp_path):
    root = make_lfw(tmp_path / "l")
    (root / "pairs.txt").unlink()
    dev_test = "2\nAnn_Lee 1 3\nBo_Chen 1 2\nAnn_Lee 2 Cy_Diaz 1\nDee_Ek 1 Bo_Chen 2\n"  # header "N": one set
    (root / "lfw" / "pairsDevTest.txt").write_text(dev_test)
    ds = read_lfw(root, lazy=True)
    assert ds.pairs[:, 2].tolist() == [1, 1, 0, 0] and ds.pairs[:, 3].tolist() == [0, 0, 0, 0]
    assert {ds.class_names[int(ds.labels[i])] for i, s in enumerate(ds.split) if s == "test"} == set(LFW_TEST)
    bare = read_lfw(root / "lfw", pairs=None, lazy=True)  # the pairs file is found beside the people
    assert np.array_equal(bare.pairs, ds.pairs)
    (root / "lfw" / "pairsDevTest.txt").unlink()
    none = read_lfw(root, lazy=True)
    assert none.pairs is None and none.split is None and len(none) == 15


def test_lfw_pair_naming_a_missing_image_names_the_file_and_line(tmp_path):
    root = make_lfw(tmp_path / "l")
    lines = (root / "pairs.txt").read_text().splitlines()
    lines[4] = "Bo_Chen\t1\t7"  # line 5
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"pairs\.txt: line 5: image Bo_Chen/Bo_Chen_0007\.jpg does not exist"):
        read_lfw(root)
    with pytest.warns(UserWarning, match=r"skipped 1 pair\(s\) in LFW pairs file .*line 5"):
        ds = read_lfw(root, on_error="skip", lazy=True)
    assert len(ds.pairs) == 19 and ds.pairs[:, 3].tolist().count(1) == 1
    (root / "pairs.txt").write_text("10 1\nAnn_Lee 1 2\n")
    with pytest.raises(DataError, match=r"pairs\.txt: the header '10 1' announces 20 pairs .* has 1"):
        read_lfw(root)
    (root / "pairs.txt").write_text("2\nAnn_Lee 1 x\nAnn_Lee 1 2\nAnn_Lee 1 Bo_Chen 1\nAnn_Lee 1 Bo_Chen 2\n")
    with pytest.raises(DataError, match=r"pairs\.txt: line 2: expected 'name n1 n2'"):
        read_lfw(root)


# ------------------------------------------------------------------------------ SOP
def test_sop_products_splits_and_missing_file(tmp_path):
    root = make_sop(tmp_path / "Stanford_Online_Products")
    ds = read_sop(tmp_path, lazy=True)  # the parent folder is accepted too
    assert len(ds) == 10 and ds.class_names == ["101", "102", "103", "201", "202"]
    assert [ds.class_names[i] for i in ds.labels.tolist()] == [
        c for c in ("101", "102", "103", "201", "202") for _ in range(2)
    ]
    assert ds.split == ["train"] * 6 + ["test"] * 4 and _names(ds)[0] == "101_0.JPG"
    assert "Ebay_train.txt: line 2" in ds.origin[0]
    assert torch.equal(ds.to_memory(SIZE).images, read_sop(root, image_size=SIZE).images)
    (root / "chair_final" / "201_1.JPG").unlink()
    with pytest.raises(DataError, match=r"Ebay_test\.txt: line 3: image file .*201_1\.JPG does not exist"):
        read_sop(root)
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\)"):
        assert len(read_sop(root, on_error="skip", lazy=True)) == 9
    (root / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n7 201 2\n")
    with pytest.raises(DataError, match=r"Ebay_test\.txt: line 2: expected 'image_id class_id"):
        read_sop(root)


# ------------------------------------------------------------------------------ ImageNet
@pytest.mark.parametrize("flat_val", [False, True])
def test_imagenet_train_and_val_layouts(tmp_path, flat_val):
    root = make_imagenet(tmp_path / "in", flat_val)
    ds = read_imagenet(root, lazy=True)
    assert ds.class_names == list(WNIDS) and len(ds) == 9
    assert ds.split == ["train"] * 6 + ["test"] * 3 and ds.labels.tolist() == [0, 0, 1, 1, 2, 2, 0, 1, 2]
    assert _names(ds)[6:] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (1, 2, 3)]
    assert torch.equal(ds.to_memory((8, 8)).images, read_imagenet(root, image_size=8).images)


def test_imagenet_val_errors_name_the_file_and_line(tmp_path):
    root = make_imagenet(tmp_path / "in", flat_val=True)
    (root / "val" / "ILSVRC2012_val_00000002.JPEG").unlink()
    with pytest.raises(DataError, match=r"LOC_val_solution\.csv: line 3: image .*ILSVRC2012_val_00000002"):
        read_imagenet(root)
    (root / "LOC_val_solution.csv").unlink()
    with pytest.raises(DataError, match="flat folder: its labels need LOC_val_solution.csv"):
        read_imagenet(root)
    (root / "train" / WNIDS[2]).rename(root / "other")
    _img(root / "val" / WNIDS[2] / "x.JPEG", 0)
    with pytest.raises(DataError, match=f"val class folder .*{WNIDS[2]} is not a class folder"):
        read_imagenet(root)
    no_val = make_imagenet(tmp_path / "nv")
    for f in (no_val / "val").rglob("*.JPEG"):
        f.unlink()
    assert read_imagenet(no_val, lazy=True).split is None  # nothing held out: a split is drawn


# ------------------------------------------------------------------------------ official splits in tasks
def _cfg(reader: str, path: Path, kind: str, **data) -> dict:
    return {
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
            "t": {
                "kind": kind,
                "options": {} if kind == "classification" else {"k": 2},
                "data": {"reader": reader, "path": str(path), **data},
            }
        },
    }


def _task_data(reader: str, path: Path, kind: str, **data):
    cfg = parse_config(_cfg(reader, path, kind, **data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_task_data("t", cfg.tasks["t"], cfg)


def test_reid_uses_market1501_train_query_gallery(tmp_path):
    root = make_market(tmp_path / "m")
    d = _task_data("market1501", root, "reid")
    assert d.notes[0] == "official train / query / gallery split" and d.train.in_memory
    assert len(d.train) == 8 and d.train.class_names == ["0002", "0005", "0007"]
    assert d.groups.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    q, g = d.eval["query"], d.eval["gallery"]
    assert q.identities.tolist() == [11, 12, 13] and sorted(g.identities.tolist()) == [-1, -1, 11, 11, 12, 12, 13, 13]
    assert q.image_shape == (3, 16, 16)
    # a perfect embedding: each query finds its person on camera 2 (camera 1 is dropped) before the distractors
    task = task_class("reid")("t", {}, num_classes=3, in_dim=8)
    oracle = lambda s: torch.nn.functional.one_hot(s.identities.clamp(min=0), 14).float() + 1e-3
    m = task.evaluate(oracle, d)
    assert m["mAP"] == pytest.approx(1.0) and m["num_queries"] == 3
    random = _task_data("market1501", root, "reid", use_official_split=False, test_fraction=0.5)
    assert "held out as query/gallery" in random.notes[0]


def test_verification_scores_lfw_official_pairs_with_their_folds(tmp_path):
    root = make_lfw(tmp_path / "l")
    d = _task_data("lfw", root, "verification")
    test = d.eval["test"]
    assert sorted(d.train.class_names) == ["Eve_Fox", "Fay_Gu", "Gil_Ho"] and len(d.train) == 7
    assert sorted(test.class_names) == sorted(LFW_TEST) and len(test) == 8
    assert "20 official pairs in 10 fold(s)" in d.notes[0]
    full = read_lfw(root, lazy=True)
    # re-indexed into the test part: the same files, in the same pair order
    fo, to = _names(full), _names(test)
    assert [(to[a], to[b]) for a, b in test.pairs[:, :2]] == [(fo[a], fo[b]) for a, b in full.pairs[:, :2]]
    task = task_class("verification")("t", {}, num_classes=3, in_dim=8)
    oracle = lambda s: torch.nn.functional.one_hot(s.identities, 7).float()
    m = task.evaluate(oracle, d)
    assert m["acc_10fold"] == pytest.approx(1.0) and m["roc_auc"] == pytest.approx(1.0)
    random = _task_data("lfw", root, "verification", use_official_split=False, test_fraction=0.5)
    assert random.eval["test"].pairs is None and "identities disjoint" in random.notes[0]


def test_official_pair_folds_decide_the_accuracy():
    from ufo.tasks.metrics import verification_metrics
    from ufo.tasks.verification import official_pair_metrics

    # 10 folds x (2 same + 2 different) pairs over 4 one-hot embeddings; one different pair of
    # fold 3 scores as high as the same pairs, so only fold 3 loses accuracy (1 of its 4 wrong).
    emb = torch.eye(4)
    pairs = []
    for k in range(10):
        pairs += [(0, 0, 1, k), (1, 1, 1, k), (0, 1, 0, k), (2, 3, 0, k) if k != 3 else (2, 2, 0, k)]
    m = official_pair_metrics(emb, np.array(pairs), seed=0)
    assert m["acc_10fold"] == pytest.approx((9 * 1.0 + 0.75) / 10)
    assert m["acc_10fold_std"] == pytest.approx(np.std([1.0] * 9 + [0.75])) and m["threshold"] == pytest.approx(0.5)
    one_set = np.array(pairs)
    one_set[:, 3] = 0  # a single-set pairs file (pairsDevTest.txt): random stratified folds as for drawn pairs
    a, b, same = one_set[:, 0], one_set[:, 1], one_set[:, 2]
    assert official_pair_metrics(emb, one_set) == verification_metrics(emb, a, b, same, folds=10, seed=0)


def test_retrieval_uses_sop_split_and_refuses_shared_products(tmp_path):
    root = make_sop(tmp_path / "s")
    d = _task_data("sop", root, "retrieval")
    assert d.train.class_names == ["101", "102", "103"] and d.eval["test"].class_names == ["201", "202"]
    assert d.eval["test"].labels.tolist() == [0, 0, 1, 1] and d.notes[0].startswith("official train/test split")
    shared = make_sop(tmp_path / "s2", test={101: "bicycle", 202: "kettle"})
    with pytest.raises(DataError, match=r"task 't': sop: the official split shares 1 classes between train and test"):
        _task_data("sop", shared, "retrieval")
    random = _task_data("sop", shared, "retrieval", use_official_split=False, test_fraction=0.4)
    assert not set(random.train.class_names) & set(random.eval["test"].class_names)


def test_classification_uses_imagenet_val_as_test(tmp_path):
    d = _task_data("imagenet", make_imagenet(tmp_path / "in", flat_val=True), "classification")
    assert len(d.train) == 6 and len(d.eval["test"]) == 3 and d.notes[0] == "official train/test split"
    assert d.eval["test"].labels.tolist() == [0, 1, 2] and d.train.class_names == list(WNIDS)


# ------------------------------------------------------------------------------ a CSV manifest's split column
# people a and b train, c and d test; one test image of an unknown person (empty identity)
FACES = (
    [("a", "1", "train")] * 2
    + [("b", "2", "train")] * 2
    + [("c", "3", "test")] * 5
    + [("d", "4", "test")] * 5
    + [("d", "", "test")]
)


def test_verification_follows_a_csv_train_test_split(tmp_path):
    d = _task_data("csv", make_csv(tmp_path, FACES), "verification")
    test = d.eval["test"]
    assert d.notes[0] == "official train/test split, pairs drawn from the test identities"
    assert _names(d.train) == ["00.jpg", "01.jpg", "02.jpg", "03.jpg"] and d.train.class_names == ["a", "b"]
    assert _names(test) == [f"{i:02d}.jpg" for i in range(4, 14)]  # the unknown person is left out
    assert test.identities.tolist() == [3] * 5 + [4] * 5
    task = task_class("verification")("t", {}, num_classes=2, in_dim=8)
    oracle = lambda s: torch.nn.functional.one_hot(s.identities, 5).float()
    assert task.evaluate(oracle, d)["roc_auc"] == pytest.approx(1.0)


def test_verification_draws_its_own_split_when_told_to(tmp_path):
    d = _task_data("csv", make_csv(tmp_path, FACES), "verification", use_official_split=False, test_fraction=0.5)
    train_ids, test_ids = set(d.train.identities.tolist()), set(d.eval["test"].identities.tolist())
    assert d.notes[0].startswith("identities disjoint") and not train_ids & test_ids
    assert train_ids | test_ids == {1, 2, 3, 4}  # the unknown person is in neither part
    assert len(d.train) + len(d.eval["test"]) == len(FACES) - 1


def test_verification_reads_split_values_in_any_case(tmp_path):
    rows = [(label, ident, split.upper() if i % 2 else split.title()) for i, (label, ident, split) in enumerate(FACES)]
    d = _task_data("csv", make_csv(tmp_path, rows), "verification")
    assert d.train.class_names == ["a", "b"] and len(d.eval["test"]) == 10


def test_verification_tests_on_query_and_gallery_together(tmp_path):
    rows = FACES[:4] + [
        ("c", "3", "query"),
        ("c", "3", "gallery"),
        ("c", "3", "gallery"),
        ("d", "4", "query"),
        ("d", "4", "gallery"),
    ]
    d = _task_data("csv", make_csv(tmp_path, rows), "verification")
    assert len(d.train) == 4 and d.eval["test"].identities.tolist() == [3, 3, 3, 4, 4]


def test_verification_refuses_a_split_with_no_training_samples(tmp_path):
    rows = [(label, ident, "query" if i % 3 == 0 else "gallery") for i, (label, ident, _) in enumerate(FACES)]
    path = make_csv(tmp_path, rows)
    with pytest.raises(
        DataError,
        match=r"m: its split marks no sample train \(its values are \['gallery', 'query'\]\)"
        r".*use_official_split: false",
    ):
        _task_data("csv", path, "verification")
    d = _task_data("csv", path, "verification", use_official_split=False, test_fraction=0.5)
    assert d.notes[0].startswith("identities disjoint")


def test_reid_leaves_out_queries_of_unknown_identity_and_ignores_unknown_cameras(tmp_path):
    rows = FACES[:4] + [
        ("c", "3", "query"),
        ("c", "3", "gallery"),
        ("d", "4", "query"),
        ("d", "4", "gallery"),
        ("e", "", "query"),
        ("e", "", "gallery"),
    ]
    cams = ["1"] * 4 + ["", "", "1", "2", "1", "2"]  # c's query and its match: both cameras unknown
    cfg = parse_config(_cfg("csv", make_csv(tmp_path, rows, cams), "reid"))
    with pytest.warns(UserWarning, match="left 1 queries with unknown"):
        d = build_task_data("t", cfg.tasks["t"], cfg)
    q, g = d.eval["query"], d.eval["gallery"]
    assert q.identities.tolist() == [3, 4] and q.cameras.tolist() == [-1, 1] and g.identities.tolist() == [3, 4, -1]
    task = task_class("reid")("t", {}, num_classes=2, in_dim=8)
    oracle = lambda s: torch.nn.functional.one_hot(s.identities.clamp(min=0), 5).float() + 1e-3
    m = task.evaluate(oracle, d)
    assert m["num_queries"] == 2 and m["mAP"] == pytest.approx(1.0)
