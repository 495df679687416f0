"""Training one demo SFT-type stage (pretrain, align, sft, rebirth) on the project's jitted steps
(training/steps.py): a fresh optimizer and schedule, replicated state, progress lines to the log.

Jitted steps are cached per (lr, steps, trainable structure). The mrDPO rounds run through
training/mrdpo.py instead (demo/pipeline.py mrdpo_arm).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from vsalmonn_jax.training.sharding import make_mesh, replicated
from vsalmonn_jax.training.state import TrainState, make_optimizer
from vsalmonn_jax.training.steps import make_steps, put_batch

_CACHE: dict = {}


def shown_metrics(metrics: dict) -> str:
    """The progress line's metrics: "loss=.. dpo_loss=.. gt_ce=.. rewards/accuracy=.. grad_norm=.."
    (those present)."""
    return " ".join(f"{k}={metrics[k]:.4g}" for k in ("loss", "dpo_loss", "gt_ce", "rewards/accuracy",
                                                      "grad_norm") if k in metrics)


def _compiled(task, config, lr: float, num_steps: int, state: TrainState, mesh):
    """(tx, steps, state shardings) for this schedule / state layout, built once."""
    layout = [(np.shape(x), str(getattr(x, "dtype", type(x)))) for x in jax.tree.leaves(state)]
    key = (id(task), float(lr), int(num_steps), str(jax.tree.structure(state)),
           str(layout))
    if key not in _CACHE:
        cfg = config.copy_and_resolve_references()
        cfg.train.lr = float(lr)
        cfg.stage = "sft"
        tx, schedule = make_optimizer(cfg.train, int(num_steps))
        shardings = jax.tree.map(lambda _: replicated(mesh), state.replace(opt_state=tx.init(
            state.trainable)))
        _CACHE[key] = (tx, make_steps(task, cfg, tx, schedule, mesh, shardings),
                       shardings)
    return _CACHE[key]


def train_stage(task, config, *, params: dict, trainable: dict, batches, num_steps: int, lr: float,
                seed: int, log=print, name: str = "train", log_every: int = 50
                ) -> tuple[dict, list[dict]]:
    """Run `num_steps` SFT optimizer steps from `trainable`; returns (trained trainable tree as
    numpy, metric history)."""
    mesh = make_mesh(dict(config.mesh))
    trainable = jax.tree.map(lambda x: jnp.array(x, jnp.float32), trainable)  # a copy: donated below
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, trainable=trainable,
                       opt_state=None, rng=jax.random.PRNGKey(seed),
                       ref_adapter={})
    tx, steps, shardings = _compiled(task, config, lr, num_steps, state, mesh)
    state = jax.device_put(state.replace(opt_state=tx.init(trainable)), shardings)
    history, start, window = [], time.perf_counter(), time.perf_counter()
    for step in range(1, num_steps + 1):
        batch = put_batch(next(batches), steps.batch_sharding)
        state, metrics = steps.train(state, batch)
        if step % log_every == 0 or step == num_steps or step == 1:
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            scalars["step"] = step
            history.append(scalars)
            shown = shown_metrics(scalars)
            now = time.perf_counter()
            log(f"[{name}] step {step}/{num_steps} {shown} ({now - window:.1f}s)")
            window = now
            if not np.isfinite(scalars["loss"]):
                raise FloatingPointError(f"[{name}] non-finite loss at step {step}: {scalars}")
    log(f"[{name}] {num_steps} steps in {time.perf_counter() - start:.1f}s")
    return jax.device_get(state.trainable), history
