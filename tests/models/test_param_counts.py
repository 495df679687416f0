"""`jax.eval_shape` of the 7B config: total and trainable parameter counts, cross-checked against the
same modules built by `transformers` on the meta device (no memory), and every logical axis known."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
    WhisperConfig,
    WhisperModel,
)

from vsalmonn_jax.config import load_config
from vsalmonn_jax.lora import LoraConfig, count_params, init_lora
from vsalmonn_jax.models.av_llm import AVLLM, AVConfig, dummy_batch
from vsalmonn_jax.training.sharding import LOGICAL_AXIS_RULES

# LoRA r=128 on q,k,v of 28 layers: 55,050,240; connectors (adapter): 65,916,672
TRAINABLE_7B = 120_966_912


def _torch_count(module, skip=()):
    return sum(p.numel() for n, p in module.named_parameters() if not n.startswith(skip))


@pytest.fixture(scope="module")
def shapes():
    cfg = AVConfig.from_config(load_config("7b"), placeholder_id=151646)
    abstract = jax.eval_shape(AVLLM(cfg).init, jax.random.PRNGKey(0), dummy_batch(cfg))
    return cfg, abstract


def test_7b_counts_match_transformers_modules(shapes):
    cfg, abstract = shapes
    assert cfg.frame_tokens == 182 and cfg.audio_tokens_per_chunk == 60
    assert cfg.audio_tokens_per_second == 2.0 and cfg.vision.used_layers == 26
    # the release's interleave (configs/7b.py): room for the audio interpolated up to a multiple
    # of the frame count, one slot per frame more than the 20,260 of the timestamp mode
    assert cfg.interleave == "official" and cfg.media_length(110, 4) == 110 * 182 + 240 + 110
    assert dataclasses.replace(cfg, interleave="timestamp").media_length(110, 4) == 110 * 182 + 240
    params, adapter = abstract["params"], abstract["adapter"]
    with torch.device("meta"):
        qwen = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False))
        siglip = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
            image_size=384, patch_size=14))
        whisper = WhisperModel(WhisperConfig(
            num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
            encoder_ffn_dim=5120, decoder_layers=1, decoder_attention_heads=20, vocab_size=8, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, decoder_start_token_id=1)).encoder
        qformer = Blip2QFormerModel(Blip2QFormerConfig(
            hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
            encoder_hidden_size=1280, cross_attention_frequency=1, vocab_size=8))
    llm = _torch_count(qwen)
    assert llm == 7_615_616_512  # Qwen2-7B
    assert count_params(params["llm"]) == llm
    # SigLIP-so400m with the last layer dropped (26 of 27), no post-layernorm, no head
    assert count_params(params["vision"]) == _torch_count(siglip, ("vision_model.post_layernorm",
                                                                    "vision_model.head",
                                                                    "post_layernorm", "head"))
    # Whisper-large-v3 encoder + ln_speech (2 * 1280)
    assert count_params(params["audio"]) == _torch_count(whisper) + 2 * 1280
    h = 3584
    projector = 1152 * h + h + h * h + h
    audio_head = 768 + 768 * h + h + 2 * (h * h + h)  # query + audio_proj + final_linear
    assert count_params(adapter["vision_connector"]) == projector + h  # + image_newline
    assert count_params(adapter["audio_connector"]) == _torch_count(qformer) + audio_head
    total = count_params(params) + count_params(adapter)
    assert total == 7_615_616_512 + count_params(params["vision"]) + count_params(params["audio"]) \
        + count_params(adapter)
    lora = LoraConfig.from_config(load_config("7b").model.lora)
    lora_tree = jax.eval_shape(lambda p: init_lora(jax.random.PRNGKey(0), p, lora), params["llm"])
    assert count_params(lora_tree) == 28 * (2 * h * 128 + 2 * (h * 128 + 128 * 512))
    trainable = count_params(lora_tree) + count_params(adapter)
    print(f"7B AV model: total {total:,} frozen {count_params(params):,} trainable {trainable:,}")
    assert total == 8_716_250_144 and trainable == TRAINABLE_7B


def test_every_logical_axis_has_a_rule(shapes):
    _, abstract = shapes
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    specs = nn.get_partition_spec(abstract)
    used = {a for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(
        x, jax.sharding.PartitionSpec)) for a in spec if a is not None}
    assert used <= known, used - known
    assert np.all([isinstance(x, nn.LogicallyPartitioned)
                   for x in jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(
                       x, nn.LogicallyPartitioned))])
