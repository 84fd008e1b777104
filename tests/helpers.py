"""Tiny search spaces, hypothesis strategies and a torchrun harness shared by the tests."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import strategies as st

from ufo.arch import PATHS, Arch, SearchSpace

TASKS = ["cls", "faces", "signs"]


def tiny_space(**overrides) -> SearchSpace:
    kw = dict(
        tasks=TASKS,
        depth=[1, 2, 3],
        embed_dim=[16, 24, 32],
        num_heads=[1, 2, 3],
        mlp_ratio=[1.0, 1.5, 2.0],
        head_dim=8,
        img_size=16,
        patch_size=4,
    )
    kw.update(overrides)
    return SearchSpace(**kw)


@st.composite
def archs(draw, space: SearchSpace, with_paths: bool = True) -> Arch:
    d = draw(st.sampled_from(space.depth))
    paths = (
        {t: draw(st.lists(st.sampled_from(PATHS), min_size=d, max_size=d)) for t in space.tasks} if with_paths else {}
    )
    return Arch(
        depth=d,
        embed_dim=draw(st.sampled_from(space.embed_dim)),
        num_heads=draw(st.lists(st.sampled_from(space.num_heads), min_size=d, max_size=d)),
        mlp_ratio=draw(st.lists(st.sampled_from(space.mlp_ratio), min_size=d, max_size=d)),
        paths=paths,
    )


def train_one_and_two_processes(config: Path, tmp_path: Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """`ufo train CONFIG` in one process (run "one") and under `torchrun` with 2 CPU processes
    (run "two"); returns both metrics.csv logs. Fails the test if either run fails."""
    bin_dir = Path(sys.executable).parent
    one = subprocess.run(
        [str(bin_dir / "ufo"), "train", str(config), "--out", str(tmp_path / "one")], capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            str(bin_dir / "torchrun"),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "ufo.cli",
            "train",
            str(config),
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]

    def log(run: str) -> list[dict[str, str]]:
        with open(tmp_path / run / "metrics.csv") as f:
            return list(csv.DictReader(f))

    return log("one"), log("two")


def make_image_folder(
    root: Path,
    classes: int = 4,
    per_class: int = 10,
    seed: int = 0,
    fmt: str = "JPEG",
    min_side: int = 20,
    max_side: int = 48,
) -> Path:
    """`root/c<k>/<i>.jpg`: RGB images of varied sizes whose mean colour follows the class (so a
    model can learn them); returns root."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    for c in range(classes):
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
            arr = np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.{ext}", fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return root
