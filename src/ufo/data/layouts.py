"""Readers for public data sets in the layouts their users already have on disk.

- `read_market1501`: person re-identification, `bounding_box_train/`, `query/`, `bounding_box_test/`;
- `read_lfw`: face verification, `PERSON/PERSON_NNNN.jpg` plus the official `pairs.txt`;
- `read_sop`: Stanford Online Products, `Ebay_train.txt` / `Ebay_test.txt` list files;
- `read_imagenet`: `train/<wnid>/` and `val/<wnid>/` (or a flat `val/` with `LOC_val_solution.csv`).

Like the readers in `ufo.data.readers` they only list the files (one `scandir` per folder) and
their labels into a `FileStore`; with `lazy=True` the set streams, otherwise it is decoded into
memory (`image_size`, `channels`, `on_error` as there). Each sets `split` to the data set's own
official split, which the task kinds use when `use_official_split` is on. Results are cached per
process (`ufo.data.dataset.cached`).
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ufo.data.dataset import ImageSet, cached, encode_values, some
from ufo.data.readers import (
    IMAGE_EXTENSIONS,
    ImageSize,
    OnError,
    decode_set,
    existing,
    folder_classes,
    list_images,
    reader_params,
)
from ufo.data.store import FileStore
from ufo.errors import DataError


class _Problems:
    """Records a reader cannot use (bad names, missing files): raise at the first under
    on_error="raise", else count them and warn once with the first few."""

    def __init__(self, where: str, on_error: str, what: str = "record") -> None:
        self.where, self.on_error, self.what = where, on_error, what
        self.items: list[str] = []

    def add(self, problem: str) -> None:
        if self.on_error == "raise":
            raise DataError(f"{problem} (pass on_error='skip' to leave such {self.what}s out)")
        self.items.append(problem)

    def warn(self) -> None:
        if self.items:
            warnings.warn(f"skipped {len(self.items)} {self.what}(s) in {self.where}: {some(self.items)}", stacklevel=4)


def _find_base(root: Path, marker: str, names: Sequence[str] = ()) -> Path | None:
    """`root` if it holds `marker`, else its sub-folder `names[i]` (or any one sub-folder) that does."""
    if (root / marker).exists():
        return root
    subs = [root / n for n in names] + sorted(d for d in root.iterdir() if d.is_dir())
    return next((d for d in subs if (d / marker).exists()), None)


# ---------------------------------------------------------------------------------------------
# Market-1501
# ---------------------------------------------------------------------------------------------

_MARKET_NAME = re.compile(r"(-?\d+)_c(\d+)s(\d+)_(\d+)_(\d+)\.jpe?g", re.IGNORECASE)
_MARKET_PARTS = (("bounding_box_train", "train"), ("query", "query"), ("bounding_box_test", "gallery"))


def read_market1501(
    root: str | Path,
    image_size: ImageSize = None,
    channels: int | None = None,
    on_error: OnError = "raise",
    lazy: bool = False,
) -> ImageSet:
    """Market-1501: `bounding_box_train/`, `query/` and `bounding_box_test/` of
    `PPPP_cCsS_FFFFFF_NN.jpg` (person PPPP, camera C, sequence S, frame, box). `root` may be the
    folder holding those three or its parent (e.g. the unpacked `Market-1501-v15.09.15/`).

    split = "train" / "query" / "gallery"; identities = the person id, cameras = C, labels = the
    person id as a class ("0002", ...). As in the Market-1501 protocol, junk images (id -1) are
    left out everywhere, and distractors (id 0000) are left out of train and query but kept in the
    gallery with identity -1: `reid_metrics` then ranks them as wrong matches, which is how the
    protocol scores them (it ignores only the junk). The count left out is a warning. A .jpg whose
    name does not follow the pattern is a DataError naming it (on_error="skip": counted warning)."""
    root = existing(Path(root), "Market-1501 folder")
    base = _find_base(root, "bounding_box_train") if root.is_dir() else None
    if base is None:
        raise DataError(
            f"Market-1501 layout not found under {root}: expected {root}/bounding_box_train/, "
            "query/ and bounding_box_test/ of PPPP_cCsS_FFFFFF_NN.jpg files"
        )

    def load() -> ImageSet:
        rel, pids, cams, split = [], [], [], []
        left_out: dict[str, int] = {}
        bad = _Problems(f"Market-1501 {base}", on_error, "file")
        for folder, part in _MARKET_PARTS:
            d = base / folder
            if not d.is_dir():
                raise DataError(
                    f"Market-1501 folder {base} has no {folder}/; expected bounding_box_train/, "
                    "query/ and bounding_box_test/"
                )
            for f in list_images(d, (".jpg", ".jpeg")):
                m = _MARKET_NAME.fullmatch(f)
                if m is None:
                    bad.add(
                        f"Market-1501 file {d / f}: the name is not PPPP_cCsS_FFFFFF_NN.jpg "
                        "(person id, camera C, sequence S, frame, box)"
                    )
                    continue
                pid = int(m.group(1))
                if pid == -1 or (pid == 0 and part != "gallery"):
                    key = f"{'junk (-1)' if pid == -1 else 'distractors (0000)'} in {folder}"
                    left_out[key] = left_out.get(key, 0) + 1
                    continue
                rel.append(f"{folder}/{f}")
                pids.append(pid)
                cams.append(int(m.group(2)))
                split.append(part)
        bad.warn()
        if left_out:
            warnings.warn(
                f"Market-1501 {base}: left out {sum(left_out.values())} images the protocol does not "
                f"score ({', '.join(f'{n} {k}' for k, n in left_out.items())})",
                stacklevel=3,
            )
        if not rel:
            raise DataError(f"no usable images in Market-1501 folder {base}")
        ids = sorted(set(pids))
        index = {p: i for i, p in enumerate(ids)}
        ds = ImageSet(
            FileStore(base, rel),
            labels=torch.tensor([index[p] for p in pids], dtype=torch.int64),
            class_names=[f"{p:04d}" for p in ids],
            identities=torch.tensor([p if p > 0 else -1 for p in pids], dtype=torch.int64),
            cameras=torch.tensor(cams, dtype=torch.int64),
            split=split,
            name="market1501",
        )
        return decode_set(ds, lazy, image_size, channels, on_error, relabel=False)

    stamps = [base / f for f, _ in _MARKET_PARTS]
    return cached("read_market1501", stamps, reader_params(image_size, channels, on_error, lazy=lazy), load)


# ---------------------------------------------------------------------------------------------
# LFW
# ---------------------------------------------------------------------------------------------

_LFW_DIRS = ("lfw", "lfw-deepfunneled", "lfw_funneled", "lfw-funneled")
_LFW_PAIRS = ("pairs.txt", "pairsDevTest.txt")


def _lfw_pairs(path: Path, index: dict[tuple[str, int], int], on_error: str) -> np.ndarray:
    """(M, 4) int64 (a, b, same, fold) of an LFW pairs file: header "FOLDS N" (pairs.txt: per
    fold N matched lines `name n1 n2`, then N mismatched lines `name1 n1 name2 n2`) or "N"
    (pairsDevTest.txt: one set). `index` maps (person, image number) to a sample."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    head = lines[0].split() if lines else []
    if not (1 <= len(head) <= 2 and all(h.isdigit() for h in head)):
        raise DataError(
            f"LFW pairs file {path}: line 1 should be the header 'FOLDS PAIRS' (e.g. '10 300') or "
            f"'PAIRS', got {lines[0][:60]!r}"
            if lines
            else f"LFW pairs file {path} is empty"
        )
    folds, n = (1, int(head[0])) if len(head) == 1 else (int(head[0]), int(head[1]))
    body = [(no, ln.split()) for no, ln in enumerate(lines[1:], start=2) if ln.strip()]
    if len(body) != 2 * folds * n:
        raise DataError(
            f"LFW pairs file {path}: the header '{lines[0].strip()}' announces {2 * folds * n} pairs "
            f"({folds} fold(s) x {n} matched + {n} mismatched) but the file has {len(body)}"
        )
    missing = _Problems(f"LFW pairs file {path}", on_error, "pair")
    rows = []
    for k, (no, tok) in enumerate(body):
        where = f"LFW pairs file {path}: line {no}"
        try:
            if len(tok) == 3:
                a, b, same = (tok[0], int(tok[1])), (tok[0], int(tok[2])), 1
            elif len(tok) == 4:
                a, b, same = (tok[0], int(tok[1])), (tok[2], int(tok[3])), 0
            else:
                raise ValueError
        except ValueError:
            raise DataError(
                f"{where}: expected 'name n1 n2' (matched) or 'name1 n1 name2 n2' (mismatched), got {' '.join(tok)!r}"
            ) from None
        absent = [f"{p}/{p}_{i:04d}.jpg" for p, i in (a, b) if (p, i) not in index]
        if absent:
            missing.add(f"{where}: image {absent[0]} does not exist")
            continue
        rows.append((index[a], index[b], same, k // (2 * n)))
    missing.warn()
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def read_lfw(
    root: str | Path,
    image_size: ImageSize = None,
    channels: int | None = None,
    on_error: OnError = "raise",
    lazy: bool = False,
    pairs: str | Path | None = None,
) -> ImageSet:
    """Labeled Faces in the Wild: `PERSON/PERSON_NNNN.jpg` folders (in `root`, or in its
    `lfw/`, `lfw-deepfunneled/` or `lfw_funneled/`) and a pairs file: `pairs` when given, else
    `pairs.txt` (View 2, 10 folds) or `pairsDevTest.txt` (one set) in `root` or the image folder.

    labels and identities = the person (folders in natural order). With a pairs file, `pairs`
    holds its (a, b, same, fold) rows indexing into the set and split = "test" for the people the
    pairs name, "train" for everyone else (identities disjoint). Without one, no split and no
    pairs. A pair naming a missing image is a DataError naming the pairs file and line (with
    on_error="skip" the pair is left out, counted)."""
    root = existing(Path(root), "LFW folder")
    if not root.is_dir():
        raise DataError(f"LFW folder {root} is not a folder; expected PERSON/PERSON_NNNN.jpg folders")
    images = next((root / d for d in _LFW_DIRS if (root / d).is_dir()), root)
    if pairs is not None:
        pairs_file: Path | None = existing(Path(pairs), "LFW pairs file")
    else:
        pairs_file = next((d / f for f in _LFW_PAIRS for d in (root, images) if (d / f).is_file()), None)
    exts = tuple(IMAGE_EXTENSIONS)

    def load() -> ImageSet:
        names, rel, labels = folder_classes(images, exts, on_error)
        index = {}
        for i, r in enumerate(rel):
            person, fname = r.split(os.sep, 1)
            m = re.fullmatch(re.escape(person) + r"_(\d+)\.\w+", fname)
            if m:
                index[(person, int(m.group(1)))] = i
        split, pair_rows = None, None
        if pairs_file is not None:
            pair_rows = _lfw_pairs(pairs_file, index, on_error)
            tested = set(np.asarray(labels)[pair_rows[:, :2].ravel()].tolist()) if len(pair_rows) else set()
            split = ["test" if c in tested else "train" for c in labels]
        lab = torch.tensor(labels, dtype=torch.int64)
        ds = ImageSet(
            FileStore(images, rel),
            labels=lab,
            class_names=names,
            identities=lab.clone(),
            split=split,
            name="lfw",
            pairs=pair_rows,
        )
        return decode_set(ds, lazy, image_size, channels, on_error, relabel=False)

    stamps = [images] + ([pairs_file] if pairs_file is not None else [])
    return cached(
        "read_lfw", stamps, reader_params(image_size, channels, on_error, lazy=lazy, pairs=str(pairs_file)), load
    )


# ---------------------------------------------------------------------------------------------
# Stanford Online Products
# ---------------------------------------------------------------------------------------------

_SOP_LISTS = (("Ebay_train.txt", "train"), ("Ebay_test.txt", "test"))
_SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]


def read_sop(
    root: str | Path,
    image_size: ImageSize = None,
    channels: int | None = None,
    on_error: OnError = "raise",
    lazy: bool = False,
) -> ImageSet:
    """Stanford Online Products: `Ebay_train.txt` and `Ebay_test.txt` in `root` (or in its
    `Stanford_Online_Products/`), each with the header `image_id class_id super_class_id path` and
    one image per line, paths relative to that folder.

    labels = class_id (the product; class names are the ids, in numeric order), split = "train" /
    "test" from the list file (the official split has disjoint products). A missing image is a
    DataError naming the list file and line (on_error="skip": left out, counted)."""
    root = existing(Path(root), "Stanford Online Products folder")
    base = _find_base(root, "Ebay_train.txt", ["Stanford_Online_Products"]) if root.is_dir() else None
    if base is None:
        raise DataError(
            f"Stanford Online Products layout not found under {root}: expected {root}/Ebay_train.txt and Ebay_test.txt"
        )

    def load() -> ImageSet:
        paths, classes, split, wheres = [], [], [], []
        missing = _Problems(f"Stanford Online Products {base}", on_error, "image")
        for fname, part in _SOP_LISTS:
            lst = existing(base / fname, "Stanford Online Products list file")
            lines = lst.read_text(encoding="utf-8-sig").splitlines()
            if not lines or [h.lower() for h in lines[0].split()] != _SOP_HEADER:
                raise DataError(
                    f"SOP list file {lst}: line 1 should be the header '{' '.join(_SOP_HEADER)}', "
                    f"got {(lines or [''])[0][:80]!r}"
                )
            for no, ln in enumerate(lines[1:], start=2):
                tok = ln.split()
                if not tok:
                    continue
                where = f"SOP list file {lst}: line {no}"
                if len(tok) != 4 or not all(t.lstrip("-").isdigit() for t in tok[:3]):
                    raise DataError(f"{where}: expected 'image_id class_id super_class_id path', got {ln.strip()!r}")
                if not os.path.isfile(base / tok[3]):
                    missing.add(f"{where}: image file {base / tok[3]} does not exist")
                    continue
                paths.append(tok[3])
                classes.append(tok[1])
                split.append(part)
                wheres.append(where)
        missing.warn()
        if not paths:
            raise DataError(f"no readable images listed in {base / 'Ebay_train.txt'} and Ebay_test.txt")
        labels, names = encode_values(classes)
        ds = ImageSet(FileStore(base, paths, wheres), labels=labels, class_names=names, split=split, name="sop")
        return decode_set(ds, lazy, image_size, channels, on_error, relabel=False)

    stamps = [base / f for f, _ in _SOP_LISTS]
    return cached("read_sop", stamps, reader_params(image_size, channels, on_error, lazy=lazy), load)


# ---------------------------------------------------------------------------------------------
# ImageNet
# ---------------------------------------------------------------------------------------------

_VAL_SOLUTION = "LOC_val_solution.csv"


def _val_solution(root: Path, given: str | Path | None) -> Path | None:
    if given is not None:
        return existing(Path(given), "ImageNet validation labels")
    # Kaggle's layout keeps it three levels above ILSVRC/Data/CLS-LOC/
    return next(
        (d / _VAL_SOLUTION for d in (root, *list(root.resolve().parents)[:3]) if (d / _VAL_SOLUTION).is_file()), None
    )


def _flat_val(
    val: Path, solution: Path, classes: dict[str, int], exts: Sequence[str], on_error: str
) -> tuple[list[str], list[int]]:
    """(paths relative to val's parent, labels) of a flat val/ folder labelled by
    LOC_val_solution.csv (`ImageId,PredictionString`, the first token of which is the wnid)."""
    files = {os.path.splitext(f)[0]: f for f in list_images(val, exts)}
    lines = solution.read_text(encoding="utf-8-sig").splitlines()
    reader = csv.reader(lines)
    header = [h.strip() for h in next(reader, [])]
    if "ImageId" not in header or "PredictionString" not in header:
        raise DataError(
            f"ImageNet validation labels {solution}: line 1 should be 'ImageId,PredictionString', "
            f"got {','.join(header)[:80]!r}"
        )
    col_id, col_pred = header.index("ImageId"), header.index("PredictionString")
    missing = _Problems(f"ImageNet {val}", on_error, "image")
    rel, labels, seen = [], [], set()
    for rec in reader:
        if not any(v.strip() for v in rec):
            continue
        where = f"ImageNet validation labels {solution}: line {reader.line_num}"
        if len(rec) <= max(col_id, col_pred) or not rec[col_pred].split():
            raise DataError(f"{where}: expected 'ImageId,PredictionString' with a wnid first, got {','.join(rec)!r}")
        image_id, wnid = rec[col_id].strip(), rec[col_pred].split()[0]
        if wnid not in classes:
            raise DataError(f"{where}: wnid {wnid!r} is not a class folder of {val.parent / 'train'}")
        if image_id not in files:
            missing.add(f"{where}: image {val / image_id}.JPEG does not exist")
            continue
        seen.add(image_id)
        rel.append(f"{val.name}/{files[image_id]}")
        labels.append(classes[wnid])
    missing.warn()
    unlabelled = len(files) - len(seen)
    if unlabelled:
        warnings.warn(
            f"ImageNet {val}: left out {unlabelled} image(s) that {solution.name} does not label", stacklevel=4
        )
    return rel, labels


def read_imagenet(
    root: str | Path,
    image_size: ImageSize = None,
    channels: int | None = None,
    on_error: OnError = "raise",
    lazy: bool = False,
    val_solution: str | Path | None = None,
) -> ImageSet:
    """ImageNet-style class folders: `root/train/<wnid>/*.JPEG` and, optionally,
    `root/val/<wnid>/*.JPEG`, or a flat `root/val/*.JPEG` labelled by `LOC_val_solution.csv`
    (`val_solution`, else found in `root` or up to three folders above it, as Kaggle lays it out).

    class_names = the training wnids, sorted; split = "train" / "test" (val), or none without
    val/ (a split is then drawn). A val class that is not a training class, or a CSV line naming a
    missing image, is a DataError naming it (on_error="skip": missing images are left out, counted)."""
    root = existing(Path(root), "ImageNet folder")
    train_dir, val = root / "train", root / "val"
    if not train_dir.is_dir():
        raise DataError(
            f"ImageNet layout not found under {root}: expected {root}/train/<wnid>/*.JPEG "
            "(and val/<wnid>/*.JPEG, or a flat val/ with LOC_val_solution.csv)"
        )
    exts = tuple(IMAGE_EXTENSIONS)
    solution = _val_solution(root, val_solution) if val.is_dir() else None

    def load() -> ImageSet:
        names, rel, labels = folder_classes(train_dir, exts, on_error, prefix="train")
        split = ["train"] * len(rel)
        if val.is_dir():
            classes = {n: i for i, n in enumerate(names)}
            with os.scandir(val) as it:
                class_dirs = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
            if class_dirs:
                for d in class_dirs:
                    if d not in classes:
                        raise DataError(f"ImageNet val class folder {val / d} is not a class folder of {train_dir}")
                    files = list_images(val / d, exts)
                    rel += [f"val/{d}/{f}" for f in files]
                    labels += [classes[d]] * len(files)
            elif solution is None:
                raise DataError(
                    f"ImageNet {val} is a flat folder: its labels need {_VAL_SOLUTION} (in {root} or "
                    "above it), or sort val/ into val/<wnid>/ folders"
                )
            else:
                v_rel, v_labels = _flat_val(val, solution, classes, exts, on_error)
                rel, labels = rel + v_rel, labels + v_labels
            split += ["test"] * (len(rel) - len(split))
        has_val = split[-1] == "test"  # val images come last
        ds = ImageSet(
            FileStore(root, rel),
            labels=torch.tensor(labels, dtype=torch.int64),
            class_names=names,
            split=split if has_val else None,
            name="imagenet",
        )
        return decode_set(ds, lazy, image_size, channels, on_error, relabel=False)

    stamps = [train_dir] + ([val] if val.is_dir() else []) + ([solution] if solution is not None else [])
    return cached(
        "read_imagenet", stamps, reader_params(image_size, channels, on_error, lazy=lazy, val=str(solution)), load
    )
