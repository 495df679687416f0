"""Window-level Q-Former: parity with transformers.Blip2QFormerModel (cross-attention every layer),
window by window, plus the chunk position table, shapes and parameter count of the audio connector."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from vsalmonn_jax.models import import_hf
from vsalmonn_jax.models.qformer import (
    AudioConnector,
    QFormer,
    QFormerConfig,
    chunk_positions,
    num_params,
)

CFG = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, window=25,
                    num_queries=1, encoder_width=24, llm_hidden=40)


def _torch_qformer():
    hf_cfg = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, encoder_hidden_size=24,
                                cross_attention_frequency=1, layer_norm_eps=1e-12,
                                hidden_act="gelu", vocab_size=10)
    return Blip2QFormerModel(hf_cfg).eval()


def test_qformer_matches_blip2_window_by_window():
    torch_model = _torch_qformer()
    params = import_hf.qformer_params(import_hf.Source(torch_model.state_dict()), CFG, "hf")
    rng = np.random.default_rng(0)
    # 2 chunks of 75 encoder frames -> 3 windows each; one query per window
    features = rng.normal(size=(2, 75, 24)).astype(np.float32)
    query = rng.normal(size=(1, 1, 32)).astype(np.float32)
    windows = features.reshape(6, 25, 24)
    with torch.no_grad():
        expected = torch_model(query_embeds=torch.from_numpy(query).expand(6, -1, -1),
                               encoder_hidden_states=torch.from_numpy(windows)).last_hidden_state
    ours = QFormer(CFG).apply({"adapter": params}, jnp.broadcast_to(query, (6, 1, 32)),
                              jnp.asarray(windows))
    assert ours.shape == (6, 1, 32)
    np.testing.assert_allclose(np.asarray(ours), expected.numpy(), atol=2e-5, rtol=1e-5)


def test_chunk_positions_match_official_formula():
    table = chunk_positions(4, 6)
    assert np.all(table[0] == 0)
    np.testing.assert_allclose(table[1], [0, 1, 0, 1, 0, 1], atol=1e-7)  # position 0: sin 0, cos 0
    div = np.exp(np.arange(0, 6, 2) * -(np.log(10000.0) / 6))
    np.testing.assert_allclose(table[3, 0::2], np.sin(2 * div), atol=1e-6)
    np.testing.assert_allclose(table[3, 1::2], np.cos(2 * div), atol=1e-6)


def test_audio_connector_shapes_collection_and_count():
    features = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 100, 24)), jnp.float32)
    model = AudioConnector(CFG)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), features)
    assert set(variables) == {"adapter"}
    assert sum(x.size for x in jax.tree.leaves(variables)) == num_params(CFG)
    apply = jax.jit(model.apply)
    out = apply(variables, features)
    assert out.shape == (2, 3 * 4, 40)  # 100 frames -> 4 windows of 25 per chunk
    # the chunk position is the only thing that differs between identical chunks
    same = jnp.broadcast_to(features[:, :1], features.shape)
    out_same = np.asarray(apply(variables, same)).reshape(2, 3, 4, 40)
    np.testing.assert_allclose(out_same[:, 2] - out_same[:, 0],
                               np.broadcast_to(chunk_positions(3, 40)[2], (2, 4, 40)), atol=1e-5)


def test_initializer_range_sets_every_kernel_and_the_queries():
    """Tiny widths need ~1/sqrt(width): 0.02 (the HF default, kept) is that only at 768..3584."""
    import dataclasses

    import flax.linen as nn
    from flax import traverse_util

    features = jnp.zeros((1, 1, 100, 24), jnp.float32)
    for std in (0.02, 0.125):
        cfg = dataclasses.replace(CFG, hidden_size=64, intermediate_size=256, llm_hidden=64,
                                  num_queries=64, initializer_range=std)
        variables = nn.unbox(AudioConnector(cfg).init(jax.random.PRNGKey(0), features))
        flat = traverse_util.flatten_dict(variables)
        leaves = {k: np.asarray(v) for k, v in flat.items() if k[-1] in ("kernel", "query")}
        assert len(leaves) == 2 * (4 + 4 + 2) + 3 + 1   # per layer: 2 attentions, ffn; head; query
        for path, value in leaves.items():
            assert abs(value.std() / std - 1) < 0.15, (path, value.std(), std)


def test_dropout_only_when_training():
    """dropout 0.1 (the release's BERT config): two dropout rngs give different outputs when
    training (deterministic=False); at inference the output equals the dropout-0 model's."""
    features = jnp.asarray(np.random.default_rng(2).normal(size=(1, 2, 50, 24)), jnp.float32)
    variables = AudioConnector(CFG).init(jax.random.PRNGKey(0), features)
    drop = AudioConnector(dataclasses.replace(CFG, dropout=0.1))
    clean = AudioConnector(CFG).apply(variables, features)
    np.testing.assert_array_equal(np.asarray(drop.apply(variables, features)), np.asarray(clean))
    train = lambda seed: np.asarray(drop.apply(variables, features, False,
                                               rngs={"dropout": jax.random.PRNGKey(seed)}))
    a, b = train(1), train(2)
    assert np.abs(a - b).max() > 1e-3 and np.abs(a - np.asarray(clean)).max() > 1e-3
    np.testing.assert_array_equal(train(1), a)                        # same rng, same draw
    np.testing.assert_array_equal(                                    # rate 0 never needs an rng
        np.asarray(AudioConnector(CFG).apply(variables, features, False)), np.asarray(clean))
