"""Sharded tar files (the webdataset format): a few hundred large files instead of millions of
small ones, for file systems and object stores that are slow at opening files.

`write_shards` packs any `ImageSet` into `shard-000000.tar`, `shard-000001.tar`, ... with
`webdataset.ShardWriter`. Sample i is the members `<key>.jpg` (or `.png`, `.ppm`, ...: the source
file's own bytes, never re-encoded; a set decoded in memory is written as PNG) and `<key>.json`
(`label`, `class_name`, `identity`, `camera`, `split`, `origin`), with key = i as 9 digits. An
`index.json` beside the shards lists the class names, the per-class counts, the shards with their
sample counts, and the set's official pairs (LFW) by key.

`read_webdataset` does not stream the shards in order, as a webdataset pipeline would: it reads
only the tar headers (stdlib `tarfile`: `TarInfo.offset_data` and `size`) and the small json
members, and returns a `TarStore` that reads any image by (shard, offset, size) with one `pread`.
Training needs random access: the mixed-task sampler draws P x K batches (P identities, K images
each) and exact per-step batches that a resume can replay, neither of which a sequential stream
with a shuffle buffer can give, and splits, subsampling and DDP ranks all pick arbitrary samples.
Indexing costs one pass over the headers (a seek per member, no image bytes read); the index is
then a few dozen bytes per sample.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ufo.data.dataset import ImageSet, cached, encode_values, some
from ufo.data.readers import ImageSize, OnError, decode_set, existing, reader_params
from ufo.data.store import FileStore, ImageStore, TarStore, ZipStore
from ufo.errors import DataError

SHARD_PATTERN = "shard-%06d.tar"
INDEX = "index.json"
# member extensions that hold the image, in the order one is chosen when a sample has several
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "pnm", "bmp", "gif", "tif", "tiff")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _png(store: ImageStore, i: int) -> bytes:
    chw = store.read(i)
    im = Image.fromarray(chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def encoded_image(store: ImageStore, i: int) -> tuple[str, bytes]:
    """(extension, bytes) of sample i: the file's own bytes for a file, zip or tar store (so a
    JPEG is never re-compressed), else a PNG of the decoded pixels."""
    if isinstance(store, FileStore):
        name, data = store.rel[i], Path(store.path(i)).read_bytes()
    elif isinstance(store, (ZipStore, TarStore)):
        name, data = store.member[i], store.raw(i)
    else:
        return "png", _png(store, i)
    ext = os.path.splitext(os.fsdecode(name))[1].lower().lstrip(".")
    ext = {"jpeg": "jpg", "tiff": "tif"}.get(ext, ext)
    return (ext, data) if ext in IMAGE_KEYS else ("png", _png(store, i))


def _meta(ds: ImageSet, i: int) -> dict[str, Any]:
    label = int(ds.labels[i])
    opt = lambda t: None if t is None else int(t[i])
    return {
        "label": label,
        "class_name": ds.class_names[label],
        "identity": opt(ds.identities),
        "camera": opt(ds.cameras),
        "split": None if ds.split is None else ds.split[i],
        "origin": ds.store.origin(i),
    }


def write_shards(
    ds: ImageSet,
    out_dir: str | Path,
    maxcount: int = 10_000,
    maxsize: float = 1e9,
    on_error: OnError = "raise",
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write `ds` as webdataset shards `out_dir/shard-%06d.tar` (a new shard after `maxcount`
    samples or `maxsize` bytes) plus `out_dir/index.json`; returns the index.

    An unreadable source image raises a DataError naming it, or with on_error="skip" is left out
    (counted warning; pairs naming it are dropped). `overwrite` replaces the shards and index of
    an earlier pack in `out_dir`; otherwise they are an error. `progress(n)` is called after every
    n samples written."""
    import webdataset as wds

    if len(ds) == 0:
        raise DataError(f"ImageSet {ds.name!r} is empty: nothing to write")
    if maxcount < 1 or maxsize <= 0:
        raise DataError(f"maxcount must be >= 1 and maxsize > 0, got {maxcount} and {maxsize}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("shard-*.tar")) + ([out / INDEX] if (out / INDEX).exists() else [])
    if old and not overwrite:
        raise DataError(
            f"{out} already holds shards ({len(old)} files); pass overwrite=True (--overwrite) or pick another folder"
        )
    for f in old:
        f.unlink()
    shards: list[dict[str, Any]] = []
    writer: wds.ShardWriter  # `post` reads its count
    writer = wds.ShardWriter(
        str(out / SHARD_PATTERN),
        maxcount=maxcount,
        maxsize=maxsize,
        verbose=0,
        encoder=False,
        mtime=0.0,
        post=lambda f: shards.append({"file": Path(f).name, "samples": writer.count}),
    )
    kept, skipped = [], []
    try:
        for i in range(len(ds)):
            try:
                ext, data = encoded_image(ds.store, i)
            except Exception as e:  # missing file, bad zip member, undecodable tensor...
                problem = f"cannot read image {ds.store.origin(i)}: {type(e).__name__}: {e}"
                if on_error == "raise":
                    raise DataError(f"{problem} (pass on_error='skip' to leave it out)") from None
                skipped.append(problem)
                continue
            writer.write({"__key__": f"{i:09d}", ext: data, "json": json.dumps(_meta(ds, i)).encode()})
            kept.append(i)
            if progress is not None:
                progress(1)
    finally:
        writer.close()
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) of {ds.name}: {some(skipped)}", stacklevel=2)
    if not kept:
        raise DataError(f"no readable images in {ds.name}")
    labels = ds.labels[torch.as_tensor(kept)]
    pairs = None
    if ds.pairs is not None:
        ok = np.zeros(len(ds), bool)
        ok[kept] = True
        pairs = ds.pairs[ok[ds.pairs[:, 0]] & ok[ds.pairs[:, 1]]].tolist()
    index = {
        "format": "webdataset",
        "writer": "ufo",
        "name": ds.name,
        "num_samples": len(kept),
        "class_names": ds.class_names,
        "counts": torch.bincount(labels, minlength=ds.num_classes).tolist(),
        "shards": shards,
        "pairs": pairs,
    }
    (out / INDEX).write_text(json.dumps(index, indent=1))
    return index


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _shard_files(path: Path) -> tuple[list[Path], dict[str, Any] | None]:
    """The shards of `path` (a .tar file, or a folder: those its index.json lists, else its *.tar)
    and the index, if any."""
    if path.is_file():
        if not path.name.endswith(".tar"):
            raise DataError(
                f"webdataset shard {path} is not an uncompressed .tar; random access needs plain tar "
                "(repack with `ufo data pack`)"
            )
        return [path], None
    index = None
    if (path / INDEX).is_file():
        try:
            index = json.loads((path / INDEX).read_text())
            files = [path / s["file"] for s in index["shards"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"webdataset index {path / INDEX} is not valid: {type(e).__name__}: {e}") from None
        for f in files:
            if not f.is_file():
                raise DataError(f"webdataset shard {f} listed in {path / INDEX} does not exist")
    else:
        files = sorted(path.glob("*.tar"))
    if not files:
        compressed = sorted(path.glob("*.tar.gz")) + sorted(path.glob("*.tgz"))
        hint = f" (only compressed {compressed[0].name}...: random access needs plain .tar)" if compressed else ""
        raise DataError(f"no .tar shards in {path}{hint}")
    return files, index


def _index_shard(path: Path) -> list[tuple[str, dict[str, tuple[int, int]], bytes | None]]:
    """[(key, {extension: (offset, size)}, json bytes or None)] of one tar shard, in file order.
    Reads the headers and the json members only; a corrupt or truncated shard is a DataError."""
    samples: dict[str, tuple[dict[str, tuple[int, int]], list[bytes | None]]] = {}
    size = path.stat().st_size
    last = "the start"
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    raise tarfile.ReadError(f"member {m.name} needs bytes up to {m.offset_data + m.size:,} of {size:,}")
                folder, base = os.path.split(m.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = f"{folder}/{stem}" if folder else stem
                members, js = samples.setdefault(key, ({}, [None]))
                members[ext.lower()] = (m.offset_data, m.size)
                if ext.lower() == "json":
                    data = tf.extractfile(m)
                    assert data is not None  # a regular file (checked above) always extracts
                    js[0] = data.read()
                last = m.name
            end = tf.offset  # where the reader stopped: a valid archive has its zero end block here
        with open(path, "rb") as f:
            f.seek(end)
            tail = f.read(512)
        if len(tail) < 512 or tail.strip(b"\0"):
            raise tarfile.ReadError(f"no valid tar header or end-of-archive after {last} (byte {end:,})")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"webdataset shard {path} is corrupt or truncated: {e}") from None
    return [(k, members, js[0]) for k, (members, js) in samples.items()]


def read_webdataset(
    path: str | Path,
    image_size: ImageSize = None,
    channels: int | None = None,
    on_error: OnError = "raise",
    lazy: bool = False,
) -> ImageSet:
    """Webdataset tar shards as an `ImageSet` read by random access (see the module docstring):
    `path` is a folder of shards (those its `index.json` lists, else every *.tar in name order)
    or one .tar file.

    A sample's image is its first member among IMAGE_KEYS; its label is `label` of its `.json`
    (named by index.json's class_names, as `write_shards` writes them), else the json's
    `class_name` or a `.cls` member's text; `identity`, `camera` and `split` come from the json
    when present (a missing identity or camera is -1). A sample without an image or a label is a
    DataError naming the shard and key (on_error="skip": left out, counted); so is a corrupt shard."""
    path = existing(Path(path), "webdataset path")
    files, index = _shard_files(path)

    def load() -> ImageSet:
        shard, offset, size, member, metas, keys, problems = [], [], [], [], [], [], []
        for s, f in enumerate(files):
            for key, members, js in _index_shard(f):
                where = f"webdataset shard {f}: sample {key!r}"
                ext = next((e for e in IMAGE_KEYS if e in members), None)
                try:
                    meta = json.loads(js) if js is not None else {}
                    if "cls" in members and "label" not in meta and "class_name" not in meta:
                        with open(f, "rb") as fh:
                            fh.seek(members["cls"][0])
                            meta["class_name"] = fh.read(members["cls"][1]).decode().strip()
                except (ValueError, UnicodeDecodeError) as e:
                    raise DataError(f"{where}: unreadable metadata: {e}") from None
                if ext is None or ("label" not in meta and "class_name" not in meta):
                    problem = (
                        f"{where} has no image member (it has {sorted(members)})"
                        if ext is None
                        else f"{where} has no label (a json 'label' or 'class_name', or a .cls member)"
                    )
                    if on_error == "raise":
                        raise DataError(f"{problem} (pass on_error='skip' to leave such samples out)")
                    problems.append(problem)
                    continue
                shard.append(s)
                offset.append(members[ext][0])
                size.append(members[ext][1])
                member.append(os.fsencode(f"{key}.{ext}"))
                metas.append(meta)
                keys.append(key)
        if problems:
            warnings.warn(f"skipped {len(problems)} sample(s) in {path}: {some(problems)}", stacklevel=3)
        if not metas:
            raise DataError(f"no samples with an image and a label in {path}")
        names = (index or {}).get("class_names")
        if names is not None and all(isinstance(m.get("label"), int) for m in metas):
            labels = torch.tensor([m["label"] for m in metas], dtype=torch.int64)
            if int(labels.min()) < 0 or int(labels.max()) >= len(names):
                raise DataError(f"webdataset {path}: labels outside 0..{len(names) - 1} ({INDEX} class_names)")
        else:
            labels, names = encode_values([str(m.get("class_name", m.get("label"))) for m in metas])

        def column(field: str) -> torch.Tensor | None:
            if all(m.get(field) is None for m in metas):
                return None
            return torch.tensor([-1 if m.get(field) is None else int(m[field]) for m in metas], dtype=torch.int64)

        split = None if all(m.get("split") is None for m in metas) else [m.get("split") or "" for m in metas]
        pairs = None
        if index is not None and index.get("pairs"):
            pos = {k: i for i, k in enumerate(keys)}
            rows = [(pos.get(f"{a:09d}"), pos.get(f"{b:09d}"), same, fold) for a, b, same, fold in index["pairs"]]
            pairs = np.array([r for r in rows if r[0] is not None and r[1] is not None], np.int64).reshape(-1, 4)
        store = TarStore(
            [str(f) for f in files],
            np.array(shard, np.int32),
            np.array(offset, np.int64),
            np.array(size, np.int64),
            np.array(member, dtype=np.bytes_),
        )
        ds = ImageSet(
            store,
            labels=labels,
            class_names=names,
            identities=column("identity"),
            cameras=column("camera"),
            split=split,
            name=(index or {}).get("name") or path.stem,
            pairs=pairs,
        )
        return decode_set(ds, lazy, image_size, channels, on_error, relabel=False)

    return cached("read_webdataset", [path, *files], reader_params(image_size, channels, on_error, lazy=lazy), load)
