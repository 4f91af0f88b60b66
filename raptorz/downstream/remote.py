"""The heads' passes over the train rows on a Dask cluster (``raptorz fit --cluster``).

The first pass maps a read over the store's groups of train rows
(:meth:`~raptorz.downstream.features.Features.groups`, about a unit each): each worker reads
its groups from the store and keeps them in its memory, so that the features need fit
the workers' memory together, not the client's, and the store is read once for them.

The linear head: every later pass maps :func:`~raptorz.downstream.linear.group_sums` (or
the statistics' moments) over the groups where they lie, and adds the partial results on
the workers in the order fixed by the number of groups
(:func:`~raptorz.downstream.sums.tree_reduce`), the order of a pass on one machine: the
client receives one sum per pass, the single-machine numbers. The models' weights go to
every worker once per pass; each worker computes on the head's ``device`` as it resolves
it (``auto``: its own GPU where it has one).

The MLP: its mini-batches are sequential, so SGD runs on the client, but an epoch's
windows of train rows (:func:`~raptorz.downstream.heads.epoch_windows`, whole groups) are
gathered from the blocks the workers hold (:meth:`ClusterPasses.window`), not read from
the store: the same rows in the same order as on one machine, the same network.

Validation and test predictions are computed on the client from the store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from distributed import Client, Future, as_completed
from distributed.deploy import Cluster

from raptorz.cluster import connect
from raptorz.downstream.features import Features, open_variable, read_span
from raptorz.downstream.labels import FittedTask
from raptorz.downstream.linear import group_sums
from raptorz.downstream.sums import add, merge_moments, moments, standard, tree_reduce
from raptorz.errors import SettingsError
from raptorz.layouts import open_embeddings

#: What ``fit(cluster=...)`` accepts: a client, a cluster, a scheduler address, or a
#: function that starts a cluster (closed when the fit ends).
ClusterTarget = Client | Cluster | str | Callable[[], Cluster]


@contextlib.contextmanager
def fit_client(cluster: ClusterTarget) -> Iterator[Client]:
    """A client for ``cluster``; a cluster started here lives only for the fit."""
    if callable(cluster) and not isinstance(cluster, (Client, Cluster)):
        with cluster() as made, connect(made) as client:
            yield client
        return
    with connect(cluster) as client:
        yield client


def load_group(store: str, name: str, positions: np.ndarray) -> np.ndarray:
    """On a worker: the float32 features of one group, read from the store (``name``: the
    feature as :func:`~raptorz.downstream.features.open_variable` names it)."""
    variable = open_variable(open_embeddings(store), store, name).transpose("id", ...)
    return read_span(variable, positions)


def _take(block: np.ndarray, at: np.ndarray) -> np.ndarray:
    """On a worker: rows ``at`` of a group's block."""
    return block[at]


def _holed(block: np.ndarray) -> np.ndarray:
    """On a worker: which rows of a group hold NaN."""
    return np.isnan(block).any(axis=1)


class ClusterPasses:
    """The train rows held on the workers, group by group; each pass a map over them.

    ``device`` names where the workers compute :func:`~raptorz.downstream.linear.group_sums`
    (each resolves ``auto`` for itself).

    Raises
    ------
    SettingsError
        Where the features are not a store's (an array in memory has nothing to read).
    InputError
        Naming the store and the ids, where a train row holds NaN.
    """

    def __init__(self, client: Client, features: Features, rows: np.ndarray,
                 device: str = "cpu") -> None:
        store = features.variable.encoding.get("source")
        if store is None:
            raise SettingsError("a cluster reads the features from a store; these are an "
                                "array in memory", option="cluster")
        self.client, self.features, self.rows, self.device = client, features, rows, device
        self.groups = features.groups(rows)
        # Where each train row lies: its group, and its place in the group's block.
        self.group_of = np.full(len(features.positions), -1, np.int64)
        self.place = np.zeros(len(features.positions), np.int64)
        for number, group in enumerate(self.groups):
            self.group_of[group], self.place[group] = number, np.arange(len(group))
        name = str(features.variable.name)
        self.blocks = [client.submit(load_group, str(store), name, features.positions[g],
                                     pure=False) for g in self.groups]
        holed = client.gather([client.submit(_holed, b, pure=False) for b in self.blocks])
        if self.groups:
            features.refuse_nan(np.concatenate(self.groups), np.concatenate(holed))
        features.reads.passes += 1
        features.reads.bytes += len(rows) * features.n_features * 4

    def _pass(self, parts: Iterator[Future], combine: Callable[..., Any]) -> Any:
        """One pass: ``parts`` (one task per group) combined on the workers."""
        self.features.reads.passes += 1
        self.features.reads.bytes += len(self.rows) * self.features.n_features * 4
        total = tree_reduce(parts, lambda group: self.client.submit(combine, group, pure=False))
        return None if total is None else total.result()

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of each feature over the train rows."""
        merged = self._pass((self.client.submit(moments, b, pure=False) for b in self.blocks),
                            merge_moments)
        return standard(merged, self.features.n_features)

    def sums(self, task: FittedTask, y: np.ndarray, v: np.ndarray, offset: np.ndarray,
             n_out: int) -> list[np.ndarray]:
        """:func:`~raptorz.downstream.linear.group_sums` over every train row."""
        [weights] = self.client.scatter([v], broadcast=True, hash=False)
        total = self._pass((self.client.submit(group_sums, block, y[group], task, weights,
                                               offset, n_out, self.device, pure=False)
                            for block, group in zip(self.blocks, self.groups, strict=True)), add)
        width = v.shape[1]
        return total or [np.zeros(width // n_out), np.zeros(v.shape), np.zeros(width)]

    def window(self, rows: np.ndarray) -> np.ndarray:
        """The float32 features of the train rows ``rows`` in that order, from the blocks
        the workers hold (an MLP epoch's window): a group wholly in ``rows`` comes back
        whole, of another only its rows; each is placed as it arrives."""
        rows = np.asarray(rows, np.int64)
        which, place = self.group_of[rows], self.place[rows]
        if (which < 0).any():
            raise ValueError("a window holds rows that are not train rows")
        self.features.reads.bytes += len(rows) * self.features.n_features * 4
        out = np.empty((len(rows), self.features.n_features), np.float32)
        masks: dict[Any, tuple[np.ndarray, bool]] = {}
        futures = []
        for number in np.unique(which):
            mask = which == number
            whole = len(np.unique(place[mask])) == len(self.groups[number])
            future = (self.blocks[number] if whole else
                      self.client.submit(_take, self.blocks[number], place[mask], pure=False))
            masks[future.key] = mask, whole
            futures.append(future)
        for future, part in as_completed(futures, loop=self.client.loop, with_results=True):
            mask, whole = masks[future.key]
            out[mask] = part[place[mask]] if whole else part
        return out

    def close(self) -> None:
        """Let the workers drop the train rows."""
        self.client.cancel(self.blocks)

