"""video-SALMONN 2 at the paper's shapes: LLaVA-OneVision Qwen2-7B, SigLIP-so400m, Whisper-large-v3.

The shapes are those of the released checkpoints' config.json files (lmms-lab/llava-onevision-qwen2-7b-ov,
openai/whisper-large-v3) and the paper's Q-Former; README "Use the released weights" loads them.
"""

from vsalmonn_jax.defaults import base_config


def get_config():
    c = base_config()
    c.model.llm.update(dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position_embeddings=32768))
    c.model.lora.update(dict(rank=128, alpha=256.0, dropout=0.05))
    c.model.vision.update(dict(   # SigLIP so400m-patch14-384
        hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16,
        image_size=384, patch_size=14, layer_norm_eps=1e-6, select_layer=-2))
    c.model.audio.update(dict(    # Whisper-large-v3 encoder
        num_mel_bins=128, d_model=1280, num_layers=32, num_heads=20, ffn_dim=5120,
        max_source_positions=1500))
    c.model.qformer.update(dict(hidden_size=768, num_layers=2, num_heads=12,
                                intermediate_size=3072, window=25, num_queries=1, dropout=0.1))
    # the input format the released weights were trained on (docs/recipe.md "Input format");
    # the clean forms: interleave=timestamp, prompt_format=clean, time_tokens=none,
    # audio_cut=none, frame_sampling=grid, video_audio=track, qformer.dropout=0,
    # dpo.gt_ce_mean=tokens
    c.model.connector.interleave = "official"
    c.data.update(dict(prompt_format="official", time_tokens="official", audio_cut="video",
                       frame_sampling="file", video_audio="record"))
    c.dpo.gt_ce_mean = "rows"   # the release's DPO step: per row, CE-only rows at weight 1
    c.train.ce_mean = "rows"    # its SFT step likewise: each row's token mean, averaged over rows
    # its LoRA stages freeze speech_llama_proj (train.py re-enables LoRA, Q-Former, query tokens,
    # final_linear, mm_projector, image_newline only); stage 1 (7b_align) trains it
    c.train.frozen = ("adapter/audio_connector/audio_proj",)
    # caption --temperature / --top-p / --num-samples as the release's HF generate(do_sample=True,
    # top_p=0.9) samples: HF's GenerationConfig fills in top_k 50 (greedy by default, as the release)
    c.generate.top_k = 50
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    return c
