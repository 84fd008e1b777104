"""Splits: deterministic for a seed, stratified, disjoint classes / identities, query-gallery."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import require_shared_data
from ufo.data import (
    ImageSet,
    load_recipe,
    split_by_class,
    split_by_identity,
    split_by_sample,
    split_query_gallery,
)
from ufo.errors import DataError


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    return load_recipe("digits")


@pytest.fixture(scope="module")
def tracks() -> ImageSet:
    return load_recipe("gtsrb-tracks", root=require_shared_data())


def _toy(labels: list[int], identities: list[int] | None = None) -> ImageSet:
    n = len(labels)
    return ImageSet(
        images=torch.zeros(n, 1, 2, 2, dtype=torch.uint8),
        labels=torch.tensor(labels),
        class_names=[f"c{i}" for i in range(max(labels) + 1)],
        identities=None if identities is None else torch.tensor(identities),
        name="toy",
    )


def test_split_by_sample_deterministic_and_stratified(digits: ImageSet):
    tr, te = split_by_sample(digits, 0.2, seed=3)
    tr2, te2 = split_by_sample(digits, 0.2, seed=3)
    assert tr.origin == tr2.origin and te.origin == te2.origin
    assert split_by_sample(digits, 0.2, seed=4)[1].origin != te.origin
    assert len(tr) + len(te) == len(digits) and not set(tr.origin) & set(te.origin)
    assert len(te) == 360
    share = te.counts().double() / digits.counts().double()
    assert torch.all((share - 0.2).abs() < 0.02), share  # every class keeps its 20% share
    assert tr.class_names == digits.class_names  # labels are not renumbered


def test_split_by_sample_unstratified_and_errors(digits: ImageSet):
    _tr, te = split_by_sample(digits, 0.5, seed=0, stratify=False)
    assert len(te) == 899
    with pytest.raises(DataError, match="strictly between 0 and 1"):
        split_by_sample(digits, 1.5)
    with pytest.raises(DataError, match=r"class 'c2' has a single sample"):
        split_by_sample(_toy([0, 0, 1, 1, 2]), 0.4)
    with pytest.raises(DataError, match="has no official split"):
        split_by_sample(digits, use_official=True)


def test_official_split():
    ds = load_recipe("gtsrb", root=require_shared_data())
    tr, te = split_by_sample(ds, use_official=True)
    assert len(tr) == 9030 and len(te) == 4300
    assert set(tr.split) == {"train"} and set(te.split) == {"test"}


def test_split_by_class_disjoint(digits: ImageSet):
    tr, te = split_by_class(digits, test_fraction=0.3, seed=1)
    assert tr.num_classes + te.num_classes == 10 and te.num_classes == 3
    assert not set(tr.class_names) & set(te.class_names)
    assert tr.labels.max() == tr.num_classes - 1 and te.labels.max() == te.num_classes - 1  # relabelled
    again = split_by_class(digits, test_fraction=0.3, seed=1)[1]
    assert again.class_names == te.class_names
    tr, te = split_by_class(digits, test_classes=["3", "7"])
    assert te.class_names == ["3", "7"] and len(te) == 183 + 179
    assert split_by_class(digits, test_classes=4, seed=0)[1].num_classes == 4
    with pytest.raises(DataError, match="exactly one of"):
        split_by_class(digits)
    with pytest.raises(DataError, match="test class 'x' is not a class name"):
        split_by_class(digits, test_classes=["x"])


def test_split_by_identity_disjoint(tracks: ImageSet):
    tr, te = split_by_identity(tracks, 0.25, seed=0)
    assert not set(tr.identities.tolist()) & set(te.identities.tolist())
    assert len(set(te.identities.tolist())) == 76 and len(tr) + len(te) == 9030
    assert tr.num_classes == 225 and te.num_classes == 76
    assert split_by_identity(tracks, 0.25, seed=0)[1].origin == te.origin
    assert split_by_identity(tracks, 0.25, seed=1)[1].origin != te.origin


def test_split_by_identity_uses_identities_over_labels():
    ds = _toy([0, 0, 1, 1, 0, 0, 1, 1], identities=[5, 5, 5, 5, 6, 6, 7, 7])
    tr, te = split_by_identity(ds, 0.34, seed=0, relabel=False)
    assert not set(tr.identities.tolist()) & set(te.identities.tolist())
    unknown = _toy([0, 0, 1, 1, 1], identities=[1, 1, 2, 2, -1])
    with pytest.warns(UserWarning, match="left 1 samples with unknown"):
        tr, te = split_by_identity(unknown, 0.5)
    assert len(tr) + len(te) == 4


def test_query_gallery(tracks: ImageSet):
    _, te = split_by_identity(tracks, 0.25, seed=0)
    q, g = split_query_gallery(te, seed=0)
    assert len(q) == 76 and len(g) == len(te) - 76
    assert q.identities.unique().numel() == 76 and set(q.identities.tolist()) <= set(g.identities.tolist())
    assert not set(q.origin) & set(g.origin) and q.class_names == g.class_names
    assert split_query_gallery(te, seed=0)[0].origin == q.origin
    q3, _ = split_query_gallery(te, seed=0, queries_per_identity=3)
    assert torch.all(torch.bincount(q3.identities)[q3.identities.unique()] == 3)


def test_query_gallery_single_image_identity():
    ds = _toy([0, 0, 1, 2, 2], identities=[10, 10, 11, 12, 12])
    with pytest.raises(DataError, match=r"identity 11 \('c1', e\.g\. toy\[2\]\) has 1 sample"):
        split_query_gallery(ds)
    with pytest.warns(UserWarning, match=r"1 identity\(s\) had too few samples.*identity 11"):
        q, g = split_query_gallery(ds, on_error="skip")
    assert sorted(q.identities.tolist()) == [10, 12] and 11 in g.identities.tolist()
    labels_only = _toy([0, 0, 1, 1, 1])
    q, g = split_query_gallery(labels_only, seed=0)
    assert q.labels.tolist() == [0, 1] and np.bincount(g.labels.numpy()).tolist() == [1, 2]
