"""Sampling functions: greedy, temperature, top-k, exact top-p nucleus, per-sequence reproducible RNG."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsalmonn_jax.generate.sampling import (
    SamplingConfig,
    filter_logits,
    select_tokens,
    sequence_keys,
    step_keys,
    top_k_mask,
    top_p_mask,
)


def _logits_of(probs):
    return jnp.log(jnp.asarray(probs, jnp.float32))


def test_top_p_mask_is_the_exact_nucleus():
    # sorted probs 0.4, 0.3, 0.2, 0.1 (scrambled order); mass before each: 0, .4, .7, .9
    probs = np.array([[0.2, 0.4, 0.1, 0.3]])
    cases = {0.3: [1], 0.4: [1], 0.41: [1, 3], 0.7: [1, 3], 0.75: [1, 3, 0], 0.9: [1, 3, 0],
             0.95: [1, 3, 0, 2]}
    for p, kept in cases.items():
        mask = np.asarray(top_p_mask(_logits_of(probs), p))[0]
        assert sorted(np.flatnonzero(mask).tolist()) == sorted(kept), p


def test_top_p_keeps_ties_with_the_last_nucleus_token():
    probs = [[0.2, 0.3, 0.2, 0.3]]
    assert np.asarray(top_p_mask(_logits_of(probs), 0.5)).tolist() == [[False, True, False, True]]
    assert np.asarray(top_p_mask(_logits_of(probs), 0.7)).all()


def test_top_p_always_keeps_the_argmax():
    mask = np.asarray(top_p_mask(_logits_of([[0.97, 0.01, 0.01, 0.01]]), 0.01))
    assert mask.tolist() == [[True, False, False, False]]


def test_top_p_never_samples_outside_nucleus():
    # constructed distribution over 64 tokens: 5 tokens carry 0.9 of the mass, rest share 0.1
    vocab = 64
    probs = np.full(vocab, 0.1 / (vocab - 5))
    head = np.array([3, 17, 40, 41, 60])
    probs[head] = [0.3, 0.25, 0.15, 0.12, 0.08]
    logits = jnp.broadcast_to(_logits_of(probs), (4096, vocab))
    cfg = SamplingConfig(greedy=False, top_p=0.9)
    tokens, _ = select_tokens(logits, sequence_keys(jax.random.key(1), 4096), cfg)
    tokens = np.asarray(tokens)
    assert set(tokens.tolist()) <= set(head.tolist())
    assert set(tokens.tolist()) == set(head.tolist())        # all five actually reachable
    # sampled frequencies follow the renormalised nucleus (0.9 mass), within 4 standard errors
    freq = np.array([(tokens == t).mean() for t in head])
    expected = probs[head] / probs[head].sum()
    assert np.all(np.abs(freq - expected) < 4 * np.sqrt(expected * (1 - expected) / 4096))


def test_top_k_keeps_k_and_ties():
    logits = jnp.asarray([[1.0, 5.0, 3.0, 3.0, -2.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    mask = np.asarray(top_k_mask(logits, 2))
    assert mask.tolist() == [[False, True, True, True, False], [False, False, False, True, True]]
    assert np.asarray(top_k_mask(logits, 0)).all()


def test_top_k_sampling_stays_in_top_k():
    logits = jnp.broadcast_to(jnp.arange(32, dtype=jnp.float32) * 0.1, (2048, 32))
    cfg = SamplingConfig(greedy=False, top_k=3, temperature=2.0)
    tokens, _ = select_tokens(logits, sequence_keys(jax.random.key(2), 2048), cfg)
    assert set(np.asarray(tokens).tolist()) == {29, 30, 31}


def test_filter_logits_temperature_then_filters():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
    out = np.asarray(filter_logits(logits, SamplingConfig(greedy=False, temperature=2.0, top_k=3)))
    np.testing.assert_allclose(out[0, :3], [1.0, 0.5, 0.0])
    assert out[0, 3] == -np.inf


def test_greedy_is_argmax_and_logprob_is_model_logprob():
    logits = jax.random.normal(jax.random.key(0), (5, 50))
    tokens, logprobs = select_tokens(logits, sequence_keys(jax.random.key(0), 5), SamplingConfig())
    np.testing.assert_array_equal(np.asarray(tokens), np.argmax(np.asarray(logits), -1))
    expected = np.asarray(jax.nn.log_softmax(logits))[np.arange(5), np.asarray(tokens)]
    np.testing.assert_allclose(np.asarray(logprobs), expected, atol=1e-6)


def test_fixed_seed_is_reproducible_and_per_sequence():
    logits = jax.random.normal(jax.random.key(3), (6, 100))
    cfg = SamplingConfig(greedy=False, top_p=0.95, temperature=1.3)
    keys = sequence_keys(jax.random.key(7), 6)
    a, _ = select_tokens(logits, step_keys(keys, 4), cfg)
    b, _ = select_tokens(logits, step_keys(keys, 4), cfg)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a row sampled alone with its own key gives the same token as inside the batch
    for i in range(6):
        alone, _ = select_tokens(logits[i:i + 1], step_keys(keys[i:i + 1], 4), cfg)
        assert int(alone[0]) == int(a[i])
    # a different step draws differently somewhere
    many = jnp.broadcast_to(logits[:1], (64, 100))
    k64 = sequence_keys(jax.random.key(7), 64)
    s4, _ = select_tokens(many, step_keys(k64, 4), cfg)
    s5, _ = select_tokens(many, step_keys(k64, 5), cfg)
    assert not np.array_equal(np.asarray(s4), np.asarray(s5))


@pytest.mark.parametrize("kwargs, message", [
    (dict(greedy=False, temperature=0.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
])
def test_bad_sampling_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_from_config_reads_generate_section():
    from vsalmonn_jax.config import load_config

    c = load_config("tiny", ["generate.greedy=false", "generate.top_p=0.8", "generate.top_k=5"])
    assert SamplingConfig.from_config(c.generate) == SamplingConfig(
        greedy=False, temperature=1.0, top_k=5, top_p=0.8)
