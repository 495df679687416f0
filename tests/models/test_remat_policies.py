"""Remat policies of the Qwen2 decoder: every policy (named activations saved or offloaded to host
memory included) gives the gradients of `full`, and a bad policy or name fails with the field."""

import contextlib
import dataclasses
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from vsalmonn_jax.models.qwen2 import REMAT_POLICIES, Qwen2, Qwen2Config, remat_policy

CONFIG = Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0,
                     remat_policy="full", attention_block=8)


def _grads(config: Qwen2Config, params, ids, mask):
    model = Qwen2(config)

    def loss(p):
        logits, _ = model.apply({"params": p}, ids, attention_mask=mask)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * mask)

    return jax.jit(jax.grad(loss))(params)


def test_named_policies_give_the_gradients_of_full():
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, CONFIG.vocab_size)
    mask = jnp.arange(24)[None] < jnp.array([[24], [17]])  # one padded row
    params = nn.unbox(Qwen2(CONFIG).init(jax.random.PRNGKey(0), ids)["params"])
    want = _grads(CONFIG, params, ids, mask)
    assert float(jnp.abs(want["layers"]["self_attn"]["q_proj"]["kernel"]).max()) > 0
    for policy, names in (("save_names", ("attention_out", "mlp_in")),
                          ("save_names", ("attention_out",)),
                          ("offload_names", ("attention_out", "mlp_in")), ("dots", ()),
                          ("none", ())):
        got = _grads(dataclasses.replace(CONFIG, remat_policy=policy, remat_names=names),
                     params, ids, mask)
        for path, a in jax.tree_util.tree_leaves_with_path(got):
            b = dict(jax.tree_util.tree_leaves_with_path(want))[path]
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5,
                                       err_msg=f"{policy} {names} {jax.tree_util.keystr(path)}")


def test_save_names_keeps_the_named_activations():
    """Under save_names the tagged activations (2 per layer) are residuals of the backward,
    saved rather than recomputed; under full none is."""
    config = dataclasses.replace(CONFIG, scan_layers=False)  # per-layer residuals are visible
    x = jnp.ones((1, 8, CONFIG.hidden_size))
    params = nn.unbox(Qwen2(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])

    def saved(policy):
        model = Qwen2(dataclasses.replace(config, remat_policy=policy))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(lambda h: model.apply({"params": params}, inputs_embeds=h)[0].sum(), x)
        return [line for line in out.getvalue().splitlines() if " named '" in line]

    named = saved("save_names")
    assert sum("named 'attention_out'" in s for s in named) == CONFIG.num_layers
    assert sum("named 'mlp_in'" in s for s in named) == CONFIG.num_layers
    assert all("f32[1,8,32]" in s for s in named)
    assert saved("full") == []


def test_bad_policy_or_name_names_the_field():
    assert set(REMAT_POLICIES) >= {"full", "dots", "save_names", "offload_names"}
    with pytest.raises(ValueError, match=r"model.llm.remat_policy='dot'.*save_names"):
        remat_policy(dataclasses.replace(CONFIG, remat_policy="dot"))
    with pytest.raises(ValueError, match=r"model.llm.remat_names has \['attn'\]"):
        remat_policy(dataclasses.replace(CONFIG, remat_policy="save_names", remat_names=("attn",)))
