"""HF's repetition penalty in the KV-cache decode loop: token-identical to `transformers` generate for
an ids prompt (prompt + generated tokens penalised) and an embeddings prompt (generated only)."""

import jax.numpy as jnp
import numpy as np
import torch
from test_decode import NEW, PROMPTS

from vsalmonn_jax.generate.decode import generate
from vsalmonn_jax.generate.sampling import SamplingConfig


def test_repetition_penalty_is_token_identical_to_transformers(tiny_pair):
    """HF's repetition penalty (greedy too): over the prompt's ids and the generated tokens for an
    ids prompt; over the generated tokens only for an embeddings prompt (the release's path)."""
    hf, model, variables = tiny_pair
    penalty = SamplingConfig(greedy=True, repetition_penalty=1.5)
    changed = False
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=0, min_new_tokens=NEW,
                              repetition_penalty=1.5)[0, len(prompt):].tolist()
            embeds = hf.get_input_embeddings()(ids)
            ref_embeds = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                     pad_token_id=0, min_new_tokens=NEW, repetition_penalty=1.5)[0].tolist()
        out = generate(model, variables, input_ids=jnp.asarray([prompt], jnp.int32), max_new_tokens=NEW,
                       sampling=penalty)
        assert np.asarray(out.tokens)[0].tolist() == ref
        out = generate(model, variables, inputs_embeds=jnp.asarray(embeds.numpy()), max_new_tokens=NEW,
                       sampling=penalty)
        assert np.asarray(out.tokens)[0].tolist() == ref_embeds
        plain = generate(model, variables, input_ids=jnp.asarray([prompt], jnp.int32), max_new_tokens=NEW)
        changed |= np.asarray(plain.tokens)[0].tolist() != ref
    assert changed   # the penalty changed some output (else the test would not test it)
