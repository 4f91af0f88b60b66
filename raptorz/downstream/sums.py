"""How a pass's partial results combine: float64 sums and moments of groups of rows, added
(or merged) in an order fixed by the number of groups, so that a pass on one machine and
the same pass on Dask workers give the same numbers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final, TypeVar

import numpy as np

from raptorz.defaults import BATCH

#: Partial results summed (or merged) together at once: see :func:`tree_reduce`.
FAN_IN: Final = 8

T = TypeVar("T")


def tree_reduce(parts: Iterable[T], combine: Callable[[list[T]], T]) -> T | None:
    """Combine ``parts`` :data:`FAN_IN` consecutive ones at a time, then those results
    likewise, up to one (``None`` for no parts), holding at most ``FAN_IN`` per level.

    The grouping depends only on the number of parts, so a pass summed here and the same
    pass summed on Dask workers (``combine`` submitting a task) add the same numbers in
    the same order.
    """
    levels: list[list[T]] = []
    for part in parts:
        level = 0
        while True:
            if len(levels) == level:
                levels.append([])
            levels[level].append(part)
            if len(levels[level]) < FAN_IN:
                break
            part, levels[level] = combine(levels[level]), []
            level += 1
    carry: list[T] = []
    for items in levels:
        items = items + carry
        carry = [items[0] if len(items) == 1 else combine(items)] if items else []
    return carry[0] if carry else None


def add(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Partial sums added in turn."""
    total = [a.copy() for a in parts[0]]
    for part in parts[1:]:
        for into, value in zip(total, part, strict=True):
            into += value
    return total


Moments = tuple[int, np.ndarray, np.ndarray]


def moments(x: np.ndarray) -> Moments:
    """Count, mean and summed squared deviations of each column of ``x``, in float64,
    one :data:`BATCH` of rows at a time."""
    total: Moments = (0, np.zeros(x.shape[1]), np.zeros(x.shape[1]))
    for start in range(0, len(x), BATCH):
        batch = x[start:start + BATCH].astype(np.float64)
        mean = batch.mean(axis=0)
        total = merge_moments([total, (len(batch), mean, ((batch - mean) ** 2).sum(axis=0))])
    return total


def merge_moments(parts: list[Moments]) -> Moments:
    """Merge moments in turn with Chan et al.'s pairwise update, stable where a plain
    sum of squares would cancel."""
    count, mean, m2 = parts[0]
    for n, part_mean, part_m2 in parts[1:]:
        if n == 0:
            continue
        total, delta = count + n, part_mean - mean
        mean = mean + delta * (n / total)
        m2 = m2 + part_m2 + delta**2 * (count * n / total)
        count = total
    return count, mean, m2


def standard(merged: Moments | None, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation from merged moments. Constant features get a standard
    deviation of 1, so that standardizing leaves them at 0; "constant" allows for the
    rounding of float32 features (a spread below 1e-6 of the mean's size)."""
    count, mean, m2 = merged or (0, np.zeros(n_features), np.zeros(n_features))
    std = np.sqrt(m2 / max(count, 1))
    std[std <= 1e-6 * np.abs(mean) + np.finfo(np.float32).tiny] = 1.0
    return mean, std
