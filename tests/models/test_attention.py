"""models/attention: the xla flash kernel (forward and dq/dk/dv) equals a plain reference for every mask
kind and GQA ratio, on 1 and 8 devices; splash (interpret) equals xla; dispatch and its refusals."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from vsalmonn_jax.config import load_config
from vsalmonn_jax.models.attention import (
    MaskSpec,
    attention,
    check_supported,
    reference_attention,
    resolve_impl,
)
from vsalmonn_jax.models.decoder_layers import causal_attention
from vsalmonn_jax.models.qwen2 import Qwen2Config
from vsalmonn_jax.training import sharding

LENGTH, BLOCK = 37, 16  # T not a multiple of the block; 3 query blocks


def _qkv(batch=2, length=LENGTH, heads=4, kv_heads=2, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, length, heads, dim), np.float32)
    k = rng.standard_normal((batch, length, kv_heads, dim), np.float32)
    v = rng.standard_normal((batch, length, kv_heads, dim), np.float32)
    cotangent = rng.standard_normal((batch, length, heads, dim), np.float32)
    return tuple(jnp.asarray(x) for x in (q, k, v, cotangent))


def _spec(kind: str, batch=2, length=LENGTH) -> MaskSpec:
    """Masks over [2, 37]: row 0 left-padded by 3 (its first queries see no key), row 1 right-padded
    from 30; two packed segments split at 20; a prefix [0, 12) with continuations 1, 2, 3."""
    key_mask = np.ones((batch, length), bool)
    key_mask[0, :3] = False
    key_mask[1, 30:] = False
    segments = (np.arange(length) >= 20).astype(np.int32)[None].repeat(batch, 0)
    branches = np.searchsorted([12, 20, 29], np.arange(length), side="right").astype(np.int32)[None].repeat(batch, 0)
    as_jnp = lambda x: jnp.asarray(x)  # noqa: E731
    return {
        "causal": MaskSpec(causal=True),
        "padding": MaskSpec(causal=True, key_mask=as_jnp(key_mask)),
        "segments": MaskSpec(causal=True, segment_ids=as_jnp(segments)),
        "prefix": MaskSpec(causal=True, key_mask=as_jnp(key_mask), branch_ids=as_jnp(branches)),
        "everything": MaskSpec(causal=True, key_mask=as_jnp(key_mask), segment_ids=as_jnp(segments),
                               branch_ids=as_jnp(branches)),
        "bidirectional": MaskSpec(causal=False, key_mask=as_jnp(key_mask)),
    }[kind]


def _value_and_grads(fn, q, k, v, cotangent):
    """The output and d<cotangent, out>/d(q, k, v)."""
    out, pullback = jax.vjp(fn, q, k, v)
    return (out, *pullback(cotangent))


def _compare(ours, ref, atol=1e-5):
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, err_msg=name)


@pytest.mark.parametrize("kind,heads,kv_heads", [
    ("causal", 4, 2), ("padding", 4, 2), ("segments", 4, 2), ("prefix", 4, 2), ("bidirectional", 4, 2),
    ("everything", 2, 2), ("everything", 7, 1)])  # GQA ratios 2, 1, 7
def test_xla_forward_and_grads_equal_reference(kind, heads, kv_heads):
    q, k, v, cotangent = _qkv(heads=heads, kv_heads=kv_heads)
    spec = _spec(kind)
    ours = jax.jit(lambda *a: _value_and_grads(lambda q, k, v: attention(q, k, v, spec, "xla", BLOCK), *a))
    ref = jax.jit(lambda *a: _value_and_grads(lambda q, k, v: reference_attention(q, k, v, spec), *a))
    got = ours(q, k, v, cotangent)
    _compare(got, ref(q, k, v, cotangent))
    assert float(jnp.abs(got[0]).max()) > 0.1 and float(jnp.abs(got[3]).max()) > 0.1  # not trivially zero


def test_xla_hidden_rows_give_zeros_and_blocks_are_skipped():
    """Left-padded queries with no visible key: zero output and zero gradient (no NaN); keys of other
    segments get no gradient from a query block that cannot see them."""
    q, k, v, cotangent = _qkv()
    spec = _spec("padding")
    out, dq, dk, _ = _value_and_grads(lambda q, k, v: attention(q, k, v, spec, "xla", BLOCK), q, k, v, cotangent)
    assert np.all(np.isfinite(np.asarray(out))) and np.all(np.isfinite(np.asarray(dq)))
    np.testing.assert_array_equal(np.asarray(out)[0, :3], 0.0)
    np.testing.assert_array_equal(np.asarray(dq)[0, :3], 0.0)
    np.testing.assert_array_equal(np.asarray(dk)[0, :3], 0.0)  # padding keys


def test_xla_bf16_inputs_close_to_fp32_reference():
    q, k, v, _ = _qkv()
    spec = _spec("everything")
    ours = attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), spec, "xla", BLOCK)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(reference_attention(q, k, v, spec)),
                               atol=5e-2)  # bf16 inputs and P@V: ~3 significant digits


def test_xla_sharded_over_batch_and_heads_equals_single_device():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 4), ("batch", "heads"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    q, k, v, cotangent = _qkv(heads=8, kv_heads=4)
    spec = _spec("everything")
    fn = lambda q, k, v, c, s: _value_and_grads(lambda q, k, v: attention(q, k, v, s, "xla", BLOCK), q, k, v, c)  # noqa: E731
    single = jax.jit(fn)(q, k, v, cotangent, spec)
    heads = NamedSharding(mesh, PartitionSpec("batch", None, "heads", None))
    tokens = NamedSharding(mesh, PartitionSpec("batch", None))
    spec_sharding = jax.tree.map(lambda _: tokens, spec)
    sharded = jax.jit(fn, in_shardings=(heads, heads, heads, heads, spec_sharding))
    got = sharded(*jax.device_put((q, k, v, cotangent), heads), jax.device_put(spec, spec_sharding))
    assert len(got[1].sharding.device_set) == 8
    _compare(got, single)


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _loop_collectives(hlo: str) -> list[str]:
    """Collective instructions in while bodies / conditions and everything they call (compiled HLO)."""
    bodies, name = {}, None
    for line in hlo.splitlines():
        if line.endswith("{") and not line.startswith(" "):
            name = line.split()[0].lstrip("%")
            bodies[name] = []
        elif name is not None:
            bodies[name].append(line)
    called = lambda lines: {c for line in lines for c in re.findall(r"%([\w.\-]+)", line) if c in bodies}
    todo = {c for lines in bodies.values() for line in lines if " while(" in line
            for c in re.findall(r"(?:body|condition)=%([\w.\-]+)", line)}
    seen = set()
    while todo:
        seen.add(current := todo.pop())
        todo |= called(bodies[current]) - seen
    return [line.strip()[:120] for c in seen for line in bodies[c] if any(f" {op}(" in line for op in COLLECTIVES)]


def test_xla_under_a_mesh_has_no_collective_inside_its_block_loops():
    """data=2 x fsdp=2 x tensor=2 (the training mesh's axes): the kernel runs per batch shard, so no
    device waits for the others to decide whether a block pair is visible (an automatically
    partitioned cond all-reduces its predicate at every block pair of every layer); same values."""
    q, k, v, cotangent = _qkv(batch=4, heads=4, kv_heads=2)
    spec = _spec("everything", batch=4)
    fn = lambda q, k, v, c, s: _value_and_grads(lambda q, k, v: attention(q, k, v, s, "xla", BLOCK), q, k, v, c)  # noqa: E731
    single = jax.jit(fn)(q, k, v, cotangent, spec)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))  # the batch split as in training
    args = jax.device_put((q, k, v, cotangent, spec), rows)
    with jax.set_mesh(mesh), sharding.logical_rules():
        compiled = jax.jit(fn).lower(*args).compile()
        hlo, got = compiled.as_text(), compiled(*args)
    assert " while(" in hlo and _loop_collectives(hlo) == []
    assert len(got[1].sharding.device_set) == 8
    _compare(got, single)


def test_xla_grad_temp_memory_is_linear_in_length():
    """AOT only: temp bytes of the gradient at 4x the length grow at most ~4x (a [T, T] buffer would
    be 16x); less than 4x at these small shapes, where per-block buffers are a fixed share."""
    def temp(length):
        q = jax.ShapeDtypeStruct((1, length, 4, 32), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32)
        loss = lambda q, k, v: jnp.sum(attention(q, k, v, MaskSpec(causal=True), "xla", 128))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes
    small, large = temp(1024), temp(4096)
    assert 1.5 < large / small <= 4.5, (small, large)


def test_causal_attention_entry_point_is_the_xla_kernel():
    """decoder_layers.causal_attention(q, k, v, key_mask, block) keeps its signature for callers."""
    q, k, v, _ = _qkv()
    spec = _spec("padding")
    np.testing.assert_allclose(np.asarray(causal_attention(q, k, v, spec.key_mask, BLOCK)),
                               np.asarray(reference_attention(q, k, v, spec)), atol=1e-5)


def test_splash_interpret_sharded_equals_xla_with_padding_and_segments():
    """Pallas interpret mode (~3 s a call on CPU): one case, T=150 padded to 2 splash blocks of 128,
    under a data=2 x tensor=2 mesh (the kernel runs per device in a shard_map over batch and heads).
    Unsharded splash is covered by the Qwen2 parity test."""
    q, k, v, cotangent = _qkv(length=150, heads=4, kv_heads=2)
    key_mask = np.ones((2, 150), bool)
    key_mask[1, 100:] = False
    segments = (np.arange(150) >= 60).astype(np.int32)[None].repeat(2, 0)
    spec = MaskSpec(causal=True, key_mask=jnp.asarray(key_mask), segment_ids=jnp.asarray(segments))
    cotangent = cotangent * key_mask[:, :, None, None]  # splash's padded rows differ (never used)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
    with jax.set_mesh(mesh), sharding.logical_rules():
        splash = jax.jit(lambda *a: _value_and_grads(
            lambda q, k, v: attention(q, k, v, spec, "splash", 128, interpret=True), *a))(q, k, v, cotangent)
    assert len(splash[0].sharding.device_set) == 4
    xla = _value_and_grads(lambda q, k, v: attention(q, k, v, spec, "xla", 64), q, k, v, cotangent)
    out_s, out_x = (np.asarray(x[0]) * key_mask[:, :, None, None] for x in (splash, xla))
    np.testing.assert_allclose(out_s, out_x, atol=1e-5)
    _compare(splash[1:], xla[1:])


def test_splash_under_a_mesh_that_does_not_divide_batch_or_heads():
    """A one-row caption prompt on a data=2 x tensor=4 mesh, 2 kv heads: splash's shard_map keeps the
    batch and heads whole (shards.mesh_axes) instead of failing "2 does not evenly divide 1"."""
    q, k, v, _ = _qkv(batch=1, length=150, heads=4, kv_heads=2)
    spec = MaskSpec(causal=True)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4}, jax.devices()[:8])
    with jax.set_mesh(mesh), sharding.logical_rules():
        out = jax.jit(lambda q, k, v: attention(q, k, v, spec, "splash", 128, interpret=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference_attention(q, k, v, spec)),
                               atol=1e-5)


def test_auto_picks_the_platform_backend():
    assert resolve_impl("auto", "tpu") == "splash"
    assert resolve_impl("auto", "gpu") == "cudnn"
    assert resolve_impl("auto", "cpu") == "xla"
    assert resolve_impl("auto") == "xla"  # these tests run on CPU
    assert resolve_impl("splash", "cpu") == "splash"


def test_auto_on_an_amd_gpu_is_xla(monkeypatch):
    """jax calls an AMD GPU "gpu" too, and cuDNN does not exist there: auto picked it and the first
    forward raised "cuDNN is not detected"."""
    from types import SimpleNamespace

    def fake(version):
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        monkeypatch.setattr(jax, "devices", lambda *a: [SimpleNamespace(
            client=SimpleNamespace(platform_version=version))])

    fake("PJRT C API\nrocm 60342")
    assert resolve_impl("auto") == "xla"
    fake("PJRT C API\ncuda 12080")
    assert resolve_impl("auto") == "cudnn"
    assert resolve_impl("auto", "rocm") == "xla"


def test_unknown_and_removed_impls_are_named():
    with pytest.raises(ValueError, match="'jax' was removed.*dense"):
        resolve_impl("jax")
    with pytest.raises(ValueError, match="one of auto, xla, splash, cudnn; got 'flash'"):
        resolve_impl("flash")
    config = load_config("tiny")
    config.model.llm.attention_impl = "jax"
    with pytest.raises(ValueError, match="'jax' was removed"):  # at config time, before any trace
        Qwen2Config.from_config(config.model.llm)


@pytest.mark.parametrize("impl,kinds,missing", [
    ("cudnn", {"padding", "segments"}, "segments"), ("cudnn", {"prefix"}, "prefix"),
    ("splash", {"prefix", "padding"}, "prefix")])
def test_backends_refuse_masks_they_cannot_express(impl, kinds, missing):
    with pytest.raises(ValueError, match=rf"{impl}.*\['{missing}'\].*O\(T\^2\).*attention_impl.*'xla'"):
        check_supported(impl, kinds)
    q, k, v, _ = _qkv()
    spec = _spec("everything" if missing != "prefix" or impl == "splash" else "prefix")
    with pytest.raises(ValueError, match=f"cannot express the .*{missing}"):
        attention(q, k, v, spec, impl)  # refused while tracing, before any backend call
    assert check_supported("xla", kinds) == "xla"
