"""Benchmark: data at real scale (issue 19). Writes bench/results/data.json and data.md.

    python bench/data.py                  # full run: folders of 20,000 and 80,000 JPEGs at 224 px
    python bench/data.py --quick          # a smoke run on small folders (figures not comparable)

The JPEG folders are generated once under --data-dir (default /tmp/ufo-bench-data; ~10 GB, about
15 minutes on 2 cores) and reused: realistic photos-like files of ~100 KB (400-600 x 300-450 px,
quality 92), 100 classes. The 20,000-file folder is the first quarter of the 80,000-file one
(hard links, so its files are the same bytes).

1. Decode + augment throughput to 224 px: UFO's streamed loader (`MixedLoader` over a lazy
   `read_image_folder`: workers decode each JPEG at the crop's DCT scale, random-resized-crop and
   flip, uint8 to the main process, which normalises) against torchvision `ImageFolder` +
   `DataLoader` with the same workers, batch, prefetch and augmentation (RandomResizedCrop(224,
   scale=(0.08, 1)), RandomHorizontalFlip, ToDtype, Normalize). The two alternate in rounds, each
   with fresh workers, so that only one loader's workers run at a time; the ratio is the median of
   the per-round ratios.
2. Peak memory of `ufo train` (a small ViT at 224 px, one streamed classification task) over the
   20,000-file folder and over the 80,000-file one: the largest summed PSS of the process and its
   DataLoader workers, and the main process's peak RSS, sampled every 0.1 s.
3. Time from `ufo train` start (process creation) to the end of its first step, on the large folder
   (`first_step_s` in train_summary.json).
4. Training throughput of the real suite (configs/suite.yaml, ../shared/data) with its file-based
   tasks streamed (faces, chars, signs, tracks: `data.cache: stream`) against all in memory, measured
   between the 20th and the last logged step, alternating runs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import psutil
import torch
import yaml
from PIL import Image, ImageDraw

from _common import load_average, progress, quantiles, target, write_results

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STREAMED = ("faces", "chars", "signs", "tracks")  # the suite's file-based tasks (alnum is one .mat array)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----- the JPEG folders -----


def _photo(i: int) -> Image.Image:
    """A photo-like image: a smooth colour field, a dozen shapes and sensor noise (compresses to ~100 KB)."""
    rng = np.random.default_rng([2026, i])
    w, h = int(rng.integers(400, 601)), int(rng.integers(300, 451))
    img = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(5, 15))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    noisy = np.asarray(img).astype(np.int16) + rng.normal(0, 15, (h, w, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _file(root: Path, i: int, classes: int) -> Path:
    return root / f"n{i % classes:05d}" / f"img_{i:07d}.jpg"


def _write(args: tuple[str, int, int]) -> int:
    root, i, classes = Path(args[0]), args[1], args[2]
    f = _file(root, i, classes)
    if not f.exists():
        tmp = f.with_suffix(".tmp")
        _photo(i).save(tmp, "JPEG", quality=92)
        os.replace(tmp, f)
    return i


def make_folders(data_dir: Path, n_large: int, n_base: int, classes: int) -> tuple[Path, Path]:
    """data_dir/large (n_large JPEGs) and data_dir/base (hard links to the first n_base); resumable."""
    large, base = data_dir / f"large-{n_large}", data_dir / f"base-{n_base}"
    for c in range(classes):
        (large / f"n{c:05d}").mkdir(parents=True, exist_ok=True)
        (base / f"n{c:05d}").mkdir(parents=True, exist_ok=True)
    todo = [(str(large), i, classes) for i in range(n_large) if not _file(large, i, classes).exists()]
    if todo:
        with progress() as bar, Pool(os.cpu_count() or 1) as pool:
            job = bar.add_task(f"writing {len(todo):,} JPEGs", total=len(todo))
            for _ in pool.imap_unordered(_write, todo, chunksize=64):
                bar.advance(job)
    for i in range(n_base):
        src, dst = _file(large, i, classes), _file(base, i, classes)
        if not dst.exists():
            os.link(src, dst)
    return base, large


# ----- 1. decode + augment throughput -----


def _torchvision_loader(root: Path, batch: int, workers: int, prefetch: int):
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    tf = v2.Compose(
        [
            v2.RandomResizedCrop(224, scale=(0.08, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    ds = datasets.ImageFolder(str(root), transform=tf)
    dl = DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        persistent_workers=True,
        prefetch_factor=prefetch,
        drop_last=True,
    )
    it = iter(dl)
    return lambda: next(it)[0], lambda: None


def _ufo_loader(root: Path, batch: int, workers: int, prefetch: int, seed: int):
    from ufo.data.loader import Feed, MixedLoader
    from ufo.data.readers import read_image_folder
    from ufo.data.sampler import MixedTaskSampler, TaskSource

    ds = read_image_folder(root, lazy=True)
    sampler = MixedTaskSampler([TaskSource("images", len(ds))], batch, seed=seed)
    feed = Feed("images", 0, ds, (224, 224), 3, MEAN, STD, {"random_resized_crop": 0.08, "hflip": True})
    ld = MixedLoader([feed], sampler, seed=seed, workers=workers, prefetch=prefetch)
    return lambda: ld.next()[0], ld.close


def throughput(root: Path, rounds: int, batches: int, batch: int, workers: int, prefetch: int) -> dict:
    """Images per second of each loader, alternating rounds with fresh workers each time."""
    rates: dict[str, list[float]] = {"ufo": [], "torchvision": []}
    with progress() as bar:
        job = bar.add_task("decode+augment 224 px", total=2 * rounds)
        for r in range(rounds):
            for name in ("ufo", "torchvision") if r % 2 == 0 else ("torchvision", "ufo"):
                make = (
                    (lambda: _ufo_loader(root, batch, workers, prefetch, r))
                    if name == "ufo"
                    else (lambda: _torchvision_loader(root, batch, workers, prefetch))
                )
                nxt, close = make()
                for _ in range(2):  # worker start-up and the first batches are not timed
                    x = nxt()
                assert x.shape == (batch, 3, 224, 224) and x.dtype == torch.float32
                t0 = time.perf_counter()
                for _ in range(batches):
                    nxt()
                rates[name].append(batches * batch / (time.perf_counter() - t0))
                close()
                del nxt, close
                bar.advance(job)
    ratios = [a / b for a, b in zip(rates["ufo"], rates["torchvision"])]
    return {
        "ufo_img_per_s": quantiles(rates["ufo"]),
        "torchvision_img_per_s": quantiles(rates["torchvision"]),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "rounds": rounds,
        "batches_per_round": batches,
        "batch": batch,
        "workers": workers,
        "prefetch": prefetch,
    }


# ----- 2 and 3. memory and start-up of `ufo train` -----


def train_config(folder: Path, steps: int, workers: int, files: int, classes: int) -> dict:
    test_fraction = max(0.01, 2 * classes / files)  # a small held-out part, at least two images per class
    return {
        "name": "data-bench",
        "seed": 0,
        "model": {
            "img_size": 224,
            "patch_size": 16,
            "head_dim": 32,
            "depth": [2],
            "embed_dim": [64],
            "num_heads": [2],
            "mlp_ratio": [2.0],
            "mean": list(MEAN),
            "std": list(STD),
        },
        "tasks": {
            "images": {
                "kind": "classification",
                "augment": {"random_resized_crop": 0.08, "hflip": True},
                "data": {
                    "reader": "image_folder",
                    "path": str(folder),
                    "cache": "stream",
                    "test_fraction": test_fraction,
                },
            }
        },
        "train": {
            "steps": steps,
            "batch_size": 32,
            "log_every": 10,
            "ckpt_every": 10_000,
            "warmup_steps": 5,
            "workers": workers,
            "eval_batch_size": 64,
        },
    }


def _tree_memory(proc: psutil.Process) -> tuple[float, float]:
    """(summed PSS of the process and its descendants, the process's own RSS), in MiB."""
    pss, rss = 0.0, 0.0
    try:
        procs = [proc, *proc.children(recursive=True)]
        rss = proc.memory_info().rss / 2**20
    except psutil.Error:
        return 0.0, 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            pss += p.memory_full_info().pss / 2**20
    return pss, rss


def train_run(folder: Path, steps: int, workers: int, out: Path, classes: int) -> dict:
    """`ufo train` over `folder`, its memory sampled every 0.1 s; start-up and totals from its summary."""
    cfg_path = out.with_suffix(".yaml")
    files = sum(1 for _ in folder.rglob("*.jpg"))
    cfg_path.write_text(yaml.safe_dump(train_config(folder, steps, workers, files, classes)))
    t0 = time.time()
    proc = subprocess.Popen(
        [str(BIN / "ufo"), "train", str(cfg_path), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ps = psutil.Process(proc.pid)
    peak_pss = peak_rss = 0.0
    while proc.poll() is None:
        pss, rss = _tree_memory(ps)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(0.1)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"ufo train failed on {folder}:\n{err[-3000:]}")
    summary = json.loads((out / "train_summary.json").read_text())
    return {
        "files": files,
        "peak_pss_mib": peak_pss,
        "peak_main_rss_mib": peak_rss,
        "first_step_s": summary["first_step_s"],
        "wall_s": time.time() - t0,
        "train_images_per_s": summary["images_per_s"],
        "steps": steps,
    }


# ----- 4. the suite, streamed against in memory -----


def _rate_after(metrics: Path, skip_step: int, batch: int) -> float:
    """Images per second between step `skip_step` and the last logged step (from the cumulative rates)."""
    with open(metrics) as f:
        rows = [(int(r["step"]), float(r["images_per_s"])) for r in csv.DictReader(f) if r["images_per_s"]]
    (s0, r0), (s1, r1) = next(x for x in rows if x[0] >= skip_step), rows[-1]
    t0, t1 = s0 * batch / r0, s1 * batch / r1
    return (s1 - s0) * batch / (t1 - t0)


def suite(steps: int, rounds: int, workers: int, tmp: Path) -> dict:
    stream = [f"tasks.{t}.data.cache=stream" for t in STREAMED]
    rates: dict[str, list[float]] = {"stream": [], "memory": []}
    with progress() as bar:
        job = bar.add_task("suite streamed vs memory", total=2 * rounds)
        for r in range(rounds):
            for mode in ("stream", "memory") if r % 2 == 0 else ("memory", "stream"):
                out = tmp / f"suite-{mode}-{r}"
                sets = [
                    f"train.steps={steps}",
                    "train.log_every=10",
                    f"train.workers={workers}",
                    "train.ckpt_every=100000",
                ] + (stream if mode == "stream" else [])
                args = [str(BIN / "ufo"), "train", str(ROOT / "configs" / "suite.yaml"), "--out", str(out)]
                for s in sets:
                    args += ["--set", s]
                res = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
                if res.returncode != 0:
                    raise SystemExit(f"suite run ({mode}) failed:\n{res.stderr[-3000:]}")
                rates[mode].append(_rate_after(out / "metrics.csv", 20, 96))
                bar.advance(job)
    ratios = [a / b for a, b in zip(rates["stream"], rates["memory"])]
    return {
        "stream_img_per_s": quantiles(rates["stream"]),
        "memory_img_per_s": quantiles(rates["memory"]),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "steps": steps,
        "workers": workers,
        "streamed_tasks": list(STREAMED),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "ufo-bench-data")
    ap.add_argument("--quick", action="store_true", help="small folders and few rounds (a smoke run)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-suite", action="store_true", help="leave out part 4 (needs ../shared/data)")
    a = ap.parse_args()
    n_base, n_large, classes = (800, 3200, 20) if a.quick else (20_000, 80_000, 100)
    rounds, batches, steps = (2, 4, 12) if a.quick else (8, 20, 60)
    base, large = make_folders(a.data_dir, n_large, n_base, classes)
    results: dict = {
        "folders": {
            "base": str(base),
            "large": str(large),
            "files": [n_base, n_large],
            "classes": classes,
            "mean_file_kb": float(np.mean([f.stat().st_size for f in list(base.rglob("*.jpg"))[:500]])) / 1024,
        }
    }
    results["load_before"] = load_average()
    results["throughput"] = throughput(base, rounds, batches, 64, a.workers, 4)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results["train_base"] = train_run(base, steps, a.workers, tmp / "base", classes)
        results["train_large"] = train_run(large, steps, a.workers, tmp / "large", classes)
        if not a.skip_suite:
            results["suite"] = suite(40 if a.quick else 240, 2, a.workers, tmp)
    b, lg = results["train_base"], results["train_large"]
    results["memory_ratio_pss"] = lg["peak_pss_mib"] / b["peak_pss_mib"]
    results["memory_ratio_main_rss"] = lg["peak_main_rss_mib"] / b["peak_main_rss_mib"]
    results["in_memory_estimate_mib"] = {
        "base": n_base * 3 * 224 * 224 / 2**20,
        "large": n_large * 3 * 224 * 224 / 2**20,
    }
    results["load_after"] = load_average()
    targets = [
        target(
            "decode+augment 224 px: UFO / torchvision ImageFolder (same workers)",
            results["throughput"]["ratio"],
            ">=",
            1.0,
        ),
        target(
            f"peak memory of ufo train, {n_large:,} / {n_base:,} files (PSS of process + workers)",
            results["memory_ratio_pss"],
            "<=",
            1.2,
        ),
        target(f"ufo train start to first step, {n_large:,} files (s)", lg["first_step_s"], "<=", 30.0),
    ]
    if "suite" in results:
        targets.append(target("suite training throughput, streamed / in memory", results["suite"]["ratio"], ">=", 0.9))
    name = "data-quick" if a.quick else "data"
    cmd = "python bench/data.py" + (" --quick" if a.quick else "") + (" --skip-suite" if a.skip_suite else "")
    _jpath, mpath = write_results(name, results, targets, command=cmd)
    print(mpath.read_text())


if __name__ == "__main__":
    main()
