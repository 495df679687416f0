"""vsalmonn_jax: video-SALMONN 2 (audio-visual captioning LLM, SFT + multi-round DPO) in JAX/Flax.

Import submodules directly (`vsalmonn_jax.models.qwen2`, `vsalmonn_jax.lora`, ...); this file is light.
"""

__version__ = "0.1.0"
