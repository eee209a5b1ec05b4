"""Splits that respect content: identical files always land on the same side. No TensorFlow.

A folder often holds the same photo twice (`x.jpg` and `x_copy.jpg`). If one
copy trains and the other validates, the validation score measures memory,
not generalisation. Every split of the tool (train/validation, the folds of
cross-validation, tune's held-out estimate, the audit's out-of-fold scores)
therefore splits *groups* of byte-identical files (same `ImageRecord.digest`),
never the files themselves.

    content_groups   group id per record, from the content hash
    grouped_split    stratified train/validation split of groups; every class
                     with at least two distinct images gets at least one
                     validation image
    grouped_folds    stratified K-fold of groups (StratifiedGroupKFold when any
                     group holds two files, StratifiedKFold otherwise)
    overlap          the records of one scan whose content is also in another

Without duplicates the split is the one `train_test_split` always made here,
so seeds and figures are unchanged; only classes it left out of validation
are then given one image.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SplitResult:
    """A train/validation split of rows.

    Attributes:
        train, val: sorted row indices (int arrays), disjoint, covering every row.
        n_duplicates: rows that share their content with an earlier row (0 when all distinct).
        n_groups: groups of two or more identical rows.
        unvalidated: class indices with rows but none in `val` (fewer than two distinct images).
    """

    train: np.ndarray
    val: np.ndarray
    n_duplicates: int
    n_groups: int
    unvalidated: tuple[int, ...]


def content_groups(digests) -> np.ndarray:
    """Group id (n,) int per row: rows with the same content digest share one id, numbered by first appearance."""
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(d, len(ids)) for d in digests], dtype=np.int64)


def group_labels(labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Label (n_groups,) of each group: its most common row label, ties to the lower index.

    A group with two labels is a label conflict (`profile` warns about it); it
    still goes to one side whole.
    """
    votes: dict[int, Counter] = {}
    for label, group in zip(labels.tolist(), groups.tolist()):
        votes.setdefault(group, Counter())[label] += 1
    return np.array([min(votes[g].items(), key=lambda kv: (-kv[1], kv[0]))[0] for g in range(len(votes))],
                    dtype=np.int64)


def grouped_split(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int = 0) -> SplitResult:
    """A stratified, seeded split of whole groups, about `fraction` of them validating.

    Args:
        labels: (n,) class index per row.
        groups: (n,) group id per row (`content_groups`), ids 0..G-1.
        fraction: in (0, 1), the share of groups held out.

    Returns:
        A `SplitResult`. A class with one distinct image cannot be validated:
        it trains, and is listed in `unvalidated`.
    """
    from sklearn.model_selection import train_test_split

    glabels = group_labels(labels, groups)
    counts = np.bincount(glabels, minlength=int(labels.max()) + 1)
    usable = np.flatnonzero(counts[glabels] >= 2)  # groups of classes with >= 2 distinct images
    n_classes = int((counts >= 2).sum())
    val_groups = np.array([], dtype=np.int64)
    if n_classes and len(usable) > n_classes:
        n_val = min(max(n_classes, int(round(len(glabels) * fraction))), len(usable) - n_classes)
        _, val_groups = train_test_split(usable, test_size=n_val, stratify=glabels[usable], random_state=seed)
    val_groups = _repair(val_groups, usable, glabels, seed)
    in_val = np.isin(groups, val_groups)
    present = set(labels[in_val].tolist())
    unvalidated = tuple(int(c) for c in np.flatnonzero(np.bincount(labels, minlength=len(counts))) if c not in present)
    sizes = np.bincount(groups)
    return SplitResult(np.flatnonzero(~in_val), np.flatnonzero(in_val), int(len(groups) - len(sizes)),
                       int((sizes >= 2).sum()), unvalidated)


def _repair(val_groups: np.ndarray, usable: np.ndarray, glabels: np.ndarray, seed: int) -> np.ndarray:
    """Add one group of each class with >= 2 distinct images that the split left out of validation."""
    rng = np.random.default_rng(seed)
    have = set(glabels[val_groups].tolist())
    added = []
    for label in sorted(set(glabels[usable].tolist()) - have):
        members = usable[glabels[usable] == label]
        added.append(int(rng.choice(members)))
    return np.sort(np.concatenate([val_groups, np.array(added, dtype=np.int64)])) if added else np.sort(val_groups)


def grouped_folds(labels: np.ndarray, groups: np.ndarray | None, n_folds: int, seed: int = 0,
                  repeats: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified K-fold (train rows, test rows) pairs that never split a group, `repeats` times reshuffled.

    Args:
        labels: (n,) class index per row.
        groups: (n,) group id per row, or None (every row its own group).
        n_folds: 2 or more; at most the smallest class's number of distinct images.
        repeats: >= 1; each repetition draws new folds (seed + repetition).

    Without a group of two rows this is exactly scikit-learn's (Repeated)StratifiedKFold.
    """
    from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedGroupKFold, StratifiedKFold

    x = np.zeros(len(labels))
    if groups is None or len(np.unique(groups)) == len(groups):
        if repeats > 1:
            return list(RepeatedStratifiedKFold(n_splits=n_folds, n_repeats=repeats, random_state=seed).split(x, labels))
        return list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(x, labels))
    splits = []
    for repetition in range(repeats):
        splitter = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed + repetition)
        splits.extend(splitter.split(x, labels, groups))
    return splits


def distinct_per_class(labels: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Distinct contents (n_classes,) per class: what a stratified fold can actually divide."""
    if groups is None:
        return np.bincount(labels)
    pairs = np.unique(np.stack([labels, groups], axis=1), axis=0)
    return np.bincount(pairs[:, 0], minlength=int(labels.max()) + 1)


def overlap(records, other_records) -> list:
    """The records of `records` whose content digest also occurs in `other_records` (order kept)."""
    seen = {r.digest for r in other_records}
    return [r for r in records if r.digest in seen]
