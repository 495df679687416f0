"""The KV-cache decode loop: parity with `transformers` generate, cache vs full forward, batching, stops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vsalmonn_jax.generate.decode import generate, last_real_index
from vsalmonn_jax.generate.sampling import SamplingConfig

PROMPTS = [[5, 17, 33, 2, 9, 41, 70], [11, 3], [60, 61, 62, 63, 1]]
SAMPLE = SamplingConfig(greedy=False, temperature=1.0, top_p=0.9)
NEW = 8  # one max_new_tokens everywhere: the jitted loop compiles once per shape


def right_padded(prompts, pad=0):
    t = max(len(p) for p in prompts)
    ids = np.full((len(prompts), t), pad, np.int32)
    mask = np.zeros((len(prompts), t), bool)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
        mask[i, :len(p)] = True
    return jnp.asarray(ids), jnp.asarray(mask)


def test_last_real_index_left_and_right_padding():
    mask = jnp.asarray([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]], bool)
    assert last_real_index(mask).tolist() == [1, 3, 3]


def test_greedy_is_token_identical_to_transformers(tiny_pair):
    hf, model, variables = tiny_pair
    new = NEW
    for prompt in PROMPTS:
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
                              min_new_tokens=new)
        ref = ref[0, len(prompt):].tolist()
        out = generate(model, variables, input_ids=jnp.asarray([prompt], jnp.int32), max_new_tokens=new)
        assert np.asarray(out.tokens)[0].tolist() == ref
        assert out.lengths.tolist() == [new] and out.stopped.tolist() == [False]
    # and as one right-padded batch against transformers' own left-padded batch
    ids, mask = right_padded(PROMPTS)
    t = ids.shape[1]
    left = torch.zeros(len(PROMPTS), t, dtype=torch.long)
    left_mask = torch.zeros(len(PROMPTS), t, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        left[i, t - len(p):] = torch.tensor(p)
        left_mask[i, t - len(p):] = 1
    with torch.no_grad():
        ref = hf.generate(left, attention_mask=left_mask, max_new_tokens=new, do_sample=False,
                          eos_token_id=None, pad_token_id=0, min_new_tokens=new)[:, t:].numpy()
    out = generate(model, variables, input_ids=ids, attention_mask=mask, max_new_tokens=new)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    # with an end token: transformers pads finished rows with pad_token_id, so do we
    eos = int(ref[0, 2])
    with torch.no_grad():
        ref_eos = hf.generate(left, attention_mask=left_mask, max_new_tokens=new, do_sample=False,
                              eos_token_id=eos, pad_token_id=95)[:, t:].numpy()
    ref_eos = np.pad(ref_eos, ((0, 0), (0, new - ref_eos.shape[1])), constant_values=95)
    out = generate(model, variables, input_ids=ids, attention_mask=mask, max_new_tokens=new,
                   stop_ids=(eos,), pad_id=95)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref_eos)
    assert bool(out.stopped[0]) and int(out.lengths[0]) <= 3


def test_cached_decode_logits_equal_full_forward(tiny_pair):
    """Step by step through the cache (right-padded batch) vs a full forward of each sequence."""
    from vsalmonn_jax.models.qwen2 import init_cache

    _, model, variables = tiny_pair
    apply = jax.jit(model.apply)
    ids, mask = right_padded(PROMPTS)
    batch, t = ids.shape
    steps = NEW - 1
    num_real = mask.sum(1)
    cache = init_cache(model.config, batch, t + steps, jnp.float32)
    logits, cache = apply(variables, input_ids=ids, attention_mask=mask, cache=cache)
    step_logits = [jnp.take_along_axis(logits, last_real_index(mask)[:, None, None], 1)[:, 0]]
    token = jnp.argmax(step_logits[-1], -1).astype(jnp.int32)
    seqs = [list(p) for p in PROMPTS]
    for step in range(1, steps + 1):
        for i in range(batch):
            seqs[i].append(int(token[i]))
        logits, cache = apply(variables, input_ids=token[:, None], attention_mask=jnp.ones((batch, 1), bool),
                              positions=(num_real + step - 1)[:, None], cache=cache)
        step_logits.append(logits[:, 0])
        token = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
    for i in range(batch):
        seqs[i].append(int(token[i]))
    full_ids, full_mask = right_padded(seqs)        # no cache: one causal forward per sequence
    full, _ = apply(variables, input_ids=full_ids, attention_mask=full_mask)
    worst = 0.0
    for i in range(batch):
        n = len(PROMPTS[i])
        for step in range(steps + 1):
            diff = np.abs(np.asarray(step_logits[step][i]) - np.asarray(full[i, n - 1 + step]))
            worst = max(worst, float(diff.max()))
    assert worst < 1e-4, worst
    # generate() emits the same tokens and reports the full forward's per-token log-probs
    out = generate(model, variables, input_ids=ids, attention_mask=mask, max_new_tokens=NEW)
    for i, seq in enumerate(seqs):
        n = len(PROMPTS[i])
        assert np.asarray(out.tokens[i]).tolist() == seq[n:n + NEW]
        logp = np.asarray(jax.nn.log_softmax(full[i, n - 1:n - 1 + NEW], -1))
        np.testing.assert_allclose(np.asarray(out.logprobs[i]), logp[np.arange(NEW), seq[n:n + NEW]],
                                   atol=1e-4)


@pytest.mark.parametrize("sampling", [SamplingConfig(), SAMPLE], ids=["greedy", "top_p"])
def test_mixed_length_batch_equals_one_by_one(tiny_pair, sampling):
    _, model, variables = tiny_pair
    ids, mask = right_padded(PROMPTS)
    keys = jax.random.split(jax.random.key(5), len(PROMPTS))
    batched = generate(model, variables, input_ids=ids, attention_mask=mask, keys=keys,
                       max_new_tokens=NEW, sampling=sampling)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, variables, input_ids=jnp.asarray([p], jnp.int32), keys=keys[i:i + 1],
                         max_new_tokens=NEW, sampling=sampling)
        assert np.asarray(alone.tokens)[0].tolist() == np.asarray(batched.tokens)[i].tolist()
        np.testing.assert_allclose(np.asarray(alone.logprobs)[0], np.asarray(batched.logprobs)[i],
                                   atol=1e-4)
    # left padding gives the same tokens too
    t = ids.shape[1]
    left = np.zeros_like(np.asarray(ids))
    left_mask = np.zeros_like(np.asarray(mask))
    for i, p in enumerate(PROMPTS):
        left[i, t - len(p):] = p
        left_mask[i, t - len(p):] = True
    out = generate(model, variables, input_ids=jnp.asarray(left), attention_mask=jnp.asarray(left_mask),
                   keys=keys, max_new_tokens=NEW, sampling=sampling)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(batched.tokens))


def test_sampling_is_reproducible_with_a_fixed_seed(tiny_pair):
    _, model, variables = tiny_pair
    ids, mask = right_padded(PROMPTS)
    run = lambda seed: np.asarray(generate(
        model, variables, input_ids=ids, attention_mask=mask, rng=jax.random.key(seed),
        max_new_tokens=NEW, sampling=SAMPLE).tokens)
    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_stop_tokens_end_each_sequence_independently(tiny_pair):
    _, model, variables = tiny_pair
    ids, mask = right_padded(PROMPTS)
    free = np.asarray(generate(model, variables, input_ids=ids, attention_mask=mask,
                               max_new_tokens=NEW).tokens)
    stop = int(free[0, 3])                      # a token sequence 0 emits at step 3
    out = generate(model, variables, input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                   stop_ids=(stop,), pad_id=-1)
    tokens = np.asarray(out.tokens)
    for i in range(len(PROMPTS)):
        hits = np.flatnonzero(free[i] == stop)
        if hits.size:                            # ends at its first stop token, padded after
            n = hits[0] + 1
            assert out.stopped[i] and int(out.lengths[i]) == n
            assert tokens[i, :n].tolist() == free[i, :n].tolist()
            assert (tokens[i, n:] == -1).all() and (np.asarray(out.logprobs[i, n:]) == 0).all()
        else:                                    # never stops: identical to the free run
            assert not out.stopped[i] and int(out.lengths[i]) == NEW
            assert tokens[i].tolist() == free[i].tolist()
    assert bool(out.stopped[0]) and int(out.lengths[0]) <= 4
    assert out.token_lists()[0] == free[0, :int(out.lengths[0]) - 1].tolist()
    assert out.token_lists(include_stop=True)[0][-1] == stop


def test_all_sequences_stopped_ends_loop_early(tiny_pair):
    _, model, variables = tiny_pair
    ids, mask = right_padded(PROMPTS)
    first = np.asarray(generate(model, variables, input_ids=ids, attention_mask=mask,
                                max_new_tokens=NEW).tokens)[:, 0]
    out = generate(model, variables, input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                   stop_ids=tuple(set(first.tolist())))
    assert out.lengths.tolist() == [1, 1, 1] and all(out.stopped.tolist())


def test_inputs_embeds_prefill_equals_token_prefill(tiny_pair):
    _, model, variables = tiny_pair
    ids, mask = right_padded(PROMPTS)
    embeds = model.apply(variables, ids, method="embed")
    a = generate(model, variables, input_ids=ids, attention_mask=mask, max_new_tokens=NEW)
    b = generate(model, variables, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)


def test_lora_generation_equals_merged_weights(tiny_pair):
    from vsalmonn_jax.lora import LoraConfig, init_lora, merge
    from vsalmonn_jax.models.qwen2 import Qwen2

    _, model, variables = tiny_pair
    lcfg = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "k_proj", "v_proj"))
    lora = init_lora(jax.random.key(0), variables["params"], lcfg)
    lora = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), lora)
    ids, mask = right_padded(PROMPTS)
    with_lora = generate(Qwen2(model.config, lora=lcfg), {"params": variables["params"], "lora": lora},
                         input_ids=ids, attention_mask=mask, max_new_tokens=NEW)
    merged = generate(model, {"params": merge(variables["params"], lora, lcfg.scale)},
                      input_ids=ids, attention_mask=mask, max_new_tokens=NEW)
    base = generate(model, variables, input_ids=ids, attention_mask=mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(np.asarray(with_lora.tokens), np.asarray(merged.tokens))
    np.testing.assert_allclose(np.asarray(with_lora.logprobs), np.asarray(merged.logprobs), atol=1e-4)
    assert not np.allclose(np.asarray(with_lora.logprobs), np.asarray(base.logprobs), atol=1e-3)


def _on_mesh(tiny_pair, axes):
    """(model, params placed on a mesh of `axes`, the mesh)."""
    import flax.linen as nn

    from vsalmonn_jax.training.sharding import make_mesh, sharding_of

    _, model, variables = tiny_pair
    mesh = make_mesh(axes)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    shardings = sharding_of(abstract, mesh)
    params = jax.tree.map(jax.device_put, variables["params"], nn.unbox(shardings["params"]))
    assert len(params["embed_tokens"]["embedding"].sharding.device_set) == 8
    return model, params, mesh


def _generate_on(model, params, mesh, ids, mask):
    from vsalmonn_jax.training.sharding import batch_sharding, logical_rules

    with jax.set_mesh(mesh), logical_rules():
        return generate(model, {"params": params}, input_ids=jax.device_put(ids, batch_sharding(mesh)),
                        attention_mask=jax.device_put(mask, batch_sharding(mesh)), max_new_tokens=NEW,
                        rng=jax.random.key(3), sampling=SAMPLE, mesh=mesh)


def test_sharded_generation_matches_single_device(tiny_pair):
    from vsalmonn_jax.training.sharding import logical_rules

    model, params, mesh = _on_mesh(tiny_pair, {"data": 2, "fsdp": 2, "tensor": 2})
    prompts = PROMPTS + [[7, 7, 8]]
    ids, mask = right_padded(prompts)
    ref = generate(model, tiny_pair[2], input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                   rng=jax.random.key(3), sampling=SAMPLE)
    out = _generate_on(model, params, mesh, ids, mask)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-4)
    with jax.set_mesh(mesh), logical_rules():      # a batch that does not divide: replicated, same tokens
        odd = generate(model, {"params": params}, input_ids=ids[:3], attention_mask=mask[:3],
                       max_new_tokens=NEW, rng=jax.random.key(3), sampling=SAMPLE, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(odd.tokens), np.asarray(ref.tokens)[:3])


def test_context_parallel_prefill_matches_single_device(tiny_pair):
    """The prompt split over context = 2 (padded 7 -> 8 tokens, load-balanced), its K/V written to
    the cache in natural order; decode replicated over context: the same tokens and log-probs."""
    model, params, mesh = _on_mesh(tiny_pair, {"fsdp": 2, "context": 2, "tensor": 2})
    ids, mask = right_padded(PROMPTS + [[7, 7, 8]])
    ref = generate(model, tiny_pair[2], input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                   rng=jax.random.key(3), sampling=SAMPLE)
    out = _generate_on(model, params, mesh, ids, mask)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)


def test_one_prompt_on_a_data_context_tensor_mesh(tiny_pair):
    """One row on data=2 x context=2 x tensor=2: the batch and the decode position are smaller than
    their shards, so they are replicated (models/shards.constrain). Padded instead, the [1, 1, V]
    decode logits came out wrong (XLA's partitioner) and so did the tokens."""
    from vsalmonn_jax.training.sharding import logical_rules

    model, params, mesh = _on_mesh(tiny_pair, {"data": 2, "context": 2, "tensor": 2})
    ids, mask = right_padded(PROMPTS[1:2])
    ref = generate(model, tiny_pair[2], input_ids=ids, attention_mask=mask, max_new_tokens=NEW)
    with jax.set_mesh(mesh), logical_rules():
        out = generate(model, {"params": params}, input_ids=ids, attention_mask=mask,
                       max_new_tokens=NEW, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)


def test_bad_inputs_raise_clear_errors(tiny_pair):
    _, model, variables = tiny_pair
    ids, mask = right_padded(PROMPTS)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        generate(model, variables, max_new_tokens=2)
    with pytest.raises(ValueError, match="rows \\[1\\] have no real token"):
        generate(model, variables, input_ids=ids, attention_mask=mask.at[1].set(False), max_new_tokens=2)
    with pytest.raises(ValueError, match="longest prompt \\(7 tokens\\) \\+ max_new_tokens \\(5000\\)"):
        generate(model, variables, input_ids=ids, attention_mask=mask, max_new_tokens=5000)
    with pytest.raises(ValueError, match="attention_mask shape"):
        generate(model, variables, input_ids=ids, attention_mask=mask[:, :2], max_new_tokens=2)


def test_prefill_with_cache_equals_full_forward(tiny_pair):
    """The prompt fills the cache through the causal kernel on its own K/V: same logits as no cache,
    right- or left-padded; the cache then holds those K/V at slots [0, T) and nothing after."""
    from vsalmonn_jax.models.kv_cache import init_cache

    _, model, variables = tiny_pair
    right_ids, right_mask = right_padded(PROMPTS)
    left_ids = np.zeros_like(np.asarray(right_ids))
    left_mask = np.zeros_like(np.asarray(right_mask))
    t = right_ids.shape[1]
    for i, p in enumerate(PROMPTS):
        left_ids[i, t - len(p):] = p
        left_mask[i, t - len(p):] = True
    for ids, mask in ((right_ids, right_mask), (jnp.asarray(left_ids), jnp.asarray(left_mask))):
        full, _ = model.apply(variables, input_ids=ids, attention_mask=mask)
        cache = init_cache(model.config, ids.shape[0], t + 3, jnp.float32)
        cached, cache = model.apply(variables, input_ids=ids, attention_mask=mask, cache=cache)
        real = np.asarray(mask)
        np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=1e-5)
        assert int(cache["index"]) == t and np.asarray(cache["mask"])[:, :t].tolist() == real.tolist()
        k = np.asarray(cache["k"])                                     # [L, B, K, S, D]
        assert np.abs(k[:, :, :, :t][:, real.nonzero()[0], :, real.nonzero()[1]]).min() > 0
        assert not k[:, :, :, t:].any()


def test_prompt_into_a_used_cache_is_refused(tiny_pair):
    from vsalmonn_jax.models.kv_cache import init_cache

    _, model, variables = tiny_pair
    cache = init_cache(model.config, 1, 16, jnp.float32)
    _, cache = model.apply(variables, input_ids=jnp.asarray([[5, 6, 7]], jnp.int32), cache=cache)
    with pytest.raises(ValueError, match="needs an empty cache \\(index 0, from init_cache\\), got index 3"):
        model.apply(variables, input_ids=jnp.asarray([[8, 9]], jnp.int32), cache=cache)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_decode_step_writes_the_cache_in_place(tiny_pair, scan_layers):
    """The compiled decode step (the loop body) aliases the donated cache to its output and touches
    the whole [L,B,K,S,D] buffers only through dynamic-update-slice: no copy, no broadcast of them."""
    import functools
    import re

    import flax.linen as nn

    from vsalmonn_jax.generate.decode import decode_step
    from vsalmonn_jax.models.kv_cache import init_cache
    from vsalmonn_jax.models.qwen2 import Qwen2

    model = Qwen2(tiny_pair[1].config.replace(scan_layers=scan_layers))
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    cache = jax.eval_shape(lambda: init_cache(model.config, 2, 48, jnp.float32))
    token = jax.ShapeDtypeStruct((2,), jnp.int32)
    step = jax.jit(functools.partial(decode_step, model), donate_argnums=1)
    text = step.lower(params, cache, token, token).compile().as_text()
    assert text.splitlines()[0].count("may-alias") >= 2           # k and v are donated in place
    full = "f32[" + ",".join(map(str, cache["k"].shape)) + "]"
    ops = set()
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = " + re.escape(full) + r"\{[\d,]*\} ([\w-]+)\(", line)
        if m:
            ops.add(m.group(2) if m.group(2) != "fusion" else "fusion:" + m.group(1).split(".")[0])
    allowed = {"parameter", "get-tuple-element", "dynamic-update-slice", "bitcast"}
    assert ops and all(op in allowed or (op.startswith("fusion:") and "dynamic-update-slice" in op)
                       for op in ops), ops


@pytest.mark.parametrize("filled", [1, 4, 5, 13, 19])
def test_decode_attention_reads_only_the_filled_blocks(filled):
    """The blockwise path over the filled part of the cache (a last block overlapping the one before
    it, S = 19 not a multiple of the block) equals attention over the whole masked cache."""
    from vsalmonn_jax.models.kv_cache import decode_attention, slot_mask

    rng = np.random.default_rng(filled)
    q = jnp.asarray(rng.standard_normal((2, 1, 6, 8)), jnp.float32)        # [B,T,N,D], 3 groups
    k, v = (jnp.asarray(rng.standard_normal((2, 2, 19, 8)), jnp.float32) for _ in range(2))
    valid = jnp.asarray(rng.random((2, 19)) > 0.2).at[:, 0].set(True)
    mask = slot_mask(valid, filled - 1, 1)                                   # [B,1,S]
    dense = decode_attention(q, k, v, mask)
    blocks = jax.jit(decode_attention, static_argnums=5)(q, k, v, mask, jnp.int32(filled), 4)
    np.testing.assert_allclose(np.asarray(blocks), np.asarray(dense), atol=1e-5)
    # blocks past the filled ones are never read: NaN there (which any read would spread) is harmless
    end = -(-filled // 4) * 4
    v_nan = v.at[:, :, end:].set(jnp.nan)
    np.testing.assert_allclose(np.asarray(decode_attention(q, k, v_nan, mask, filled, 4)),
                               np.asarray(dense), atol=1e-5)
