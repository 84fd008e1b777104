"""The built-in recipes on the real data in ../shared/data, with their exact counts, and the
errors for an unknown recipe or a missing data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, require_shared_data
from ufo.data import RECIPES, ImageSet, default_data_root, list_recipes, load_oneshot_runs, load_recipe
from ufo.errors import DataError

EXPECTED = {  # recipe: (images, classes, (C, H, W))
    "digits": (1797, 10, (1, 8, 8)),
    "mnist5k": (5000, 10, (1, 28, 28)),
    "orl-faces": (400, 40, (1, 112, 92)),
    "omniglot-small": (4840, 242, (1, 105, 105)),
    "omniglot-oneshot": (800, 400, (1, 105, 105)),
    "gtsrb": (13330, 43, (3, 32, 32)),
    "gtsrb-tracks": (9030, 301, (3, 32, 32)),
    "alphadigits": (1404, 36, (1, 20, 16)),
}
NEEDS_FILES = {name for name, r in RECIPES.items() if r.folder is not None}


@pytest.fixture(scope="module")
def root() -> Path:
    return require_shared_data()


@pytest.fixture(scope="module")
def loaded(root: Path) -> dict[str, ImageSet]:
    """Every recipe decoded once for the module (and cached for the process)."""
    return {name: load_recipe(name, root=root) for name in list_recipes()}


def test_registry_is_documented():
    assert set(list_recipes()) == set(EXPECTED)
    for name, recipe in RECIPES.items():
        assert recipe.doc and any(ch.isdigit() for ch in recipe.doc), f"{name} needs a docstring with its counts"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_counts(loaded: dict[str, ImageSet], name: str):
    n, k, shape = EXPECTED[name]
    ds = loaded[name]
    assert len(ds) == n and ds.num_classes == k and ds.image_shape == shape
    assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
    assert ds.counts().min() > 0, "labels are contiguous and every class has samples"
    assert len(ds.origin) == n and ds.name == name


def test_package_recipes_need_no_root():
    assert len(load_recipe("digits", root="/nonexistent")) == 1797
    ds = load_recipe("digits", image_size=16)
    assert ds.image_shape == (1, 16, 16) and int(ds.images.max()) == 255


def test_orl(loaded):
    ds = loaded["orl-faces"]
    assert ds.class_names[:3] == ["s1", "s2", "s3"] and ds.class_names[-1] == "s40"
    assert torch.equal(ds.identities, ds.labels) and ds.counts().tolist() == [10] * 40


def test_omniglot_small_union(loaded):
    ds = loaded["omniglot-small"]
    assert ds.counts().tolist() == [20] * 242
    alphabets = {c.split("/")[0] for c in ds.class_names}
    assert alphabets == {"Balinese", "Early_Aramaic", "Greek", "Korean", "Latin",
                         "Japanese_(katakana)", "Sanskrit", "Tagalog"}  # fmt: skip
    assert sum(c.startswith("Greek/") for c in ds.class_names) == 24
    assert sum(c.startswith("Latin/") for c in ds.class_names) == 26
    assert ds.identities.unique().tolist() == list(range(1, 21))
    assert torch.bincount(ds.images.flatten(), minlength=256).nonzero().flatten().tolist() == [0, 255]


def test_omniglot_oneshot_runs(root: Path, loaded):
    runs = load_oneshot_runs(root)
    assert len(runs) == 20 and runs[0]["run"] == "run01"
    for r in runs:
        assert r["support_images"].shape == (20, 1, 105, 105) and r["query_images"].shape == (20, 1, 105, 105)
        assert r["support_labels"].tolist() == list(range(20))
        assert sorted(r["query_labels"].tolist()) == list(range(20))  # one query per class
    # run01/class_labels.txt: "run01/test/item01.png run01/training/class08.png"
    assert runs[0]["query_files"][0] == "run01/test/item01.png" and runs[0]["query_labels"][0] == 7
    flat = loaded["omniglot-oneshot"]
    assert flat.split.count("support") == 400 and flat.split.count("query") == 400
    assert flat.class_names[7] == "run01/class08" and flat.labels[20] == 7
    assert torch.equal(flat.images[20], runs[0]["query_images"][0])


def test_gtsrb(loaded):
    ds = loaded["gtsrb"]
    assert ds.split.count("train") == 9030 and ds.split.count("test") == 4300
    train = torch.tensor([s == "train" for s in ds.split])
    assert ds.identities[train].unique().numel() == 301 and (ds.identities[~train] == -1).all()
    assert ds.labels[train].unique().numel() == 43 and ds.labels[~train].unique().numel() == 43
    # every track belongs to exactly one class
    pairs = torch.stack([ds.identities[train], ds.labels[train]], 1).unique(dim=0)
    assert len(pairs) == 301


def test_gtsrb_tracks(loaded):
    ds = loaded["gtsrb-tracks"]
    assert torch.equal(ds.labels, ds.identities) and ds.counts().tolist() == [30] * 301
    assert ds.class_names[0] == "class00/track00000" and ds.class_names[-1] == "class42/track00006"
    assert ds.split is None


def test_alphadigits(loaded):
    ds = loaded["alphadigits"]
    assert ds.class_names == [str(i) for i in range(10)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    assert ds.counts().tolist() == [39] * 36


def test_image_size_and_dataset_folder_as_root(root: Path):
    ds = load_recipe("orl-faces", root=root / "orl-faces", image_size=32)
    assert ds.image_shape == (1, 32, 32) and len(ds) == 400


def test_unknown_recipe():
    with pytest.raises(DataError, match=r"unknown dataset recipe 'mnist'; available: alphadigits, digits, .*orl-faces"):
        load_recipe("mnist")


@pytest.mark.parametrize("name", sorted(NEEDS_FILES))
def test_missing_folder_says_how_to_provide_it(tmp_path: Path, name: str):
    expected = rf"expected the folder {tmp_path}/{RECIPES[name].folder}.*root:.*--data-dir.*UFO_DATA_DIR"
    with pytest.raises(DataError, match=expected):
        load_recipe(name, root=tmp_path)


def test_default_data_root(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("UFO_DATA_DIR", str(tmp_path))
    assert default_data_root() == tmp_path
    with pytest.raises(DataError, match=rf"{tmp_path}/orl-faces"):
        load_recipe("orl-faces")
    monkeypatch.delenv("UFO_DATA_DIR")
    monkeypatch.chdir(tmp_path)  # not found from the working dir: found next to the repository
    if SHARED_DATA.is_dir():
        found = default_data_root()
        assert found is not None and found.resolve() == SHARED_DATA.resolve()


def test_no_data_root(monkeypatch):
    import ufo.data.recipes as recipes

    monkeypatch.setattr(recipes, "default_data_root", lambda: None)
    with pytest.raises(DataError, match=r"no data root found.*<data root>/gtsrb-subset.*root:.*UFO_DATA_DIR"):
        load_recipe("gtsrb")
