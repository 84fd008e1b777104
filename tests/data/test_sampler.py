"""MixedTaskSampler: batch composition per mode, P x K structure, epoch coverage, determinism and
exact resumption from a JSON round-tripped state."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from ufo.data.sampler import MixedTaskSampler, TaskSource, pk_capacity
from ufo.errors import DataError


def _groups(n_groups: int, per_group: int) -> np.ndarray:
    return np.repeat(np.arange(n_groups), per_group)


def _tasks() -> list[TaskSource]:
    return [
        TaskSource("cls", 600),
        TaskSource("face", 200),
        TaskSource("reid", 160, groups=_groups(40, 4), k=4),
    ]


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[t], b[t]) for t in a)


def _check_pk(idx: np.ndarray, groups: np.ndarray, k: int, p: int) -> None:
    labels = groups[idx]
    assert len(idx) == p * k
    blocks = labels.reshape(p, k)
    assert (blocks == blocks[:, :1]).all(), "each block of K samples comes from one group"
    assert len(set(blocks[:, 0].tolist())) == p, "the P groups are distinct"


# ---- hetero ----


def test_hetero_explicit_quotas_every_step() -> None:
    q = {"cls": 20, "face": 4, "reid": 8}
    s = MixedTaskSampler(_tasks(), 32, quotas=q, seed=1)
    assert s.quotas() == q
    for _ in range(30):
        b = s.next()
        assert list(b) == ["cls", "face", "reid"]
        assert {t: len(v) for t, v in b.items()} == q
        assert all(v.dtype == np.int64 for v in b.values())
    assert s.step == 30


def test_hetero_temperature_one_is_proportional() -> None:
    tasks = [TaskSource("a", 3000), TaskSource("b", 1000), TaskSource("c", 500)]
    q = MixedTaskSampler(tasks, 90).quotas()
    assert q == {"a": 60, "b": 20, "c": 10}
    q = MixedTaskSampler(tasks, 91).quotas()  # largest remainder: a 60.67, b 20.22, c 10.11
    assert q == {"a": 61, "b": 20, "c": 10} and sum(q.values()) == 91


def test_hetero_large_temperature_is_uniform_and_minimums_hold() -> None:
    tasks = [TaskSource("a", 100000), TaskSource("b", 10), TaskSource("c", 1000)]
    assert MixedTaskSampler(tasks, 90, temperature=1e6).quotas() == {"a": 30, "b": 30, "c": 30}
    q = MixedTaskSampler(tasks, 64).quotas()  # b would get 0.006: it still gets one sample
    assert q == {"a": 62, "b": 1, "c": 1}
    s = MixedTaskSampler(tasks, 64, temperature=2.0)  # sqrt sizes: 57.6, 0.58, 5.8
    qs = s.quotas()
    assert qs == {"a": 57, "b": 1, "c": 6}
    for _ in range(10):
        assert {t: len(v) for t, v in s.next().items()} == qs


def test_hetero_grouped_quota_is_multiple_of_k_and_at_least_2k() -> None:
    tasks = [TaskSource("big", 10000), TaskSource("reid", 160, groups=_groups(40, 4), k=4)]
    q = MixedTaskSampler(tasks, 64).quotas()
    assert q["reid"] == 8 and q["big"] == 56  # 1 would be proportional; the floor is 2*k
    q = MixedTaskSampler(tasks, 64, temperature=1e6).quotas()
    assert q["reid"] % 4 == 0 and sum(q.values()) == 64
    with pytest.raises(DataError, match=r"batch_size >= 9"):
        MixedTaskSampler(tasks, 8)
    with pytest.raises(DataError, match="multiple of k=4"):
        MixedTaskSampler(tasks, 64, quotas={"big": 54, "reid": 10})
    with pytest.raises(DataError, match="at least 2\\*k=8"):
        MixedTaskSampler(tasks, 64, quotas={"big": 60, "reid": 4})


def test_hetero_all_grouped_uses_whole_groups() -> None:
    tasks = [TaskSource("a", 400, groups=_groups(100, 4), k=4), TaskSource("b", 600, groups=_groups(100, 6), k=6)]
    q = MixedTaskSampler(tasks, 50).quotas()
    assert q["a"] % 4 == 0 and q["b"] % 6 == 0 and sum(q.values()) == 50
    four = [TaskSource("a", 400, groups=_groups(100, 4), k=4), TaskSource("c", 400, groups=_groups(100, 4), k=4)]
    with pytest.raises(DataError, match="whole groups"):
        MixedTaskSampler(four, 30)  # 30 is not a sum of 4s
    with pytest.raises(DataError, match="800 in all"):
        MixedTaskSampler(four, 804)  # 2 * 100 groups * k=4 = 800 distinct-group slots


def test_pk_structure() -> None:
    groups = np.random.default_rng(0).permutation(_groups(38, 4))  # labels scattered over the task
    tasks = [TaskSource("cls", 600), TaskSource("reid", 152, groups=groups, k=4)]
    s = MixedTaskSampler(tasks, 40, quotas={"cls": 24, "reid": 16}, seed=3)
    seen = Counter()
    for _ in range(25):  # 100 groups: two epochs of 38 end inside a batch (deferred, not repeated)
        idx = s.next()["reid"]
        _check_pk(idx, groups, k=4, p=4)
        assert len(set(idx.tolist())) == 16, "groups of >= K samples are drawn without replacement"
        seen.update(groups[idx[::4]].tolist())
    assert set(seen) == set(range(38)) and max(seen.values()) - min(seen.values()) <= 1  # every group each epoch


def test_pk_small_groups_keep_every_member() -> None:
    groups = np.array([0, 0, 1, 1, 1, 2, 2, 3])  # group 3 has one sample: not eligible
    s = MixedTaskSampler([TaskSource("reid", 8, groups=groups, k=4)], 8, mode="round_robin")
    for _ in range(20):
        idx = s.next()["reid"]
        _check_pk(idx, groups, k=4, p=2)
        assert 7 not in idx
        for block in idx.reshape(2, 4):
            assert set(block.tolist()) == set(np.flatnonzero(groups == groups[block[0]]).tolist())


def test_too_few_groups_raises_with_counts() -> None:
    groups = np.array([0, 0, 1, 2, 3, 3, 4])  # 5 groups, 2 with >= 2 samples
    tasks = [TaskSource("cls", 100), TaskSource("reid", 7, groups=groups, k=2)]
    with pytest.raises(DataError, match=r"'reid'.*P=3.*K=2.*5 groups.*only 2 have >= 2"):
        MixedTaskSampler(tasks, 16, quotas={"cls": 10, "reid": 6})
    one = np.array([0, 0, 0, 1, 2])
    with pytest.raises(DataError, match=r"'solo'.*P=2.*3 groups.*only 1 have >= 2"):
        MixedTaskSampler([TaskSource("cls", 10), TaskSource("solo", 5, groups=one, k=2)], 16)


def test_pk_capacity_is_the_largest_batch_a_grouped_task_fills() -> None:
    groups = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])  # 4 groups, 3 with >= 2 samples
    assert pk_capacity(groups, 4) == 12 and pk_capacity(groups, 2) == 6
    solo = [TaskSource("reid", len(groups), groups=groups, k=2)]
    batch = MixedTaskSampler(solo, pk_capacity(groups, 2)).next()["reid"]
    assert len(batch) == 6 and len(set(groups[batch])) == 3  # every eligible group, K each
    with pytest.raises(DataError, match="distinct groups"):
        MixedTaskSampler(solo, pk_capacity(groups, 2) + 2)


# ---- other modes ----


def test_round_robin_order() -> None:
    s = MixedTaskSampler(_tasks(), 24, mode="round_robin")
    for step in range(9):
        b = s.next()
        assert list(b) == [["cls", "face", "reid"][step % 3]] and len(next(iter(b.values()))) == 24
    with pytest.raises(DataError, match="hetero mode only"):
        s.quotas()


def test_proportional_distribution() -> None:
    tasks = [TaskSource("a", 6000), TaskSource("b", 3000), TaskSource("c", 1000)]
    s = MixedTaskSampler(tasks, 20, mode="proportional", seed=5)
    totals, absent = Counter(), 0
    for _ in range(500):
        b = s.next()
        assert sum(len(v) for v in b.values()) == 20
        assert all(len(v) > 0 for v in b.values()), "absent tasks are not keys"
        absent += "c" not in b
        totals.update({t: len(v) for t, v in b.items()})
    n = sum(totals.values())
    assert abs(totals["a"] / n - 0.6) < 0.02 and abs(totals["b"] / n - 0.3) < 0.02 and abs(totals["c"] / n - 0.1) < 0.02
    assert absent > 0  # P(c absent) = 0.9 ** 20 ~ 0.12


def test_epoch_coverage_plain_task() -> None:
    s = MixedTaskSampler([TaskSource("a", 1000), TaskSource("b", 10)], 7, quotas={"a": 4, "b": 3}, seed=2)
    drawn = np.concatenate([s.next()["b"] for _ in range(10)])  # 30 draws = 3 epochs of 10
    for e in range(3):
        assert sorted(drawn[10 * e : 10 * (e + 1)].tolist()) == list(range(10))
    assert not np.array_equal(drawn[:10], drawn[10:20]), "reshuffled each epoch"
    big = MixedTaskSampler([TaskSource("x", 5)], 12, mode="round_robin").next()["x"]  # quota > size wraps
    assert sorted(big[:5].tolist()) == sorted(big[5:10].tolist()) == list(range(5))


# ---- determinism and resumption ----


@pytest.mark.parametrize("mode", ["hetero", "round_robin", "proportional"])
def test_determinism(mode: str) -> None:
    tasks = [TaskSource("cls", 600), TaskSource("face", 200), TaskSource("reid", 400, groups=_groups(100, 4), k=4)]
    a, b, c = (MixedTaskSampler(tasks, 32, mode=mode, seed=s) for s in (7, 7, 8))
    ra, rb, rc = ([x.next() for _ in range(20)] for x in (a, b, c))
    assert all(_same(x, y) for x, y in zip(ra, rb))
    assert not all(_same(x, y) for x, y in zip(ra, rc))


def test_task_stream_independent_of_other_quotas() -> None:
    t = [TaskSource("a", 100), TaskSource("b", 50)]
    s1 = MixedTaskSampler(t, 10, quotas={"a": 5, "b": 5})
    s2 = MixedTaskSampler(t, 12, quotas={"a": 5, "b": 7})
    a1 = np.concatenate([s1.next()["a"] for _ in range(30)])
    a2 = np.concatenate([s2.next()["a"] for _ in range(30)])
    assert np.array_equal(a1, a2)


@pytest.mark.parametrize("mode", ["hetero", "round_robin", "proportional"])
@pytest.mark.parametrize("saved_at", [0, 7, 23])
def test_resume_exact_after_json_roundtrip(mode: str, saved_at: int) -> None:
    tasks = [TaskSource("cls", 37), TaskSource("face", 11), TaskSource("reid", 60, groups=_groups(10, 6), k=3)]
    ref = MixedTaskSampler(tasks, 24, mode=mode, seed=4)
    run = MixedTaskSampler(tasks, 24, mode=mode, seed=4)
    for _ in range(saved_at):
        ref.next()
        run.next()
    text = json.dumps(run.state_dict())  # plain JSON: would raise on numpy values
    fresh = MixedTaskSampler(tasks, 24, mode=mode, seed=4)
    fresh.load_state_dict(json.loads(text))
    assert fresh.step == saved_at
    for _ in range(50):
        assert _same(fresh.next(), ref.next())
    assert json.dumps(fresh.state_dict()) == json.dumps(ref.state_dict())


def test_state_mismatch_raises() -> None:
    state = json.loads(json.dumps(MixedTaskSampler(_tasks(), 32, seed=1).state_dict()))
    cases = {
        "seed": MixedTaskSampler(_tasks(), 32, seed=2),
        "mode": MixedTaskSampler(_tasks(), 32, mode="round_robin", seed=1),
        "batch_size": MixedTaskSampler(_tasks(), 40, seed=1),
        "task list": MixedTaskSampler(_tasks()[:2], 32, seed=1),
        "'face' size": MixedTaskSampler([_tasks()[0], TaskSource("face", 201), _tasks()[2]], 32, seed=1),
        "'reid' group labels": MixedTaskSampler(
            _tasks()[:2] + [TaskSource("reid", 160, groups=np.arange(160) % 40, k=4)], 32, seed=1
        ),
    }
    for what, other in cases.items():
        with pytest.raises(DataError, match=what):
            other.load_state_dict(state)
    with pytest.raises(DataError, match="malformed"):
        MixedTaskSampler(_tasks(), 32, seed=1).load_state_dict({"step": 3})


# ---- input validation ----


def test_bad_inputs() -> None:
    t = [TaskSource("a", 10), TaskSource("b", 20)]
    with pytest.raises(DataError, match="hetero, round_robin, proportional"):
        MixedTaskSampler(t, 8, mode="random")
    with pytest.raises(DataError, match="batch_size"):
        MixedTaskSampler(t, 0)
    with pytest.raises(DataError, match="'c'"):
        MixedTaskSampler(t, 8, quotas={"a": 4, "b": 2, "c": 2})
    with pytest.raises(DataError, match="missing \\['b'\\]"):
        MixedTaskSampler(t, 8, quotas={"a": 8})
    with pytest.raises(DataError, match="sum to 7"):
        MixedTaskSampler(t, 8, quotas={"a": 4, "b": 3})
    with pytest.raises(DataError, match="'empty'.*size"):
        MixedTaskSampler([TaskSource("a", 10), TaskSource("empty", 0)], 8)
    with pytest.raises(DataError, match="duplicate"):
        MixedTaskSampler([TaskSource("a", 10), TaskSource("a", 5)], 8)
    with pytest.raises(DataError, match="one label per sample"):
        MixedTaskSampler([TaskSource("a", 10, groups=np.zeros(9))], 8)
    with pytest.raises(DataError, match="temperature"):
        MixedTaskSampler(t, 8, temperature=0.0)
