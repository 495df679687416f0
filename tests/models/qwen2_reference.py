"""Test helpers: tiny random `transformers` Qwen2 models and our config/params built from them."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import transformers

from vsalmonn_jax.models.qwen2 import Qwen2Config

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=112, num_hidden_layers=3,
            num_attention_heads=6, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
            max_position_embeddings=256, tie_word_embeddings=False)


def tiny_hf_model(seed: int = 0, **overrides) -> transformers.Qwen2ForCausalLM:
    """A random fp32 Qwen2ForCausalLM; biases and norms randomised too so every tensor matters."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**{**TINY, **overrides}, attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def our_config(hf_model, **overrides) -> Qwen2Config:
    from vsalmonn_jax.models.qwen2_hf import config_from_hf
    config = config_from_hf(hf_model.config.to_dict(), dtype="float32", param_dtype="float32",
                            scan_layers=True, remat_policy="none")
    return dataclasses.replace(config, **overrides)


def hf_logits(hf_model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        out = hf_model(input_ids=torch.as_tensor(input_ids, dtype=torch.long),
                       attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask))
    return out.logits.numpy()
