"""Jitted train / eval steps for every objective: SFT (CE), DPO (+ ground-truth CE guidance).

One function per objective, built for a task model + mesh; state buffers are donated; gradients are
taken w.r.t. `state.trainable` only. A non-finite loss or gradient never reaches the weights: the
step keeps the previous trainables / optimizer state and reports `finite = 0` (the loop decides
whether to stop or skip). Media are encoded once per step and shared by every forward; DPO packs
each pair into one prefix-shared row (training/packing.py; dpo.shared_prefix=False: unshared).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vsalmonn_jax.distributed import local_batch_shards
from vsalmonn_jax.training import losses, packing
from vsalmonn_jax.training.feature_cache import cached_features
from vsalmonn_jax.training.sharding import LOGICAL_AXIS_RULES
from vsalmonn_jax.training.state import TrainState
from vsalmonn_jax.training.task import TEXT_FIELDS, present

PAIR_PREFIXES = ("chosen_", "rejected_")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static knobs of a step (hashable, read from the config once)."""

    grad_accum: int = 1
    logits_chunk: int = 0
    dropout: bool = False        # any dropout on (LoRA, Q-Former): training forwards draw rng "dropout"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    gt_ce_weight: float = 0.1
    gt_ce_mean: str = "tokens"   # tokens: pooled over the batch's GT tokens | rows: the release's step
    ce_mean: str = "tokens"      # SFT CE: tokens (pooled over the batch) | rows (per-row means)
    reference: str = "snapshot"  # snapshot | lora_disabled
    shared_prefix: bool = True   # DPO: one packed row per pair (training/packing.py)

    @classmethod
    def from_config(cls, config) -> StepOptions:
        return cls(grad_accum=int(config.train.grad_accum),
                   logits_chunk=int(config.train.logits_chunk),
                   dropout=float(config.model.lora.dropout) > 0
                   or float(config.model.qformer.get("dropout", 0.0)) > 0,
                   beta=float(config.dpo.beta), loss_type=str(config.dpo.loss_type),
                   label_smoothing=float(config.dpo.label_smoothing),
                   gt_ce_weight=float(config.dpo.gt_ce_weight),
                   gt_ce_mean=str(config.dpo.get("gt_ce_mean", "tokens")),
                   ce_mean=str(config.train.get("ce_mean", "tokens")),
                   reference=str(config.dpo.reference),
                   shared_prefix=bool(config.dpo.get("shared_prefix", True)))


def text_fields(batch: dict, prefix: str = "") -> dict:
    """{"input_ids","attention_mask","loss_mask"} of one sequence set ("", "chosen_", ...)."""
    missing = [prefix + k for k in TEXT_FIELDS if prefix + k not in batch]
    if missing:
        raise KeyError(f"batch is missing {missing} (has {sorted(batch)})")
    return {k: batch[prefix + k] for k in TEXT_FIELDS}


def stack_texts(parts: list[dict]) -> dict:
    """Concatenate sequence sets on the batch axis, right-padding to the longest: n x [B,T_i] -> [nB,T]."""
    length = max(p["input_ids"].shape[1] for p in parts)

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1])))

    return {k: jnp.concatenate([pad(p[k]) for p in parts], axis=0) for k in TEXT_FIELDS}


def tile_media(media: Any, n: int) -> Any:
    """Repeat batch-major media n times on the batch axis (the same encoding for every forward)."""
    if n == 1 or media is None:
        return media
    return jax.tree.map(lambda x: jnp.concatenate([x] * n, axis=0), media)


def _rngs(state: TrainState, opts: StepOptions):
    return {"dropout": jax.random.fold_in(state.rng, state.step)} if opts.dropout else None


def _encode(task, params, batch):
    """Frozen-encoder outputs: from the batch (feature cache hit) or computed once here."""
    cached = cached_features(batch)
    if cached:
        return task.with_features(batch, cached)
    return jax.lax.stop_gradient(task.encode({"params": params}, batch))


def _token_logps(task, variables, text, media, opts, *, deterministic, rngs):
    hidden, targets, mask = task.forward(variables, text, media, deterministic=deterministic,
                                         rngs=rngs)
    logps = losses.chunked_token_logps(hidden, targets, mask,
                                       lambda h: task.logits(variables, h), opts.logits_chunk)
    return logps, mask


def sft_loss(task, opts: StepOptions, params, trainable, batch, *, deterministic=False, rngs=None):
    """(CE over target tokens, mean by train.ce_mean; metrics)."""
    media = _encode(task, params, batch)
    variables = present({"params": params, **trainable})
    logps, mask = _token_logps(task, variables, text_fields(batch), media, opts,
                               deterministic=deterministic, rngs=rngs)
    ce, count = losses.masked_ce(logps, mask, opts.ce_mean)
    return ce, {"ce": ce, "target_tokens": count}


def shares_prefix(task, opts: StepOptions) -> bool:
    """Whether DPO runs prefix-shared: asked for, and the task has a packed forward."""
    return opts.shared_prefix and hasattr(task, "forward_packed")


def branch_logps(task, variables, batch, media, opts: StepOptions, prefixes, *, deterministic,
                 rngs) -> list[tuple[jax.Array, jax.Array]]:
    """Per sequence set of `prefixes` ("chosen_", ...): (token log-probs, target mask), in ONE forward.

    Prefix-shared (default): one packed row per pair [prompt + media | set 1 | set 2 | ...]
    (training/packing.py), media once per pair; each set's arrays are the whole row [B,L] with the
    mask cut to its branch. Unshared (dpo.shared_prefix=False, for checking): the sets stacked on the
    batch axis with tiled media; each set's arrays are its own rows [B,T].
    """
    parts = [text_fields(batch, p) for p in prefixes]
    if shares_prefix(task, opts):
        out = task.forward_packed(variables, packing.pack_branches(parts), media,
                                  deterministic=deterministic, rngs=rngs)
        hidden, targets, mask, branch = packing.align(out)
        logps = losses.chunked_token_logps(hidden, targets, mask,
                                           lambda h: task.logits(variables, h), opts.logits_chunk)
        return [(logps, mask & (branch == k)) for k in range(1, len(prefixes) + 1)]
    n = parts[0]["input_ids"].shape[0]
    logps, mask = _token_logps(task, variables, stack_texts(parts), tile_media(media, len(parts)),
                               opts, deterministic=deterministic, rngs=rngs)
    return [(logps[k * n:(k + 1) * n], mask[k * n:(k + 1) * n]) for k in range(len(parts))]


def reference_forward(task, opts: StepOptions, state: TrainState, batch, media
                      ) -> tuple[jax.Array, jax.Array]:
    """The reference network's log pi(chosen), log pi(rejected) [B] on `batch` (GT-free rows, packed
    like the policy's unless dpo.shared_prefix=False): LoRA off, the round-start adapter snapshot
    ("snapshot") or the current one ("lora_disabled", the official quirk). No gradient."""
    adapter = state.ref_adapter if opts.reference == "snapshot" else state.trainable.get("adapter")
    variables = jax.lax.stop_gradient(present({"params": state.params, "adapter": adapter}))
    (chosen, chosen_mask), (rejected, rejected_mask) = branch_logps(
        task, variables, batch, media, opts, PAIR_PREFIXES, deterministic=True, rngs=None)
    return (jax.lax.stop_gradient(losses.sequence_logps(chosen, chosen_mask)),
            jax.lax.stop_gradient(losses.sequence_logps(rejected, rejected_mask)))


def reference_logps(task, opts: StepOptions, state: TrainState, batch, media) -> tuple[jax.Array, jax.Array]:
    """Reference log pi(chosen), log pi(rejected) [B]: precomputed in the batch, else
    `reference_forward`."""
    if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    return reference_forward(task, opts, state, batch, media)


def dpo_loss(task, opts: StepOptions, params, trainable, batch, media, ref, *, deterministic=False,
             rngs=None):
    """Chosen, rejected (and ground truth, if in the batch and weighted) in ONE policy forward."""
    use_gt = opts.gt_ce_weight > 0 and "gt_input_ids" in batch
    prefixes = PAIR_PREFIXES + (("gt_",) if use_gt else ())
    variables = present({"params": params, **trainable})
    sets = branch_logps(task, variables, batch, media, opts, prefixes, deterministic=deterministic,
                        rngs=rngs)
    chosen, rejected = (losses.sequence_logps(*s) for s in sets[:2])
    per_example, chosen_r, rejected_r = losses.dpo_loss(
        chosen, rejected, ref[0], ref[1], beta=opts.beta, loss_type=opts.loss_type,
        label_smoothing=opts.label_smoothing)
    has_pair = jnp.any(sets[0][1], axis=-1) | jnp.any(sets[1][1], axis=-1)              # [B]
    if use_gt and opts.gt_ce_mean == "rows":
        loss, gt_ce = losses.gt_guided_dpo_rows(per_example, *sets[2], has_pair, opts.gt_ce_weight)
    else:
        gt_ce = losses.masked_ce(*sets[2])[0] if use_gt else None
        loss = losses.gt_guided_dpo(per_example, gt_ce, opts.gt_ce_weight)
    metrics = losses.dpo_metrics(per_example, chosen_r, rejected_r, has_pair, chosen, rejected)
    metrics["target_tokens"] = sum(jnp.sum(m.astype(jnp.float32)) for _, m in sets)
    if use_gt:
        metrics["gt_ce"] = gt_ce
    return loss, metrics


def _apply_update(state: TrainState, tx, schedule, opts, loss, grads, metrics):
    """Optimizer update, skipped (state kept) when loss or grad norm is not finite."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state.opt_state, state.trainable)
    new_trainable = optax.apply_updates(state.trainable, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(step=state.step + 1, trainable=keep(new_trainable, state.trainable),
                              opt_state=keep(new_opt, state.opt_state))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32),
                   lr=schedule(state.step // opts.grad_accum))
    return new_state, metrics


def _sft_train(task, tx, schedule, opts):
    def step(state: TrainState, batch):
        rngs = _rngs(state, opts)
        grad_fn = jax.value_and_grad(
            lambda t: sft_loss(task, opts, state.params, t, batch, rngs=rngs), has_aux=True)
        (loss, metrics), grads = grad_fn(state.trainable)
        metrics["tokens"] = jnp.sum(batch["attention_mask"].astype(jnp.float32))
        return _apply_update(state, tx, schedule, opts, loss, grads, metrics)

    return step


def _dpo_train(task, tx, schedule, opts):
    def step(state: TrainState, batch):
        rngs = _rngs(state, opts)
        media = _encode(task, state.params, batch)
        ref = reference_logps(task, opts, state, batch, media)
        grad_fn = jax.value_and_grad(
            lambda t: dpo_loss(task, opts, state.params, t, batch, media, ref, rngs=rngs),
            has_aux=True)
        (loss, metrics), grads = grad_fn(state.trainable)
        metrics["tokens"] = sum(jnp.sum(v.astype(jnp.float32)) for k, v in batch.items()
                                if k.endswith("attention_mask"))
        return _apply_update(state, tx, schedule, opts, loss, grads, metrics)

    return step


def _sft_eval(task, opts):
    def step(state: TrainState, batch):
        loss, metrics = sft_loss(task, opts, state.params, state.trainable, batch, deterministic=True)
        return dict(metrics, loss=loss, ce_sum=loss * metrics["target_tokens"])

    return step


def _dpo_eval(task, opts):
    def step(state: TrainState, batch):
        media = _encode(task, state.params, batch)
        ref = reference_logps(task, opts, state, batch, media)
        loss, metrics = dpo_loss(task, opts, state.params, state.trainable, batch, media, ref,
                                 deterministic=True)
        return dict(metrics, loss=loss)

    return step


def _dpo_reference(task, opts):
    def step(state: TrainState, batch):
        media = _encode(task, state.params, batch)
        ref_chosen, ref_rejected = reference_logps(task, opts, state, batch, media)
        return {"ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}

    return step


OBJECTIVES = {"align": "sft", "sft": "sft", "rebirth": "sft", "dpo": "dpo", "mrdpo": "dpo"}


def objective_of(stage: str) -> str:
    if stage not in OBJECTIVES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[stage]


@dataclasses.dataclass
class Steps:
    """The jitted steps of one stage: train(state, batch) -> (state, metrics); eval -> metrics."""

    train: Callable
    eval: Callable
    objective: str
    mesh: Mesh
    batch_sharding: NamedSharding
    reference: Callable | None = None  # DPO: (state, batch) -> {"ref_chosen_logps", ...} [B]
    packed: tuple[str, ...] = ()       # prefix-shared DPO: the sequence sets packed per pair


def make_steps(task, config, tx, schedule, mesh: Mesh, shardings, objective: str | None = None,
               rules=LOGICAL_AXIS_RULES) -> Steps:
    """Jit the train/eval steps for `config.stage` (or `objective` = sft | dpo) on `mesh`.

    The batch (any dict of batch-major arrays) is sharded on its leading axis over (data, fsdp);
    state in/out shardings are `shardings`; the state argument is donated.
    """
    objective = objective or objective_of(config.stage)
    opts = StepOptions.from_config(config)
    train_fn = {"sft": _sft_train, "dpo": _dpo_train}[objective](task, tx, schedule, opts)
    eval_fn = {"sft": _sft_eval, "dpo": _dpo_eval}[objective](task, opts)
    data = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    rep = NamedSharding(mesh, PartitionSpec())
    train_jit = jax.jit(train_fn, in_shardings=(shardings, data), out_shardings=(shardings, rep),
                        donate_argnums=(0,))
    eval_jit = jax.jit(eval_fn, in_shardings=(shardings, data), out_shardings=rep)

    def in_context(fn):
        def call(state, batch):
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                return fn(state, batch)
        call.jitted = fn
        return call

    reference = None
    if objective == "dpo":  # for precomputing reference log-probs once per round
        reference = in_context(jax.jit(_dpo_reference(task, opts), in_shardings=(shardings, data),
                                       out_shardings=data))
    packed = ()
    if objective == "dpo" and shares_prefix(task, opts):
        packed = PAIR_PREFIXES + (("gt_",) if opts.gt_ce_weight > 0 else ())
    return Steps(train=in_context(train_jit), eval=in_context(eval_jit), objective=objective,
                 mesh=mesh, batch_sharding=data, reference=reference, packed=packed)


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Host numpy batch (this process's rows) -> global arrays sharded on the batch axis."""
    shards = local_batch_shards(sharding.mesh)
    for k, v in batch.items():
        if v.ndim == 0 or v.shape[0] % shards:
            raise ValueError(f"batch field {k!r} has shape {v.shape}: its leading (batch) axis must "
                             f"be a multiple of this process's {shards} (data x fsdp) batch shards")
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
