"""The jitted generation loop: one prefill over the prompt, then `lax.while_loop` decode over the KV cache.

Padding: prompts may be right-padded (the data pipeline's layout) or left-padded. Each sequence's
positions are counted over its real tokens only (`cumsum(mask) - 1`); pad slots are marked invalid in
the cache's per-slot mask, so every decode step attends to exactly the sequence's own tokens and a
batch of mixed lengths gives the same tokens as one-by-one generation. All sequences share the cache
write index: generated token i of every row sits at slot T + i - 1.

The cache (models/kv_cache.py) is the while_loop's carry: the prompt fills it through the causal
kernel on its own keys/values, then each step writes one slot per layer in place
(dynamic_update_slice) and attends over the cache; no step copies the cache buffers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vsalmonn_jax.generate.sampling import SamplingConfig, select_tokens, sequence_keys, step_keys
from vsalmonn_jax.models import kv_cache
from vsalmonn_jax.models.attention import resolve_impl


@dataclasses.dataclass
class GenerateOutput:
    """tokens int32 [B, N] (pad_id after the end), logprobs float32 [B, N] (0 after the end),
    lengths int32 [B] (generated tokens incl. the stop token), stopped bool [B] (a stop token
    was emitted; False = hit max_new_tokens without an end token)."""

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    stopped: jax.Array

    def token_lists(self, include_stop: bool = False) -> list[list[int]]:
        """Per-sequence python token lists, the stop token dropped unless include_stop."""
        tokens, lengths, stopped = (np.asarray(x) for x in (self.tokens, self.lengths, self.stopped))
        out = []
        for row, n, s in zip(tokens, lengths, stopped, strict=True):
            n = int(n) - (1 if (s and not include_stop) else 0)
            out.append([int(t) for t in row[:n]])
        return out


jax.tree_util.register_dataclass(
    GenerateOutput, data_fields=["tokens", "logprobs", "lengths", "stopped"], meta_fields=[])


def _cache_specs(cache: dict, mesh: Mesh) -> dict:
    """Shardings for the KV cache under the training mesh: batch over (data, fsdp) when it divides
    (else replicated), kv heads over tensor when they divide."""
    batch_axes = ("data", "fsdp")
    if cache["k"].shape[1] % (mesh.shape["data"] * mesh.shape["fsdp"]):
        batch_axes = None
    kv_heads = cache["k"].shape[kv_cache.HEADS_AXIS]
    heads_axis = "tensor" if kv_heads % mesh.shape["tensor"] == 0 else None
    kv = NamedSharding(mesh, PartitionSpec(None, batch_axes, heads_axis, None, None))  # [L,B,K,S,D]
    specs = {"k": kv, "v": kv, "mask": NamedSharding(mesh, PartitionSpec(batch_axes, None))}
    return {name: specs.get(name, NamedSharding(mesh, PartitionSpec())) for name in cache}


def _constrain(cache: dict, mesh: Mesh | None) -> dict:
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, _cache_specs(cache, mesh))


def last_real_index(mask: jax.Array) -> jax.Array:
    """int32 [B]: index of the last True of each row of a bool [B, T] mask (left or right padding)."""
    t = mask.shape[1]
    return (t - 1 - jnp.argmax(mask[:, ::-1], axis=1)).astype(jnp.int32)


def decode_step(model, variables, cache: dict, token: jax.Array, position: jax.Array
                ) -> tuple[jax.Array, dict]:
    """One token per sequence through the model: token/position int32 [B] -> fp32 logits [B, V] and
    the cache with this token's keys/values written in place at slot cache["index"]. The body of
    the decode loop; jit it with the cache donated (`donate_argnums`) to run it step by step."""
    logits, cache = model.apply(
        variables, input_ids=token[:, None], attention_mask=jnp.ones((token.shape[0], 1), bool),
        positions=position[:, None], cache=cache, deterministic=True)    # [B, 1, V]
    return logits[:, 0], cache


def right_aligned(input_ids, inputs_embeds, mask):
    """Each row's real tokens moved to its front (right padding), in order: cuDNN takes padding as
    lengths only (a left-padded row came back NaN: token 0 repeated, silently). Exact: positions
    are cumsum(mask) - 1, and the prefill reads each row's last real token wherever it is."""
    order = jnp.argsort(~mask, axis=1, stable=True)                      # [B, T]
    if input_ids is not None:
        input_ids = jnp.take_along_axis(input_ids, order, axis=1)
    if inputs_embeds is not None:
        inputs_embeds = jnp.take_along_axis(inputs_embeds, order[..., None], axis=1)
    return input_ids, inputs_embeds, jnp.take_along_axis(mask, order, axis=1)


def _generate_impl(variables, input_ids, inputs_embeds, attention_mask, keys, *, model,
                   max_new_tokens: int, sampling: SamplingConfig,
                   stop_ids: tuple[int, ...], pad_id: int, cache_dtype, mesh: Mesh | None):
    prompt = input_ids if input_ids is not None else inputs_embeds
    batch, prompt_len = prompt.shape[:2]
    mask = attention_mask.astype(bool)                                   # [B, T]
    if resolve_impl(model.config.attention_impl) == "cudnn":
        input_ids, inputs_embeds, mask = right_aligned(input_ids, inputs_embeds, mask)
    num_real = mask.sum(axis=1).astype(jnp.int32)                        # [B]
    cache = kv_cache.init_cache(model.config, batch, prompt_len + max_new_tokens - 1, cache_dtype)
    cache = _constrain(cache, mesh)

    # ---- prefill: hidden states of the whole prompt, logits only at each row's last real token
    hidden, cache = model.apply(
        variables, input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask,
        cache=cache, deterministic=True, return_hidden=True)             # [B, T, H]
    last = last_real_index(mask)
    last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, H]
    logits = model.apply(variables, last_hidden, method="lm_logits")[:, 0]  # [B, V]
    stop = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    rows = jnp.arange(batch)
    # the tokens each sequence holds, for the repetition penalty (as HF: the prompt's ids when the
    # prompt is ids, none for embeddings, then every generated token); [B, 0] when off
    vocab = logits.shape[-1] if sampling.repetition_penalty != 1.0 else 0
    seen = jnp.zeros((batch, vocab), bool)
    if vocab and input_ids is not None:
        held = jnp.zeros((batch, vocab), jnp.int32).at[rows[:, None], input_ids].add(mask.astype(jnp.int32))
        seen = held > 0

    def choose(logits, step, done, seen):
        token, logprob = select_tokens(logits, step_keys(keys, step), sampling,
                                       seen if vocab else None)
        token = jnp.where(done, pad_id, token)
        logprob = jnp.where(done, 0.0, logprob)
        if vocab:
            seen = seen.at[rows, token].set(True)
        return token, logprob, done | jnp.isin(token, stop), seen

    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32)
    not_done = jnp.zeros((batch,), bool)
    token, logprob, done, seen = choose(logits, 0, not_done, seen)
    lengths = jnp.ones((batch,), jnp.int32)
    tokens = tokens.at[:, 0].set(token)
    logprobs = logprobs.at[:, 0].set(logprob)

    def cond(state):
        step, _, _, done, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, token, done, tokens, logprobs, lengths, seen = state
        step_logits, cache = decode_step(model, variables, cache, token, num_real + step - 1)
        cache = _constrain(cache, mesh)
        new_token, new_logprob, new_done, seen = choose(step_logits, step, done, seen)
        tokens = tokens.at[:, step].set(new_token)
        logprobs = logprobs.at[:, step].set(new_logprob)
        lengths = lengths + (~done).astype(jnp.int32)
        return step + 1, cache, new_token, new_done, tokens, logprobs, lengths, seen

    state = (jnp.int32(1), cache, token, done, tokens, logprobs, lengths, seen)
    _, _, _, done, tokens, logprobs, lengths, _ = jax.lax.while_loop(cond, body, state)
    # `done` is only ever set by a stop token, so it is exactly "stopped"
    return GenerateOutput(tokens=tokens, logprobs=logprobs, lengths=lengths, stopped=done)


_STATIC = ("model", "max_new_tokens", "sampling", "stop_ids", "pad_id",
           "cache_dtype", "mesh")
_generate_jit = jax.jit(_generate_impl, static_argnames=_STATIC)


def generate(model, variables, *, input_ids=None, inputs_embeds=None, attention_mask=None,
             rng: jax.Array | None = None, keys: jax.Array | None = None,
             max_new_tokens: int = 1024, sampling: SamplingConfig | None = None,
             stop_ids: Sequence[int] = (), pad_id: int = 0, cache_dtype=None,
             mesh: Mesh | None = None) -> GenerateOutput:
    """Generate up to `max_new_tokens` tokens per prompt with a KV cache, in one jitted call.

    model: a `Qwen2` module (with or without LoRA); variables: {"params": ..., ["lora": ...]}.
    Prompt: `input_ids` int [B, T] or `inputs_embeds` float [B, T, H] (e.g. the AV model's spliced
    media + text embeddings), with `attention_mask` bool [B, T] (True = real token; default all
    True). Decode steps feed token ids. Randomness: `keys` [B] per-sequence keys, or `rng` split
    into B keys with `sequence_keys` (ignored when greedy). `stop_ids` (e.g. <|im_end|>, eos) end a
    sequence independently of the others. With `mesh`, the KV cache is sharded like training
    activations (batch over data+fsdp, kv heads over tensor); a batch that does not divide by
    data*fsdp stays replicated (correct, but pad it with `pad_rows` to use every device).
    Compiles once per (B, T, max_new_tokens, sampling); callers bucket prompt lengths.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("generate: pass exactly one of input_ids [B, T] or inputs_embeds [B, T, H]")
    prompt = input_ids if input_ids is not None else inputs_embeds
    if input_ids is not None and input_ids.ndim != 2:
        raise ValueError(f"generate: input_ids must be [B, T], got shape {input_ids.shape}")
    if inputs_embeds is not None and inputs_embeds.ndim != 3:
        raise ValueError(f"generate: inputs_embeds must be [B, T, H], got shape {inputs_embeds.shape}")
    batch, prompt_len = prompt.shape[:2]
    if attention_mask is None:
        attention_mask = jnp.ones((batch, prompt_len), bool)
    if tuple(attention_mask.shape) != (batch, prompt_len):
        raise ValueError(f"generate: attention_mask shape {attention_mask.shape} does not match "
                         f"the prompt's [B, T] = {(batch, prompt_len)}")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    # host-side checks (skipped for a global array spread over several processes)
    if getattr(attention_mask, "is_fully_addressable", True):
        real = np.asarray(attention_mask).astype(bool).sum(axis=1)          # [B]
        if not real.all():
            raise ValueError(f"generate: prompt rows {np.flatnonzero(real == 0).tolist()} have no "
                             "real token in attention_mask")
        limit = model.config.max_position_embeddings
        if int(real.max()) + max_new_tokens > limit:
            raise ValueError(f"generate: the longest prompt ({int(real.max())} tokens) + "
                             f"max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings "
                             f"= {limit}")
    sampling = SamplingConfig() if sampling is None else sampling
    if keys is None:
        rng = jax.random.key(0) if rng is None else rng
        keys = sequence_keys(rng, batch)
    cache_dtype = jnp.dtype(cache_dtype or model.config.dtype)
    return _generate_jit(
        variables, input_ids, inputs_embeds, attention_mask, keys, model=model,
        max_new_tokens=int(max_new_tokens), sampling=sampling,
        stop_ids=tuple(int(s) for s in stop_ids), pad_id=int(pad_id), cache_dtype=cache_dtype,
        mesh=mesh)


def pad_rows(array: np.ndarray, multiple: int, value=0) -> np.ndarray:
    """Pad the leading (batch) axis up to a multiple (e.g. the mesh's data*fsdp size)."""
    extra = -array.shape[0] % multiple
    if not extra:
        return array
    pad = np.full((extra, *array.shape[1:]), value, dtype=array.dtype)
    return np.concatenate([array, pad], axis=0)
