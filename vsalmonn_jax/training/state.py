"""Train state (frozen params, fp32 trainables, optimizer, rng, DPO reference snapshot) and optax set-up.

The state is created already sharded: `jax.eval_shape` of the boxed init gives the logical specs,
`jax.jit(init, out_shardings=...)` materialises each shard where it lives (a 7B base never sits on
one host). AdamW (weight decay from config, 0 by default), linear warm-up + cosine, global-norm
clipping, gradient accumulation with optax.MultiSteps.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, PartitionSpec

from vsalmonn_jax.training.sharding import LOGICAL_AXIS_RULES, fit_to_shapes, logical_to_sharding

log = logging.getLogger(__name__)
_WARNED: set = set()


@struct.dataclass
class TrainState:
    step: jax.Array          # int32 [] loop steps taken (micro-batches when grad_accum > 1)
    params: Any              # frozen base (bf16 at scale); never differentiated
    trainable: Any           # {"lora": ..., "adapter": ...} fp32
    opt_state: Any           # optax state for `trainable` only
    rng: jax.Array           # uint32 [2] raw key; per-step keys are fold_in(rng, step)
    ref_adapter: Any         # round-start adapter snapshot for dpo.reference="snapshot" ({} if unused)


def num_updates(train_cfg, num_steps: int | None = None) -> int:
    """Optimizer updates in a stage: loop steps / grad_accum."""
    steps = int(train_cfg.num_steps if num_steps is None else num_steps)
    return max(1, steps // max(1, int(train_cfg.grad_accum)))


def steps_for_epochs(train_cfg, records: int, rows_per_step: int) -> int | None:
    """Loop steps for train.epochs passes over `records` at `rows_per_step` global rows per step
    (None when train.epochs is 0: train.num_steps is used). A pass's last partial batch counts whole;
    rounded up to a multiple of train.grad_accum (a partial accumulation would never be applied)."""
    epochs = int(train_cfg.get("epochs", 0) or 0)
    if epochs <= 0:
        return None
    accum = max(1, int(train_cfg.get("grad_accum", 1) or 1))
    steps = max(1, math.ceil(epochs * int(records) / max(1, int(rows_per_step))))
    return -(-steps // accum) * accum


def make_schedule(train_cfg, total_updates: int) -> optax.Schedule:
    """lr schedule over optimizer updates: linear warm-up (ceil(ratio * total)) then cosine/linear/none."""
    lr = float(train_cfg.lr)
    warmup = int(math.ceil(float(train_cfg.warmup_ratio) * total_updates))
    kind = train_cfg.schedule
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_updates, warmup + 1), 0.0)
    if kind == "linear":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)),
                                     optax.linear_schedule(lr, 0.0, max(total_updates - warmup, 1))],
                                    [warmup])
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)),
                                     optax.constant_schedule(lr)], [warmup])
    raise ValueError(f"train.schedule must be cosine | linear | constant, got {kind!r}")


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def frozen_labels(frozen: tuple[str, ...]):
    """tree -> labels: "frozen" for the trainable leaves under one of the `frozen` paths
    ("adapter/audio_connector/audio_proj"), else "train" (zero_frozen's); a path that names no leaf
    of a collection the model has is a ValueError (a typo would otherwise train what it meant to
    freeze)."""
    def labels(tree):
        paths = [_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
        for prefix in frozen:
            collection = prefix.split("/")[0]
            if not any(p.startswith(collection + "/") for p in paths):
                continue   # a model without that collection (the text-only task has no adapter)
            if not any(p == prefix or p.startswith(prefix + "/") for p in paths):
                raise ValueError(f"train.frozen: {prefix!r} names no trainable parameter (e.g. "
                                 f"{paths[0] if paths else 'none'}; paths are collection/module/...)")
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "frozen" if any(_path(p) == f or _path(p).startswith(f + "/")
                                         for f in frozen) else "train", tree)
    return labels


def decayed(tree):
    """AdamW's weight-decay mask, as the HF Trainer's: every leaf but biases and norm scales
    (flax's LayerNorm / RMSNorm `scale`, `bias`). Used when train.weight_decay > 0 only, so the
    optimizer state of runs without decay keeps its structure."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: _path(p).split("/")[-1] not in ("bias", "scale")
        and not _path(p).endswith(("/bias/value", "/scale/value")), tree)


def zero_frozen(frozen: tuple[str, ...]) -> optax.GradientTransformation:
    """Stateless: the gradients / updates of the leaves under `frozen` set to zero (frozen_labels).
    Unlike optax.multi_transform it leaves the optimizer state's structure plain (no MaskedNode),
    which the state's sharding rules read."""
    labels = frozen_labels(frozen)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, label: jnp.zeros_like(u) if label == "frozen" else u,
                            updates, labels(updates)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train_cfg, total_updates: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW + clipping (+ MultiSteps accumulation); the trainables under train.frozen get no update
    (their gradients are zeroed before the clipping norm, their updates after AdamW's weight
    decay). Returns (transformation, schedule)."""
    schedule = make_schedule(train_cfg, total_updates)
    frozen = tuple(str(f).strip("/") for f in (train_cfg.get("frozen") or ()))
    parts = [zero_frozen(frozen)] if frozen else []   # the release's LoRA stages: speech_llama_proj
    if float(train_cfg.grad_clip) > 0:
        parts.append(optax.clip_by_global_norm(float(train_cfg.grad_clip)))
    decay = float(train_cfg.weight_decay)
    parts.append(optax.adamw(schedule, b1=float(train_cfg.b1), b2=float(train_cfg.b2),
                             eps=float(train_cfg.eps), weight_decay=decay,
                             mask=decayed if decay > 0 else None))
    if frozen:
        parts.append(zero_frozen(frozen))
    tx = optax.chain(*parts)
    accum = int(train_cfg.grad_accum)
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum)
    return tx, schedule


def uses_snapshot(config) -> bool:
    """Whether the DPO reference needs a frozen copy of the round-start adapter."""
    return config.stage in ("dpo", "mrdpo") and config.dpo.reference == "snapshot"


def _fp32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        tree)


def _init_fn(task, config, tx):
    collections = tuple(config.train.trainable)
    for name in collections:
        if name not in ("lora", "adapter"):
            raise ValueError(f"train.trainable may hold 'lora' and 'adapter' only, got {name!r}")
    snapshot = uses_snapshot(config)

    def init(rng):
        k_model, k_state = jax.random.split(rng)
        variables = task.init(k_model, collections)
        trainable = {c: _fp32(variables.get(c, {})) for c in collections}
        ref = jax.tree.map(lambda x: x, trainable.get("adapter", {})) if snapshot else {}
        return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                          trainable=trainable, opt_state=tx.init(trainable), rng=k_state,
                          ref_adapter=ref)

    return init


def _once(spec: PartitionSpec) -> PartitionSpec:
    """A logical name used twice in one spec (e.g. a conv kernel's two `conv_in` axes) is kept on
    its first axis only; flax refuses repeated names."""
    seen, out = set(), []
    for name in spec:
        out.append(None if isinstance(name, str) and name in seen else name)
        if isinstance(name, str):
            seen.add(name)
    return PartitionSpec(*out)


def state_shardings(task, config, tx, mesh: Mesh, rules=LOGICAL_AXIS_RULES, *, fit: bool = True):
    """(abstract boxed state, NamedSharding tree) without allocating anything. fit: a dimension the
    mesh axes of its logical name do not divide is replicated (sharding.fit_to_shapes; warned once
    per mesh); fit=False gives the rules' shardings as they are (`plan` reports both)."""
    abstract = jax.eval_shape(_init_fn(task, config, tx), jax.random.PRNGKey(0))
    specs = jax.tree.map(_once, nn.get_partition_spec(abstract),
                         is_leaf=lambda x: isinstance(x, PartitionSpec))
    shardings = logical_to_sharding(specs, mesh, rules)
    if not fit:
        return abstract, shardings
    shardings, replicated = fit_to_shapes(values(abstract), shardings)
    key = (tuple(mesh.shape.items()), tuple(replicated))
    if replicated and key not in _WARNED:
        _WARNED.add(key)
        log.warning("mesh %s does not divide %d state dimension(s); they are replicated (more "
                    "memory per device; `vsalmonn-jax plan` shows how much): %s%s",
                    dict(mesh.shape), len(replicated), "; ".join(replicated[:4]),
                    " ..." if len(replicated) > 4 else "")
    return abstract, shardings


def abstract_state(task, config, tx, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """ShapeDtypeStructs carrying shardings: the restore target for orbax."""
    abstract, shardings = state_shardings(task, config, tx, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        values(abstract), shardings)


def _overlay(tree, part):
    """`tree` with the leaves `part` holds replaced (cast to the leaf's dtype)."""
    if not isinstance(part, dict):
        return part.astype(tree.dtype)
    return {k: (_overlay(v, part[k]) if k in part else v) for k, v in tree.items()}


def make_initializer(task, config, tx, shardings):
    """jitted (rng, params=None, pretrained=True) -> state placed with `shardings`.

    params=None: the model's variables are initialised in place from `rng`, except the tensors that
    config.model.pretrained provides (models/pretrained.py, streamed onto the mesh; pretrained=False
    skips them, e.g. when a checkpoint brings its own base); `initialize.record` then says what was
    loaded. Given `params` are placed with the base shardings and donated. Reusable: one compile
    serves every stage / round / resume with the same task and config."""
    init = _init_fn(task, config, tx)
    snapshot = uses_snapshot(config)
    # No mesh / rules context: out_shardings place every leaf; in-init constraints are not needed.
    fresh = jax.jit(lambda r: values(init(r)), out_shardings=shardings)
    around = jax.jit(lambda r, p: values(init(r)).replace(params=p), out_shardings=shardings,
                     donate_argnums=(1,))

    def overlay(r, loaded):
        state = values(init(r))
        trainable = {c: _overlay(v, loaded.get(c, {})) for c, v in state.trainable.items()}
        return state.replace(params=_overlay(state.params, loaded.get("params", {})),
                             trainable=trainable, opt_state=tx.init(trainable),
                             ref_adapter=jax.tree.map(lambda x: x, trainable.get("adapter", {}))
                             if snapshot else {})

    overlaid = jax.jit(overlay, out_shardings=shardings, donate_argnums=(1,))

    def initialize(rng, params=None, pretrained=True):
        from vsalmonn_jax.models.pretrained import load_pretrained_variables

        if params is not None:
            return around(rng, jax.device_put(params, shardings.params))
        if not pretrained:
            initialize.record = {"base": "from the checkpoint"}
            return fresh(rng)
        abstract = values(jax.eval_shape(init, jax.random.PRNGKey(0)))
        loaded, initialize.record = load_pretrained_variables(
            config, {"params": abstract.params, **abstract.trainable},
            {"params": shardings.params, **shardings.trainable})
        return overlaid(rng, loaded) if loaded else fresh(rng)

    initialize.record = {}
    return initialize


def create_train_state(task, config, tx, mesh: Mesh, rng: jax.Array, params=None,
                       rules=LOGICAL_AXIS_RULES, pretrained: bool = True) -> tuple[TrainState, Any]:
    """Sharded state from scratch (config.model.pretrained's tensors loaded, the rest initialised in
    place) or around given `params`. Returns (state, shardings); `initial_state` also returns the
    record of what was loaded. Given `params` are donated."""
    state, shardings, _ = initial_state(task, config, tx, mesh, rng, params, rules, pretrained)
    return state, shardings


def initial_state(task, config, tx, mesh: Mesh, rng: jax.Array, params=None,
                  rules=LOGICAL_AXIS_RULES, pretrained: bool = True) -> tuple[TrainState, Any, dict]:
    """create_train_state + the pretrained record (models/pretrained.py) for the run record."""
    _, shardings = state_shardings(task, config, tx, mesh, rules)
    initialize = make_initializer(task, config, tx, shardings)
    return initialize(rng, params, pretrained), shardings, initialize.record


def values(tree):
    """Strip nn.Partitioned boxes without applying sharding constraints."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


def snapshot_reference(state: TrainState) -> TrainState:
    """Freeze the current adapter as the DPO reference (start of a DPO stage / mrDPO round)."""
    adapter = state.trainable.get("adapter", {})
    return state.replace(ref_adapter=jax.tree.map(jnp.copy, adapter))


def trainable_count(state: TrainState) -> dict[str, int]:
    """Scalars per trainable collection (for the start-of-run log)."""
    return {k: int(sum(x.size for x in jax.tree.leaves(v))) for k, v in state.trainable.items()}


def merge_and_reinit(state: TrainState, lora_config, rng: jax.Array, shardings=None) -> TrainState:
    """Fold the LoRA into the frozen base (W += scale A B, fp32, cast back) and start a fresh LoRA
    (B = 0): the policy is unchanged (exactly in fp32; a bf16 base rounds the sum, which drops
    much of an update far below the weights' scale, as the release's PEFT merge on its bf16 model
    does) and becomes the next DPO reference. Jitted; the old base is
    donated so two copies never live at once. The optimizer state is left to the caller."""
    from vsalmonn_jax.lora import init_lora, merge

    def fn(params, lora, key):
        new_params = merge(params, lora, lora_config.scale)
        fresh = {name: init_lora(jax.random.fold_in(key, i), params[name], lora_config)
                 for i, name in enumerate(sorted(lora))}
        return new_params, fresh

    out = None if shardings is None else (shardings.params, shardings.trainable["lora"])
    params, lora = jax.jit(fn, donate_argnums=(0,), out_shardings=out)(
        state.params, state.trainable["lora"], rng)
    return state.replace(params=params, trainable=dict(state.trainable, lora=lora))
