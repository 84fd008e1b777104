"""Streamed sets and the loader: lazy listing, worker-independent augmentation, exact resume with
read-ahead, ranks that read only their part, per-task sizes, bad files, and the cache policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from helpers import make_image_folder, train_one_and_two_processes
from ufo.config import parse_config
from ufo.data.build import build_task_data
from ufo.data.loader import Feed, MixedLoader, iter_batches
from ufo.data.readers import read_image_folder
from ufo.data.sampler import MixedTaskSampler, TaskSource
from ufo.errors import DataError
from ufo.train.loop import Trainer

AUG = {"random_resized_crop": 0.5, "hflip": True, "rotation": 10.0, "crop_padding": 2}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "imgs", classes=4, per_class=10)


def _loader(
    folder: Path, size=(24, 20), workers=0, world=1, rank=0, batch=12, seed=0, on_error="raise", augment=AUG
) -> MixedLoader:
    ds = read_image_folder(folder, lazy=True)
    sampler = MixedTaskSampler([TaskSource("t", len(ds))], batch, seed=seed)
    return MixedLoader(
        [Feed("t", 0, ds, size, 3, augment=augment, on_error=on_error)],
        sampler,
        seed=seed,
        rank=rank,
        world=world,
        workers=workers,
    )


def test_lazy_folder_is_listed_not_decoded_and_decodes_like_the_eager_reader(folder):
    ds = read_image_folder(folder, lazy=True)
    assert not ds.in_memory and len(ds) == 40 and ds.class_names == ["c0", "c1", "c2", "c3"]
    with pytest.raises(DataError, match="streams its images"):
        _ = ds.images
    eager = read_image_folder(folder, image_size=(24, 20))
    mem = ds.to_memory((24, 20))
    assert mem.in_memory and torch.equal(mem.images, eager.images)
    assert mem.labels.tolist() == eager.labels.tolist() and mem.origin == eager.origin
    assert ds.subset([3, 1]).origin == [ds.origin[3], ds.origin[1]]


def test_streamed_batch_has_the_task_size_and_the_planned_labels(folder):
    ld = _loader(folder)
    plan = MixedTaskSampler([TaskSource("t", 40)], 12, seed=0).next()["t"]
    x, ids, y = ld.next()
    assert x.shape == (12, 3, 24, 20) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert y.tolist() == ld.feeds[0].data.labels[plan].tolist() and ids.tolist() == [0] * 12
    assert ld.state_dict()["step"] == 1


def test_augmentation_does_not_depend_on_the_number_of_workers(folder):
    a, b = _loader(folder, workers=0), _loader(folder, workers=2)
    for _ in range(3):
        (xa, _, ya), (xb, _, yb) = a.next(), b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.close()
    x0, _, _ = _loader(folder, seed=0).next()
    assert not torch.equal(x0, _loader(folder, seed=1).next()[0])


def test_resume_drops_read_ahead_batches_and_continues_exactly(folder):
    ref = _loader(folder, workers=2)
    want = [ref.next() for _ in range(5)]
    ref.close()
    a = _loader(folder, workers=2)
    for _ in range(2):
        a.next()
    state = a.state_dict()  # the workers have read further ahead than step 2
    a.close()
    assert state["step"] == 2
    b = _loader(folder, workers=2)
    b.load_state_dict(state)
    for k in (2, 3, 4):
        x, _, y = b.next()
        assert torch.equal(x, want[k][0]) and torch.equal(y, want[k][2])
    b.close()


def test_each_rank_reads_its_slice_with_the_single_process_augmentation(folder):
    x, _, y = _loader(folder).next()
    for rank in (0, 1):
        xr, _, yr = _loader(folder, world=2, rank=rank).next()
        assert torch.equal(xr, x[rank::2]) and torch.equal(yr, y[rank::2])


def test_tasks_of_different_sizes_come_as_one_chunk_per_size(folder):
    mem = read_image_folder(folder, image_size=16)
    sampler = MixedTaskSampler([TaskSource("a", 40), TaskSource("b", 40)], 16, quotas={"a": 6, "b": 10}, seed=1)
    ld = MixedLoader(
        [Feed("a", 0, mem, (16, 16)), Feed("b", 1, read_image_folder(folder, lazy=True), (24, 16))], sampler, workers=0
    )
    x, ids, y = ld.next()
    assert isinstance(x, list) and [tuple(t.shape) for t in x] == [(6, 3, 16, 16), (10, 3, 24, 16)]
    assert ids.tolist() == [0] * 6 + [1] * 10 and len(y) == 16


def test_every_size_gives_every_rank_the_global_batch_chunks_in_one_order(folder):
    """FSDP runs one pass through the blocks per chunk, so every rank must get the same sizes in
    the same order: with `every_size`, a size this rank has no rows of comes as an empty chunk.
    A share of 1 row over 2 ranks leaves rank 1 without task a's (first) size."""
    mem = read_image_folder(folder, image_size=16)

    def loader(rank: int, every_size: bool) -> MixedLoader:
        sampler = MixedTaskSampler([TaskSource("a", 40), TaskSource("b", 40)], 5, quotas={"a": 1, "b": 4}, seed=1)
        feeds = [Feed("a", 0, mem, (16, 16)), Feed("b", 1, read_image_folder(folder, image_size=(24, 16)), (24, 16))]
        return MixedLoader(feeds, sampler, rank=rank, world=2, workers=0, every_size=every_size)

    shapes = {}
    for rank in (0, 1):
        ld = loader(rank, every_size=True)
        x, ids, y = ld.next()
        shapes[rank] = [tuple(t.shape) for t in x]
        assert ld.step_rows == {"a": 1, "b": 4} and ld.local_rows() == {"a": 1 - rank, "b": 2}
        assert ids.tolist() == [0] * (1 - rank) + [1] * 2 and len(y) == 3 - rank
    assert shapes == {0: [(1, 3, 16, 16), (2, 3, 24, 16)], 1: [(0, 3, 16, 16), (2, 3, 24, 16)]}
    x, _, _ = loader(1, every_size=False).next()  # without it, rank 1 gets its own sizes only
    assert isinstance(x, torch.Tensor) and tuple(x.shape) == (2, 3, 24, 16)


def test_an_unreadable_file_is_named_or_replaced_by_one_of_its_class_and_counted(folder):
    bad = folder / "c1" / "3.jpg"
    bad.write_bytes(b"this is not a JPEG")
    with pytest.raises(DataError, match=r"c1/3\.jpg.*on_error: skip"):
        _loader(folder, batch=40).next()
    ld = _loader(folder, batch=40, on_error="skip", workers=2)
    with pytest.warns(UserWarning, match=r"c1/3\.jpg"):
        x, _, y = ld.next()
    plan = MixedTaskSampler([TaskSource("t", 40)], 40, seed=0).next()["t"]
    assert y.tolist() == ld.feeds[0].data.labels[plan].tolist()  # the stand-in has the same label
    assert dict(ld.skipped) == {"t": 1} and torch.isfinite(x).all()
    ld.close()


def test_iter_batches_of_a_streamed_set_equal_its_decoded_images(folder):
    ds = read_image_folder(folder, lazy=True)
    got = torch.cat(list(iter_batches(ds, (24, 20), 3, batch_size=16)))
    assert torch.equal(got, ds.to_memory((24, 20), channels=3).images)
    (folder / "c2" / "0.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match=r"c2/0\.jpg"):
        list(iter_batches(ds, 24, 3))
    with pytest.warns(UserWarning, match="1 unreadable image"):
        out = torch.cat(list(iter_batches(ds, 24, 3, on_error="skip")))
    assert out.shape == (40, 3, 24, 24) and int(out[20].max()) == 0  # scored as a black image


def _cfg(folder: Path, **data) -> dict:
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
                "kind": "classification",
                "img_size": [24, 16],
                "augment": {"crop_padding": 2},
                "data": {"reader": "image_folder", "path": str(folder), **data},
            }
        },
        "train": {
            "steps": 6,
            "batch_size": 8,
            "ckpt_every": 2,
            "log_every": 1,
            "warmup_steps": 1,
            "threads": 1,
            "workers": 2,
        },
    }


@pytest.mark.parametrize(
    "data, streamed",
    [
        ({}, False),
        ({"cache_max_mb": 0.01}, True),
        ({"cache": "stream"}, True),
        ({"cache": "memory", "cache_max_mb": 0}, False),
    ],
)
def test_cache_policy_decodes_small_sets_and_streams_the_rest(folder, data, streamed):
    cfg = parse_config(_cfg(folder, **data))
    d = build_task_data("t", cfg.tasks["t"], cfg)
    assert d.train.in_memory != streamed and d.eval["test"].in_memory != streamed
    assert len(d.train) + len(d.eval["test"]) == 40
    if not streamed:
        assert d.train.image_shape == (3, 24, 16)  # decoded at the task's own size
    assert ("streamed" in d.notes[-1]) == streamed


def test_streamed_training_resumes_exactly_after_a_crash(folder, tmp_path):
    cfg = parse_config(_cfg(folder, cache="stream"))
    full = Trainer(cfg, tmp_path / "full", show_progress=False)
    summary = full.fit()
    assert summary["first_step_s"] > 0

    class Crash(Trainer):
        def train_step(self):
            if self.step == 4:
                raise KeyboardInterrupt
            return super().train_step()

    with pytest.raises(KeyboardInterrupt):
        Crash(cfg, tmp_path / "run", show_progress=False).fit()
    Trainer(cfg, tmp_path / "run", show_progress=False).fit(resume=True)
    from ufo.checkpoint import load_checkpoint

    a, _ = load_checkpoint(tmp_path / "full" / "model.safetensors")
    b, _ = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


@pytest.mark.slow
def test_torchrun_ranks_stream_their_parts_and_match_one_process(folder, tmp_path):
    cfg = _cfg(folder, cache="stream")
    cfg["model"]["drop_path_rate"] = 0.0
    cfg["tasks"]["t"]["augment"] = AUG
    cfg["tasks"]["d"] = {"kind": "classification", "data": {"recipe": "digits", "max_train": 400}}
    cfg["tasks"]["t"]["batch"], cfg["tasks"]["d"]["batch"] = 8, 8
    cfg["train"] = {**cfg["train"], "steps": 6, "batch_size": 16}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    one, two = train_one_and_two_processes(path, tmp_path)
    l1, l2 = ([float(r["loss"]) for r in log] for log in (one, two))
    assert len(l1) == len(l2) == 6 and max(abs(a - b) for a, b in zip(l1, l2)) <= 1e-4, (l1, l2)


def test_ranks_take_whole_identity_groups_of_a_grouped_task(folder):
    """P x K tasks go to the ranks a K-row identity group at a time: dealt one row at a time, K = 4
    over 4 ranks would leave every rank one sample per identity and no positive pair. Together the
    ranks still hold exactly the global batch."""
    mem = read_image_folder(folder, image_size=16)  # 4 classes of 10
    groups = mem.labels.numpy()

    def loader(rank: int, world: int) -> MixedLoader:
        sampler = MixedTaskSampler([TaskSource("t", 40, groups, k=4)], 16, seed=2)
        return MixedLoader([Feed("t", 0, mem, (16, 16))], sampler, rank=rank, world=world, workers=0)

    _, _, y = loader(0, 1).next()
    assert sorted(torch.bincount(y).tolist()) == [4, 4, 4, 4]  # P = 4 identities, K = 4 each
    parts = []
    for rank in range(4):
        ld = loader(rank, 4)
        _, _, yr = ld.next()
        assert torch.bincount(yr).max() == 4 and len(yr) == 4 and ld.local_rows() == {"t": 4}  # one whole group
        parts.append(yr)
    assert torch.equal(torch.cat(parts), y)  # rank r holds group r, in plan order
