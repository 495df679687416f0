"""orbax checkpoints of a stage: step, trainables, optimizer, rng, DPO reference, data iterator state
(each process's own: every host reads its own shard of the records).

The frozen base is not saved by default (it is re-loaded / re-initialised bit-identically); mrDPO,
whose base changes at each round's merge, saves it with `include_params=True`. Restores always use
ShapeDtypeStruct targets carrying the current shardings, so any topology can resume any checkpoint.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from vsalmonn_jax.distributed import any_process, barrier, gather_json, is_primary, primary_value
from vsalmonn_jax.training.state import TrainState


class CheckpointError(RuntimeError):
    """No checkpoint of a folder can be read; the message names the folder and each step's error."""


STATE_FIELDS = ("step", "trainable", "opt_state", "rng", "ref_adapter")
DATA = "data"                          # meta key: this process's data-iterator state
DATA_BY_PROCESS = "data_by_process"    # saved by several processes: every one's, in process order


class Checkpointer:
    """Keep-N (async) CheckpointManager around TrainState + a JSON side item (data state, cursor)."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True,
                 include_params: bool = False, create: bool = True):
        """`create=False` for reading another run: a missing folder is an error, never created."""
        self.directory = pathlib.Path(directory).absolute()
        self.include_params = include_params
        if not create and not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: no such checkpoint folder")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def _fields(self):
        return STATE_FIELDS + (("params",) if self.include_params else ())

    def _tree(self, state) -> dict:
        return {name: getattr(state, name) for name in self._fields()}

    def save(self, state: TrainState, meta: dict | None = None, force: bool = False) -> bool:
        """Save at `state.step` (async unless disabled). `meta` must be JSON-able; its "data" entry is
        this process's (orbax writes the JSON item on process 0 only, so with several processes
        every one's is gathered into it first: call it on every process, as the state save)."""
        step = int(jax.device_get(state.step))
        meta = dict(meta or {})
        if DATA in meta and jax.process_count() > 1:
            meta[DATA_BY_PROCESS] = gather_json(meta[DATA])
            meta[DATA] = meta[DATA_BY_PROCESS][0]   # what a one-process resume takes
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self._tree(state)),
            meta=ocp.args.JsonSave(meta)), force=force)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def steps_on_disk(self) -> list[int]:
        """The saved steps, newest first, as process 0 lists them (every process: the same list;
        a collective)."""
        return [int(s) for s in primary_value(sorted(self.all_steps(), reverse=True))]

    def path_of(self, step: int | None) -> str | None:
        return None if step is None else str(self.directory / str(step))

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """Restore into the structure/shardings of `target` (a state or ShapeDtypeStruct state).

        Fields not in the checkpoint (the frozen params, unless saved) are taken from `target`,
        which then must hold real arrays for them. Without `step`: the latest readable checkpoint
        (an unreadable newer one is set aside, see `_readable`).
        """
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            self._tree(target))
        restored = self._readable(step, lambda s: self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())))
        return target.replace(**restored["state"]), _own_data(dict(restored["meta"] or {}))

    def saved_fields(self, step: int) -> set[str]:
        """The state fields checkpoint `step` holds (its base `params` or not), from its metadata."""
        reader = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(create=False),
            item_handlers={"state": ocp.StandardCheckpointHandler()})
        try:
            return set(reader.item_metadata(step)["state"].keys())
        finally:
            reader.close()

    def holds_base(self) -> bool:
        """Whether this folder's checkpoints hold the base `params`: the newest one whose metadata
        reads decides (an unreadable newest one is skipped, as restores do); process 0's answer on
        every process (a collective)."""
        answer = False
        for step in sorted(self.all_steps(), reverse=True):
            try:
                answer = "params" in self.saved_fields(step)
                break
            except Exception:  # noqa: BLE001 - orbax / json raise many kinds: try an older one
                continue
        return bool(primary_value(answer))

    def restore_trainable(self, target: TrainState, step: int | None = None,
                          with_base: bool | None = None) -> TrainState:
        """Only the trainables (and the base: `with_base`, default: if this Checkpointer saves it)
        into `target`: start a new stage from a previous stage's checkpoint whatever its optimizer
        looked like (fresh opt_state / step)."""
        with_base = self.include_params if with_base is None else with_base
        fields = ("trainable",) + (("params",) if with_base else ())
        item = {name: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            getattr(target, name)) for name in fields}
        restored = self._readable(step, lambda s: self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True))))
        return target.replace(**restored["state"])

    def _readable(self, step: int | None, restore: Callable[[int], Any]) -> Any:
        """`restore(step)`; without `step` the newest checkpoint that reads, newest first. Unreadable
        newer ones (truncated data file, empty metadata, ...) are reported (which, why, which one is
        used instead) and moved to `<directory>.corrupt/` so later saves at those steps succeed."""
        steps = [step] if step is not None else self.steps_on_disk()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        failures: list[tuple[int, str]] = []
        for candidate in steps:
            reason = ""
            try:
                out = restore(candidate)
            except Exception as err:  # noqa: BLE001 - orbax / tensorstore / json raise many kinds
                text = str(err).strip()
                reason = f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"
            # each process reads its own shards: one that fails makes every process fall back
            # (else the hosts would continue from different steps)
            if any_process(bool(reason)):
                failures.append((candidate, reason or "unreadable on another process"))
                continue
            if failures:
                self._set_aside([s for s, _ in failures])
                print(f"checkpoint: restored step {candidate} ({self.path_of(candidate)}) instead of "
                      + "; ".join(f"unreadable step {s} ({r})" for s, r in failures)
                      + f"; the unreadable ones were moved to {self.directory}.corrupt/",
                      file=sys.stderr, flush=True)
            return out
        raise CheckpointError(f"no readable checkpoint in {self.directory}: "
                              + "; ".join(f"step {s}: {r}" for s, r in failures)
                              + ". Delete or repair that folder (or start a new --workdir).")

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            aside = self.directory.parent / f"{self.directory.name}.corrupt"
            aside.mkdir(parents=True, exist_ok=True)
            for s in steps:
                target = aside / str(s)
                n = 1
                while target.exists():
                    target, n = aside / f"{s}.{n}", n + 1
                os.replace(self.directory / str(s), target)
        barrier("vsalmonn_checkpoint_set_aside")   # every process then lists the same steps
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _own_data(meta: dict) -> dict:
    """meta with "data" = this process's saved data state. Saved by another number of processes:
    the shards hold other records, so no position carries over exactly; each process takes process
    0's (the same number of batches into its shard) and process 0 says so."""
    states = meta.pop(DATA_BY_PROCESS, None)
    if states is None:
        return meta
    if len(states) == jax.process_count():
        meta[DATA] = states[jax.process_index()]
    else:
        meta[DATA] = states[0]
        if is_primary():
            print(f"checkpoint: the data positions were saved by {len(states)} processes and this run "
                  f"has {jax.process_count()}: each process continues from process 0's position in its "
                  "own shard (the shards now hold other records: this epoch may repeat or miss some)",
                  file=sys.stderr, flush=True)
    return meta


def restore_init_from(folder: str | os.PathLike, target: TrainState) -> tuple[TrainState, bool]:
    """`target` with the trainables of run `folder`'s latest checkpoint and, when that checkpoint
    holds it, the base they were trained on (a DPO stage saves its base, the previous LoRA merged
    in: its LoRA without that base is another model). Returns (state, whether the base came too)."""
    ckpt = Checkpointer(pathlib.Path(folder) / "checkpoints", create=False)
    try:
        with_base = ckpt.holds_base()
        return ckpt.restore_trainable(target, with_base=with_base), with_base
    finally:
        ckpt.close()
