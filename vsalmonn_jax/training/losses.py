"""Training objectives: masked token cross-entropy, summed sequence log-probs, DPO (sigmoid / IPO).

Log-probs are computed from final hidden states chunk by chunk so the [B, T, V] fp32 logits are never
materialised; chunks without a single target token skip the lm_head entirely.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "ipo")


def shift_targets(input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Position t predicts token t+1: targets[t] = ids[t+1], mask[t] = loss_mask[t+1]; last is off."""
    # [B, T] -> [B, T]
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    mask = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    return targets, mask.astype(bool)


def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position in fp32: logits [B, T, V], targets int [B, T] -> [B, T]."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def chunked_token_logps(hidden: jax.Array, targets: jax.Array, mask: jax.Array,
                        logits_fn: Callable[[jax.Array], jax.Array],
                        chunk_size: int = 0) -> jax.Array:
    """Per-token target log-probs from final hidden states, `chunk_size` positions at a time.

    hidden [B, T, H], targets / mask [B, T] -> [B, T] fp32 (0 where mask is False). Each chunk's logits
    ([B, chunk, V]) are rematerialised in the backward pass instead of stored, and a chunk with no
    target token in the whole batch skips `logits_fn` (a real branch: the loop is a scan, not a vmap).
    chunk_size <= 0 or >= T: one chunk (plain logits, nothing skipped).
    """
    batch, length = targets.shape
    if chunk_size <= 0 or chunk_size >= length:
        return jnp.where(mask, token_logps(logits_fn(hidden), targets), 0.0)
    pad = -length % chunk_size
    num_chunks = (length + pad) // chunk_size
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))

    def to_chunks(x):  # [B, C*n, ...] -> [n, B, C, ...]
        x = x.reshape(batch, num_chunks, chunk_size, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    @jax.checkpoint
    def one_chunk(h, t, m):
        def compute(_):
            return jnp.where(m, token_logps(logits_fn(h), t), 0.0)

        return jax.lax.cond(jnp.any(m), compute,
                            lambda _: jnp.zeros(t.shape, jnp.float32), None)

    def body(carry, xs):
        return carry, one_chunk(*xs)

    _, out = jax.lax.scan(body, None, (to_chunks(hidden), to_chunks(targets), to_chunks(mask)))
    out = jnp.moveaxis(out, 0, 1).reshape(batch, num_chunks * chunk_size)  # [B, T + pad]
    return out[:, :length]


def sequence_logps(logps: jax.Array, mask: jax.Array) -> jax.Array:
    """Summed response log-probability per sequence: [B, T] -> [B] (DPO's log pi(y|x))."""
    return jnp.sum(jnp.where(mask, logps, 0.0), axis=-1)


CE_MEANS = ("tokens", "rows")


def masked_ce(logps: jax.Array, mask: jax.Array, mean: str = "tokens") -> tuple[jax.Array, jax.Array]:
    """Token cross-entropy of logps / mask [B, T]; returns (loss, token count). mean "tokens": over
    all target tokens of the batch; "rows": each row's token mean, then the mean over the rows that
    have targets (the release's step: one row per device, gradients averaged)."""
    if mean not in CE_MEANS:
        raise ValueError(f"train.ce_mean must be one of {CE_MEANS}, got {mean!r}")
    count = jnp.sum(mask.astype(jnp.float32))
    if mean == "rows":
        per_row = jnp.sum(mask.astype(jnp.float32), axis=-1)                               # [B]
        ce = -jnp.sum(jnp.where(mask, logps, 0.0), axis=-1) / jnp.maximum(per_row, 1.0)   # [B]
        used = (per_row > 0).astype(jnp.float32)
        return jnp.sum(ce * used) / jnp.maximum(jnp.sum(used), 1.0), count
    total = -jnp.sum(jnp.where(mask, logps, 0.0))
    return total / jnp.maximum(count, 1.0), count


def dpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
             ref_chosen_logps: jax.Array, ref_rejected_logps: jax.Array, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-example DPO losses and implicit rewards beta * (log pi - log ref) (rewards carry no grad).

    sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), h = (pi_c - ref_c) - (pi_r - ref_r)
    ipo:     (h - 1 / (2 beta))^2, on the same summed log-probs (TRL's IPO averages them per token,
             which puts its 1 / (2 beta) target on another scale; not the release's loss)
    """
    logits = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = (-jax.nn.log_sigmoid(beta * logits) * (1.0 - label_smoothing)
                  - jax.nn.log_sigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "ipo":
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    chosen_rewards = beta * jax.lax.stop_gradient(policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * jax.lax.stop_gradient(policy_rejected_logps - ref_rejected_logps)
    return losses, chosen_rewards, rejected_rewards


def gt_guided_dpo(dpo_losses: jax.Array, gt_ce: jax.Array | None, gt_ce_weight: float = 0.1
                  ) -> jax.Array:
    """The paper's objective: mean DPO loss + weight x CE of the policy on the ground-truth caption."""
    loss = jnp.mean(dpo_losses)
    if gt_ce is not None and gt_ce_weight:
        loss = loss + gt_ce_weight * gt_ce
    return loss


def gt_guided_dpo_rows(dpo_losses: jax.Array, gt_logps: jax.Array, gt_mask: jax.Array,
                       has_pair: jax.Array, gt_ce_weight: float = 0.1) -> tuple[jax.Array, jax.Array]:
    """The release's step (dpo.gt_ce_mean=rows): it trains one row per device and averages the
    gradients, so per row: a pair's DPO loss + weight x its GT caption's token-mean CE; a CE-only
    row (no pair: llava/train/dpo_trainer.py's `ce_only`) its CE at weight 1; then the mean over
    the rows that have a pair or a GT caption (padding rows out).
    dpo_losses / has_pair [B]; gt_logps / gt_mask [B, T]. Returns (loss, mean GT CE over GT rows)."""
    count = jnp.sum(gt_mask.astype(jnp.float32), axis=-1)                               # [B]
    ce = -jnp.sum(jnp.where(gt_mask, gt_logps, 0.0), axis=-1) / jnp.maximum(count, 1.0)  # [B]
    row = jnp.where(has_pair, dpo_losses + gt_ce_weight * ce, ce)
    used = has_pair | (count > 0)
    loss = jnp.sum(jnp.where(used, row, 0.0)) / jnp.maximum(jnp.sum(used.astype(jnp.float32)), 1.0)
    has_gt = count > 0
    gt_ce = jnp.sum(jnp.where(has_gt, ce, 0.0)) / jnp.maximum(jnp.sum(has_gt.astype(jnp.float32)), 1.0)
    return loss, gt_ce


# the dpo_metrics that are means over a batch's pairs (evaluation weighs batches by "pairs")
PAIR_MEANS = ("dpo_loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
              "rewards/accuracy", "logps/chosen", "logps/rejected")


def dpo_metrics(losses: jax.Array, chosen_rewards: jax.Array, rejected_rewards: jax.Array,
                has_pair: jax.Array | None = None, chosen_logps: jax.Array | None = None,
                rejected_logps: jax.Array | None = None) -> dict[str, jax.Array]:
    """Scalars for logging: DPO loss, rewards, margin, preference accuracy (and the policy's
    log-probs, when given), means over the rows that hold a pair (`has_pair` [B]; default all),
    and `pairs`, their count: a CE-only record or an evaluation's padding row has no pair, and
    counted as a tie (loss log 2, margin 0, not accurate) it skewed every mean."""
    margins = chosen_rewards - rejected_rewards
    weights = jnp.ones_like(losses) if has_pair is None else has_pair.astype(losses.dtype)
    pairs = jnp.sum(weights)
    mean = lambda x: jnp.sum(weights * x) / jnp.maximum(pairs, 1.0)  # noqa: E731
    out = {
        "pairs": pairs,
        "dpo_loss": mean(losses),
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/margins": mean(margins),
        "rewards/accuracy": mean((margins > 0).astype(losses.dtype)),
    }
    if chosen_logps is not None:
        out.update({"logps/chosen": mean(chosen_logps), "logps/rejected": mean(rejected_logps)})
    return out
