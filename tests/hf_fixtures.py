"""Tiny Hugging Face checkpoints built offline for the weight-loading tests: LLaVA-OneVision (both
tensor-name layouts), Whisper and the official video-SALMONN 2 state dict, shaped like a config.

`llava_dir` / `whisper_dir` save with `save_pretrained` (safetensors, sharded with an index) and put
a tiny Qwen2-style tokenizer (ChatML specials + the media placeholder) beside the LLaVA weights.
"""

from __future__ import annotations

import pathlib

import torch

CORPUS = ["Please describe the video in detail.", "At 1 s, a red square moves left.",
          "At 2 s, a low beep sounds.", "A blue circle appears and a high tone plays.",
          "The camera pans over a quiet street while a dog barks twice."] * 4
VIDEO_TOKEN = 3        # the tokenizer's "<media>" id (tokenizer_build: specials 0..3)
IMAGE_TOKEN = None     # set per config: the last vocabulary id (never produced by the tokenizer)


def llava_model(config, seed: int = 0, std: float | None = 0.2):
    """A random LlavaOnevisionForConditionalGeneration with config.model's vision / LLM shapes;
    weights drawn N(0, std) (norm scales 1 + noise) so greedy captions depend on every tensor
    (std=None: transformers' own init)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    m = config.model
    v, llm = m.vision, m.llm
    torch.manual_seed(seed)
    hf = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=v.hidden_size,
                           intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                           num_attention_heads=v.num_heads, image_size=v.image_size,
                           patch_size=v.patch_size, hidden_act="gelu_pytorch_tanh",
                           layer_norm_eps=v.layer_norm_eps),
        text_config=dict(model_type="qwen2", vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
                         intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
                         num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
                         head_dim=llm.head_dim, rope_theta=llm.rope_theta,
                         rms_norm_eps=llm.rms_norm_eps, tie_word_embeddings=False,
                         max_position_embeddings=llm.max_position_embeddings),
        vision_feature_layer=-2, vision_feature_select_strategy="full",
        video_token_index=VIDEO_TOKEN, image_token_index=int(llm.vocab_size) - 1,
        tie_word_embeddings=False)
    model = LlavaOnevisionForConditionalGeneration(hf).eval().float()
    if std is None:
        return model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layer_norm1.weight") \
                    or name.endswith("layer_norm2.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return model


def save_tokenizer(out: str | pathlib.Path):
    from vsalmonn_jax.data.tokenizer_build import build_tokenizer

    return build_tokenizer(CORPUS, str(out), vocab_size=300)


def original_llava_names(state: dict) -> dict:
    """transformers LlavaOnevision names -> the original LLaVA layout (model.layers, model.vision_tower.
    vision_tower.vision_model, model.mm_projector.{0,2}, model.image_newline, lm_head)."""
    out = {}
    for k, t in state.items():
        if k.startswith("model.vision_tower."):
            k = "model.vision_tower.vision_tower.vision_model." + k[len("model.vision_tower."):] \
                if not k.startswith("model.vision_tower.vision_model.") else \
                "model.vision_tower.vision_tower." + k[len("model.vision_tower."):]
        elif k.startswith("model.multi_modal_projector."):
            k = k.replace("multi_modal_projector.linear_1", "mm_projector.0").replace(
                "multi_modal_projector.linear_2", "mm_projector.2")
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        out[k] = t
    return out


def llava_dir(out: str | pathlib.Path, config, seed: int = 0, layout: str = "transformers",
              max_shard_size: str = "40KB") -> pathlib.Path:
    """Save a random tiny LLaVA-OneVision (+ tokenizer) to `out`; layout "transformers" (save_pretrained,
    sharded safetensors with an index) or "original" (original LLaVA names, one safetensors file)."""
    out = pathlib.Path(out)
    model = llava_model(config, seed)
    if layout == "transformers":
        model.save_pretrained(out, max_shard_size=max_shard_size)
    elif layout == "original":
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in original_llava_names(model.state_dict()).items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        raise ValueError(layout)
    save_tokenizer(out)
    return out


def whisper_model(config, seed: int = 0):
    from transformers import WhisperConfig, WhisperModel

    a = config.model.audio
    torch.manual_seed(seed)
    return WhisperModel(WhisperConfig(
        num_mel_bins=a.num_mel_bins, d_model=a.d_model, encoder_layers=a.num_layers,
        encoder_attention_heads=a.num_heads, encoder_ffn_dim=a.ffn_dim, decoder_layers=1,
        decoder_attention_heads=a.num_heads, decoder_ffn_dim=a.ffn_dim,
        max_source_positions=a.max_source_positions, vocab_size=8, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1)).eval()


def whisper_dir(out: str | pathlib.Path, config, seed: int = 0,
                max_shard_size: str = "40KB") -> pathlib.Path:
    whisper_model(config, seed).save_pretrained(out, max_shard_size=max_shard_size)
    return pathlib.Path(out)


def official_state_dict(config, llava, whisper, qformer=None, rank: int = 4, seed: int = 1) -> dict:
    """The names the official code saves: DeepSpeed `module.` + PEFT `base_model.model.`, LoRA on
    q/k/v as `base_layer` + `lora_A/B.default`, LLaVA-NeXT vision / projector names, LAVIS Q-Former
    (from a transformers Blip2QFormerModel `qformer`, or random when None)."""
    m = config.model
    sd = {}
    for k, t in original_llava_names(llava.state_dict()).items():
        if k.startswith("model.layers.") and any(f"self_attn.{p}." in k for p in ("q_proj", "k_proj",
                                                                                     "v_proj")):
            k = k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        sd["module.base_model.model." + k] = t
    g = torch.Generator().manual_seed(seed)
    llm = m.llm
    for i in range(llm.num_layers):
        for p, out in (("q_proj", llm.num_heads * llm.head_dim),
                       ("k_proj", llm.num_kv_heads * llm.head_dim),
                       ("v_proj", llm.num_kv_heads * llm.head_dim)):
            base = f"module.base_model.model.model.layers.{i}.self_attn.{p}"
            sd[f"{base}.lora_A.default.weight"] = torch.randn(rank, llm.hidden_size, generator=g)
            sd[f"{base}.lora_B.default.weight"] = torch.randn(out, rank, generator=g)
    for k, t in whisper.encoder.state_dict().items():
        sd["module.base_model.model.speech_encoder." + k] = t
    d = m.audio.d_model
    sd["module.base_model.model.ln_speech.weight"] = torch.rand(d, generator=g) + 0.5
    sd["module.base_model.model.ln_speech.bias"] = torch.randn(d, generator=g)
    if qformer is None:
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        q = m.qformer
        torch.manual_seed(seed)
        qformer = Blip2QFormerModel(Blip2QFormerConfig(
            hidden_size=q.hidden_size, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
            intermediate_size=q.intermediate_size, encoder_hidden_size=d,
            cross_attention_frequency=1, vocab_size=8)).eval()
    for k, t in qformer.state_dict().items():  # transformers BLIP-2 -> LAVIS BERT names
        k = k.replace("layernorm.", "embeddings.LayerNorm.").replace(".attention.attention.",
                                                                    ".attention.self.")
        k = k.replace(".crossattention.attention.", ".crossattention.self.")
        sd["module.base_model.model.speech_Qformer.bert." + k] = t
    h, qh = llm.hidden_size, m.qformer.hidden_size
    sd["module.base_model.model.speech_query_tokens"] = torch.randn(1, int(m.qformer.num_queries), qh,
                                                                     generator=g)
    for name, shape in (("speech_llama_proj", (h, qh)), ("final_linear.0", (h, h)),
                        ("final_linear.2", (h, h))):
        sd[f"module.base_model.model.{name}.weight"] = torch.randn(*shape, generator=g)
        sd[f"module.base_model.model.{name}.bias"] = torch.randn(shape[0], generator=g)
    return sd
