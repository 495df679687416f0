"""Next-token selection: greedy, temperature, top-k and exact top-p (nucleus) filtering, per-sequence RNG.

Pure functions on logits `[batch, vocab]`; every sequence draws from its own key so a caption does not
depend on which other prompts share its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. Hashable (a static argument of the jitted decode loop).

    greedy: argmax (temperature / top_k / top_p ignored).
    temperature: logits are divided by it before filtering (> 0).
    top_k: keep the k most likely tokens (0 = off; ties with the k-th logit are kept).
    top_p: keep the smallest set of most likely tokens whose probability mass reaches top_p (1.0 = off).
    repetition_penalty: HF's (greedy too): the logit of every token already in the sequence is
    divided by it when positive, multiplied when negative, before choosing (1.0 = off).
    """

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")

    @classmethod
    def from_config(cls, c) -> SamplingConfig:
        """From the `generate` config section (greedy, temperature, top_k, top_p, repetition_penalty)."""
        return cls(greedy=bool(c.greedy), temperature=float(c.temperature), top_k=int(c.top_k),
                   top_p=float(c.top_p), repetition_penalty=float(c.get("repetition_penalty", 1.0)))


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """bool [B, V]: True for tokens whose logit is >= the k-th largest of their row."""
    if k <= 0 or k >= logits.shape[-1]:
        return jnp.ones(logits.shape, bool)
    kth = jax.lax.top_k(logits, k)[0][..., -1:]                      # [B, 1]
    return logits >= kth


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """bool [B, V]: the nucleus, i.e. the smallest set of most likely tokens with mass >= p.

    A token is kept when the probability mass of the tokens ranked strictly above it is < p, so the
    most likely token is always kept and the set stops at the first token whose inclusion reaches p.
    Tokens exactly tied in probability with the last kept one are kept too (no arbitrary order).
    One sort per row; no scatter back to vocabulary order is needed.
    """
    if p >= 1.0:
        return jnp.ones(logits.shape, bool)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)     # [B, V]
    sorted_probs = -jnp.sort(-probs, axis=-1)                       # [B, V] descending
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # exclusive cumulative mass
    keep = jnp.maximum(jnp.sum(mass_before < p, axis=-1, keepdims=True), 1)  # [B, 1]
    cutoff = jnp.take_along_axis(sorted_probs, keep - 1, axis=-1)   # smallest kept probability
    return probs >= cutoff


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """float32 [B, V]: temperature-scaled logits with tokens outside top-k / top-p set to -inf."""
    logits = logits.astype(jnp.float32) / config.temperature
    keep = top_k_mask(logits, config.top_k)
    logits = jnp.where(keep, logits, -jnp.inf)
    keep = top_p_mask(logits, config.top_p)
    return jnp.where(keep, logits, -jnp.inf)


def step_keys(keys: jax.Array, step: jax.Array | int) -> jax.Array:
    """The keys of one decode step: each sequence's key folded with the step index. [B] keys."""
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)


def penalize_repeats(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF's RepetitionPenaltyLogitsProcessor: logits [B, V] of the tokens in `seen` (bool [B, V])
    divided by `penalty` when positive, multiplied when negative."""
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def select_tokens(logits: jax.Array, keys: jax.Array, config: SamplingConfig,
                  seen: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Choose one token per row. Returns (tokens int32 [B], model log-probs float32 [B]).

    logits: [B, V] from the model; keys: [B] per-sequence PRNG keys for this step (unused when
    greedy); seen: bool [B, V], the tokens already in each sequence (config.repetition_penalty).
    The returned log-prob is of the chosen token under the model's own distribution (log_softmax
    of the raw logits, before the penalty, temperature and filtering).
    """
    logits = logits.astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)                  # [B, V]
    if seen is not None and config.repetition_penalty != 1.0:
        logits = penalize_repeats(logits, seen, config.repetition_penalty)
    if config.greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        filtered = filter_logits(logits, config)
        tokens = jax.vmap(jax.random.categorical)(keys, filtered)
    tokens = tokens.astype(jnp.int32)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen


def sequence_keys(rng: jax.Array, batch: int) -> jax.Array:
    """[batch] independent keys from one key (sequence b gets fold_in(rng, b))."""
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch))
