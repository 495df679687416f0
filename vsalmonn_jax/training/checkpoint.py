"""orbax checkpoints of a stage: step, trainables, optimizer, rng, DPO reference, data iterator state.

The frozen base is not saved by default (it is re-loaded / re-initialised bit-identically); mrDPO,
whose base changes at each round's merge, saves it with `include_params=True`. Restores always use
ShapeDtypeStruct targets carrying the current shardings, so any topology can resume any checkpoint.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from vsalmonn_jax.training.state import TrainState

STATE_FIELDS = ("step", "trainable", "opt_state", "rng", "ref_adapter")


class Checkpointer:
    """Keep-N (async) CheckpointManager around TrainState + a JSON side item (data state, cursor)."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, async_save: bool = True,
                 include_params: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        self.include_params = include_params
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def _fields(self):
        return STATE_FIELDS + (("params",) if self.include_params else ())

    def _tree(self, state) -> dict:
        return {name: getattr(state, name) for name in self._fields()}

    def save(self, state: TrainState, meta: dict | None = None, force: bool = False) -> bool:
        """Save at `state.step` (async unless disabled). `meta` must be JSON-able."""
        step = int(jax.device_get(state.step))
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self._tree(state)),
            meta=ocp.args.JsonSave(meta or {})), force=force)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def path_of(self, step: int | None) -> str | None:
        return None if step is None else str(self.directory / str(step))

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """Restore into the structure/shardings of `target` (a state or ShapeDtypeStruct state).

        Fields not in the checkpoint (the frozen params, unless saved) are taken from `target`,
        which then must hold real arrays for them.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            self._tree(target))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return target.replace(**restored["state"]), dict(restored["meta"] or {})

    def restore_trainable(self, target: TrainState, step: int | None = None) -> TrainState:
        """Only the trainables (and the base, if saved) into `target`: start a new stage from a
        previous stage's checkpoint whatever its optimizer looked like (fresh opt_state / step)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        fields = ("trainable",) + (("params",) if self.include_params else ())
        item = {name: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            getattr(target, name)) for name in fields}
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)))
        return target.replace(**restored["state"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
