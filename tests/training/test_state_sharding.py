"""A state dimension the mesh does not divide (jit refuses such a sharding) is replicated, with a
warning naming it, so the default mesh runs where a tower or vocab width does not split evenly."""

import logging

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from vsalmonn_jax.config import load_config
from vsalmonn_jax.training import state as state_lib
from vsalmonn_jax.training.sharding import make_mesh
from vsalmonn_jax.training.task import build_task


def test_indivisible_dimensions_are_replicated_with_a_warning(caplog):
    """vocab 511 on tensor = 2 (as the 7B SigLIP's 1152 on fsdp = 256): IndivisibleError before."""
    config = load_config("tiny", ["model.llm.vocab_size=511"])
    task = build_task(config, text_only=True)
    tx, _ = state_lib.make_optimizer(config.train, 10)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    with caplog.at_level(logging.WARNING, logger=state_lib.__name__):
        state, shardings = state_lib.create_train_state(task, config, tx, mesh, jax.random.PRNGKey(0))
    llm = shardings.params   # the text-only task's params are the LLM's
    assert llm["embed_tokens"]["embedding"].spec == P(None, "fsdp")    # vocab replicated, embed split
    assert llm["lm_head"]["kernel"].spec == P("fsdp", None)
    assert "tensor" in llm["layers"]["self_attn"]["q_proj"]["kernel"].spec   # divisible: as before
    embedding = state.params["embed_tokens"]["embedding"]
    assert embedding.shape == (511, 64) and embedding.sharding.spec == P(None, "fsdp")
    assert np.isfinite(np.asarray(embedding)).all()
    text = caplog.text
    assert "params/embed_tokens/embedding dim 0 (511) is not divisible by tensor = 2: replicated" in text
    assert "params/lm_head/kernel dim 1 (511)" in text
