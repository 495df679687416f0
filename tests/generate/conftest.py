"""Fixtures for the generation tests: a tiny random `transformers` Qwen2 and the same weights in JAX.

The weights are converted here by name (kernels transposed to [in, out], layers stacked for
`nn.scan`), independent of the package's own importer, so the parity tests check the model too.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from vsalmonn_jax.config import load_config
from vsalmonn_jax.models.qwen2 import Qwen2, Qwen2Config

TINY_VOCAB = 96


def tiny_llm_config(**overrides) -> Qwen2Config:
    c = load_config("tiny").model.llm
    c.update(dict(vocab_size=TINY_VOCAB, num_layers=2))
    c.update(overrides)
    return Qwen2Config.from_config(c)


def torch_qwen2(cfg: Qwen2Config, seed: int = 0, init_std: float = 0.2):
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
        initializer_range=init_std, attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(hf_cfg).eval().float()
    with torch.no_grad():   # random norm scales and biases too, so every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def params_from_torch(model, cfg: Qwen2Config) -> dict:
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        attn = {n: {"kernel": sd[p + f"self_attn.{n}.weight"].T, "bias": sd[p + f"self_attn.{n}.bias"]}
                for n in ("q_proj", "k_proj", "v_proj")}
        attn["o_proj"] = {"kernel": sd[p + "self_attn.o_proj.weight"].T}
        layers.append({
            "input_layernorm": {"scale": sd[p + "input_layernorm.weight"]},
            "post_attention_layernorm": {"scale": sd[p + "post_attention_layernorm.weight"]},
            "self_attn": attn,
            "mlp": {n: {"kernel": sd[p + f"mlp.{n}.weight"].T}
                    for n in ("gate_proj", "up_proj", "down_proj")},
        })
    params = {"embed_tokens": {"embedding": sd["model.embed_tokens.weight"]},
              "norm": {"scale": sd["model.norm.weight"]},
              "lm_head": {"kernel": sd["lm_head.weight"].T}}
    if cfg.scan_layers:
        params["layers"] = _stack(layers)
    else:
        params.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
    return _to_jnp(params)


def _stack(trees):
    if isinstance(trees[0], dict):
        return {k: _stack([t[k] for t in trees]) for k in trees[0]}
    return np.stack(trees)


def _to_jnp(tree):
    if isinstance(tree, dict):
        return {k: _to_jnp(v) for k, v in tree.items()}
    return jnp.asarray(tree)


@pytest.fixture(scope="module")
def tiny_pair():
    """(torch model, JAX Qwen2 module, {"params": ...}) with identical random weights."""
    cfg = tiny_llm_config()
    hf = torch_qwen2(cfg)
    return hf, Qwen2(cfg), {"params": params_from_torch(hf, cfg)}
