"""Decoding with the LLM's weights gathered once over fsdp: the same tokens as the training layout,
and no all-gather of weights inside the decode loop (the training layout gathers every layer for
every token: ~15 GB per device per token at 7B)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vsalmonn_jax.generate import decode
from vsalmonn_jax.generate.decode_layout import decode_layout, gathered_bytes, gathered_spec
from vsalmonn_jax.generate.sampling import SamplingConfig
from vsalmonn_jax.models.qwen2 import Qwen2, Qwen2Config
from vsalmonn_jax.training.sharding import LOGICAL_AXIS_RULES, make_mesh

CONFIG = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8)


def test_gathered_spec_keeps_only_tensor():
    assert gathered_spec(P(None, "fsdp", "tensor")) == P(None, None, "tensor")
    assert gathered_spec(P(("data", "fsdp"), "tensor")) == P(None, "tensor")
    assert gathered_spec(P(("fsdp", "tensor"),)) == P("tensor")
    assert gathered_spec(P()) == P()


@pytest.fixture(scope="module")
def placed():
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    model = Qwen2(CONFIG)
    ids = jnp.asarray(np.random.default_rng(0).integers(2, 64, (4, 6)), jnp.int32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh,
                                                LOGICAL_AXIS_RULES)
        variables = nn.unbox(jax.jit(lambda: model.init(jax.random.PRNGKey(0), ids),
                                     out_shardings=shardings)())
    return mesh, model, ids, variables


def _decode(mesh, model, ids, variables):
    args = (variables, ids, None, jnp.ones(ids.shape, bool), decode.sequence_keys(jax.random.key(0), 4))
    kw = dict(model=model, max_new_tokens=5, sampling=SamplingConfig(), stop_ids=(1,), pad_id=0,
              cache_dtype=jnp.float32, mesh=mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        text = decode._generate_jit.lower(*args, **kw).compile().as_text()
        out = decode._generate_jit(*args, **kw)
    return out, text


def loop_gather_sizes(hlo: str) -> list[int]:
    """Element counts of the all-gathers inside the while-loop bodies of a compiled HLO text."""
    bodies = set(re.findall(r"body=(%[\w.\-]+)", hlo))
    sizes, current = [], None
    for line in hlo.split("\n"):
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            current = line.split()[0]
        match = re.search(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", line)
        if match and current in bodies:
            sizes.append(int(np.prod([int(d) for d in match.group(1).split(",") if d] or [1])))
    return sizes


def test_gathered_weights_decode_the_same_tokens_without_per_token_weight_gathers(placed):
    mesh, model, ids, variables = placed
    gathered, used = decode_layout(variables, "gathered")
    assert used == "gathered"
    for before, after in zip(jax.tree.leaves(variables), jax.tree.leaves(gathered), strict=True):
        assert "fsdp" not in str(after.sharding.spec)
        assert after.sharding.spec == gathered_spec(before.sharding.spec)
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    now, after = gathered_bytes(variables)
    assert after == pytest.approx(4 * now, rel=0.2)           # fsdp=4 gathered
    train_out, train_hlo = _decode(mesh, model, ids, variables)
    gathered_out, gathered_hlo = _decode(mesh, model, ids, gathered)
    np.testing.assert_array_equal(np.asarray(train_out.tokens), np.asarray(gathered_out.tokens))
    np.testing.assert_allclose(np.asarray(train_out.logprobs), np.asarray(gathered_out.logprobs),
                               atol=1e-5)
    smallest_weight = min(x.size for x in jax.tree.leaves(variables))
    assert max(loop_gather_sizes(train_hlo)) >= smallest_weight // 4   # the premise: weights gathered
    assert all(size < 16 for size in loop_gather_sizes(gathered_hlo))   # only per-row scalars


def test_auto_gathers_when_the_device_says_it_fits(placed, monkeypatch):
    _, _, _, variables = placed
    assert decode_layout(variables, "auto")[1] == "train"     # CPU reports no memory: kept
    assert decode_layout(variables, "train")[0] is variables
    _, after = gathered_bytes(variables)
    device = type(jax.local_devices()[0])
    monkeypatch.setattr(device, "memory_stats",
                        lambda self: {"bytes_limit": 4 * after, "bytes_in_use": after})
    assert decode_layout(variables, "auto")[1] == "gathered"
    monkeypatch.setattr(device, "memory_stats",
                        lambda self: {"bytes_limit": 2 * after, "bytes_in_use": after})
    assert decode_layout(variables, "auto")[1] == "train"     # over half the free memory
    # several processes decide together: one that lacks the memory keeps every process's layout
    from vsalmonn_jax import distributed

    monkeypatch.setattr(device, "memory_stats",
                        lambda self: {"bytes_limit": 4 * after, "bytes_in_use": after})
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    asked = []
    monkeypatch.setattr(distributed, "any_process", lambda flag: asked.append(flag) or True)
    assert decode_layout(variables, "auto")[1] == "train" and asked == [False]
    monkeypatch.setattr(distributed, "any_process", lambda flag: flag)
    assert decode_layout(variables, "auto")[1] == "gathered"
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    with pytest.raises(ValueError, match="decode_layout must be one of"):
        decode_layout(variables, "replicated")
    single = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), variables)
    assert decode_layout(single, "gathered")[1] == "train"    # one device: nothing to gather
