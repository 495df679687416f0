"""vsalmonn_jax: video-SALMONN 2 (audio-visual captioning LLM, SFT + multi-round DPO) in JAX/Flax.

Import submodules directly (`vsalmonn_jax.models.qwen2`, `vsalmonn_jax.lora`, ...); this file is light:
`from vsalmonn_jax import Captioner` (the captioning API, vsalmonn_jax/api.py) imports on first use.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Captioner":
        from vsalmonn_jax.api import Captioner

        return Captioner
    raise AttributeError(f"module 'vsalmonn_jax' has no attribute {name!r}")
