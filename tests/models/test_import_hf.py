"""Checkpoint import: LLaVA-OneVision (SigLIP + projector + image_newline + Qwen2) and Whisper from
local `transformers` directories, and the official video-SALMONN 2 state dict (DeepSpeed + PEFT
names, LAVIS Q-Former) rebuilt here from the names in its published source."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import llava_model, official_state_dict
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    WhisperConfig,
    WhisperModel,
)

from vsalmonn_jax.config import load_config
from vsalmonn_jax.models import import_hf
from vsalmonn_jax.models.av_llm import AVLLM, AVConfig, dummy_batch, init_variables

PH = 7


@pytest.fixture(scope="module")
def cfg():
    config = load_config("tiny", ["model.audio.max_source_positions=150",
                                  "model.audio.chunk_seconds=3"])
    return AVConfig.from_config(config, placeholder_id=PH)


@pytest.fixture(scope="module")
def torch_parts(cfg):
    torch.manual_seed(0)
    a, q = cfg.audio, cfg.qformer
    llava = llava_model(load_config("tiny"), seed=0, std=None)
    whisper = WhisperModel(WhisperConfig(
        num_mel_bins=a.num_mel_bins, d_model=a.d_model, encoder_layers=a.num_layers,
        encoder_attention_heads=a.num_heads, encoder_ffn_dim=a.ffn_dim, decoder_layers=1,
        decoder_attention_heads=a.num_heads, max_source_positions=a.max_source_positions,
        vocab_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1)).eval()
    qformer = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=q.hidden_size, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
        intermediate_size=q.intermediate_size, encoder_hidden_size=a.d_model,
        cross_attention_frequency=1, vocab_size=8)).eval()
    return llava, whisper, qformer


def _flat_equal(ours, expected):
    flat_o = dict(jax.tree_util.tree_flatten_with_path(ours)[0])
    flat_e = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    assert flat_o.keys() == flat_e.keys()
    for k in flat_o:
        np.testing.assert_array_equal(np.asarray(flat_o[k]), np.asarray(flat_e[k]), err_msg=str(k))


def test_llava_onevision_and_whisper_directories(cfg, torch_parts, tmp_path):
    llava, whisper, _ = torch_parts
    llava.save_pretrained(tmp_path / "llava")
    whisper.save_pretrained(tmp_path / "whisper")
    loaded = import_hf.merge_variables(import_hf.load_llava_onevision(tmp_path / "llava", cfg),
                                       import_hf.load_whisper(tmp_path / "whisper", cfg))
    init = nn.unbox(jax.eval_shape(lambda: init_variables(jax.random.PRNGKey(0), cfg)))
    shapes = lambda t: jax.tree.map(lambda x: x.shape, t)
    assert shapes(loaded["params"]) == shapes(init["params"])
    assert shapes(loaded["adapter"]["vision_connector"]) == shapes(init["adapter"]["vision_connector"])
    # the whole starting point: fresh connectors (seeded) + fresh LoRA, checked against the model
    full = import_hf.load_pretrained(cfg, jax.random.PRNGKey(3), llava=tmp_path / "llava",
                                     whisper=tmp_path / "whisper", lora=_lora(cfg))
    assert set(full) == {"params", "adapter", "lora"}
    assert shapes(full["adapter"]["audio_connector"]) == shapes(init["adapter"]["audio_connector"])
    with pytest.raises(KeyError, match="whisper"):
        import_hf.load_pretrained(cfg, jax.random.PRNGKey(3), llava=tmp_path / "llava")
    # the LLM answers exactly like transformers' language model
    ids = np.array([[3, 9, 27, 81, 4]], np.int32)
    with torch.no_grad():
        expected = llava(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    logits = AVLLM(cfg).apply({"params": loaded["params"]}, jnp.asarray(ids),
                              method=lambda m, x: m.llm(x)[0])
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(loaded["adapter"]["vision_connector"]["image_newline"]),
                                  llava.model.image_newline.detach().numpy())


@pytest.mark.slow
def test_official_release_state_dict(cfg, torch_parts, tmp_path):
    llava, whisper, qformer = torch_parts
    sd = official_state_dict(load_config("tiny"), llava, whisper, qformer)
    torch.save(sd, tmp_path / "all_parameters.bin")
    loaded = import_hf.load_official(tmp_path / "all_parameters.bin", cfg)
    init = nn.unbox(jax.eval_shape(lambda: init_variables(jax.random.PRNGKey(0), cfg, _lora(cfg))))
    shapes = lambda t: jax.tree.map(lambda x: x.shape, t)
    for collection in ("params", "adapter", "lora"):
        assert shapes(loaded[collection]) == shapes(init[collection]), collection
    # LAVIS-named Q-Former == the same weights through the transformers BLIP-2 names
    _flat_equal(loaded["adapter"]["audio_connector"]["qformer"],
                import_hf.qformer_params(import_hf.Source(qformer.state_dict()), cfg.qformer, "hf"))
    a = loaded["lora"]["llm"]["layers"]["self_attn"]["k_proj"]["a"]
    np.testing.assert_array_equal(np.asarray(a[1]), sd[
        "module.base_model.model.model.layers.1.self_attn.k_proj.lora_A.default.weight"].numpy().T)
    np.testing.assert_array_equal(
        np.asarray(loaded["adapter"]["audio_connector"]["final_linear_1"]["kernel"]),
        sd["module.base_model.model.final_linear.2.weight"].numpy().T)
    # and the whole model runs on exactly these variables
    batch = dummy_batch(cfg, batch=1, frames=2, chunks=1, text_len=6)
    logits, _ = jax.jit(AVLLM(cfg, _lora(cfg)).apply)(loaded, batch)
    assert np.all(np.isfinite(np.asarray(logits)))


def _lora(cfg):
    from vsalmonn_jax.lora import LoraConfig

    return LoraConfig(rank=4, alpha=8.0, dropout=0.0)


def test_missing_tensor_is_named(cfg):
    with pytest.raises(KeyError, match="embeddings.patch_embedding.weight"):
        import_hf.siglip_params(import_hf.Source({"foo": np.zeros(1)}), cfg.vision)
    assert dataclasses.is_dataclass(cfg)


def test_bf16_safetensors_directory_streams(cfg, tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    v = cfg.vision
    model = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
        patch_size=v.patch_size)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "siglip")
    params = import_hf.siglip_params(import_hf.Source(tmp_path / "siglip"), v)
    fc1 = params["layers"]["fc1"]["kernel"]
    assert fc1.dtype == "bfloat16" and fc1.shape == (v.used_layers, v.hidden_size, v.intermediate_size)
    np.testing.assert_array_equal(fc1[1].astype(np.float32),
                                  model.encoder.layers[1].mlp.fc1.weight.detach().float().numpy().T)


def test_release_checkpoint_files_load_as_the_release_does(tmp_path, capsys):
    """A release output folder holds all_parameters.bin + checkpoint-N.bin per saved step: the
    folder merged every .bin in name order (checkpoint-2000 after checkpoint-15475); a single
    checkpoint-N.bin (the trained tensors only) was loaded without its all_parameters.bin."""
    from vsalmonn_jax.models.import_release import open_official
    from vsalmonn_jax.safetensors_io import CheckpointError

    torch.save({"frozen": torch.ones(2), "lora": torch.zeros(2)}, tmp_path / "all_parameters.bin")
    torch.save({"lora": torch.full((2,), 15475.0)}, tmp_path / "checkpoint-15475.bin")
    state = open_official(tmp_path / "checkpoint-15475.bin")
    assert float(state["frozen"][0]) == 1.0 and float(state["lora"][0]) == 15475.0
    assert float(open_official(tmp_path)["lora"][0]) == 15475.0      # one step: that one
    torch.save({"lora": torch.full((2,), 2000.0)}, tmp_path / "checkpoint-2000.bin")
    with pytest.raises(CheckpointError, match="holds 2 release checkpoints"):
        open_official(tmp_path)
    assert float(open_official(tmp_path / "checkpoint-2000.bin")["lora"][0]) == 2000.0
    (tmp_path / "all_parameters.bin").unlink()
    assert set(open_official(tmp_path / "checkpoint-2000.bin")) == {"lora"}
    assert "no all_parameters.bin is beside it" in capsys.readouterr().err


def test_an_untied_output_layer_under_a_tied_config_is_an_error(capsys):
    """A config tying the embeddings never reads a stored lm_head.weight: the logits silently used
    the embedding (then only a warning); now a stored head that differs from the embedding is an
    error naming the tensor and the flag; one equal to it (a tied model saved whole) is fine."""
    import dataclasses

    from vsalmonn_jax.models.import_hf import Source, qwen2_plan
    from vsalmonn_jax.models.qwen2 import Qwen2Config
    from vsalmonn_jax.safetensors_io import CheckpointError

    cfg = dataclasses.replace(Qwen2Config.from_config(load_config("tiny").model.llm), tie_word_embeddings=True)
    embed = np.arange(cfg.vocab_size * cfg.hidden_size, dtype=np.float32).reshape(cfg.vocab_size, -1)
    head = embed.copy()
    head[-1, -1] += 1.0      # differs in the very last value (the last row block)
    for missing in ([], None):
        with pytest.raises(CheckpointError, match=r"'lm_head.weight' that differs from "
                           r"'model.embed_tokens.weight'.*tie_word_embeddings=False"):
            qwen2_plan(Source({"model.embed_tokens.weight": embed, "lm_head.weight": head}), cfg,
                       missing=missing)
    qwen2_plan(Source({"model.embed_tokens.weight": embed, "lm_head.weight": embed.copy()}), cfg,
               missing=[])
    qwen2_plan(Source({"model.embed_tokens.weight": embed}), cfg, missing=[])
    assert capsys.readouterr().err == ""
