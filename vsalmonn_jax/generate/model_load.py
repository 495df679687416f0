"""Model variables for inference from a training checkpoint (training/checkpoint.py's orbax layout).

Only what inference needs is read back (a partial restore: trainables, and the base params when the
checkpoint holds them, as mrDPO's merged bases do), so the optimizer / DPO-reference layout of the
stage that wrote it does not matter. A base not in the checkpoint is re-initialised from
`config.seed` exactly as training initialised it.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import orbax.checkpoint as ocp

from vsalmonn_jax.training import state as st

log = logging.getLogger(__name__)


def checkpoint_root(path: str | pathlib.Path) -> pathlib.Path:
    """A run's workdir (holding checkpoints/) or the checkpoints folder itself -> the orbax folder."""
    path = pathlib.Path(path).absolute()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    return path


def saved_fields(root: pathlib.Path, step: int) -> list[str]:
    """Top-level fields of the saved train state at `step`.

    Read with the item's own handler: `StandardCheckpointer().metadata(<step>/state)` looks for a
    step-level `_CHECKPOINT_METADATA` inside the item folder and logs "Metadata file does not exist"
    on every call.
    """
    metadata = ocp.PyTreeCheckpointHandler().metadata(root / str(step) / "state")
    return sorted(metadata.tree.keys())


def latest_step(root: pathlib.Path) -> int:
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").is_dir())
    if not steps:
        raise FileNotFoundError(f"no checkpoint steps in {root} (expected <step>/state folders)")
    return steps[-1]


def restore_for_inference(config, task, mesh, checkpoint: str | pathlib.Path | None,
                          step: int | None = None) -> tuple[dict, dict]:
    """-> (variables {"params", "adapter", "lora"} as sharded arrays, info dict).

    With no checkpoint the freshly initialised model (config.seed) is returned (smoke tests).
    """
    tx, _ = st.make_optimizer(config.train, st.num_updates(config.train))
    state, shardings = st.create_train_state(task, config, tx, mesh, jax.random.PRNGKey(int(config.seed)))
    info = {"checkpoint": None, "step": None, "base": "initialised from config.seed"}
    if checkpoint is not None:
        root = checkpoint_root(checkpoint)
        step = latest_step(root) if step is None else int(step)
        fields = saved_fields(root, step)
        if "trainable" not in fields:
            raise ValueError(f"{root / str(step)}: no 'trainable' in the saved state (fields: {fields})")
        wanted = ["trainable"] + (["params"] if "params" in fields else [])
        target = {name: jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            getattr(state, name), getattr(shardings, name)) for name in wanted}
        manager = ocp.CheckpointManager(root, item_names=("state", "meta"))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True)))["state"]
        finally:
            manager.close()
        state = state.replace(**restored)
        info.update(checkpoint=str(root), step=step,
                    base="from the checkpoint" if "params" in fields else info["base"])
    variables = {"params": state.params, **state.trainable}
    return {k: v for k, v in variables.items() if k == "params" or (v is not None and len(v))}, info
