"""The grain loader: records -> per-host shard -> seeded shuffle per epoch -> decode + features in
worker processes -> quarantine of failures -> bucketed padded batches, with checkpointable state.

Scripts that use workers (`data.num_workers > 0`) need their entry point under
`if __name__ == "__main__":` (workers start by spawn); absl flags are marked parsed here.
`BatchIterator.get_state()` is a JSON-able dict (orbax `args.JsonSave`), valid between batches.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Sequence

import grain
import ml_collections

from vsalmonn_jax.data.collate import collate
from vsalmonn_jax.data.example import Featurizer
from vsalmonn_jax.data.quarantine import Quarantine
from vsalmonn_jax.data.worker_watch import WatchedIterator, watch_parent

log = logging.getLogger(__name__)


_WORKER_LIMITS = []


def _init_worker(index: int, count: int) -> None:
    """Start-up of a grain worker process: jax there may only start its CPU platform (the resize
    kernel; a worker must never claim accelerator memory), and BLAS runs single-threaded since
    each worker is one unit of parallelism (threads fighting over the cores made the log-mel
    matmul 3-5x slower). A worker exits when its parent (the trainer) is gone."""
    import jax

    watch_parent()

    try:
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:   # a backend already started in this process: leave it
        pass
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    _WORKER_LIMITS.append(threadpool_limits(limits=1))


def host_shard(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(index, count) of this process's part of every batch on `config.mesh`: (0, 1) in one process,
    else distributed.batch_shard (processes whose devices hold the same rows, e.g. `tensor` spanning
    processes, share an index and load the same records)."""
    import jax

    if jax.process_count() == 1:
        return 0, 1
    from vsalmonn_jax.distributed import batch_shard
    from vsalmonn_jax.training.sharding import make_mesh

    return batch_shard(make_mesh(dict(config.mesh)))


def make_dataset(records: Sequence[dict], featurizer: Featurizer, *, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = 1,
                 shard: tuple[int, int] = (0, 1)) -> grain.MapDataset:
    """MapDataset of examples: this host's shard, reshuffled every epoch with `seed`."""
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} not in [0, {count})")
    ds = grain.MapDataset.source(list(records))[index::count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs, reseed_each_epoch=True)
    return ds.map(featurizer)


class DataPositionError(RuntimeError):
    """A saved data position this loader cannot take up (saved with another worker count)."""


class BatchIterator:
    """Iterates padded batches; failed records go to the quarantine, never into a batch."""

    def __init__(self, dataset: grain.MapDataset, featurizer: Featurizer, *, batch_size: int,
                 pad_id: int, workers: int = 0, quarantine: Quarantine | None = None,
                 length_buckets: Sequence[int] = (), drop_remainder: bool = False,
                 read_threads: int = 1):
        self.featurizer, self.batch_size, self.pad_id = featurizer, int(batch_size), int(pad_id)
        self.workers = int(workers)
        self.length_buckets, self.drop_remainder = tuple(length_buckets), drop_remainder
        self.quarantine = quarantine or Quarantine()
        iter_ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                            prefetch_buffer_size=max(2, batch_size)))
        if workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                                          worker_init_fn=_init_worker)
        self._it = iter(iter_ds)
        # with workers: waits that notice a dead worker (WorkerDied) instead of blocking forever
        self._watch = WatchedIterator(self._it) if workers > 0 else None
        self.batches = 0
        self._state = self._snapshot()
        self._done = False

    def _snapshot(self) -> dict:
        return {"grain": self._it.get_state(), "quarantine": self.quarantine.state(),
                "batches": self.batches, "workers": self.workers}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        examples = []
        while len(examples) < self.batch_size:
            try:
                example = next(self._watch or self._it)
            except StopIteration:
                break
            if "failed" in example:
                log.warning("quarantined %s (%s:%s): %s", example["id"], example["source"],
                            example["line"], example["detail"])
                self.quarantine.add(example)
            else:
                self.quarantine.ok()
                examples.append(example)
        if not examples or (self.drop_remainder and len(examples) < self.batch_size):
            self._done = True
            if examples:
                log.info("drop_remainder: the last %d examples do not fill a batch of %d",
                         len(examples), self.batch_size)
            (log.warning if self.quarantine.failed else log.info)(self.quarantine.summary())
            self.quarantine.check(final=True)
            raise StopIteration
        settings = self.featurizer.settings
        batch = collate(examples, pad_id=self.pad_id, image_size=settings.image_size,
                        num_mel_bins=settings.num_mel_bins, max_frames=settings.max_frames,
                        length_buckets=self.length_buckets)
        self.batches += 1
        self._state = self._snapshot()
        return batch

    def get_state(self) -> dict:
        """State after the last batch returned (JSON-able)."""
        return self._state

    def set_state(self, state: dict) -> None:
        saved = state.get("workers", self.workers)
        if saved != self.workers:   # grain's position is per worker: it does not carry over
            raise DataPositionError(
                f"the data position was saved with data.num_workers={saved} and this run has "
                f"{self.workers}: resume with --config.data.num_workers={saved}")
        self._it.set_state(state["grain"])
        self.quarantine.restore(state["quarantine"])
        self.batches = int(state["batches"])
        self._state, self._done = state, False

    def summary(self) -> str:
        return self.quarantine.summary()

    def close(self) -> None:
        """Stop the worker processes (dropping the iterators now avoids noisy teardown later)."""
        if self._it is None:
            return
        clean = self._watch.close() if self._watch is not None else True
        if clean and (close := getattr(self._it, "close", None)) is not None:
            close()
        self._it, self._watch, self._done = None, None, True
        gc.collect()


def make_loader(records: Sequence[dict], config: ml_collections.ConfigDict, *,
                featurizer: Featurizer | None = None, shuffle: bool = True,
                num_epochs: int | None = 1, batch_size: int | None = None,
                workers: int | None = None, shard: tuple[int, int] | None = None,
                drop_remainder: bool = False, quarantine_path: str | None = None,
                seed: int | None = None) -> BatchIterator:
    """A BatchIterator over `records` with the settings of `config.data` (overridable here).

    The quarantine file is `config.data.quarantine`, relative to `config.workdir`; with several
    hosts each writes its own `<name>.host<i>.jsonl`. The summary is logged when the data ends.
    """
    data = config.data
    featurizer = featurizer or Featurizer.from_config(config)
    if quarantine_path is None:
        quarantine_path = data.quarantine
        if quarantine_path and not os.path.isabs(quarantine_path):
            quarantine_path = os.path.join(config.workdir, quarantine_path)
    import jax

    shard = shard or host_shard(config)
    if quarantine_path and jax.process_count() > 1:   # one file per process: no concurrent appends
        stem, ext = os.path.splitext(quarantine_path)
        quarantine_path = f"{stem}.host{jax.process_index()}{ext}"
    dataset = make_dataset(records, featurizer,
                           seed=int(data.shuffle_seed if seed is None else seed), shuffle=shuffle,
                           num_epochs=num_epochs, shard=shard)
    pad_id = featurizer.tokenizer.pad_token_id
    return BatchIterator(dataset, featurizer, batch_size=batch_size or data.batch_size,
                         pad_id=0 if pad_id is None else pad_id,
                         workers=data.num_workers if workers is None else workers,
                         quarantine=Quarantine(quarantine_path, data.max_failure_share),
                         length_buckets=data.length_buckets, drop_remainder=drop_remainder)
