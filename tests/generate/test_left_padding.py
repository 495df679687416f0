"""Left-padded prompts under cuDNN attention (the GPU default): the decode loop right-aligns them first.

cuDNN takes padding as lengths only and its wrapper returns NaN for a row that is not right-padded;
generate() documents left padding as supported, and a left-padded batch came back as token 0 with
NaN log-probs, silently. No GPU here: cuDNN is stood in for by jax's XLA kernel with the same
lengths arguments, behind our wrapper (models/attention/cudnn.py) and its NaN rule.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsalmonn_jax.generate.decode import generate
from vsalmonn_jax.generate.sampling import SamplingConfig
from vsalmonn_jax.models.qwen2 import Qwen2

PROMPTS = [[5, 17, 33, 2, 9, 41, 70], [11, 3], [60, 61, 62, 63, 1]]


@pytest.fixture
def xla_for_cudnn(monkeypatch):
    real = jax.nn.dot_product_attention

    def stand_in(*args, implementation=None, **kwargs):
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)


def _padded(left: bool):
    t = max(map(len, PROMPTS))
    ids, mask = np.zeros((len(PROMPTS), t), np.int32), np.zeros((len(PROMPTS), t), bool)
    for i, p in enumerate(PROMPTS):
        at = slice(t - len(p), t) if left else slice(0, len(p))
        ids[i, at], mask[i, at] = p, True
    return jnp.asarray(ids), jnp.asarray(mask)


def test_left_padded_prompts_under_cudnn_equal_xla(tiny_pair, xla_for_cudnn):
    _, model, variables = tiny_pair
    cudnn = Qwen2(dataclasses.replace(model.config, attention_impl="cudnn"))
    keys = jax.random.split(jax.random.key(5), len(PROMPTS))
    sampling = SamplingConfig(greedy=False, temperature=1.0, top_p=0.9)
    want = generate(model, variables, input_ids=_padded(False)[0],
                    attention_mask=_padded(False)[1], keys=keys, max_new_tokens=6, sampling=sampling)
    for left in (False, True):
        ids, mask = _padded(left)
        got = generate(cudnn, variables, input_ids=ids, attention_mask=mask, keys=keys,
                       max_new_tokens=6, sampling=sampling)
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
        np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-4)
        embeds = variables["params"]["embed_tokens"]["embedding"][ids]     # the captioner's form
        got = generate(cudnn, variables, inputs_embeds=embeds, attention_mask=mask, keys=keys,
                       max_new_tokens=6, sampling=sampling)
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
