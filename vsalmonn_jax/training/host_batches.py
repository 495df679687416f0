"""What the processes of a multi-host run must agree on before a host batch becomes global arrays:
its fields, their shapes, its rows (where hosts share a batch shard) and, in evaluation, its size.

Every step is one SPMD program over all processes, built by each from its own host batch; a
difference gives them different programs (a crash or hang at the first collective) or splices
different records into one example. One process: nothing here runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from vsalmonn_jax import distributed
from vsalmonn_jax.distributed import batch_shard, local_batch_shards

OPTIONAL = ("time_ids", "time_mask")   # per-frame time tokens: some batches have them
# the int32 vectors the processes all-gather (report_failure sends one of the same width); last
# column: "my data iterator failed"
BATCH_CHECK_WIDTH = 7    # shard index, rows hash (2), fields hash (2), has time tokens, failed
EVAL_ROWS_WIDTH = 3      # rows, has had a batch, failed


def agree(fields: dict, rows: int, mesh) -> dict:
    """`fields` as every process's batch agrees (multi-process runs): each host bucketed its own
    examples (text lengths, frame and mel-chunk buckets; time tokens only for some videos under
    data.time_tokens=official), and different shapes would give the processes different programs,
    which crash or hang at their first collective. So: time tokens filled in where another host's
    batch has them (an all-False time_mask changes nothing), then every axis padded at its end to
    the largest any process has (masks False, token ids repeating their last column, the rest
    zeros: all under masks that are False, as collate's padding is, so losses and log-probs are
    unchanged)."""
    base = sorted(k for k in fields if k not in OPTIONAL)
    kinds = _hash([repr([(k, fields[k].ndim, fields[k].dtype.str) for k in base]).encode()])
    has_time = all(k in fields for k in OPTIONAL)
    if check_batches(rows, kinds, has_time, mesh,
                     lambda: ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(fields.items()))) \
            and not has_time:
        size, frames = fields["frame_mask"].shape
        fields = dict(fields, time_ids=np.zeros((size, frames, 4), np.int32),
                      time_mask=np.zeros((size, frames, 4), bool))
    names = sorted(fields)
    target = largest(np.concatenate([np.asarray(fields[k].shape, np.int32) for k in names]))
    out, at = {}, 0
    for k in names:
        v, want = fields[k], target[at:at + fields[k].ndim]
        at += v.ndim
        pad = [(0, int(w) - n) for w, n in zip(want, v.shape, strict=True)]
        if any(after for _, after in pad):
            v = np.pad(v, pad, mode="edge" if k.endswith("input_ids") else "constant")
        out[k] = v
    return out


def rows_fingerprint(batch: dict) -> int:
    """A 62-bit hash of which rows a host batch holds: its example ids and token ids."""
    return _hash([key.encode() + np.ascontiguousarray(batch[key]).tobytes() for key in sorted(batch)
                  if key == "example_id" or key.endswith("input_ids")])


def _hash(parts: list[bytes]) -> int:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return int.from_bytes(digest.digest()[:8], "big") >> 2


class DataErrorElsewhere(RuntimeError):
    """Another process could not load its batch (its own error is in its log); raised on the others
    at the same point, so every process stops (after a save) instead of waiting for it."""


def _raise_if_failed(table: np.ndarray) -> None:
    failed = np.flatnonzero(table[:, -1]).tolist()
    if failed:
        raise DataErrorElsewhere(f"process(es) {failed} could not load their batch (the reason is in "
                                 "their log); every process stops")


def stop_together(error: Exception | None, what: str) -> None:
    """Host-side work that must succeed on every process before a collective (e.g. decoding the
    clips a sampling batch captions): raise `error` where it happened and DataErrorElsewhere on the
    other processes, instead of those entering the collective and waiting forever. One tiny
    all-gather with several processes; one process: raise `error` if any."""
    if jax.process_count() > 1 and distributed.any_process(error is not None) and error is None:
        raise DataErrorElsewhere(f"another process could not {what} (the reason is in its log); "
                                 "every process stops")
    if error is not None:
        raise error


def report_failure(mesh, evaluation: bool = False) -> None:
    """A process whose data iterator raised joins the collective the others are in (the batch check,
    or in `evaluation` the rows agreement) with its failure flag set; its caller then raises its own
    error."""
    from jax.experimental import multihost_utils

    width = EVAL_ROWS_WIDTH if evaluation else BATCH_CHECK_WIDTH
    multihost_utils.process_allgather(np.asarray([0] * (width - 1) + [1], np.int32))


def agreed_rows(mesh, batch: dict | None, seen_one: bool) -> int:
    """This eval step's local rows (0: every stream is done): the batch's, rounded up to a multiple
    of this process's batch shards; with several processes the largest any process has."""
    rows = 0 if batch is None else len(next(iter(batch.values())))
    shards = local_batch_shards(mesh)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        table = np.asarray(multihost_utils.process_allgather(
            np.asarray([rows, int(seen_one or rows > 0), 0], np.int32))).reshape(-1, EVAL_ROWS_WIDTH)
        _raise_if_failed(table)
        if table[:, 0].any() and not table[:, 1].all():
            raise ValueError(f"evaluation: process(es) {np.flatnonzero(table[:, 1] == 0).tolist()} "
                             "hold no record of the val set: use a val set with at least one "
                             "record per host's batch shard")
        rows = int(table[:, 0].max())
    return -(-rows // shards) * shards


def check_batches(rows: int, kinds: int, optional: bool, mesh: Mesh,
                  describe: Callable[[], str]) -> bool:
    """Before a batch becomes global arrays (multi-process runs; one tiny all-gather per batch):

    - every process must hold fields of the same names, ranks and dtypes (`kinds`, a hash, of the
      fields every batch has; `optional`: this batch has the fields some batches lack, e.g.
      per-frame time tokens; returns whether any process's batch has them, to be filled in);
    - processes that share a batch shard (`tensor` / `context` spanning hosts) must have loaded the
      same rows (`rows`, a hash): each fills its own devices' part of one global array, so a record
      one host skipped would be spliced into another host's example without any error.
    Every process raises the same error (none hangs); `describe()` is this process's fields, for the
    message. A process whose data iterator failed joins with `report_failure`: the others raise
    DataErrorElsewhere. 62-bit hashes.
    """
    from jax.experimental import multihost_utils

    index = batch_shard(mesh)[0]
    mine = np.asarray([index, rows & 0x7FFFFFFF, (rows >> 31) & 0x7FFFFFFF,
                       kinds & 0x7FFFFFFF, (kinds >> 31) & 0x7FFFFFFF, int(optional), 0], np.int32)
    table = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, BATCH_CHECK_WIDTH)
    _raise_if_failed(table)   # a process whose data iterator raised (report_failure)
    if len({tuple(row) for row in table[:, 3:5]}) > 1:
        raise RuntimeError(
            "the processes built batches with different fields (this process "
            f"{jax.process_index()}: {describe()}); every host must read records of one kind")
    for shard in sorted(set(table[:, 0].tolist())):
        peers = np.flatnonzero(table[:, 0] == shard)
        if len({tuple(table[p, 1:3]) for p in peers}) > 1:
            raise RuntimeError(
                f"processes {peers.tolist()} share batch shard {shard} but loaded different rows "
                "for this batch: one skipped or quarantined a record another read (see each host's "
                "quarantine file); every host must read the same media")
    return bool(table[:, 5].any())


def largest(dims: np.ndarray) -> np.ndarray:
    """The element-wise largest of every process's `dims` (int32, one length on all processes)."""
    from jax.experimental import multihost_utils

    everyone = multihost_utils.process_allgather(np.asarray(dims, np.int32))
    return np.asarray(everyone).reshape(jax.process_count(), -1).max(axis=0)
