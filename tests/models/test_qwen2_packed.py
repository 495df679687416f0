"""Qwen2 over packed rows: segment_ids (several sequences in one row) and branch_ids (continuations
sharing one prefix, as #16's [prompt | chosen | rejected | GT]) equal transformers on each piece alone."""

import jax.numpy as jnp
import numpy as np
import pytest
from qwen2_reference import hf_logits, tiny_hf_model

from vsalmonn_jax.models.qwen2 import Qwen2, load_hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = tiny_hf_model(seed=3)
    path = tmp_path_factory.mktemp("qwen2_packed")
    hf.save_pretrained(path)
    params, config = load_hf(path, param_dtype="float32")
    return hf, params, config.replace(dtype="float32", attention_impl="xla", attention_block=8)


def test_packed_sequences_equal_each_sequence_alone(tiny):
    hf, params, config = tiny
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 97, n).astype(np.int32) for n in (7, 5, 6)]
    ids = np.concatenate(pieces)[None]  # [1, 18] + 2 padding
    ids = np.pad(ids, ((0, 0), (0, 2)))
    segments = np.concatenate([np.full(len(p), i) for i, p in enumerate(pieces)] + [np.full(2, 3)])[None]
    positions = np.concatenate([np.arange(len(p)) for p in pieces] + [np.zeros(2, int)])[None]
    mask = np.arange(20)[None] < 18
    logits, _ = Qwen2(config).apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                    positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments))
    start = 0
    for piece in pieces:
        alone = hf_logits(hf, piece[None])[0]
        np.testing.assert_allclose(np.asarray(logits)[0, start:start + len(piece)], alone, atol=1e-4)
        start += len(piece)


def test_continuations_sharing_a_prefix_equal_prefix_plus_each_alone(tiny):
    """[prefix | a | b | c]: each continuation sees the prefix and itself only, positions restart
    after the prefix; its logits equal transformers on prefix + that continuation."""
    hf, params, config = tiny
    rng = np.random.default_rng(1)
    prefix = rng.integers(0, 97, 9).astype(np.int32)
    continuations = [rng.integers(0, 97, n).astype(np.int32) for n in (4, 6, 3)]
    ids = np.concatenate([prefix, *continuations])[None]
    branches = np.concatenate([np.zeros(9, int)] + [np.full(len(c), i + 1) for i, c in enumerate(continuations)])[None]
    positions = np.concatenate([np.arange(9)] + [9 + np.arange(len(c)) for c in continuations])[None]
    logits, _ = Qwen2(config).apply({"params": params}, jnp.asarray(ids), positions=jnp.asarray(positions),
                                    branch_ids=jnp.asarray(branches))
    logits = np.asarray(logits)[0]
    start = 9
    for cont in continuations:
        alone = hf_logits(hf, np.concatenate([prefix, cont])[None])[0]
        np.testing.assert_allclose(logits[:9], alone[:9], atol=1e-4)
        np.testing.assert_allclose(logits[start:start + len(cont)], alone[9:], atol=1e-4)
        start += len(cont)


def test_packed_rows_need_positions_and_no_cache(tiny):
    _, params, config = tiny
    ids = jnp.zeros((1, 6), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids / branch_ids need explicit `positions`"):
        Qwen2(config).apply({"params": params}, ids, segment_ids=jnp.zeros((1, 6), jnp.int32))


def test_prefix_rows_on_cudnn_are_refused_before_running(tiny):
    _, params, config = tiny
    ids = jnp.zeros((1, 6), jnp.int32)
    with pytest.raises(ValueError, match=r"'cudnn'.*\['prefix'\].*O\(T\^2\).*\['xla'\]"):
        Qwen2(config.replace(attention_impl="cudnn")).apply(
            {"params": params}, ids, positions=jnp.arange(6)[None], branch_ids=jnp.zeros((1, 6), jnp.int32))
