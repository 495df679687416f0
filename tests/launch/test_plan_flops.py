"""`plan`'s FLOPs and MFU: matmul FLOPs counted from a jaxpr (scan bodies x length, unlike XLA's
cost_analysis), the collective-bytes model and the overlap model, on hand-checkable numbers."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from vsalmonn_jax.config import load_config
from vsalmonn_jax.plan_flops import CHIPS, comm_bytes, matmul_flops, mfu, sequences


def _scan_matmuls(x, w):  # x [128, 256], w [10, 256, 256]: 10 chained matmuls
    return jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0].sum()


def test_matmul_flops_multiply_scan_bodies():
    x = jax.ShapeDtypeStruct((128, 256), jnp.float32)
    w = jax.ShapeDtypeStruct((10, 256, 256), jnp.float32)
    one = 2 * 128 * 256 * 256
    assert matmul_flops(jax.make_jaxpr(_scan_matmuls)(x, w)) == 10 * one
    # XLA's own count sees the loop body once
    xla = jax.jit(_scan_matmuls).lower(x, w).compile().cost_analysis()
    assert (xla[0] if isinstance(xla, list) else xla)["flops"] < 2 * one
    # the gradient wrt w: forward + (dx, dw) per step = 3 matmuls per step
    assert matmul_flops(jax.make_jaxpr(jax.grad(_scan_matmuls, argnums=1))(x, w)) == 30 * one
    # remat: the backward recomputes the forward
    remat = jax.grad(lambda x, w: jax.checkpoint(_scan_matmuls)(x, w), argnums=1)
    assert matmul_flops(jax.make_jaxpr(remat)(x, w)) == 40 * one


def test_matmul_flops_conv_and_cond():
    img = jax.ShapeDtypeStruct((2, 3, 16, 16), jnp.float32)     # NCHW
    kernel = jax.ShapeDtypeStruct((8, 3, 3, 3), jnp.float32)   # OIHW
    conv = lambda i, k: jax.lax.conv(i, k, (1, 1), "SAME")
    assert matmul_flops(jax.make_jaxpr(conv)(img, kernel)) == 2 * (2 * 8 * 16 * 16) * (3 * 3 * 3)
    a = jax.ShapeDtypeStruct((4, 5), jnp.float32)
    branchy = lambda p, a: jax.lax.cond(p, lambda a: a @ a.T @ a, lambda a: a * 2.0, a)
    assert matmul_flops(jax.make_jaxpr(branchy)(True, a)) == 2 * 4 * 4 * 5 + 2 * 4 * 5 * 4


def test_matmul_flops_of_a_shard_map_count_every_shard():
    """A matmul run per batch shard (xla / context attention) costs what it costs unsplit."""
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    w = jax.ShapeDtypeStruct((16, 4), jnp.float32)
    split = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"),
                          axis_names=frozenset({"data"}), check_vma=False)
    assert matmul_flops(jax.make_jaxpr(split)(x, w)) == matmul_flops(jax.make_jaxpr(jnp.matmul)(x, w)) == 2 * 8 * 16 * 4


@pytest.mark.parametrize("causal,pairs", [(True, 8 * 9 // 2), (False, 8 * 8)])
def test_matmul_flops_of_xla_attention_count_every_visited_block_pair(causal, pairs):
    """The xla kernel's key / query block loops are while loops (data-dependent trip counts) whose
    bodies declare their mean trips (loop_trips): 8 blocks of 8 tokens, a causal mask visits 36 block
    pairs and a full one 64, each with 2 matmuls forward and 5 backward. Counting each while body once
    gave 8 pairs per pass."""
    from vsalmonn_jax.models.attention import MaskSpec, attention

    q = jax.ShapeDtypeStruct((1, 64, 4, 8), jnp.float32)       # [B, T, N heads, D]
    kv = jax.ShapeDtypeStruct((1, 64, 2, 8), jnp.float32)      # 2 kv heads: GQA
    loss = lambda q, k, v: attention(q, k, v, MaskSpec(causal=causal), "xla", 8).sum()
    pair = 2 * 8 * 8 * 8 * 4                                   # one [8 x 8] block matmul, all heads
    assert matmul_flops(jax.make_jaxpr(loss)(q, kv, kv)) == 2 * pairs * pair
    assert matmul_flops(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, kv, kv)) == 7 * pairs * pair


def test_overlap_model_and_collective_bytes():
    chip = CHIPS["v5p"]
    compute_bound = mfu(flops=4.59e14, model_flops=3.0e14, comm=1e9, chip=chip)
    assert compute_bound["step_s"] == pytest.approx(1.0) and compute_bound["mfu"] == pytest.approx(
        3.0e14 / 4.59e14)
    comm_bound = mfu(flops=4.59e14, model_flops=3.0e14, comm=1.2e12, chip=chip)  # 2 s of link
    assert comm_bound["step_s"] == pytest.approx(2.0) and comm_bound["mfu"] == pytest.approx(
        3.0e14 / 4.59e14 / 2)
    config = load_config("7b")
    assert sequences("sft", config) == (1, 0) and sequences("dpo", config) == (3, 2)
    assert sequences("dpo+precomputed_ref", config) == (3, 0) and sequences("reference", config) == (0, 2)
    mesh = {"data": 1, "fsdp": 16, "tensor": 1}
    # fsdp only, no trainable: SFT with full remat gathers the frozen LLM 3 times (fwd, recompute,
    # bwd) and the towers once, each (n-1)/n of it per device
    got = comm_bytes(config, mesh, "sft", "full", 15e9, 2e9, 0.0, 0.0)
    assert got == pytest.approx(15 / 16 * (3 * 15e9 + 2e9))
    assert comm_bytes(config, mesh, "sft", "none", 15e9, 2e9, 0.0, 0.0) == pytest.approx(
        15 / 16 * (2 * 15e9 + 2e9))
    # DPO adds the reference forward's gather; tensor all-reduces scale with tokens and layers
    assert comm_bytes(config, mesh, "dpo", "full", 15e9, 0.0, 0.0, 0.0) == pytest.approx(
        15 / 16 * 4 * 15e9)
    tensor = comm_bytes(config, {"data": 1, "fsdp": 1, "tensor": 4}, "reference", "full", 0.0, 0.0,
                        0.0, 1000.0)
    assert tensor == pytest.approx(2 * 0.75 * 1000 * 3584 * 2 * 2 * 28 * 2)  # 2 reference sequences
    # context: each layer all-gathers the sequence's K and V (4 kv heads x 128, bf16) per pass
    context = comm_bytes(config, {"data": 1, "fsdp": 1, "context": 4, "tensor": 1}, "reference",
                         "full", 0.0, 0.0, 0.0, 1000.0)
    assert context == pytest.approx(0.75 * 1000 * 2 * 4 * 128 * 2 * 28 * 2)
