"""Frozen SigLIP / Whisper weights are sharded over fsdp (each device holds an eighth on an
8-device fsdp mesh) and the AV forward on that mesh equals the single-device forward."""

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vsalmonn_jax.config import load_config
from vsalmonn_jax.models.av_llm import AVLLM, AVConfig, dummy_batch, init_variables
from vsalmonn_jax.plan import shard_bytes, total_bytes
from vsalmonn_jax.training.sharding import logical_rules, make_mesh, sharding_of

PH = 7


def test_frozen_towers_sharded_over_fsdp_forward_unchanged():
    config = load_config("tiny", ["model.audio.max_source_positions=150",
                                  "model.audio.chunk_seconds=3"])
    cfg = AVConfig.from_config(config, placeholder_id=PH)
    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    boxed = init_variables(jax.random.PRNGKey(0), cfg)
    variables = nn.unbox(boxed)
    shardings = nn.unbox(sharding_of(boxed, mesh))
    towers = shardings["params"]["vision"], shardings["params"]["audio"]["whisper"]
    for tower in ("vision", "audio"):
        params, specs = variables["params"][tower], shardings["params"][tower]
        # SigLIP 32-wide, Whisper 32-wide: every weight with an embed axis is cut 8 ways
        assert shard_bytes(params, specs) < total_bytes(params) / 4, tower
    for specs in towers:  # [layers, embed, mlp]
        assert specs["layers"]["fc1"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert towers[0]["embeddings"]["patch_embedding"].spec[-1] == "fsdp"
    assert towers[1]["stem"]["conv1_kernel"].spec[-1] == "fsdp"

    rng = np.random.default_rng(0)
    batch = dummy_batch(cfg, batch=8, frames=2, chunks=1, text_len=6)
    batch["pixel_values"] = rng.normal(size=batch["pixel_values"].shape).astype(np.float32)
    batch["mel"] = rng.normal(size=batch["mel"].shape).astype(np.float32)
    model = AVLLM(cfg)
    want, _ = jax.jit(model.apply)(variables, batch)
    placed = jax.tree.map(jax.device_put, variables, shardings,
                          is_leaf=lambda x: isinstance(x, NamedSharding))
    with jax.set_mesh(mesh), logical_rules():
        got, _ = jax.jit(model.apply)(placed, batch)
    assert got.sharding.mesh.shape["fsdp"] == 8
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
    assert float(np.abs(np.asarray(want)).max()) > 0

