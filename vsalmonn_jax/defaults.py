"""Defaults shared by every preset: training, DPO, mrDPO, generation, evaluation, data, mesh.

Size presets in `configs/` (`tiny.py`, `7b.py`, ...) start from `base_config()` and set shapes.
"""

import ml_collections

from vsalmonn_jax.data.synthetic_scene import default_config as synthetic_defaults

# fields added after runs and caches were saved without them, with the behaviour those had: a
# resumed run compares a missing field with this value (training/run_config.py), and cache keys
# leave the field out at it (data/example.py, demo/data.py), so older entries keep their keys
LEGACY_VALUES = {
    "data.video_audio": "track",
    "mrdpo.unfinished": "collapsed",
    "train.frozen": (),
    "train.ce_mean": "tokens",
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 2024
    c.stage = "sft"  # align | sft | dpo | mrdpo | rebirth
    c.workdir = "runs/default"  # `train --workdir DIR` sets it; config.json there records the run

    # ---- model (shapes are set by the size presets) ----
    c.model = ml_collections.ConfigDict()
    c.model.llm = ml_collections.ConfigDict(dict(
        vocab_size=0, hidden_size=0, intermediate_size=0, num_layers=0, num_heads=0,
        num_kv_heads=0, head_dim=0, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=False,
        dtype="bfloat16",         # compute dtype (fp32 for parity tests)
        param_dtype="bfloat16",   # frozen base weights
        scan_layers=True,         # nn.scan over decoder layers (compile time independent of depth)
        # per-layer nn.remat: none | full (save nothing; the default, fits every mesh in launch/) |
        # dots (save matmul outputs) | dots_all | save_names (keep remat_names, recompute the rest) |
        # offload_names (remat_names to pinned host memory until the backward; needs a backend
        # with a pinned_host memory space: TPU, GPU, and CPU in jax 0.10). `plan` compiles each.
        remat_policy="full",
        remat_names=("attention_out", "mlp_in"),  # attention output before o_proj; normed MLP input
        attention_impl="auto",    # auto (splash on TPU, cudnn on GPU, xla on CPU) | xla (blockwise
                                  # flash kernel, any device, every mask) | splash (TPU Pallas: causal,
                                  # padding, segments) | cudnn (GPU fused: causal, right padding)
        attention_block=512,      # query/key block of the xla and splash kernels (memory O(T * block))
    ))
    c.model.lora = ml_collections.ConfigDict(dict(
        # dropout: on the LoRA input only; its mask is redrawn from the rng key in the backward, never stored
        rank=128, alpha=256.0, dropout=0.05, targets=("q_proj", "k_proj", "v_proj")))
    c.model.vision = ml_collections.ConfigDict(dict(   # SigLIP vision tower
        hidden_size=0, intermediate_size=0, num_layers=0, num_heads=0, image_size=384,
        patch_size=14, layer_norm_eps=1e-6, select_layer=-2, frame_chunk=16,
        position_init_std=0.02))   # learned positions at random init (real weights replace them)
    c.model.audio = ml_collections.ConfigDict(dict(    # Whisper encoder
        num_mel_bins=128, d_model=0, num_layers=0, num_heads=0, ffn_dim=0,
        max_source_positions=1500, chunk_seconds=30, chunk_batch=4))
    c.model.qformer = ml_collections.ConfigDict(dict(  # window-level Q-Former (BLIP-2 style)
        hidden_size=768, num_layers=2, num_heads=12, intermediate_size=3072,
        layer_norm_eps=1e-12, window=25, num_queries=1,
        initializer_range=0.02,    # kernels at init; tiny widths need ~1/sqrt(width) (configs/demo.py)
        dropout=0.0))              # BERT-style dropout (query embeddings, attention probabilities,
                                   # attention and FFN outputs) when training; 0 at inference.
                                   # release: 0.1 (configs/7b.py); 0 = off (clean, parity tests)
    c.model.connector = ml_collections.ConfigDict(dict(
        pool_mode="max",          # max | average | bilinear
        pool_stride=2,
        initializer_range=0.02,   # vision projector kernels at init (HF default)
        newline="grid",           # grid: image_newline per row of pooled tokens (video-SALMONN 2) |
                                  # video: one after the media (LLaVA-OneVision video path) | none
        interleave="timestamp",   # timestamp (clean) | official (the release: nearest-interpolation
                                  # QUIRK; configs/7b.py)
        cell_embedding=False,     # a learned vector per pooled cell added to its tokens (not in the
                                  # release: docs/recipe.md, what blocks moves)
        placeholder_token="<media>",
    ))

    # pretrained weights (models/pretrained.py; `vsalmonn-jax check-weights` inspects them). Empty =
    # random init from `seed` (smoke tests only). Later sources win: llava < whisper < official.
    c.model.pretrained = ml_collections.ConfigDict(dict(
        llava="",      # LLaVA-OneVision Qwen2 dir (HF format, transformers or original LLaVA names):
                       # SigLIP, projector, image_newline, Qwen2 (e.g. llava-onevision-qwen2-7b-ov)
        whisper="",    # Whisper dir, encoder tensors (e.g. whisper-large-v3)
        official="",   # the video-SALMONN 2 release: dir or file, safetensors or torch .bin
        tokenizer="",  # used when data.tokenizer is empty; default: the official dir's, else llava's
    ))

    # ---- data ----
    c.data = ml_collections.ConfigDict(dict(
        root="", train="", val="", test="", tokenizer="",
        fps=1.0, max_frames=110, sample_rate=16000, min_audio_seconds=1.0,
        missing_audio="silence",  # silence (+ flag) | error
        # first (official: channel 0; warns when it is silent but others are not) | mean (all
        # channels averaged) | dialogue (the centre channel of 5.1 / 7.1, where speech is mixed;
        # the mean for mono / stereo)
        audio_channel="first",
        # positions of text + media (the media counted once decoded); past it: error (quarantine)
        # | truncate_response (the release cuts its embedded sequence at model_max_length 32768)
        max_length=32768, truncation="error",
        # the release's input format (configs/7b.py sets it; docs/recipe.md "Input format"):
        prompt_format="clean",    # clean: `<media>\nprompt` (one newline) | official: the release's
                                  # `user\n<media>\n` + tokens of "\n" + prompt (two newline tokens)
        time_tokens="none",       # none | official: per-frame time tokens (str(round(T / F * i, 1))
                                  # after frame i's visual tokens) for video WITHOUT audio only |
                                  # all: for every video, audio-visual too (not in the release)
        audio_cut="none",         # none: the whole track | video: cut to the video's duration, as
                                  # the release's data loader does (no extra 30-s chunk for a track
                                  # slightly longer than the video); audio-only records to
                                  # max_frames / fps seconds (the release's max_time, 110 s)
        video_audio="track",      # track: a video record without "audio" takes its file's own
                                  # track | record = the release: only the record's "audio" field
                                  # (without it the record is visual-only: time tokens under
                                  # time_tokens=official); files named to `caption` keep their track
        frame_sampling="grid",    # grid: the first frame at each 1/fps s, above max_frames evenly
                                  # over that grid | file = the release: every round(file fps /
                                  # fps)-th frame, above max_frames linspace over ALL its frames
        batch_size=1, num_workers=0, shuffle_seed=2024, max_failure_share=0.05,
        length_buckets=(), encoder_cache="",
        quarantine="quarantine.jsonl",  # failed records; a relative path goes under the workdir
    ))
    c.data.synthetic = synthetic_defaults()  # the synthetic data set's generator and SFT biases

    # ---- optimisation (official recipe) ----
    c.train = ml_collections.ConfigDict(dict(
        lr=2e-5, warmup_ratio=0.03, schedule="cosine", weight_decay=0.0, b1=0.9, b2=0.999,
        eps=1e-8, grad_clip=1.0, grad_accum=1,
        num_steps=1000,   # loop steps of a stage (micro-batches with grad_accum > 1)
        epochs=0,         # > 0: passes over data.train's records instead (num_steps derived from them)
        log_every=10, eval_every=500, checkpoint_every=500, keep_checkpoints=3,
        on_nan="stop",  # stop | skip
        trainable=("lora", "adapter"),
        frozen=(),          # paths inside the trainables kept as loaded, e.g.
                            # "adapter/audio_connector/audio_proj" (the 7B LoRA stages, as the release)
        ce_mean="tokens",   # SFT CE: tokens (mean over the batch's target tokens) | rows (each row's
                            # token mean, then over rows: the release, one row per device)
        logits_chunk=1024,  # lm_head + log-softmax over this many positions at a time (0 = all)
        feature_cache="",   # folder: cache the frozen SigLIP/Whisper outputs per example ("" = off)
    ))
    c.dpo = ml_collections.ConfigDict(dict(
        beta=0.1, loss_type="sigmoid", label_smoothing=0.0, gt_ce_weight=0.1,
        # tokens: mean DPO + weight x CE pooled over the batch's GT tokens | rows: the release's step
        # (one row per device): per row DPO + weight x its GT token-mean CE, a CE-only row CE x 1
        gt_ce_mean="tokens",
        reference="snapshot",  # snapshot | lora_disabled (official QUIRK)
        # mrDPO: the round's reference log-probs are computed once with its pairs and stored
        # (round_<r>/reference.jsonl); False = the reference forward runs in every step
        precompute_reference=True,
        shared_prefix=True))    # one packed row per pair [prompt+media | chosen | rejected | GT]
    c.mrdpo = ml_collections.ConfigDict(dict(
        rounds=3, steps_per_round=1000, samples_per_video=2, pair_rule="total",
        drop_ties=True, judge="exact",
        # training/pairs.py: total | miss_weighted (miss_weight x M + I + H) | dominance (no worse
        # on M, I and H each); best_worst | all pairs
        miss_weight=2.0, pair_mode="best_worst", min_margin=0.0,
        # NOT in the paper: keep only pairs whose captions differ by <= this many sentences
        # (a length-controlled pair rule against "shorter wins"); -1 = off
        max_length_gap=-1,
        # sampling the k captions per video (official: top-p 0.9, T 1.0 and transformers 4.39's
        # default top_k 50: configs/7b_mrdpo.py); max_new_tokens 0 = generate.max_new_tokens
        top_p=0.9, temperature=1.0, top_k=0, max_new_tokens=0,
        videos_per_round=0,       # 0 = all training videos every round; N = a fresh slice of N
        batch_size=0,             # pairs per step over the mesh; 0 = data.batch_size per data x fsdp
        gt_guidance=True,         # pair records carry the GT caption for the dpo.gt_ce_weight CE
        ce_only_records=False,    # videos without a pair still give a GT-only (CE) record
        unfinished="collapsed",   # a rejected sample that never stopped trains as judged: repeats
                                  # collapsed + <|im_end|> | as_sampled: its full text, no end
                                  # token (DPO pushes down the loop itself); not in the release
        sample_batch=8,           # captions generated per batch (AV env; padded to the mesh)
        media_cache_gb=4.0,       # decoded clips kept per host for reuse (AV env; least recent
                                  # dropped first; ~55 MB per 110-frame clip)
        control=False))           # control arm: the same rounds with the DPO term off (GT CE only)
    c.rebirth = ml_collections.ConfigDict(dict(
        non_caption_ratio=0.3,    # share of non-caption (e.g. QA) records in the rebirth SFT mix
        num_steps=0,              # 0 = train.num_steps
        mrdpo_workdir="",         # the mrDPO run: rounds/0 = pre-DPO model, rounds/<R> = final
        non_caption_data=""))     # SFT JSONL of the non-caption (QA) conversations to mix in
    c.generate = ml_collections.ConfigDict(dict(
        max_new_tokens=1024, temperature=1.0, top_p=0.9, top_k=0, greedy=True,
        # HF's repetition penalty (greedy too; 1.0 = off): set it to the checkpoint's
        # generation_config.json value to decode as the release did (caption / mrDPO warn otherwise)
        repetition_penalty=1.0,
        # the LLM's weights while decoding (generate/decode_layout.py): auto | gathered (once over
        # fsdp: no per-token all-gather of every layer) | train (as trained: fsdp-split)
        decode_layout="auto",
        prompt="Please describe the video in detail."))
    c.eval = ml_collections.ConfigDict(dict(
        judge="embedding", passes=7, llm_base_url="", llm_model="gpt-3.5-turbo-0125",
        llm_concurrency=4, cache_dir="",
        # llm judge (eval/llm_judge.py); the API key is read from these env variables, never config
        llm_api_key_env="VSALMONN_JUDGE_API_KEY,OPENAI_API_KEY", llm_temperature=0.0, llm_top_p=0.1,
        llm_max_retries=8, llm_fallback_retries=2, llm_backoff_s=1.0, llm_timeout_s=120.0,
        # a refused / unresolvable endpoint: this many probes (seconds), then the run stops
        llm_connect_retries=2,
        llm_json_mode=True,
        # embedding judge (eval/embedding.py); fit with `vsalmonn-jax eval calibrate`
        embedding_model="", embedding_match_threshold=0.5, embedding_correct_threshold=0.65,
        embedding_cover_threshold=0.65, embedding_number_rule="unmatched", embedding_negation_rule=True,
        embedding_clauses=True, embedding_threads=1))

    # ---- parallelism: mesh (data, fsdp, context, tensor); -1 = all remaining devices ----
    # context > 1 splits each sequence over that many devices (load-balanced causal layout, K/V
    # all-gathered in attention) for SFT, DPO and the reference; decode stays replicated over it.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1))
    return c
