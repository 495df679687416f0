"""Prefix-shared DPO rows: the sequence sets of a pair ([prompt + media | chosen | rejected | GT]) as
ONE packed sequence per pair, so the prompt and the media are encoded and attended once.

Branch ids (models/attention/mask.py): 0 = the shared prompt, k = the k-th continuation. Packing runs
inside the step (static width: the sum of the sets' widths, padding last); a continuation token is
predicted from the token before it, its first token from the last prefix token (`align`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PACKED_FIELDS = ("input_ids", "attention_mask", "loss_mask", "branch_ids")


def _first_target(loss_mask, attention_mask):
    """(index of the first target token [B] (0 where none), whether the row has one [B])."""
    loss = loss_mask.astype(bool) & attention_mask.astype(bool)
    return jnp.argmax(loss, axis=1), jnp.any(loss, axis=1)


def pack_branches(parts: list[dict]) -> dict:
    """n sequence sets {"input_ids","attention_mask","loss_mask"} [B,T_k] sharing their prompt (the
    tokens before the first target) -> one row per pair [B, sum T_k]:
    prompt | continuation 1 | ... | continuation n | padding, with "branch_ids" 0 | 1 | ... | n | 0.
    The prompt is that of the first set with a target token (a CE-only row's GT; sets without
    targets add only loss-free tokens). Right-padded inputs; the prompts of the sets with targets
    must agree (`check_shared_prompts`, host side)."""
    firsts, has = zip(*(_first_target(p["loss_mask"], p["attention_mask"]) for p in parts), strict=True)
    has = jnp.stack(has, axis=1)                                                          # [B,n]
    firsts = jnp.stack(firsts, axis=1)
    prompt = jnp.min(jnp.where(has, firsts, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
    prompt = jnp.where(jnp.any(has, axis=1, keepdims=True), prompt, 0)                   # [B,1]
    source = jnp.argmax(has, axis=1)[:, None]                                             # [B,1]
    width = sum(p["input_ids"].shape[1] for p in parts)
    j = jnp.arange(width)[None, :]                                                        # [1,W]

    def take(x, index):  # [B,T] gathered at index [B,W] (clipped into the row)
        return jnp.take_along_axis(x, jnp.clip(index, 0, x.shape[1] - 1), axis=1)

    in_prefix = j < prompt                                                                # [B,W]
    ids = jnp.zeros(in_prefix.shape, parts[0]["input_ids"].dtype)
    for k, part in enumerate(parts):
        mine = in_prefix & (source == k)
        ids = jnp.where(mine, take(part["input_ids"], jnp.broadcast_to(j, in_prefix.shape)), ids)
    valid, loss = in_prefix, jnp.zeros_like(in_prefix)
    branch = jnp.zeros(in_prefix.shape, jnp.int32)
    start = prompt
    for k, part in enumerate(parts, start=1):
        length = jnp.sum(part["attention_mask"].astype(bool), axis=1, keepdims=True)     # [B,1]
        count = jnp.maximum(length - prompt, 0)
        inside = (j >= start) & (j < start + count)
        index = prompt + j - start
        ids = jnp.where(inside, take(part["input_ids"], index), ids)
        loss = jnp.where(inside, take(part["loss_mask"].astype(bool), index), loss)
        valid = valid | inside
        branch = jnp.where(inside, k, branch)
        start = start + count
    return {"input_ids": ids, "attention_mask": valid, "loss_mask": loss & valid, "branch_ids": branch}


def _opens_and_last_prefix(branch_ids: jax.Array, attention_mask: jax.Array):
    """(opens [B,L] bool: a continuation's first token, last_prefix [B,1]: the last prefix token)."""
    t = jnp.arange(branch_ids.shape[1])[None, :]
    prefix = attention_mask.astype(bool) & (branch_ids == 0)
    last_prefix = jnp.max(jnp.where(prefix, t, 0), axis=1, keepdims=True)                # [B,1]
    previous = jnp.concatenate([branch_ids[:, :1], branch_ids[:, :-1]], axis=1)
    return (branch_ids > 0) & (branch_ids != previous) & (t > 0), last_prefix


def predicting_index(branch_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Which position's hidden state predicts each token of a packed row: the one before it, or for
    a continuation's first token the last prefix token. [B,L] -> [B,L]."""
    opens, last_prefix = _opens_and_last_prefix(branch_ids, attention_mask)
    t = jnp.arange(branch_ids.shape[1])[None, :]
    return jnp.where(opens, last_prefix, jnp.maximum(t - 1, 0))


def align(out: dict) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """A packed forward's {"hidden" [B,L,H], "targets" (token ids), "loss_mask", "attention_mask",
    "branch_ids" [B,L]} -> (predicting hidden [B,L,H], targets [B,L], mask bool [B,L], branch [B,L]):
    row t of the hidden states is the one that predicts token t (`predicting_index`), built as the
    states shifted by one with the last prefix token's state copied to each continuation's first
    token (a shift and a [B,1,H] gather, no gather along the sequence)."""
    hidden = out["hidden"]
    opens, last_prefix = _opens_and_last_prefix(out["branch_ids"], out["attention_mask"])
    shifted = jnp.concatenate([hidden[:, :1], hidden[:, :-1]], axis=1)                   # [B,L,H]
    prefix_state = jnp.take_along_axis(hidden, last_prefix[..., None], axis=1)           # [B,1,H]
    hidden = jnp.where(opens[..., None], prefix_state, shifted)
    mask = out["loss_mask"].astype(bool) & out["attention_mask"].astype(bool) & (out["branch_ids"] > 0)
    return hidden, out["targets"], mask, out["branch_ids"]


def check_shared_prompts(batch: dict, prefixes: tuple[str, ...]) -> None:
    """Host check before a packed step: in every pair, the sequence sets that have a target token
    share their prompt (the tokens before the first target; sets without one, e.g. the empty chosen /
    rejected of a CE-only row, add nothing). Raises ValueError naming the example_id (a shared
    prefix cannot hold two prompts)."""
    sets = [p for p in prefixes if p + "input_ids" in batch]
    if len(sets) < 2:
        return
    ids = {p: np.asarray(batch[p + "input_ids"]) for p in sets}
    loss = {p: np.asarray(batch[p + "loss_mask"]).astype(bool)
            & np.asarray(batch[p + "attention_mask"]).astype(bool) for p in sets}
    example_ids = np.asarray(batch.get("example_id", np.arange(ids[sets[0]].shape[0])))
    for row in range(ids[sets[0]].shape[0]):
        targeted = [p for p in sets if loss[p][row].any()]  # none: a padding row (pad_rows)
        starts = {p: int(np.argmax(loss[p][row])) for p in targeted}
        for p in targeted[1:]:
            first, n = targeted[0], starts[targeted[0]]
            if starts[p] != n or not np.array_equal(ids[p][row, :n], ids[first][row, :n]):
                raise ValueError(
                    f"example_id {int(example_ids[row])}: the {p}prompt differs from the {first}"
                    f"prompt (first target at {starts[p]} vs {n}); prefix-shared DPO packs one prompt "
                    "per pair (set dpo.shared_prefix=False to run such pairs unshared)")


def packed_output(hidden: jax.Array, row: dict) -> dict:
    """What a task's forward_packed returns: final hidden [B,L,H] + the row's (spliced) unshifted
    "targets" (token ids), "loss_mask", "attention_mask", "branch_ids" [B,L] (the input of `align`)."""
    targets = row["targets"] if "targets" in row else row["input_ids"]
    return {"hidden": hidden, "targets": targets, "loss_mask": row["loss_mask"],
            "attention_mask": row["attention_mask"], "branch_ids": row["branch_ids"]}
