"""LoRA as a separate pytree: B = 0 is the base model, merge equals unmerged, gradients reach LoRA only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vsalmonn_jax.lora import (
    LoraConfig,
    count_by_collection,
    init_lora,
    is_target,
    lora_partition_specs,
    merge,
)
from vsalmonn_jax.models.qwen2 import Qwen2, Qwen2Config

CONFIG = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, rope_theta=10000.0)
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
IDS = np.random.default_rng(0).integers(0, 64, size=(2, 7)).astype(np.int32)


@pytest.fixture(scope="module")
def params():
    return nn.unbox(Qwen2(CONFIG).init(jax.random.PRNGKey(0), IDS))["params"]


def _random_b(lora, seed=1):
    flat = traverse_util.flatten_dict(lora)
    key = jax.random.PRNGKey(seed)
    for i, path in enumerate(sorted(flat)):
        if path[-1] == "b":
            flat[path] = 0.05 * jax.random.normal(jax.random.fold_in(key, i), flat[path].shape)
    return traverse_util.unflatten_dict(flat)


def test_fresh_lora_shapes_and_init(params):
    lora = init_lora(jax.random.PRNGKey(1), params, LORA)
    q = lora["layers"]["self_attn"]["q_proj"]
    assert q["a"].shape == (2, 32, 4) and q["b"].shape == (2, 4, 32)
    assert lora["layers"]["self_attn"]["k_proj"]["b"].shape == (2, 4, 16)
    assert set(lora["layers"]["self_attn"]) == {"q_proj", "k_proj", "v_proj"}
    assert not np.any(np.asarray(q["b"]))
    bound = 1 / np.sqrt(32)
    assert np.abs(np.asarray(q["a"])).max() <= bound and np.abs(np.asarray(q["a"])).max() > 0.8 * bound
    assert not np.allclose(q["a"][0], q["a"][1])  # layers draw independent A


def test_b_zero_equals_base(params):
    lora = init_lora(jax.random.PRNGKey(1), params, LORA)
    base, _ = Qwen2(CONFIG).apply({"params": params}, IDS)
    adapted, _ = Qwen2(CONFIG, LORA).apply({"params": params, "lora": lora}, IDS)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(adapted))


def test_lora_changes_output_and_merge_equals_unmerged(params):
    lora = _random_b(init_lora(jax.random.PRNGKey(1), params, LORA))
    base, _ = Qwen2(CONFIG).apply({"params": params}, IDS)
    adapted, _ = Qwen2(CONFIG, LORA).apply({"params": params, "lora": lora}, IDS)
    assert np.abs(np.asarray(adapted) - np.asarray(base)).max() > 1e-3
    merged = jax.jit(merge, static_argnums=2)(params, lora, LORA.scale)
    merged_out, _ = Qwen2(CONFIG).apply({"params": merged}, IDS)
    np.testing.assert_allclose(np.asarray(merged_out), np.asarray(adapted), atol=1e-5)
    # only the adapted kernels changed
    np.testing.assert_array_equal(merged["layers"]["self_attn"]["o_proj"]["kernel"],
                                  params["layers"]["self_attn"]["o_proj"]["kernel"])
    assert not np.array_equal(merged["layers"]["self_attn"]["q_proj"]["kernel"],
                              params["layers"]["self_attn"]["q_proj"]["kernel"])


def test_omitting_lora_disables_it(params):
    lora = _random_b(init_lora(jax.random.PRNGKey(1), params, LORA))
    base, _ = Qwen2(CONFIG).apply({"params": params}, IDS)
    disabled, _ = Qwen2(CONFIG, LORA).apply({"params": params}, IDS)
    enabled, _ = Qwen2(CONFIG, LORA).apply({"params": params, "lora": lora}, IDS)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(disabled))
    assert np.abs(np.asarray(enabled) - np.asarray(base)).max() > 1e-3


def test_gradients_flow_to_lora_only(params):
    lora = init_lora(jax.random.PRNGKey(1), params, LORA)
    model = Qwen2(CONFIG, LORA)

    def loss(lora_tree, base):
        logits, _ = model.apply({"params": base, "lora": lora_tree}, IDS)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    grad_lora, grad_base = jax.grad(loss, argnums=(0, 1))(lora, params)
    # with B = 0 the gradient reaches B (and not yet A), as in PEFT
    for name in ("q_proj", "k_proj", "v_proj"):
        g = grad_lora["layers"]["self_attn"][name]
        assert np.abs(np.asarray(g["b"])).max() > 0
        assert np.abs(np.asarray(g["a"])).max() == 0
    # training differentiates w.r.t. `lora` only: the base is an argument we never step
    assert jax.tree.structure(grad_lora) == jax.tree.structure(lora)
    assert jax.tree.structure(grad_base) == jax.tree.structure(params)


def test_dropout_is_driven_by_the_rng(params):
    cfg = LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    lora = _random_b(init_lora(jax.random.PRNGKey(1), params, cfg))
    model = Qwen2(CONFIG, cfg)
    run = lambda seed, det: np.asarray(model.apply(
        {"params": params, "lora": lora}, IDS, deterministic=det, rngs={"dropout": jax.random.PRNGKey(seed)})[0])
    np.testing.assert_array_equal(run(0, False), run(0, False))
    assert np.abs(run(0, False) - run(1, False)).max() > 1e-4
    np.testing.assert_array_equal(run(0, True), run(1, True))


def test_target_patterns(params):
    assert is_target(("layers", "mlp", "up_proj"), ("*_proj",))
    assert is_target(("layers", "mlp", "up_proj"), ("layers/mlp/*",))
    assert not is_target(("layers", "self_attn", "q_proj"), ("layers/mlp/*",))
    lora = init_lora(jax.random.PRNGKey(0), params, LoraConfig(rank=2, alpha=2.0, targets=("layers/mlp/*",)))
    assert set(lora["layers"]) == {"mlp"} and set(lora["layers"]["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    with pytest.raises(ValueError, match="match no kernel"):
        init_lora(jax.random.PRNGKey(0), params, LoraConfig(targets=("nothing",)))


def test_counts_and_partition_specs(params):
    lora = init_lora(jax.random.PRNGKey(1), params, LORA)
    counts = count_by_collection({"params": params, "lora": lora})
    assert counts["lora"] == 2 * ((32 * 4 + 4 * 32) + 2 * (32 * 4 + 4 * 16))
    assert counts["params"] == sum(x.size for x in jax.tree.leaves(params))
    boxed = jax.eval_shape(lambda: Qwen2(CONFIG).init(jax.random.PRNGKey(0), IDS))
    specs = lora_partition_specs(nn.get_partition_spec(boxed)["params"], lora)
    assert tuple(specs["layers"]["self_attn"]["q_proj"]["a"]) == ("layers", "embed", None)
    assert tuple(specs["layers"]["self_attn"]["q_proj"]["b"]) == ("layers", None, "heads")


class _StoredMaskDense(nn.Module):
    """The former LoRA dropout (nn.Dropout before `@ a`), whose mask autodiff keeps for the backward."""

    features: int = 24

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features))
        a, b = self.get_variable("lora", "a"), self.get_variable("lora", "b")
        h = nn.Dropout(0.25)(x, deterministic=False)
        return x @ kernel + 2.0 * jnp.dot(jnp.dot(h, a), b)


def test_lora_dropout_regenerates_its_mask_in_the_backward():
    from jax._src.ad_checkpoint import saved_residuals

    from vsalmonn_jax.models.decoder_layers import Dense

    x = jax.random.normal(jax.random.key(0), (3, 40, 16))                  # [B, T, in]
    lora = {"a": 0.3 * jax.random.normal(jax.random.key(1), (16, 4)),
            "b": 0.3 * jax.random.normal(jax.random.key(2), (4, 24))}
    params = {"kernel": 0.2 * jax.random.normal(jax.random.key(3), (16, 24))}
    new = Dense(24, (None, None), lora_scale=2.0, lora_dropout=0.25, deterministic=False)

    def loss(module, lora, x):
        out = module.apply({"params": params, "lora": lora}, x, rngs={"dropout": jax.random.key(7)})
        return jnp.sum(jnp.sin(out)), out

    (_, ref), ref_grads = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(_StoredMaskDense(), lora, x)
    (_, got), got_grads = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(new, lora, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)  # same mask
    assert not np.allclose(np.asarray(ref), np.asarray(
        Dense(24, (None, None), lora_scale=2.0).apply({"params": params, "lora": lora}, x)), atol=1e-3)
    for g, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)

    def kept(module):   # arrays autodiff keeps from the forward for the backward, besides x itself
        res = saved_residuals(lambda lora, x: loss(module, lora, x)[0], lora, x)
        return [(aval.dtype, aval.shape) for aval, why in res if aval.shape == x.shape and "argument" not in why]
    assert (np.dtype(bool), x.shape) in kept(_StoredMaskDense())          # the old way stores the mask
    assert kept(new) == []                                                  # only the rng key is kept


def test_lora_dropout_keeps_no_mask_per_layer_in_the_compiled_gradient():
    """memory_analysis of the jitted gradient through a chain of LoRA projections: going from 2 to 6
    layers adds what the no-dropout chain adds (no mask per layer), where the stored-mask way adds
    several x-sized buffers per layer."""
    from vsalmonn_jax.models.decoder_layers import Dense

    x = jax.random.normal(jax.random.key(0), (512, 128))

    class Chain(nn.Module):
        layers: int
        kind: str

        @nn.compact
        def __call__(self, h):
            for i in range(self.layers):
                if self.kind == "stored":
                    h = _StoredMaskDense(128, name=f"l{i}")(h)
                else:
                    h = Dense(128, (None, None), lora_scale=2.0, lora_dropout=0.25,
                              deterministic=self.kind == "off", name=f"l{i}")(h)
                h = jnp.tanh(h)
            return h

    def temp(layers, kind):
        variables = {"params": {f"l{i}": {"kernel": jnp.zeros((128, 128))} for i in range(layers)},
                     "lora": {f"l{i}": {"a": jnp.zeros((128, 8)), "b": jnp.zeros((8, 128))}
                              for i in range(layers)}}
        def loss(lora, x):
            out = Chain(layers, kind).apply({**variables, "lora": lora}, x, rngs={"dropout": jax.random.key(1)})
            return jnp.sum(out ** 2)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables["lora"], x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    growth = {kind: temp(6, kind) - temp(2, kind) for kind in ("off", "regenerated", "stored")}
    mask = x.size                                   # one bool mask of x
    assert growth["regenerated"] - growth["off"] < mask, growth
    assert growth["stored"] - growth["off"] >= 4 * mask, growth   # what the test would catch
