"""ImageSet and the readers, each on a small sample of real images built in tmp_path, plus the
bad inputs a user can give them (corrupt image, missing file, empty class, missing path)."""

from __future__ import annotations

import io
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from conftest import require_shared_data
from ufo.data import (
    ImageSet,
    cache_info,
    concat,
    read_alphadigits_mat,
    read_csv_manifest,
    read_gtsrb,
    read_image_folder,
    read_npz,
    read_zip_images,
)
from ufo.errors import DataError


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def orl() -> Path:
    return require_shared_data("orl-faces")


@pytest.fixture(scope="module")
def gtsrb_train() -> Path:
    return require_shared_data("gtsrb-subset") / "GTSRB" / "Final_Training" / "Images"


@pytest.fixture
def faces(tmp_path: Path, orl: Path) -> Path:
    """3 subjects x 3 real ORL PGMs as an image folder."""
    root = tmp_path / "faces"
    for s in ("s1", "s2", "s10"):
        (root / s).mkdir(parents=True)
        for i in (1, 2, 3):
            shutil.copy(orl / s / f"{i}.pgm", root / s / f"{i}.pgm")
    return root


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return (d.images[:60] * (255 / 16)).round().astype(np.uint8), d.target[:60]


# ------------------------------------------------------------------------------------ ImageSet


def _toy(n: int = 6, classes: int = 3) -> ImageSet:
    return ImageSet(
        images=torch.arange(n * 4, dtype=torch.uint8).view(n, 1, 2, 2),
        labels=torch.arange(n) % classes,
        class_names=[f"c{i}" for i in range(classes)],
        identities=torch.arange(n),
        split=["train", "test"] * (n // 2),
        name="toy",
    )


def test_imageset_subset_relabel_counts():
    ds = _toy()
    assert len(ds) == 6 and ds.num_classes == 3 and ds.counts().tolist() == [2, 2, 2]
    sub = ds.subset([1, 4, 5])
    assert sub.labels.tolist() == [1, 1, 2] and sub.identities.tolist() == [1, 4, 5]
    assert sub.split == ["test", "train", "test"] and sub.origin == ["toy[1]", "toy[4]", "toy[5]"]
    assert torch.equal(sub.images, ds.images[[1, 4, 5]]) and sub.class_names == ds.class_names
    rel = sub.relabel()
    assert rel.labels.tolist() == [0, 0, 1] and rel.class_names == ["c1", "c2"]
    mask = ds.subset(ds.labels == 0)
    assert len(mask) == 2 and mask.counts().tolist() == [2, 0, 0]


def test_imageset_validates():
    ok = _toy()
    with pytest.raises(DataError, match="uint8"):
        ImageSet(images=ok.images.float(), labels=ok.labels, class_names=ok.class_names)
    with pytest.raises(DataError, match="labels has 5 entries"):
        ImageSet(images=ok.images, labels=ok.labels[:5], class_names=ok.class_names)
    with pytest.raises(DataError, match="label 3 is outside"):
        ImageSet(images=ok.images, labels=ok.labels + 1, class_names=ok.class_names)
    with pytest.raises(DataError, match="identities must be an int64"):
        ImageSet(images=ok.images, labels=ok.labels, class_names=ok.class_names, identities=ok.labels.int())
    with pytest.raises(DataError, match="1 or 3 channels"):
        ImageSet(images=ok.images.expand(-1, 2, -1, -1), labels=ok.labels, class_names=ok.class_names)


def test_concat_merges_classes_by_name():
    a, b = _toy(4, 2), _toy(6, 3)
    both = concat([a, b])
    assert len(both) == 10 and both.class_names == ["c0", "c1", "c2"]
    assert both.labels.tolist() == [0, 1, 0, 1, 0, 1, 2, 0, 1, 2]


# --------------------------------------------------------------------------------- image folder


def test_image_folder_real_pgm(faces: Path, orl: Path):
    ds = read_image_folder(faces)
    assert ds.images.shape == (9, 1, 112, 92) and ds.images.dtype == torch.uint8
    assert ds.class_names == ["s1", "s2", "s10"]  # natural order
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    ref = np.asarray(Image.open(orl / "s2" / "1.pgm"))
    assert np.array_equal(ds.images[3, 0].numpy(), ref)
    assert ds.origin[3].endswith(os.path.join("s2", "1.pgm"))


def test_image_folder_resize_and_channels(faces: Path):
    ds = read_image_folder(faces, image_size=(28, 24), channels=3)
    assert ds.images.shape == (9, 3, 28, 24)
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])


def test_image_folder_mixed_sizes_names_two_files(faces: Path, gtsrb_train: Path):
    shutil.copy(gtsrb_train / "00000" / "00000_00000.ppm", faces / "s2" / "4.ppm")
    with pytest.raises(DataError, match=r"differ in size.*1\.pgm is 112x92.*4\.ppm is 32x32.*image_size"):
        read_image_folder(faces)
    ds = read_image_folder(faces, image_size=32)
    assert ds.images.shape == (10, 3, 32, 32)  # one RGB file lifts the set to 3 channels


def test_image_folder_corrupt_image(faces: Path):
    _truncate(faces / "s2" / "2.pgm")
    with pytest.raises(DataError, match=r"cannot read image .*s2.2\.pgm.*truncated.*on_error='skip'"):
        read_image_folder(faces)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*2\.pgm"):
        ds = read_image_folder(faces, on_error="skip")
    assert len(ds) == 8 and ds.counts().tolist() == [3, 2, 3]
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image"):  # replayed on a cache hit
        assert read_image_folder(faces, on_error="skip").images is ds.images


def test_image_folder_not_an_image(faces: Path):
    (faces / "s1" / "4.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"4\.png.*UnidentifiedImageError"):
        read_image_folder(faces)


def test_image_folder_empty_class(faces: Path):
    (faces / "s7").mkdir()
    with pytest.raises(DataError, match=r"class folder .*s7 has no images"):
        read_image_folder(faces)
    with pytest.warns(UserWarning, match=r"empty class folder.*s7"):
        ds = read_image_folder(faces, on_error="skip")
    assert ds.class_names == ["s1", "s2", "s10"]


def test_image_folder_missing_path(tmp_path: Path):
    with pytest.raises(DataError, match=r"image folder .*nowhere does not exist"):
        read_image_folder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        read_image_folder(tmp_path / "flat")


def test_cache_decodes_once_and_sees_changes(faces: Path):
    before = cache_info()
    a = read_image_folder(faces, image_size=40)
    b = read_image_folder(faces, image_size=40)
    after = cache_info()
    assert after["misses"] == before["misses"] + 1 and after["hits"] == before["hits"] + 1
    assert a.images is b.images  # decoded once, shared
    time.sleep(0.01)
    shutil.copy(faces / "s1" / "1.pgm", faces / "s1" / "9.pgm")  # changes the class folder's mtime
    c = read_image_folder(faces, image_size=40)
    assert len(c) == len(a) + 1


# ------------------------------------------------------------------------------------------ CSV


@pytest.fixture
def signs_csv(tmp_path: Path, gtsrb_train: Path) -> Path:
    """A CSV manifest over 6 real GTSRB PPMs from 2 classes, 2 tracks each."""
    img = tmp_path / "imgs"
    img.mkdir()
    rows = ["path,label,identity,split"]
    for cls, name in (("00001", "speed30"), ("00014", "stop")):
        for f in ("00000_00000.ppm", "00000_00001.ppm", "00001_00000.ppm"):
            shutil.copy(gtsrb_train / cls / f, img / f"{cls}_{f}")
            rows.append(f"imgs/{cls}_{f},{name},{cls}{f[:5]},{'test' if f.startswith('00001') else 'train'}")
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_csv_manifest(signs_csv: Path):
    ds = read_csv_manifest(signs_csv)
    assert ds.images.shape == (6, 3, 32, 32)
    assert ds.class_names == ["speed30", "stop"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.identities.tolist() == [100000, 100000, 100001, 1400000, 1400000, 1400001]
    assert ds.split == ["train", "train", "test"] * 2
    assert ds.cameras is None


def test_csv_manifest_empty_identity_or_camera_is_unknown(tmp_path: Path, digits):
    imgs, y = digits
    rows = ["path;label;identity;camera;split"]
    for i, (ident, cam) in enumerate([("7", "1"), ("", "2"), ("7", ""), ("", ""), ("9", "1")]):
        Image.fromarray(imgs[i]).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png;digit{y[i]};{ident};{cam};{'Train' if i < 3 else 'TEST'}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    ds = read_csv_manifest(tmp_path / "m.csv")
    assert ds.identities.tolist() == [7, -1, 7, -1, 9] and ds.cameras.tolist() == [1, 2, -1, -1, 1]
    assert ds.split == ["train"] * 3 + ["test"] * 2  # split values in lower case, as the tasks name them
    for col, field in ((0, "path"), (1, "label")):  # the required columns stay required
        bad = rows[:2] + [";".join("" if k == col else v for k, v in enumerate(rows[2].split(";")))]
        (tmp_path / "bad.csv").write_text("\n".join(bad) + "\n")
        with pytest.raises(DataError, match=rf"bad\.csv: row 2 \(line 3\): empty '{field}'"):
            read_csv_manifest(tmp_path / "bad.csv")


def test_csv_manifest_missing_column(tmp_path: Path):
    p = tmp_path / "m.csv"
    p.write_text("file,label\na.png,0\n")
    with pytest.raises(DataError, match=r"m\.csv: missing required column 'path'"):
        read_csv_manifest(p)


def test_csv_manifest_missing_file_names_row_and_path(signs_csv: Path):
    text = signs_csv.read_text().replace("imgs/00014_00000_00001.ppm", "imgs/gone.ppm")
    signs_csv.write_text(text)
    with pytest.raises(DataError, match=r"manifest\.csv: row 5 \(line 6\): image file .*gone\.ppm does not exist"):
        read_csv_manifest(signs_csv)
    with pytest.warns(UserWarning, match=r"skipped 1 .*gone\.ppm"):
        ds = read_csv_manifest(signs_csv, on_error="skip")
    assert len(ds) == 5 and len(ds.identities) == 5 and len(ds.split) == 5


# ------------------------------------------------------------------------------------------ npz


def test_npz_layouts_and_dtypes(tmp_path: Path, digits):
    imgs, y = digits
    names = np.array([f"digit{v}" for v in y])
    cases = {
        "nhw_uint8": imgs,
        "nhw_float01": imgs / 255.0,
        "nhw_float255": imgs.astype(np.float32),
        "nchw": np.repeat(imgs[:, None], 3, axis=1),
        "nhwc": np.repeat(imgs[..., None], 3, axis=3),
    }
    for key, arr in cases.items():
        p = tmp_path / f"{key}.npz"
        np.savez(p, images=arr, labels=names, identities=np.arange(len(y)))
        ds = read_npz(p)
        assert ds.images.shape[0] == 60 and ds.images.shape[2:] == (8, 8), key
        assert torch.equal(ds.images[:, 0], torch.from_numpy(imgs)), key
        assert ds.class_names == sorted(set(names.tolist())) and ds.identities.tolist() == list(range(60))
    ds = read_npz(tmp_path / "nhw_uint8.npz", image_size=16, channels=3)
    assert ds.images.shape == (60, 3, 16, 16)


def test_npz_bad_input(tmp_path: Path, digits):
    imgs, y = digits
    p = tmp_path / "d.npz"
    np.savez(p, x=imgs, labels=y)
    with pytest.raises(DataError, match=r"d\.npz has no array 'images' \(it has \['labels', 'x'\]\)"):
        read_npz(p)
    assert len(read_npz(p, images_key="x")) == 60
    np.savez(p, images=imgs.astype(np.float32) * 4, labels=y)
    with pytest.raises(DataError, match=r"values span \[0, 1020\]"):
        read_npz(p)
    bad = imgs.astype(np.float32) / 255
    bad[7, 0, 0] = np.nan
    np.savez(p, images=bad, labels=y)
    with pytest.raises(DataError, match=r"images\[7\] has NaN"):
        read_npz(p)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert len(read_npz(p, on_error="skip")) == 59


# ------------------------------------------------------------------------------------------ zip


@pytest.fixture(scope="module")
def omniglot() -> Path:
    return require_shared_data("omniglot-small")


def _small_zip(src: Path, dst: Path, top: str, chars: list[str], extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for m in zin.namelist():
            if any(f"/{c}/" in m for c in chars) and m.endswith(("_01.png", "_02.png")):
                zout.writestr(m.replace(m.split("/")[0], top, 1), zin.read(m))
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return dst


def test_zip_images_union_dedupe(tmp_path: Path, omniglot: Path):
    a = _small_zip(omniglot / "images_background_small1.zip", tmp_path / "a.zip", "s1",
                   ["Greek/character01", "Balinese/character02"])  # fmt: skip
    b = _small_zip(omniglot / "images_background_small2.zip", tmp_path / "b.zip", "s2",
                   ["Greek/character01", "Tagalog/character03"])  # fmt: skip
    ds = read_zip_images([a, b])
    # Greek/character01 is byte-identical in both zips: counted once
    assert ds.class_names == ["Balinese/character02", "Greek/character01", "Tagalog/character03"]
    assert len(ds) == 6 and ds.counts().tolist() == [2, 2, 2]
    assert ds.images.shape[1:] == (1, 105, 105) and set(ds.images.unique().tolist()) <= {0, 255}
    assert ds.origin[0].startswith(f"{a}:s1/Balinese/character02/") and ds.origin[0].endswith("_01.png")
    assert len(read_zip_images([a, b], dedupe=False)) == 8
    assert read_zip_images(a, class_depth=1).class_names == ["character01", "character02"]


def test_zip_images_corrupt_member(tmp_path: Path, omniglot: Path):
    good = io.BytesIO()
    Image.new("L", (105, 105), 255).save(good, format="PNG")
    z = _small_zip(omniglot / "images_background_small1.zip", tmp_path / "c.zip", "top", ["Latin/character05"],
                   extra={"top/Latin/character05/9999_03.png": good.getvalue()[:60]})  # fmt: skip
    with pytest.raises(DataError, match=r"c\.zip:top/Latin/character05/9999_03\.png"):
        read_zip_images(z)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*9999_03\.png"):
        ds = read_zip_images(z, on_error="skip")
    assert len(ds) == 2


# ---------------------------------------------------------------------------------------- GTSRB


def _tiny_gtsrb(root: Path, src: Path) -> Path:
    hdr = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
    for cls in ("00000", "00002"):
        d = root / "GTSRB" / "Final_Training" / "Images" / cls
        d.mkdir(parents=True)
        rows = [hdr]
        for f in ("00000_00000.ppm", "00000_00001.ppm", "00001_00000.ppm"):
            shutil.copy(src / "Final_Training" / "Images" / cls / f, d / f)
            rows.append(f"{f};30;30;5;5;25;25;{int(cls)}")
        (d / f"GT-{cls}.csv").write_text("\n".join(rows) + "\n")
    t = root / "GTSRB" / "Final_Test" / "Images"
    t.mkdir(parents=True)
    gt = (src / "Final_Test" / "GT-final_test.csv").read_text().splitlines()[:4]
    for line in gt[1:]:
        shutil.copy(src / "Final_Test" / "Images" / line.split(";")[0], t)
    (t.parent / "GT-final_test.csv").write_text("\n".join(gt) + "\n")
    return root


def test_gtsrb_layout(tmp_path: Path, gtsrb_train: Path):
    src = gtsrb_train.parents[1]
    root = _tiny_gtsrb(tmp_path / "g", src)
    ds = read_gtsrb(root)
    assert len(ds) == 9 and ds.split == ["train"] * 6 + ["test"] * 3
    assert ds.labels[:6].tolist() == [0, 0, 0, 2, 2, 2] and ds.num_classes >= 3
    # track ids are global: track 00000 of class 0 and of class 2 are different signs
    assert ds.identities.tolist()[:6] == [0, 0, 1, 2, 2, 3] and ds.identities[6:].tolist() == [-1, -1, -1]
    assert read_gtsrb(root / "GTSRB", include_test=False).split == ["train"] * 6
    (root / "GTSRB" / "Final_Test" / "GT-final_test.csv").unlink()
    with pytest.raises(DataError, match=r"GT-final_test\.csv do not exist.*include_test=False"):
        read_gtsrb(root)
    with pytest.raises(DataError, match=r"GTSRB layout not found under .*nothing"):
        (tmp_path / "nothing").mkdir()
        read_gtsrb(tmp_path / "nothing")


def test_gtsrb_missing_image_names_csv_row(tmp_path: Path, gtsrb_train: Path):
    root = _tiny_gtsrb(tmp_path / "g", gtsrb_train.parents[1])
    (root / "GTSRB" / "Final_Training" / "Images" / "00002" / "00000_00001.ppm").unlink()
    with pytest.raises(DataError, match=r"GT-00002\.csv: row 2: image file .*00000_00001\.ppm does not exist"):
        read_gtsrb(root)


# -------------------------------------------------------------------------------- alphadigits


def test_alphadigits_mat():
    path = require_shared_data("binary-alphadigits") / "binaryalphadigs.mat"
    ds = read_alphadigits_mat(path)
    assert ds.images.shape == (1404, 1, 20, 16) and set(ds.images.unique().tolist()) == {0, 255}
    assert ds.class_names[:3] == ["0", "1", "2"] and ds.class_names[-1] == "Z"
    assert ds.counts().tolist() == [39] * 36 and ds.origin[40].endswith("binaryalphadigs.mat:dat[1,1]")
    assert read_alphadigits_mat(path, image_size=32, channels=3).images.shape == (1404, 3, 32, 32)


def test_bad_options(faces: Path):
    with pytest.raises(DataError, match="channels must be 1, 3 or None"):
        read_image_folder(faces, channels=2)
    with pytest.raises(DataError, match="on_error must be"):
        read_image_folder(faces, on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="image_size must be"):
        read_image_folder(faces, image_size=0)
