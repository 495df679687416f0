"""mrDPO round storage: round-start states (orbax, one step per round) and the round's JSON / JSONL
files (pairs, samples, stats, reference log-probs), written whole by atomic_file.py.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import orbax.checkpoint as ocp

from vsalmonn_jax.distributed import primary_value
from vsalmonn_jax.training import state as st

ROUND_FIELDS = ("params", "trainable", "rng")   # what a round-start checkpoint holds


def read_jsonl(path: pathlib.Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class RoundCheckpoints:
    """orbax manager of round-start states: step r = the state entering round r + the cursor JSON."""

    def __init__(self, directory: pathlib.Path):
        # the latest round start, plus round 0 (the pre-DPO model rebirth tuning starts from)
        options = ocp.CheckpointManagerOptions(max_to_keep=2, keep_period=1 << 30, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options,
                                             item_names=("state", "meta"))

    def latest(self) -> int | None:
        """The latest round start as process 0 lists it (every process resumes the same round)."""
        return primary_value(self.manager.latest_step())

    def save(self, round_index: int, state: st.TrainState, meta: dict) -> None:
        tree = {name: getattr(state, name) for name in ROUND_FIELDS}
        self.manager.save(round_index, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, round_index: int, target: st.TrainState) -> tuple[st.TrainState, dict]:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            {name: getattr(target, name) for name in ROUND_FIELDS})
        restored = self.manager.restore(round_index, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return target.replace(**restored["state"]), dict(restored["meta"] or {})

    def close(self) -> None:
        self.manager.close()


def load_round_state(workdir: str | os.PathLike, round_index: int, target: st.TrainState
                     ) -> tuple[st.TrainState, dict]:
    """The state entering round r (0 = the pre-DPO (SFT) model, its LoRA merged; `rounds` = the
    final model) and the cursor/history saved with it; `target` gives structure and shardings (its
    arrays are unused)."""
    ckpts = RoundCheckpoints(pathlib.Path(workdir) / "rounds")
    try:
        if round_index not in ckpts.manager.all_steps():
            raise FileNotFoundError(f"{workdir}/rounds has no round {round_index} (has "
                                    f"{sorted(ckpts.manager.all_steps())})")
        return ckpts.restore(round_index, target)
    finally:
        ckpts.close()
