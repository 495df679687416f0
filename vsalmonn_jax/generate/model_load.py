"""Model variables for inference from a training checkpoint (training/checkpoint.py's orbax layout).

Only what inference needs is read back (a partial restore: trainables, and the base params when the
checkpoint holds them, as mrDPO's merged bases do), so the optimizer / DPO-reference layout of the
stage that wrote it does not matter. A base not in the checkpoint comes from config.model.pretrained
(as training loaded it), else is re-initialised from `config.seed` exactly as training did.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import orbax.checkpoint as ocp

from vsalmonn_jax.models.pretrained import describe
from vsalmonn_jax.training import state as st

log = logging.getLogger(__name__)


def checkpoint_root(path: str | pathlib.Path) -> pathlib.Path:
    """A run's workdir (holding checkpoints/), an mrDPO workdir (rounds/: its round states, the
    latest = the final model) or the checkpoints folder itself -> the orbax folder."""
    path = pathlib.Path(path).absolute()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    elif (path / "rounds").is_dir():
        path = path / "rounds"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    return path


def saved_tree(root: pathlib.Path, step: int):
    """The saved train state's metadata tree at `step` (leaves carry .shape / .dtype).

    Read with the item's own handler: `StandardCheckpointer().metadata(<step>/state)` looks for a
    step-level `_CHECKPOINT_METADATA` inside the item folder and logs "Metadata file does not exist"
    on every call.
    """
    return ocp.PyTreeCheckpointHandler().metadata(root / str(step) / "state").tree


def saved_fields(root: pathlib.Path, step: int) -> list[str]:
    """Top-level fields of the saved train state at `step`."""
    return sorted(saved_tree(root, step).keys())


def check_shapes(saved, target, where: str, shown: int = 6) -> None:
    """Raise a ValueError naming every leaf whose saved shape differs from the config's (or that
    one side lacks): a checkpoint restored with another preset's shapes."""
    from flax import traverse_util

    have = traverse_util.flatten_dict(jax.tree.map(lambda m: tuple(m.shape), dict(saved)), sep="/")
    want = traverse_util.flatten_dict(jax.tree.map(lambda t: tuple(t.shape), dict(target)), sep="/")
    lines = [f"  {k}: checkpoint {have.get(k, 'absent')}, config {want.get(k, 'absent')}"
             for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    if lines:
        more = [f"  ... and {len(lines) - shown} more"] if len(lines) > shown else []
        raise ValueError(
            f"{where}: the checkpoint does not fit the config's shapes ({len(lines)} mismatched):\n"
            + "\n".join(lines[:shown] + more) + "\nIt was trained with another config: drop --config "
            "to use the run's own config.json, or pass the preset it was trained with.")


def latest_step(root: pathlib.Path) -> int:
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").is_dir())
    if not steps:
        raise FileNotFoundError(f"no checkpoint steps in {root} (expected <step>/state folders)")
    return steps[-1]


def restore_for_inference(config, task, mesh, checkpoint: str | pathlib.Path | None,
                          step: int | None = None) -> tuple[dict, dict]:
    """-> (variables {"params", "adapter", "lora"} as sharded arrays, info dict).

    The base comes from the checkpoint when it holds one (mrDPO's merged bases win), else from
    config.model.pretrained (models/pretrained.py), else from config.seed; info["base"] says which
    and info["pretrained"] is the loader's record. With no checkpoint the trainables are the
    pretrained ones (the official release) or fresh.
    """
    tx, _ = st.make_optimizer(config.train, st.num_updates(config.train))
    base_saved = False
    if checkpoint is not None:
        root = checkpoint_root(checkpoint)
        step = latest_step(root) if step is None else int(step)
        saved = saved_tree(root, step)
        fields = sorted(saved.keys())
        if "trainable" not in fields:
            raise ValueError(f"{root / str(step)}: no 'trainable' in the saved state (fields: {fields})")
        base_saved = "params" in fields
        # shapes checked on the abstract state, before any weight is built or read (a wrong 7B
        # preset fails in seconds, not after initialising or loading the model)
        wanted = ["trainable"] + (["params"] if base_saved else [])
        abstract = st.abstract_state(task, config, tx, mesh)
        target = {name: getattr(abstract, name) for name in wanted}
        check_shapes({name: saved[name] for name in wanted}, target, str(root / str(step)))
    state, _, record = st.initial_state(task, config, tx, mesh, jax.random.PRNGKey(int(config.seed)),
                                        pretrained=not base_saved)
    info = {"checkpoint": None, "step": None, "pretrained": record,
            "base": "from the checkpoint" if base_saved else describe(record)}
    if checkpoint is not None:
        manager = ocp.CheckpointManager(root, item_names=("state", "meta"))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True)))["state"]
        finally:
            manager.close()
        state = state.replace(**restored)
        info.update(checkpoint=str(root), step=step)
    variables = {"params": state.params, **state.trainable}
    return {k: v for k, v in variables.items() if k == "params" or (v is not None and len(v))}, info
