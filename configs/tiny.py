"""Tiny shapes for tests and the CPU demo: every part of the 7B model, a few thousand times smaller.

fp32 everywhere so that parity tests against PyTorch hold to 1e-5.
"""

from vsalmonn_jax.defaults import base_config


def get_config():
    c = base_config()
    c.model.llm.update(dict(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6,
        max_position_embeddings=4096, dtype="float32", param_dtype="float32",
        remat_policy="none"))
    c.model.lora.update(dict(rank=8, alpha=16.0, dropout=0.0))
    c.model.vision.update(dict(
        hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
        image_size=56, patch_size=14, frame_chunk=4))
    c.model.audio.update(dict(
        num_mel_bins=16, d_model=32, num_layers=2, num_heads=4, ffn_dim=64,
        max_source_positions=1500, chunk_batch=2))
    c.model.qformer.update(dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64))
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    c.train.update(dict(lr=1e-3, num_steps=20, log_every=1, eval_every=10, checkpoint_every=10))
    return c
