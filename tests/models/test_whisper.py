"""Whisper encoder parity: our output equals transformers.WhisperModel's encoder (tiny config, fp32;
150 encoder positions = 300 mel frames per chunk to keep it fast; 7B uses 1500 / 3000)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import WhisperConfig as HFWhisperConfig
from transformers import WhisperModel

from vsalmonn_jax.models import import_hf
from vsalmonn_jax.models.whisper import AudioEncoder, WhisperConfig, WhisperEncoder, num_params


def _tiny(chunk_batch=0):
    hf_cfg = HFWhisperConfig(num_mel_bins=16, d_model=32, encoder_layers=2,
                             encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1,
                             decoder_attention_heads=4, decoder_ffn_dim=64,
                             max_source_positions=150, vocab_size=100,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2,
                             decoder_start_token_id=1)
    torch_model = WhisperModel(hf_cfg).eval()
    cfg = WhisperConfig(d_model=32, num_layers=2, num_heads=4, ffn_dim=64, num_mel_bins=16,
                        max_source_positions=150, chunk_batch=chunk_batch)
    params = import_hf.whisper_params(import_hf.Source(torch_model.state_dict()), cfg)
    return torch_model, cfg, {"params": params}


@pytest.mark.parametrize("chunk_batch", [0, 2])
def test_whisper_encoder_matches_transformers(chunk_batch):
    torch_model, cfg, variables = _tiny(chunk_batch)
    mel = np.random.default_rng(0).normal(size=(3, 16, 300)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model.encoder(torch.from_numpy(mel)).last_hidden_state.numpy()
    ours = np.asarray(WhisperEncoder(cfg).apply(variables, jnp.asarray(mel)))
    assert ours.shape == (3, 150, 32)
    np.testing.assert_allclose(ours, expected, atol=5e-5, rtol=1e-5)


def test_whisper_positions_equal_checkpoint_table_and_param_count():
    torch_model, cfg, variables = _tiny()
    init = jax.jit(WhisperEncoder(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 300)))
    np.testing.assert_allclose(np.asarray(nn.unbox(init)["params"]["stem"]["embed_positions"]),
                               torch_model.encoder.embed_positions.weight.detach().numpy(), atol=1e-4)
    assert sum(x.size for x in jax.tree.leaves(variables)) == num_params(cfg, with_ln_speech=False)
    full = jax.eval_shape(AudioEncoder(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 300)))
    assert sum(x.size for x in jax.tree.leaves(full)) == num_params(cfg)
    assert set(full["params"]) == {"whisper", "ln_speech"}


def test_whisper_rejects_unpadded_mel():
    _, cfg, variables = _tiny()
    with pytest.raises(ValueError, match="300"):
        WhisperEncoder(cfg).apply(variables, jnp.zeros((1, 16, 200)))
