"""Readers: a labelled image set from the layouts users already have.

File-based readers (`read_image_folder`, `read_csv_manifest`, `read_gtsrb`, and the layouts in
`ufo.data.layouts` and `ufo.data.shards`) only list the files and their labels; with
`lazy=True` they return a streamed `ImageSet` whose images are decoded when a batch needs them,
otherwise the set is decoded into memory (`ImageSet.to_memory`). Array readers (`read_npz`,
`read_alphadigits_mat`) and `read_zip_images` always hold their images in memory.

The decoding options:
- `image_size`: None keeps the native size (all images must then share it; the error names two
  files that differ), an int for square images, or (height, width). Resizing uses PIL bilinear at
  decode time, so the set is stored at the size the model needs.
- `channels`: 1 or 3 forces grayscale or RGB; None keeps grayscale sets at 1 channel and lifts
  everything to 3 as soon as one image is in colour.
- `on_error`: "raise" stops at the first unreadable image with a `DataError` naming it; "skip"
  drops it, counts it and warns once with the count and the first few files. A streamed set
  applies the policy when a batch reads the file (see `ufo.data.loader`); missing files are
  found when the set is listed.

Results are cached per process (see `ufo.data.dataset.cached`), keyed by the reader, the files'
mtimes and these options.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ufo.data.dataset import Collector, ImageSet, cached, check_options, encode_values, some
from ufo.data.store import FileStore, ZipStore
from ufo.errors import DataError

ImageSize = int | tuple[int, int] | None
OnError = Literal["raise", "skip"]
IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Decoding helpers
# ---------------------------------------------------------------------------------------------


def _size_hw(image_size: ImageSize) -> tuple[int, int] | None:
    if image_size is None:
        return None
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in hw):
        raise DataError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return int(hw[0]), int(hw[1])


def _natural_key(s: str) -> list:
    """Sort key that orders "s2" before "s10"."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def existing(path: Path, what: str) -> Path:
    """`path`, or a DataError naming `what` when it does not exist."""
    if not path.exists():
        raise DataError(f"{what} {path} does not exist; check the path (relative paths start at {Path.cwd()})")
    return path


def reader_params(image_size: ImageSize, channels: int | None, on_error: str, **kw: Any) -> dict:
    """A reader's options, checked, as the key of its cache entry (`cached`)."""
    check_options(channels, on_error)
    return dict(image_size=_size_hw(image_size), channels=channels, on_error=on_error, **kw)


class _Collector(Collector):
    """`Collector` taking the reader options as given (image_size an int, a pair or None)."""

    def __init__(self, where: str, image_size: ImageSize, channels: int | None, on_error: str):
        super().__init__(where, _size_hw(image_size), channels, on_error)


def decode_set(
    ds: ImageSet, lazy: bool, image_size: ImageSize, channels: int | None, on_error: str, relabel: bool = True
) -> ImageSet:
    """A listed set as the reader returns it: streamed (`lazy`), else decoded into memory, with
    classes left empty by skipped images dropped (`relabel`)."""
    if lazy:
        return ds
    out = ds.to_memory(_size_hw(image_size), channels, on_error)
    return out.relabel() if relabel and len(out) < len(ds) else out


def list_images(folder: Path, exts: Sequence[str]) -> list[str]:
    """Names of the image files directly in `folder`, in natural order (no per-file stat)."""
    with os.scandir(folder) as it:
        names = [
            e.name
            for e in it
            if not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in exts and e.is_file()
        ]
    return sorted(names, key=_natural_key)


def _ids(values: list, kept: list[int]) -> torch.Tensor:
    return torch.tensor([values[i] for i in kept], dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def read_image_folder(
    root: str | Path,
    image_size: ImageSize = None,
    channels: int | None = None,
    on_error: OnError = "raise",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    lazy: bool = False,
) -> ImageSet:
    """One sub-folder per class (`root/<class>/<image>`, the ImageNet training layout), classes and
    files in natural order ("s2" before "s10"). Files with other extensions are ignored. An empty
    class folder is an error (or, with on_error="skip", dropped with a warning). With `lazy` the
    files are only listed (one `scandir` per folder, no per-file stat), not decoded."""
    root = existing(Path(root), "image folder")
    exts = tuple(e.lower() for e in extensions)

    def load() -> ImageSet:
        names, rel, labels = folder_classes(root, exts, on_error)
        ds = ImageSet(
            FileStore(root, rel), labels=torch.tensor(labels, dtype=torch.int64), class_names=names, name=root.name
        )
        return decode_set(ds, lazy, image_size, channels, on_error)

    return cached("read_image_folder", [root], reader_params(image_size, channels, on_error, ext=exts, lazy=lazy), load)


def folder_classes(
    root: Path, exts: Sequence[str], on_error: str, prefix: str = ""
) -> tuple[list[str], list[str], list[int]]:
    """(class names, file paths relative to root's parent folder `prefix`, label of each file) of
    `root/<class>/<image>`; empty class folders raise, or are skipped with a warning."""
    if not root.is_dir():
        raise DataError(f"image folder {root} is not a folder; expected one sub-folder per class")
    with os.scandir(root) as it:
        class_dirs = sorted((e.name for e in it if e.is_dir() and not e.name.startswith(".")), key=_natural_key)
    if not class_dirs:
        raise DataError(f"image folder {root} has no class sub-folders; expected {root}/<class>/<image>")
    names: list[str] = []
    rel: list[str] = []
    labels: list[int] = []
    empty = []
    for d in class_dirs:
        files = list_images(root / d, exts)
        if not files:
            if on_error == "raise":
                raise DataError(
                    f"class folder {root / d} has no images (extensions {', '.join(exts)}); add images or remove it"
                )
            empty.append(str(root / d))
            continue
        rel += [os.path.join(prefix, d, f) for f in files]
        labels += [len(names)] * len(files)
        names.append(d)
    if empty:
        warnings.warn(f"skipped {len(empty)} empty class folder(s) in {root}: {', '.join(empty)}", stacklevel=3)
    return names, rel, labels


def _sniff_delimiter(header: str) -> str:
    counts = {d: header.count(d) for d in (",", ";", "\t")}
    return max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","


def read_csv_manifest(
    path: str | Path,
    image_size: ImageSize = None,
    channels: int | None = None,
    on_error: OnError = "raise",
    lazy: bool = False,
) -> ImageSet:
    """A CSV manifest with columns `path,label` and optional `identity,camera,split` (the
    delimiter may be `,`, `;` or tab). Image paths are relative to the CSV's folder. String labels
    become classes in sorted order; integer labels are ordered numerically and renumbered 0..k-1.
    String identities/cameras are numbered in sorted order, integer ones kept; an empty one is
    unknown (-1), which the identity tasks leave out of their test sets. Split values are read in
    lower case (Train = train), as the tasks name them. Each image's origin
    names its row ("CSV manifest m.csv: row 12 (line 13): path"); a missing file is an error naming
    the row, or with on_error="skip" a counted warning."""
    path = existing(Path(path), "CSV manifest")

    def load() -> ImageSet:
        text = path.read_text(encoding="utf-8-sig")
        lines = text.splitlines()
        if not lines or not lines[0].strip():
            raise DataError(f"CSV manifest {path} is empty; expected a header line 'path,label'")
        reader = csv.reader(lines, delimiter=_sniff_delimiter(lines[0]))
        header = [h.strip().lower() for h in next(reader)]
        for req in ("path", "label"):
            if req not in header:
                raise DataError(f"CSV manifest {path}: missing required column {req!r} (header is {header})")
        col_of = {h: i for i, h in enumerate(header)}
        rows: list[dict[str, str]] = []
        wheres: list[str] = []
        missing: list[str] = []
        n_rows = 0
        for n, rec in enumerate(reader, start=1):
            if not any(v.strip() for v in rec):
                continue
            n_rows += 1
            where = f"CSV manifest {path}: row {n} (line {reader.line_num})"
            if len(rec) < len(header):
                raise DataError(f"{where} has {len(rec)} fields but the header has {len(header)}")
            row = {h: rec[i].strip() for h, i in col_of.items()}
            for req in ("path", "label"):
                if not row[req]:
                    raise DataError(f"{where}: empty {req!r}")
            if not os.path.isfile(os.path.join(path.parent, row["path"])):
                problem = f"{where}: image file {path.parent / row['path']} does not exist"
                if on_error == "raise":
                    raise DataError(f"{problem} (pass on_error='skip' to drop unreadable images)")
                missing.append(problem)
                continue
            rows.append(row)
            wheres.append(where)
        if not n_rows:
            raise DataError(f"CSV manifest {path} has a header but no rows")
        if missing:
            warnings.warn(f"skipped {len(missing)} missing image(s) in {path}: {some(missing)}", stacklevel=3)
        if not rows:
            raise DataError(f"no readable images in {path}")
        labels, names = encode_values([r["label"] for r in rows])
        opt = {c: _codes_or_unknown([r[c] for r in rows]) if c in col_of else None for c in ("identity", "camera")}
        ds = ImageSet(
            FileStore(path.parent, [r["path"] for r in rows], wheres), labels=labels, class_names=names,
            identities=opt["identity"], cameras=opt["camera"],
            split=[r["split"].lower() for r in rows] if "split" in col_of else None, name=path.stem,
        )  # fmt: skip
        return decode_set(ds, lazy, image_size, channels, on_error)

    return cached("read_csv_manifest", [path], reader_params(image_size, channels, on_error, lazy=lazy), load)


def _codes_or_unknown(values: list[str]) -> torch.Tensor:
    """`encode_values(keep_ints=True)` of the non-empty values; an empty one is unknown (-1)."""
    known = [i for i, v in enumerate(values) if v]
    codes = torch.full((len(values),), -1, dtype=torch.int64)
    if known:
        codes[known] = encode_values([values[i] for i in known], keep_ints=True)[0]
    return codes


def _layout(arr: np.ndarray, where: str) -> np.ndarray:
    """(N,H,W) / (N,H,W,C) / (N,C,H,W) -> (N,H,W) or (N,H,W,C) with C in {1,3} (alpha dropped)."""
    if arr.ndim == 3:
        return arr
    if arr.ndim != 4:
        raise DataError(f"{where}: expected images of shape (N,H,W), (N,H,W,C) or (N,C,H,W), got {arr.shape}")
    if arr.shape[-1] in (1, 3, 4):
        hwc = arr
    elif arr.shape[1] in (1, 3, 4):
        hwc = arr.transpose(0, 2, 3, 1)
    else:
        raise DataError(f"{where}: cannot tell the channel axis of shape {arr.shape}; expected 1, 3 or 4 channels")
    hwc = hwc[..., :3] if hwc.shape[-1] == 4 else hwc
    return hwc[..., 0] if hwc.shape[-1] == 1 else hwc


def _to_uint8(arr: np.ndarray, where: str) -> np.ndarray:
    """uint8 as is; floats in [0,1] or [0,255] and integers in [0,255] scaled to uint8."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{where}: images have dtype {arr.dtype}; expected uint8 or float")
    finite = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
        raise DataError(f"{where}: image values span [{lo:g}, {hi:g}]; expected [0, 1] or [0, 255]")
    scale = 255.0 if np.issubdtype(arr.dtype, np.floating) and hi <= 1.0 else 1.0
    return np.clip(np.round(np.nan_to_num(arr.astype(np.float64)) * scale), 0, 255).astype(np.uint8)


def read_npz(
    path: str | Path,
    images_key: str = "images",
    labels_key: str = "labels",
    image_size: ImageSize = None,
    channels: int | None = None,
    on_error: OnError = "raise",
    identities_key: str = "identities",
    cameras_key: str = "cameras",
    class_names_key: str = "class_names",
) -> ImageSet:
    """Arrays in a .npz: images (N,H,W), (N,H,W,C) or (N,C,H,W), uint8 or float in [0,1] or
    [0,255]; labels integers or strings; optional identities, cameras and class_names arrays.
    Loaded with allow_pickle=False. An image with NaN/inf values counts as unreadable."""
    path = existing(Path(path), "npz file")

    def load() -> ImageSet:
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
        except ValueError as e:  # object arrays need pickle, which is never allowed
            raise DataError(f"npz file {path}: {e} (store strings as fixed-width arrays, not objects)") from None
        except Exception as e:
            raise DataError(f"cannot read npz file {path}: {type(e).__name__}: {e}") from None
        keys = set(data)
        for k in (images_key, labels_key):
            if k not in keys:
                raise DataError(f"npz file {path} has no array {k!r} (it has {sorted(keys)})")
        raw, labels_raw = data[images_key], data[labels_key]
        where = f"{path}:{images_key}"
        raw = _layout(raw, where)
        if labels_raw.shape != (raw.shape[0],):
            raise DataError(f"{path}:{labels_key} has shape {labels_raw.shape}, expected ({raw.shape[0]},)")
        col = _Collector(str(path), image_size, channels, on_error)
        bad = ~np.isfinite(raw).reshape(len(raw), -1).all(1) if np.issubdtype(raw.dtype, np.floating) else None
        imgs = _to_uint8(raw, where)
        for i in range(len(imgs)):
            if bad is not None and bad[i]:
                col.fail(f"{where}[{i}] has NaN or infinite values")
                continue
            col.add(f"{where}[{i}]", imgs[i])
        images = col.finish()
        kept = np.asarray(col.kept, dtype=np.int64)
        lab = labels_raw[kept]
        if class_names_key in keys and np.issubdtype(lab.dtype, np.integer):
            names = [str(c) for c in data[class_names_key].tolist()]
            labels = torch.as_tensor(lab.astype(np.int64))
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(names)):
                raise DataError(f"{path}:{labels_key} has values outside 0..{len(names) - 1} ({class_names_key})")
        else:
            labels, names = encode_values([str(v) for v in lab.tolist()])
        extra: dict[str, torch.Tensor] = {}
        for field_name, key in (("identities", identities_key), ("cameras", cameras_key)):
            if key in keys:
                arr = data[key]
                if arr.shape != (len(raw),):
                    raise DataError(f"{path}:{key} has shape {arr.shape}, expected ({len(raw)},)")
                extra[field_name] = encode_values([str(v) for v in arr[kept].tolist()], keep_ints=True)[0]
        return ImageSet(
            images=images, labels=labels, class_names=names, origin=[f"{where}[{i}]" for i in col.kept],
            name=path.stem, identities=extra.get("identities"), cameras=extra.get("cameras"),
        )  # fmt: skip

    params = reader_params(image_size, channels, on_error, keys=(images_key, labels_key, identities_key, cameras_key))
    return cached("read_npz", [path], params, load)


def _zip_classes(members: list[str], class_depth: int | None) -> list[str]:
    """Class of each member = its parent folder; with class_depth=k the last k folders, otherwise
    the whole parent path without a top folder that every member shares."""
    parents = [m.rsplit("/", 1)[0] if "/" in m else "" for m in members]
    if class_depth is not None:
        return ["/".join(p.split("/")[-class_depth:]) if p else "" for p in parents]
    tops = {p.split("/", 1)[0] for p in parents}
    if len(tops) == 1 and all("/" in p for p in parents):
        return [p.split("/", 1)[1] for p in parents]
    return parents


def read_zip_images(
    path: str | Path | Sequence[str | Path],
    image_size: ImageSize = None,
    channels: int | None = None,
    on_error: OnError = "raise",
    class_depth: int | None = None,
    dedupe: bool = True,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    lazy: bool = False,
) -> ImageSet:
    """Images inside one or several zip files, read with zipfile + PIL without extracting.

    The class of a member is its parent folder (see `class_depth`; with None, a top folder shared
    by every member of a zip is dropped, so "images_background_small1/Greek/character01/x.png" is
    class "Greek/character01"). Several zips give the union of their classes; with `dedupe`, a
    member whose class, file name, size and CRC-32 equal an earlier one's (the same bytes) is read
    once. Origins are "archive.zip:member". Listing reads only the archives' directories."""
    paths = [Path(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
    for p in paths:
        existing(p, "zip file")
    exts = tuple(e.lower() for e in extensions)

    def load() -> ImageSet:
        classes, zip_index, members, seen = [], [], [], set()
        for z, p in enumerate(paths):
            try:
                with zipfile.ZipFile(p) as zf:
                    infos = {i.filename: i for i in zf.infolist()}
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"cannot open zip file {p}: {e}") from None
            names = sorted(
                (m for m in infos if not m.endswith("/") and Path(m).suffix.lower() in exts
                 and not Path(m).name.startswith(".") and "__MACOSX" not in m),
                key=_natural_key,
            )  # fmt: skip
            for m, cls in zip(names, _zip_classes(names, class_depth)):
                if dedupe:
                    key = (cls, m.rsplit("/", 1)[-1], infos[m].file_size, infos[m].CRC)
                    if key in seen:
                        continue
                    seen.add(key)
                classes.append(cls)
                zip_index.append(z)
                members.append(os.fsencode(m))
        if not members:
            raise DataError(f"no images ({', '.join(exts)}) in {', '.join(map(str, paths))}")
        labels, names = encode_values(classes)
        store = ZipStore([str(p) for p in paths], np.array(zip_index, np.int32), np.array(members, dtype=np.bytes_))
        ds = ImageSet(
            store,
            labels=labels,
            class_names=names,
            name=paths[0].stem if len(paths) == 1 else "+".join(p.stem for p in paths),
        )
        return decode_set(ds, lazy, image_size, channels, on_error)

    params = reader_params(image_size, channels, on_error, depth=class_depth, dedupe=dedupe, ext=exts, lazy=lazy)
    return cached("read_zip_images", paths, params, load)


def _gtsrb_base(root: Path) -> Path:
    for base in (root, root / "GTSRB"):
        if (base / "Final_Training" / "Images").is_dir():
            return base
    raise DataError(
        f"GTSRB layout not found under {root}: expected {root}/Final_Training/Images/000CC/GT-000CC.csv "
        f"(or the same under {root}/GTSRB)"
    )


def _read_semicolon_csv(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    if not path.is_file():
        raise DataError(f"GTSRB annotation file {path} does not exist")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    reader = csv.DictReader(lines, delimiter=";")
    fields = [f.strip() for f in (reader.fieldnames or [])]
    for req in required:
        if req not in fields:
            raise DataError(f"GTSRB annotation file {path}: missing column {req!r} (header is {fields})")
    return [(n, {k.strip(): (v or "").strip() for k, v in r.items() if k}) for n, r in enumerate(reader, 1)]


def read_gtsrb(
    root: str | Path,
    image_size: ImageSize = None,
    channels: int | None = None,
    on_error: OnError = "raise",
    include_test: bool = True,
    lazy: bool = False,
) -> ImageSet:
    """GTSRB in its original layout: Final_Training/Images/000CC/GT-000CC.csv and
    Final_Test/GT-final_test.csv (with ClassId), `;`-separated, images in .ppm.

    Returns one set with split "train"/"test", labels = ClassId (class_names "class00".."class42"),
    identities = a global track id for training images (one per (class, TTTTT) of the file name
    TTTTT_FFFFF.ppm, numbered in that order so ids are unique across classes) and -1 for test
    images, which have no track. `root` may be the folder holding GTSRB/ or GTSRB/ itself."""
    root = existing(Path(root), "GTSRB folder")
    base = _gtsrb_base(root)

    def load() -> ImageSet:
        meta: list[tuple[int, tuple[int, int] | None, str, str, str]] = []  # class, (class, track), split, rel, row
        missing: list[str] = []

        def add(csv_path: Path, n: int, row: dict[str, str], folder: str, split: str) -> None:
            where = f"GTSRB annotation file {csv_path}: row {n}"
            try:
                cid = int(row["ClassId"])
            except ValueError:
                raise DataError(f"{where}: ClassId {row['ClassId']!r} is not an integer") from None
            fname = row["Filename"]
            track = None
            if split == "train":
                m = re.fullmatch(r"(\d+)_(\d+)\.\w+", fname)
                if not m:
                    raise DataError(f"{where}: file name {fname!r} is not TTTTT_FFFFF.ppm, so it has no track id")
                track = (cid, int(m.group(1)))
            rel = os.path.join(folder, fname)
            if not os.path.isfile(base / rel):
                problem = f"{where}: image file {base / rel} does not exist"
                if on_error == "raise":
                    raise DataError(f"{problem} (pass on_error='skip' to drop unreadable images)")
                missing.append(problem)
                return
            meta.append((cid, track, split, rel, where))

        train_dir = base / "Final_Training" / "Images"
        class_dirs = sorted(d for d in train_dir.iterdir() if d.is_dir())
        if not class_dirs:
            raise DataError(f"{base}/Final_Training/Images has no class folders 000CC")
        for d in class_dirs:
            csv_path = d / f"GT-{d.name}.csv"
            for n, row in _read_semicolon_csv(csv_path, ("Filename", "ClassId")):
                add(csv_path, n, row, os.path.join("Final_Training", "Images", d.name), "train")
        if include_test:
            csv_path = base / "Final_Test" / "GT-final_test.csv"
            if not csv_path.is_file():
                raise DataError(
                    f"GTSRB test labels {csv_path} do not exist (GT-final_test.test.csv has no ClassId); "
                    "add the labelled GT-final_test.csv or pass include_test=False"
                )
            for n, row in _read_semicolon_csv(csv_path, ("Filename", "ClassId")):
                add(csv_path, n, row, os.path.join("Final_Test", "Images"), "test")
        if missing:
            warnings.warn(f"skipped {len(missing)} missing image(s) in {base}: {some(missing)}", stacklevel=3)
        if not meta:
            raise DataError(f"no readable images in {base}")
        tracks = sorted({m[1] for m in meta if m[1] is not None})
        track_id = {t: i for i, t in enumerate(tracks)}
        n_classes = max(m[0] for m in meta) + 1
        ds = ImageSet(
            FileStore(base, [m[3] for m in meta]),
            labels=torch.tensor([m[0] for m in meta], dtype=torch.int64),
            class_names=[f"class{i:02d}" for i in range(n_classes)],
            identities=torch.tensor([track_id[m[1]] if m[1] is not None else -1 for m in meta], dtype=torch.int64),
            split=[m[2] for m in meta],
            name="gtsrb",
        )
        return decode_set(ds, lazy, image_size, channels, on_error, relabel=False)

    stamps = [base / "Final_Training" / "Images"] + ([base / "Final_Test"] if include_test else [])
    return cached(
        "read_gtsrb", stamps, reader_params(image_size, channels, on_error, test=include_test, lazy=lazy), load
    )


def read_alphadigits_mat(
    path: str | Path,
    image_size: ImageSize = None,
    channels: int | None = None,
    on_error: OnError = "raise",
) -> ImageSet:
    """Binary Alphadigits `binaryalphadigs.mat` (scipy.io.loadmat): `dat` is a 36 x 39 cell of
    20x16 binary images, `classlabels` the 36 names '0'..'9','A'..'Z'. Returns 1,404 images,
    uint8 0/255, class-major order; origins "binaryalphadigs.mat:dat[i,j]"."""
    path = existing(Path(path), "MATLAB file")

    def load() -> ImageSet:
        import scipy.io

        try:
            mat = scipy.io.loadmat(str(path))
        except Exception as e:
            raise DataError(f"cannot read MATLAB file {path}: {type(e).__name__}: {e}") from None
        for k in ("dat", "classlabels"):
            if k not in mat:
                raise DataError(f"MATLAB file {path} has no variable {k!r}; is it binaryalphadigs.mat?")
        dat = mat["dat"]
        names = [str(np.asarray(c).ravel()[0]) for c in mat["classlabels"].ravel()]
        if dat.ndim != 2 or dat.shape[0] != len(names):
            raise DataError(f"MATLAB file {path}: dat has shape {dat.shape} for {len(names)} class labels")
        col = _Collector(str(path), image_size, channels, on_error)
        labels, origins = [], []
        for c in range(dat.shape[0]):
            for j in range(dat.shape[1]):
                origin = f"{path}:dat[{c},{j}]"
                cell = np.asarray(dat[c, j])
                labels.append(c)
                origins.append(origin)
                if cell.ndim != 2 or cell.size == 0:
                    col.fail(f"{origin}: expected a 2-D binary image, got shape {cell.shape}")
                    continue
                img = (cell > 0).astype(np.uint8) * 255 if cell.max() <= 1 else _to_uint8(cell, origin)
                col.add(origin, img)
        images = col.finish()
        return ImageSet(
            images=images, labels=_ids(labels, col.kept), class_names=names,
            origin=[origins[i] for i in col.kept], name="alphadigits",
        )  # fmt: skip

    return cached("read_alphadigits_mat", [path], reader_params(image_size, channels, on_error), load)
