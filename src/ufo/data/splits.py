"""Deterministic splits of an `ImageSet` for each task kind.

- classification: `split_by_sample` (stratified, or the official split when there is one);
- open-set retrieval: `split_by_class` (test classes never seen in training);
- verification / re-identification: `split_by_identity` (test identities never seen in
  training), then `split_query_gallery` on the test part;
- a set's own split (`ImageSet.split`, e.g. Market-1501's train / query / gallery):
  `split_official`, with `check_disjoint` for the kinds whose protocol needs unseen classes or
  identities.

The same (set, arguments, seed) always gives the same split, on any machine: the random draws
come from sklearn with an integer random_state or from numpy's default_rng(seed), never from
global state. Indices inside each part keep the set's original order.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from sklearn.model_selection import GroupShuffleSplit, train_test_split

from ufo.data.dataset import ImageSet
from ufo.errors import DataError


def _check_fraction(test_fraction: float, what: str = "test_fraction") -> None:
    if not (isinstance(test_fraction, (int, float)) and 0.0 < float(test_fraction) < 1.0):
        raise DataError(f"{what} must be a number strictly between 0 and 1, got {test_fraction!r}")


def _parts(ds: ImageSet, train_idx: np.ndarray, test_idx: np.ndarray, relabel: bool) -> tuple[ImageSet, ImageSet]:
    train, test = ds.subset(np.sort(train_idx)), ds.subset(np.sort(test_idx))
    return (train.relabel(), test.relabel()) if relabel else (train, test)


def split_by_sample(
    ds: ImageSet,
    test_fraction: float = 0.2,
    seed: int = 0,
    stratify: bool = True,
    use_official: bool = False,
) -> tuple[ImageSet, ImageSet]:
    """Split samples at random into (train, test), the same classes on both sides.

    With `stratify`, each class keeps its share in both parts (sklearn `train_test_split` with
    `stratify=labels`). With `use_official=True` the set's own `split` column is used instead:
    samples marked "train" go to train, every other sample to test (test_fraction and seed are
    then unused). Labels are not renumbered."""
    if use_official:
        if ds.split is None:
            raise DataError(f"{ds.name}: has no official split; use use_official=False to draw a random one")
        is_train = np.array([s == "train" for s in ds.split])
        if is_train.all() or not is_train.any():
            raise DataError(f"{ds.name}: the official split has no {'test' if is_train.all() else 'train'} samples")
        return ds.subset(np.flatnonzero(is_train)), ds.subset(np.flatnonzero(~is_train))
    _check_fraction(test_fraction)
    labels = ds.labels.numpy()
    if stratify:
        counts = np.bincount(labels, minlength=ds.num_classes)
        small = [ds.class_names[c] for c in np.flatnonzero((counts > 0) & (counts < 2))]
        if small:
            raise DataError(
                f"{ds.name}: cannot stratify, class {small[0]!r} has a single sample "
                f"({len(small)} such classes); pass stratify=False or drop them"
            )
    try:
        train_idx, test_idx = train_test_split(
            np.arange(len(ds)), test_size=test_fraction, random_state=seed, stratify=labels if stratify else None
        )
    except ValueError as e:  # e.g. fewer test samples than classes
        raise DataError(f"{ds.name}: cannot split {len(ds)} samples with test_fraction={test_fraction}: {e}") from None
    return _parts(ds, train_idx, test_idx, relabel=False)


def _group_split(
    ds: ImageSet, groups: np.ndarray, test_size: float | int, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise DataError(f"{ds.name}: needs at least 2 {what} to split them, found {n_groups}")
    try:
        gss = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
        train_idx, test_idx = next(gss.split(np.zeros(len(groups)), groups=groups))
    except ValueError as e:
        raise DataError(f"{ds.name}: cannot split {n_groups} {what} with test size {test_size}: {e}") from None
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise DataError(f"{ds.name}: test size {test_size} leaves one side without {what}")
    return train_idx, test_idx


def split_by_class(
    ds: ImageSet,
    test_fraction: float | None = None,
    seed: int = 0,
    test_classes: int | Sequence[str | int] | None = None,
    relabel: bool = True,
) -> tuple[ImageSet, ImageSet]:
    """Split into (train, test) with disjoint classes, for open-set retrieval.

    Give either `test_fraction` (share of the classes drawn at random, sklearn
    `GroupShuffleSplit` with classes as groups), or `test_classes`: a number of classes to draw,
    or the class names / label values to hold out. With `relabel`, each part's labels are
    renumbered 0..k-1 so the train part can feed a classifier head directly."""
    if (test_fraction is None) == (test_classes is None):
        raise DataError("split_by_class needs exactly one of test_fraction and test_classes")
    labels = ds.labels.numpy()
    if test_classes is not None and not isinstance(test_classes, (int, np.integer)):
        index = {n: i for i, n in enumerate(ds.class_names)}
        held = []
        for c in test_classes:
            if isinstance(c, str):
                if c not in index:
                    raise DataError(f"{ds.name}: test class {c!r} is not a class name of this set")
                held.append(index[c])
            elif 0 <= int(c) < ds.num_classes:
                held.append(int(c))
            else:
                raise DataError(f"{ds.name}: test class {c!r} is outside 0..{ds.num_classes - 1}")
        is_test = np.isin(labels, held)
        if is_test.all() or not is_test.any():
            raise DataError(f"{ds.name}: test_classes {list(test_classes)} leave one side empty")
        return _parts(ds, np.flatnonzero(~is_test), np.flatnonzero(is_test), relabel)
    if test_fraction is not None:
        _check_fraction(test_fraction)
    size = test_fraction if test_fraction is not None else int(test_classes)  # type: ignore[arg-type]
    train_idx, test_idx = _group_split(ds, labels, size, seed, "classes")
    return _parts(ds, train_idx, test_idx, relabel)


def _identity_groups(ds: ImageSet) -> tuple[np.ndarray, str]:
    if ds.identities is not None:
        return ds.identities.numpy(), "identity"
    return ds.labels.numpy(), "class"


def split_by_identity(
    ds: ImageSet, test_fraction: float = 0.5, seed: int = 0, relabel: bool = True
) -> tuple[ImageSet, ImageSet]:
    """Split into (train, test) with disjoint identities, for verification and
    re-identification: `identities` when the set has them, else labels (sklearn
    `GroupShuffleSplit`, test_fraction of the identities). Samples with a negative (unknown)
    identity, such as GTSRB test images, are left out of both parts, with a warning."""
    _check_fraction(test_fraction)
    groups, what = _identity_groups(ds)
    known = np.flatnonzero(groups >= 0)
    if len(known) < len(groups):
        warnings.warn(
            f"{ds.name}: left {len(groups) - len(known)} samples with unknown (negative) identity out of the split",
            stacklevel=2,
        )
    tr, te = _group_split(ds, groups[known], test_fraction, seed, f"{what}s")
    return _parts(ds, known[tr], known[te], relabel)


def split_query_gallery(
    ds: ImageSet,
    seed: int = 0,
    queries_per_identity: int = 1,
    on_error: Literal["raise", "skip"] = "raise",
) -> tuple[ImageSet, ImageSet]:
    """Split an evaluation set into (query, gallery): for each identity (`identities`, else
    labels) `queries_per_identity` random samples become queries and the rest gallery, so every
    query has at least one true match. An identity with too few samples is an error naming it, or
    with on_error="skip" its samples all go to the gallery (as distractors) with a warning.
    Negative (unknown) identities go to the gallery. Labels are kept so query and gallery share
    one label space."""
    if queries_per_identity < 1:
        raise DataError(f"queries_per_identity must be >= 1, got {queries_per_identity}")
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    groups, what = _identity_groups(ds)
    rng = np.random.default_rng(seed)
    query, too_few = [], []
    for g in np.unique(groups[groups >= 0]):
        idx = np.flatnonzero(groups == g)
        if len(idx) <= queries_per_identity:
            label = ds.class_names[int(ds.labels[idx[0]])]
            desc = f"{what} {int(g)} ({label!r}, e.g. {ds.origin[idx[0]]}) has {len(idx)} sample(s)"
            if on_error == "raise":
                raise DataError(
                    f"{ds.name}: {desc}; a query needs at least one other sample of its {what} in the gallery "
                    f"(lower queries_per_identity={queries_per_identity} or pass on_error='skip')"
                )
            too_few.append(desc)
            continue
        query.extend(rng.permutation(idx)[:queries_per_identity].tolist())
    if too_few:
        warnings.warn(
            f"{ds.name}: {len(too_few)} {what}(s) had too few samples for a query and went to the gallery only: "
            + "; ".join(too_few[:3]),
            stacklevel=2,
        )
    if not query:
        raise DataError(f"{ds.name}: no {what} has enough samples to make a query")
    is_query = np.zeros(len(ds), dtype=bool)
    is_query[query] = True
    return ds.subset(torch.from_numpy(np.flatnonzero(is_query))), ds.subset(torch.from_numpy(np.flatnonzero(~is_query)))


def split_official(ds: ImageSet, parts: Sequence[str], rest: str | None = None) -> dict[str, ImageSet]:
    """The set's own split (`ds.split`): one subset per name in `parts`, labels unchanged and
    samples in their original order. Samples with another split value go to the part `rest` when
    it is given, else they are an error naming the value; a part left empty is an error."""
    if ds.split is None:
        raise DataError(f"{ds.name}: has no official split; use use_official_split: false to draw one")
    values = np.array(ds.split, dtype=object)
    named = np.isin(values, list(parts))
    if rest is None and not named.all():
        other = sorted(set(values[~named].tolist()))
        raise DataError(f"{ds.name}: official split value(s) {other} are none of {list(parts)}")
    out = {p: np.flatnonzero(values == p) for p in parts}
    if rest is not None:
        out[rest] = np.flatnonzero(~named)
    for p, idx in out.items():
        if len(idx) == 0:
            raise DataError(
                f"{ds.name}: the official split has no {p!r} samples "
                f"(its values are {sorted(set(ds.split))}); use use_official_split: false to draw one"
            )
    return {p: ds.subset(idx) for p, idx in out.items()}


def check_disjoint(train: ImageSet, test: ImageSet, what: Literal["classes", "identities"]) -> None:
    """Raise a DataError when the official train and test parts share classes (`labels`, by name)
    or identities (`identities`, else labels; negative ones are unknown and never shared): open-set
    retrieval and verification must be scored on classes / identities unseen in training."""

    def keys(ds: ImageSet) -> set:
        if what == "identities" and ds.identities is not None:
            return set(ds.identities[ds.identities >= 0].tolist())
        return {ds.class_names[i] for i in torch.unique(ds.labels).tolist()}

    shared = keys(train) & keys(test)
    if shared:
        eg = ", ".join(map(str, sorted(shared)[:3]))
        raise DataError(
            f"{train.name}: the official split shares {len(shared)} {what} between train and test "
            f"(e.g. {eg}); this kind is scored on {what} unseen in training, so set "
            "use_official_split: false to draw a disjoint split"
        )
