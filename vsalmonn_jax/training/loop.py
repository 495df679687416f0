"""One training loop for every stage: jitted steps, metrics (JSONL + TensorBoard + tqdm), eval,
orbax checkpoints with the data-iterator state, exact resume, SIGTERM / SIGINT save-and-exit (also
while waiting on data), a checkpoint before a data error propagates, NaN policy.

`run_stage(config, train_iter, workdir, ...)` is a plain function so mrDPO / rebirth drive it round
by round; `vsalmonn-jax train` is a thin CLI over it.
"""

from __future__ import annotations

import math
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vsalmonn_jax.distributed import any_process, ensure_shared_directory
from vsalmonn_jax.models.pretrained import write_record as write_pretrained_record
from vsalmonn_jax.training import state as st
from vsalmonn_jax.training.checkpoint import Checkpointer
from vsalmonn_jax.training.feature_cache import FeatureCache
from vsalmonn_jax.training.host_batches import (
    DataErrorElsewhere,
    agree,
    agreed_rows,
    report_failure,
    rows_fingerprint,
)
from vsalmonn_jax.training.interrupts import Interrupted, stop_signals
from vsalmonn_jax.training.losses import PAIR_MEANS
from vsalmonn_jax.training.metrics_log import MetricsWriter, logged_row
from vsalmonn_jax.training.packing import check_shared_prompts
from vsalmonn_jax.training.sharding import LOGICAL_AXIS_RULES, make_mesh
from vsalmonn_jax.training.steps import Steps, make_steps, put_batch

HOST_ONLY = ("example_id",)  # batch fields kept on the host (error messages), never sent to devices


class NonFiniteLossError(RuntimeError):
    """A step produced a NaN/inf loss or gradient and train.on_nan == "stop"."""


def evaluate(steps: Steps, state, batches: Iterable[dict]) -> dict[str, float]:
    """Mean of the eval-step metrics over `batches` (SFT: token-weighted CE and its perplexity; DPO:
    the pair metrics weighted by each batch's pairs, so a short last batch counts its rows only,
    and `pairs` their total).

    Each process passes its own stream (its shard of the val set). Every eval step is a collective,
    so with several processes they agree per step on the rows (host_batches.agreed_rows): a process
    whose stream is shorter, or whose batch is, fills in rows with no target token (exact for SFT),
    instead of the others waiting for it forever."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    count = 0
    stream, template = iter(batches), None
    while True:
        try:
            batch = next(stream, None)
        except Exception:
            if jax.process_count() > 1:
                report_failure(steps.mesh, evaluation=True)   # the others stop too
            raise
        rows = agreed_rows(steps.mesh, batch, template is not None)
        if not rows:
            break
        template = batch = pad_rows(batch if batch is not None else _no_targets(template, 1), rows)
        metrics = jax.device_get(steps.eval(state, device_batch(batch, steps)))
        pairs = float(metrics.get("pairs", 1.0))
        for k, v in metrics.items():
            w = pairs if k in PAIR_MEANS else 1.0
            sums[k] = sums.get(k, 0.0) + float(v) * w
            weights[k] = weights.get(k, 0.0) + w
        count += 1
    if not count:
        return {}
    out = {k: v / weights[k] if weights[k] else 0.0 for k, v in sums.items()}
    if "pairs" in sums:
        out["pairs"] = sums["pairs"]
    if "ce_sum" in sums and sums.get("target_tokens"):
        out["loss"] = sums["ce_sum"] / sums["target_tokens"]
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    out.pop("ce_sum", None)
    return out


def _no_targets(batch: dict, rows: int) -> dict:
    """The first `rows` rows of `batch` with every loss mask False (they add no target token)."""
    return {k: np.zeros_like(v[:rows]) if k.endswith("loss_mask") else np.asarray(v)[:rows]
            for k, v in batch.items()}


def pad_rows(batch: dict, rows: int) -> dict:
    """Pad a short batch to `rows` rows with copies of row 0 whose loss masks are all False: they
    add no target token (SFT eval is exact; DPO eval means count them)."""
    extra = rows - len(next(iter(batch.values())))
    if extra <= 0:
        return batch
    fill = _no_targets({k: np.repeat(np.asarray(v)[:1], extra, axis=0) for k, v in batch.items()},
                       extra)
    return {k: np.concatenate([np.asarray(v), fill[k]]) for k, v in batch.items()}


def device_batch(batch: dict, steps: Steps) -> dict:
    """The numeric fields of a host batch, sharded on the batch axis (ids / strings stay here).
    With several processes their batches are first made alike (host_batches.agree); a
    prefix-shared DPO step checks that each pair's prompts agree."""
    keep = {k: np.asarray(v) for k, v in batch.items()
            if k not in HOST_ONLY and np.asarray(v).dtype.kind not in "OUSV"}
    if steps.packed:
        try:
            check_shared_prompts(batch, steps.packed)
        except ValueError:
            if jax.process_count() > 1:
                report_failure(steps.mesh)   # the others stop at their batch check, not in the step
            raise
    if jax.process_count() > 1:   # collectives every process joins
        keep = agree(keep, rows_fingerprint(batch), steps.mesh)
    return put_batch(keep, steps.batch_sharding)


NEXT_STAGE = 0x57A6E   # folded into the rng of a state that continues into another stage


def prepare_state(task, config, tx, mesh, *, state=None, params=None, shardings=None):
    """(state, shardings) for a stage: fresh, or continuing a previous stage's `state` with a fresh
    optimizer, step 0, its own dropout keys (the rng moved on: with step 0 again, every mrDPO round
    and rebirth drew the keys of the stage before) and (for a snapshot-reference DPO stage) the
    current adapter as reference."""
    if state is None:
        return st.create_train_state(task, config, tx, mesh, jax.random.PRNGKey(int(config.seed)),
                                     params=params)
    if shardings is None:
        _, shardings = st.state_shardings(task, config, tx, mesh)
    trainable = state.trainable
    fresh = st.TrainState(
        step=np.zeros((), np.int32), params=state.params, trainable=trainable,
        opt_state=tx.init(trainable), rng=jax.random.fold_in(state.rng, NEXT_STAGE),
        # a device copy: a host copy fails where the adapter spans hosts (fsdp / tensor over them)
        ref_adapter=jax.tree.map(jnp.copy, trainable.get("adapter", {}))
        if st.uses_snapshot(config) else {})
    return jax.device_put(fresh, shardings), shardings


_STEPS_CACHE: dict = {}
LOOP_ONLY = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "on_nan",
             "feature_cache")


def compiled_steps(task, config, num_steps: int, mesh):
    """(tx, schedule, steps, shardings, initializer), reused across calls with the same task object, config and mesh, so
    resumed runs and mrDPO rounds do not re-trace and re-compile the step."""
    step_config = config.copy_and_resolve_references()
    for name in LOOP_ONLY:  # fields read by the loop, not by the compiled step
        step_config.train[name] = None
    key = (id(task), step_config.to_json(), num_steps, tuple(mesh.shape.items()),
           tuple(d.id for d in mesh.devices.flat))
    if key not in _STEPS_CACHE or _STEPS_CACHE[key][0] is not task:
        tx, schedule = st.make_optimizer(config.train, st.num_updates(config.train, num_steps))
        _, shardings = st.state_shardings(task, config, tx, mesh)
        steps = make_steps(task, config, tx, schedule, mesh, shardings)
        init = st.make_initializer(task, config, tx, shardings)
        while len(_STEPS_CACHE) >= 8:
            _STEPS_CACHE.pop(next(iter(_STEPS_CACHE)))
        _STEPS_CACHE[key] = (task, tx, schedule, steps, shardings, init)
    return _STEPS_CACHE[key][1:]


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def run_stage(config, train_iter: Iterator[dict], workdir: str | pathlib.Path, *, task=None,
              state=None, params=None, mesh=None,
              eval_fn: Callable[[Any, Steps], dict[str, float]] | None = None,
              num_steps: int | None = None, include_params: bool = False,
              on_step: Callable[[int, dict], None] | None = None, progress: bool = True,
              tensorboard: bool = True, async_checkpoints: bool = True):
    """Train `config.stage` for `num_steps` (default train.num_steps) loop steps from `train_iter`.

    Resumes from `workdir/checkpoints` when a checkpoint exists (trainables, optimizer, step, rng,
    reference snapshot and, if the iterator has get_state/set_state, the data position). SIGTERM or
    a first SIGINT saves and returns with summary["preempted"] = True and summary["signal"]; an
    error of the data iterator (e.g. a dead worker) saves the steps done, then propagates.
    Returns (state, summary).
    """
    from vsalmonn_jax.training.task import build_task

    workdir = pathlib.Path(workdir)
    tcfg = config.train
    num_steps = int(tcfg.num_steps if num_steps is None else num_steps)
    mesh = mesh or make_mesh(dict(config.mesh))
    task = task or build_task(config)
    tx, schedule, steps, shardings, init = compiled_steps(task, config, num_steps, mesh)
    if state is None:
        state = init(jax.random.PRNGKey(int(config.seed)), params)
        write_pretrained_record(workdir, init.record if params is None else {"base": "given params"})
    else:
        state, _ = prepare_state(task, config, tx, mesh, state=state, shardings=shardings)
    ensure_shared_directory(workdir)   # several processes: one folder they all see (else a hang)
    ckpt = Checkpointer(workdir / "checkpoints", keep=int(tcfg.keep_checkpoints),
                        async_save=async_checkpoints, include_params=include_params)
    skipped = 0
    if ckpt.steps_on_disk():   # the processes decide together (process 0's listing)
        state, meta = ckpt.restore(state)
        skipped = int(meta.get("skipped", 0))
        if meta.get("data") is not None and hasattr(train_iter, "set_state"):
            train_iter.set_state(meta["data"])
    current = {"state": state}
    cache = _feature_cache(tcfg.feature_cache, task, steps, current) if tcfg.feature_cache else None
    writer = MetricsWriter(workdir, tensorboard, resume_step=int(state.step))
    summary: dict[str, Any] = {"preempted": False, "skipped_steps": skipped, "signal": "",
                               "resumed_from": int(state.step) or None}

    def save(force: bool = False) -> None:
        meta = {"stage": config.stage, "skipped": skipped,
                "data": train_iter.get_state() if hasattr(train_iter, "get_state") else None}
        ckpt.save(state, meta, force=force)

    def keep_steps_done() -> None:   # before an error propagates
        if step > (ckpt.latest_step() or 0):
            save(force=True)
            ckpt.wait()

    step = int(jax.device_get(state.step))
    bar = _progress(num_steps, step, progress)
    window_tokens, window_start = 0.0, time.perf_counter()
    last: dict[str, float] = {}
    try:
        with stop_signals() as stop:
            while step < num_steps:
                try:
                    # a stop signal cuts the data wait short (one host: a save is collective)
                    with stop.waiting(enabled=jax.process_count() == 1):
                        batch = next(train_iter)
                except Interrupted:
                    batch = None
                except Exception:
                    if jax.process_count() > 1:
                        report_failure(steps.mesh)   # the others stop at their batch check
                    keep_steps_done()
                    raise
                if batch is None:   # stopped while waiting on data
                    if step != ckpt.latest_step():
                        save(force=True)
                    ckpt.wait()
                    summary.update(preempted=True, signal=stop.name)
                    break
                if cache is not None:
                    batch = cache.attach(batch)
                try:
                    inputs = device_batch(batch, steps)
                except (DataErrorElsewhere, ValueError):
                    keep_steps_done()   # every process: the one that failed and the others (a save is collective)
                    raise
                state, metrics = steps.train(state, inputs)
                current["state"] = state
                step += 1
                last = _scalars(metrics)
                if last.pop("finite") < 1.0:
                    ids = np.asarray(batch.get("example_id", [])).tolist()
                    if tcfg.on_nan != "skip":
                        ckpt.wait()
                        good = ckpt.latest_step()
                        raise NonFiniteLossError(
                            f"non-finite loss/gradient at step {step} (loss={last['loss']}, "
                            f"grad_norm={last['grad_norm']}), batch example_ids={ids}; the update "
                            f"was not applied. Last good checkpoint: "
                            f"{ckpt.path_of(good) if good is not None else 'none'} (step {good}). "
                            f"Set train.on_nan=skip to skip such batches.")
                    skipped += 1
                    writer.write(step, {"skipped_nonfinite": float(skipped),
                                        "example_id_first": float(ids[0]) if ids else -1.0})
                window_tokens += last.get("tokens", 0.0)
                if on_step is not None:
                    on_step(step, last)
                if step % int(tcfg.log_every) == 0 or step == num_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    last["tokens_per_s"] = window_tokens / elapsed
                    last["skipped_steps"] = float(skipped)
                    writer.write(step, last)
                    bar.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "lr") if k in last})
                    window_tokens, window_start = 0.0, time.perf_counter()
                bar.update(1)
                if eval_fn is not None and step % int(tcfg.eval_every) == 0:
                    writer.write(step, eval_fn(state, steps), split="eval")
                if any_process(stop.is_set()):  # a preemption save is collective: all hosts agree
                    save(force=True)
                    ckpt.wait()
                    summary.update(preempted=True, signal=stop.name or "SIGTERM")
                    break
                if step % int(tcfg.checkpoint_every) == 0:
                    save()
        if not summary["preempted"]:
            if ckpt.latest_step() != step:
                save(force=True)
            if eval_fn is not None and step % int(tcfg.eval_every) != 0:
                writer.write(step, eval_fn(state, steps), split="eval")
    finally:
        bar.close()
        ckpt.close()
        writer.close()
    if cache is not None:
        summary["feature_cache"] = {"hits": cache.hits, "misses": cache.misses}
    if not last and step == num_steps and summary["resumed_from"] == num_steps:
        last = logged_row(writer.path, step)   # resumed at the end: the last step as it was logged
    summary.update(step=step, skipped_steps=skipped, last=last, steps=steps,
                   checkpoint=ckpt.path_of(ckpt.latest_step()))
    return state, summary


def _feature_cache(directory, task, steps: Steps, current: dict) -> FeatureCache:
    """The on-disk encoder-output cache; misses run the frozen encoders in their own jit."""
    import flax.linen as nn

    encode = jax.jit(lambda params, batch: task.encode({"params": params}, batch))

    def encode_fn(batch: dict) -> dict:
        with jax.set_mesh(steps.mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            media = encode(current["state"].params, device_batch(batch, steps))
        return {k: np.asarray(jax.device_get(v)) for k, v in media.items() if k not in batch}

    params = current["state"].params
    encoder_params = task.encoder_params(params) if hasattr(task, "encoder_params") else params
    return FeatureCache(directory, task, encoder_params, encode_fn)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled or jax.process_index() != 0,
                desc="train", dynamic_ncols=True)
